"""When one GPU is not enough: FSDP + QLoRA across GPUs, predicted per GPU, checked, launched, read back.

Three pieces, each usable alone:
  estimate(model, gpus=2, cpu_offload=False, **setup)  the calculator per GPU (vram's terms, sharded)
  check(...)                                           the known failure points of FSDP + QLoRA, each with the fix
  launch(nproc, config, out_dir)                       start a distributed job (torchrun), show progress,
                                                       return what every rank wrote (peaks, step times, losses)

The run modelled and launched is the one PEFT's FSDP + QLoRA guide and Answer.AI's fsdp_qlora use:
FULL_SHARD, one process per GPU, every decoder layer its own FSDP unit and the LoRA layers units of their
own (peft's `fsdp_auto_wrap_policy`), `use_orig_params=False`, the 4-bit weights stored in bf16 containers
(`bnb_4bit_quant_storage=torch.bfloat16`) so FSDP can flatten and shard them with the bf16 norms and
embeddings, and no fp32 upcast (FSDP flattens one dtype per unit).

What FSDP does to the bytes of vram.estimate (N GPUs):
  sharded, 1/N per GPU   base weights (packed 4-bit codes included), LoRA parameters, their gradients and the
                         optimizer state; with CPU offload these live in CPU RAM instead (the optimizer steps there)
  whole on every GPU     the quantization constants (bitsandbytes' quant_state is not a parameter: not sharded),
                         activations, logits and temporaries of the local batch
  gathered for compute   the root unit (embeddings, final norm, lm_head: gathered at the start of forward and kept
                         until backward ends) and at most two decoder-layer units at a time (the one computing and
                         the prefetched next; `limit_all_gathers`), with the layer's full LoRA gradients in backward.
Shortcuts: no NCCL buffers (outside PyTorch's allocator: part of the device total's slack); loading is not
modelled per GPU (with `cpu_ram_efficient_loading` one rank reads the checkpoint into CPU RAM); one host.
"""

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from qlora_lab import models, paths, recipe, terms, vram
from qlora_lab.vram import Estimate

SHARDED = ("weights", "lora_params", "optimizer")  # persistent terms FSDP shards (gradients: see _shard)


def unit_bytes(setup: vram.Setup, sh) -> dict[str, int]:
    """Unsharded bytes of the FSDP units gathered for compute: the root and one decoder layer (base + LoRA).

    Example: unit_bytes(vram.Setup(prepare=False), shapes.of("llama-2-70b"))["layer"] / 2**20 -> 408.0 (MiB of 4-bit codes)
    """
    unsharded = replace(setup, prepare=False)  # FSDP flattens one dtype per unit: no fp32 upcast
    root = terms.outer_bytes(unsharded, sh)  # embeddings, lm_head, final norm
    layer = (terms.weight_bytes(unsharded, sh) - root) // sh.layers
    return {"root": root, "layer": layer, "layer_lora": terms.lora_bytes(setup, sh) // sh.layers}


def _shard(phase: str, bytes_by_term: dict, setup, sh, gpus: int, cpu_offload: bool) -> dict[str, int]:
    """One moment of the step as FSDP leaves it on each GPU: sharded terms / gpus (or on the CPU), units gathered."""
    out = dict(bytes_by_term)
    for name in SHARDED:
        if name in out:
            out[name] = 0 if cpu_offload else math.ceil(out[name] / gpus)
    grads = terms.gradient_bytes(setup, sh)
    kept = grads if setup.grad_accum > 1 else 0  # accumulated gradients of earlier micro-batches: sharded too
    local = 0 if cpu_offload else math.ceil((grads if phase == "optimizer" else kept) / gpus)
    units = unit_bytes(setup, sh)
    gathered = {"forward": units["root"], "loss-backward": units["root"] + units["layer"],
                "layer-forward": units["root"] + 2 * units["layer"],
                "layer-backward": units["root"] + 2 * units["layer"] + units["layer_lora"]}.get(phase, 0)
    out["gradients"] = local + (units["layer_lora"] if phase == "layer-backward" else 0)  # full grads before reduce-scatter
    out["all-gathered"] = gathered
    if phase == "optimizer" and cpu_offload:
        out["temporaries"] = 0  # the optimizer steps on the CPU
    return {k: v for k, v in out.items() if v}


def estimate(model="llama-2-70b", gpus: int = 2, cpu_offload: bool = False, device: str = "cuda", **kwargs) -> Estimate:
    """Per-GPU peak of an FSDP + QLoRA (or LoRA) step on `gpus` GPUs: an Estimate whose bytes are one GPU's.

    kwargs are vram.Setup's fields (batch is per GPU). host_bytes is the CPU RAM that offload holds (all ranks).
    gpus=1 without offload is the single-GPU estimate of the same setup, apart from the gathered units.
    Example:
    >>> e = estimate("llama-2-70b", gpus=2, batch=2, seq=2048, r=8, prepare=False)
    >>> round(e.peak_allocated_bytes / 2**30, 1), e.peak_phase
    (27.5, 'layer-backward')
    """
    if not isinstance(gpus, int) or gpus < 1:
        raise vram.SetupError(f"gpus must be a positive integer, got {gpus!r}")
    if kwargs.get("method", "qlora") == "full":
        raise vram.SetupError("FSDP is modelled for LoRA and QLoRA (method='lora' or 'qlora'), not full fine-tuning")
    single = vram.estimate(model, device=device, **kwargs)
    setup, sh = single.setup, single.shape
    phases = {name: _shard(name, t, setup, sh, gpus, cpu_offload)
              for name, t in vram.step_phases(setup, sh, device).items()}
    totals = {name: sum(t.values()) for name, t in phases.items()}
    peak = max(totals, key=totals.get)
    paged = 0 if cpu_offload else math.ceil(single.paged_bytes / gpus)
    host = (terms.weight_bytes(replace(setup, prepare=False), sh) + terms.lora_bytes(setup, sh)
            + terms.gradient_bytes(setup, sh) + sum(terms.optimizer_bytes(setup, sh))) if cpu_offload else 0
    est = Estimate(setup=setup, shape=sh, terms=phases[peak], phases=totals, peak_allocated_bytes=totals[peak],
                   peak_phase=peak, run_peak_bytes=totals[peak], run_peak_phase=peak, paged_bytes=paged,
                   warnings=[f"{p.problem} Fix: {p.fix}" for p in check(setup=setup, gpus=gpus)],
                   params=single.params, gpus=gpus, host_bytes=host)
    est.overhead_bytes = vram.CUDA_CONTEXT + int(vram.ALLOCATOR_SLACK * est.peak_allocated_bytes) if device == "cuda" else 0
    return est


@dataclass(frozen=True)
class Problem:
    """A known failure point of FSDP + QLoRA found in a configuration."""

    name: str  # short key, e.g. "quant_storage"
    problem: str  # what goes wrong, as users met it (with the error message where there is one)
    fix: str  # the setting that avoids it
    source: str  # where it was reported


def check(setup: vram.Setup | None = None, gpus: int = 2, quant_storage: str = "bf16", param_dtype: str | None = None,
          use_orig_params: bool = False, save_optimizer: bool = False, cpu_ram_bytes: float | None = None,
          gpu_bytes: float | None = None, cpu_offload: bool = False) -> list[Problem]:
    """The known failure points of an FSDP + QLoRA launch, each with the fix; [] when none applies.

    quant_storage: bnb_4bit_quant_storage; param_dtype: the dtype FSDP's mixed precision gives parameters
    (None: none set, the parameters' own); save_optimizer: the run saves checkpoints with optimizer state;
    cpu_ram_bytes / gpu_bytes: what the host and each GPU have (None: not checked).
    Example: [p.name for p in check(vram.Setup(), quant_storage="uint8")] -> ["quant_storage", "prepare_upcast"]
    """
    setup = setup or vram.Setup(prepare=False)
    found = []

    def add(*args):
        found.append(Problem(*args))

    qlora = setup.method == "qlora"
    if qlora and quant_storage != "bf16" and quant_storage != setup.compute_dtype:
        add("quant_storage", f"4-bit weights stored as {quant_storage}: FSDP cannot flatten them with the 16-bit norms "
            "('Must flatten tensors with uniform dtype', or 'Cannot flatten integer dtype tensors' for uint8).",
            f"BitsAndBytesConfig(bnb_4bit_quant_storage={recipe.DTYPES[setup.compute_dtype]}) and "
            "from_pretrained(dtype=) the same.", "peft#1432, axolotl#1494, PEFT FSDP guide")
    if qlora and param_dtype is not None and param_dtype != quant_storage:
        add("param_dtype", f"FSDP casts parameters to {param_dtype} while the 4-bit codes are stored as {quant_storage}: "
            "the packed codes are converted as if they were numbers: depending on the versions and sizes, a crash "
            "(a shape error when the codes are unpacked: lab 08 on a CPU) or training on what amounts to random "
            "weights, without an error.", "store the codes as bf16 (bnb_4bit_quant_storage) and set param_dtype to it; "
            "transformers' Trainer sets this itself for a quantized model", "answerdotai/fsdp_qlora README, accelerate#2544")
    if qlora and setup.prepare:
        add("prepare_upcast", "prepare_model_for_kbit_training upcasts norms and embeddings to fp32, so a decoder layer "
            "holds bf16 and fp32 tensors: 'Must flatten tensors with uniform dtype'.",
            "skip the upcast under FSDP (PEFT's FSDP example does; the autocast keeps the norms' math in fp32).",
            "PEFT FSDP guide, examples/sft")
    if use_orig_params:
        add("use_orig_params", "use_orig_params=True keeps each original parameter's view and its bookkeeping: the "
            "memory saving of sharding frozen weights is partly lost.", "fsdp_use_orig_params: false, with peft's "
            "fsdp_auto_wrap_policy so LoRA layers are their own units (else 'Must flatten tensors with uniform "
            "requires_grad').", "PEFT FSDP guide, peft#1702")
    if save_optimizer and recipe.optimizer(setup.optimizer).eight_bit:
        add("optimizer_save", f"{setup.optimizer} under FSDP fails when a checkpoint saves its state "
            "(FSDP.optim_state_dict cannot unflatten bitsandbytes' 8-bit state).",
            "optim='adamw_torch' (LoRA's state is small), or save_only_model=True", "PEFT FSDP guide, bitsandbytes#323")
    if cpu_ram_bytes is not None:
        need = terms.weight_bytes(replace(setup, method="lora", base_dtype=setup.compute_dtype), vram._arch(setup.model))
        if need > cpu_ram_bytes:
            add("cpu_ram", f"loading reads the 16-bit checkpoint: about {need / 2**30:.0f} GiB of CPU RAM on the loading "
                f"rank, more than the {cpu_ram_bytes / 2**30:.0f} GiB there.", "fsdp_cpu_ram_efficient_loading: true "
                "(only rank 0 loads) and a swap file for the rest.", "answerdotai/fsdp_qlora README, transformers#32276")
    if gpu_bytes is not None:
        fields = {k: v for k, v in setup.__dict__.items() if k != "model"}  # the Setup as estimate() keywords
        per_gpu = estimate(setup.model, gpus=gpus, cpu_offload=cpu_offload, **fields)
        if per_gpu.device_bytes > gpu_bytes:
            add("per_gpu_memory", f"even sharded over {gpus} GPUs a step of this configuration needs about "
                f"{per_gpu.device_bytes / 2**30:.1f} "
                f"GiB per GPU, more than the {gpu_bytes / 2**30:.1f} GiB each has.",
                "CPU offload (fsdp_offload_params), more GPUs, a smaller batch or sequence", "this calculator")
    return found


# --------------------------------------------------------------------------- launch and collect

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)  # a Llama small enough for a CI smoke run


def checkpoint(spec: str) -> str:
    """A 16-bit checkpoint every rank can load: "tiny" (a 2-layer Llama), "random:<shape>", or a model spec.

    Random weights are built once, seeded, and cached. Example: checkpoint("tiny") -> ".../qlora_lab/fsdp-tiny"
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if spec != "tiny" and not spec.startswith("random:"):
        return models.checkpoint_for(spec)
    out = paths.cache_dir() / f"fsdp-{spec.replace(':', '-')}"
    if not (out / "config.json").exists():
        with paths.atomic_dir(out) as tmp:
            torch.manual_seed(0)
            model = (AutoModelForCausalLM.from_config(LlamaConfig(**TINY), dtype=torch.bfloat16) if spec == "tiny" else
                     models.build_random_model(spec.removeprefix("random:"), quant=None, device="cpu"))
            model.save_pretrained(tmp)
    return str(out)


def source(spec: str, backend: str) -> dict:
    """Where the ranks get the model: a random shape on GPUs is built by every rank on its own GPU (seeded, the same
    on each; a 70B shape's 16-bit checkpoint would need 140 GB of disk), anything else from a checkpoint.

    Example: source("random:llama-2-70b", "nccl") -> {"model": "random:llama-2-70b"}
    """
    return {"model": spec} if spec.startswith("random:") and backend == "nccl" else {"model": spec,
                                                                                     "checkpoint": checkpoint(spec)}


def predict(config: dict, nproc: int) -> Estimate:
    """The calculator's per-GPU estimate of the job launch(nproc, config) runs (same batch, sequence, rank, offload,
    checkpointing and autocast; AdamW, no dropout, no upcast).

    Example: predict({"model": "random:llama-2-70b", "batch": 2, "seq": 2048, "r": 8, "checkpointing": True,
    "mixed_precision": "bf16"}, 2).peak_phase -> "layer-backward"
    """
    model = config["model"].removeprefix("random:") if "checkpoint" not in config else config["checkpoint"]
    return estimate(model, gpus=nproc, cpu_offload=bool(config.get("cpu_offload")),
                    device="cuda" if config.get("backend") == "nccl" else "cpu", batch=config.get("batch", 2),
                    seq=config.get("seq", 64), r=config.get("r", 8), prepare=False, optimizer="adamw_torch",
                    checkpointing=bool(config.get("checkpointing")), mixed_precision=config.get("mixed_precision") or "no",
                    compute_dtype=config.get("compute_dtype", "bf16"))


def launch(nproc: int, config: dict, out_dir: str | Path, timeout: float = 600, progress: bool = True) -> list[dict]:
    """Run `python -m qlora_lab.fsdp` (rank_main) in nproc processes (torchrun, one host) and return each rank's results.

    Every rank writes out_dir/rank<i>.json (its results) and appends a line per step to out_dir/rank<i>.log;
    this shows rank 0's progress while the job runs. A failed job raises RuntimeError with the ranks' last
    lines. Example: launch(2, {"backend": "gloo", "steps": 4}, "runs/fsdp")[0]["losses"] -> [5.58, 5.51, ...]
    """
    problems = check(quant_storage=config.get("quant_storage", "bf16"), param_dtype=config.get("param_dtype"),
                     gpus=nproc)  # the checker runs before every launch; a known failure point is said, not hidden
    for p in problems:
        print(f"checker: {p.name}: {p.problem} Fix: {p.fix}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in (*out_dir.glob("rank*.json"), *out_dir.glob("rank*.log")):
        old.unlink()
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "qlora_lab.fsdp", str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(out_dir / "launcher.log", "w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        start, shown, timed_out = time.time(), 0, False
        while job.poll() is None:
            if time.time() - start > timeout:
                job.kill()
                job.wait()
                timed_out = True
                break
            lines = (out_dir / "rank0.log").read_text().splitlines() if (out_dir / "rank0.log").exists() else []
            if progress and len(lines) > shown:
                print(*lines[shown:], sep="\n", flush=True)
                shown = len(lines)
            time.sleep(0.5)
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    if any("out_of_memory" in r for r in results):  # a result, not a crash: the ranks that never wrote were stopped
        done = {r["rank"] for r in results}
        results += [{"rank": i, "out_of_memory": "stopped when another rank ran out of memory"}
                    for i in range(nproc) if i not in done]
    elif timed_out:
        raise RuntimeError(f"the {nproc}-process job ran past {timeout:.0f} s; see {out_dir / 'launcher.log'}")
    elif job.returncode != 0 or len(results) != nproc:
        lines = (out_dir / "launcher.log").read_text().splitlines()
        errors = [line for line in lines if re.match(r"\[rank\d+\]: \w+(Error|Exception)\b", line)]
        raise RuntimeError(f"the {nproc}-process job failed (exit {job.returncode}, {len(results)} of {nproc} ranks "
                           f"finished): {errors[0] if errors else lines[-1] if lines else 'no output'} "
                           f"(the whole log: {out_dir / 'launcher.log'})")
    return sorted(results, key=lambda r: r["rank"])


def median_step(seconds: list[float]) -> float:
    """A rank's median step time after the first (warm-up) step. Example: median_step([9.0, 2.0, 2.4, 2.2]) -> 2.2"""
    return statistics.median(seconds[1:] or seconds)


def measure_case(nproc: int, config: dict, out_dir: str | Path, timeout: float = 300) -> dict:
    """Launch one job and set what each GPU held beside the calculator: one row of lab 08's table (GiB, seconds).

    outcome is "trained" or "out of memory: ..." (a result, not a crash); peak/device are the worst rank's (None on
    a CPU, which has no allocator peak to read).
    Example: measure_case(2, {"backend": "nccl", "model": "random:llama-2-70b", "batch": 2, "seq": 2048, "r": 8,
    "checkpointing": True, "mixed_precision": "bf16", "steps": 3}, "runs/fsdp/70b")["error"] -> -0.02
    """
    est, held = predict(config, nproc), config.get("gpu_memory_bytes")
    ranks = launch(nproc, config, out_dir, timeout=timeout, progress=False)
    row = {"gpus": nproc, "cpu_offload": bool(config.get("cpu_offload")), "held_gib": held / 2**30 if held else None,
           "predicted_gib": est.peak_allocated_bytes / 2**30, "predicted_device_gib": est.device_bytes / 2**30,
           "load_peak_gib": max(r.get("load_peak_bytes") or 0 for r in ranks) / 2**30}
    oom = [r["out_of_memory"] for r in ranks if "out_of_memory" in r]
    if oom:
        return {**row, "outcome": f"out of memory: {oom[0]}"}
    peak, device = (max(r.get(k) or 0 for r in ranks) / 2**30 or None for k in ("peak_allocated_bytes", "device_used_bytes"))
    seconds = [median_step(r["step_seconds"]) for r in ranks]
    return {**row, "outcome": "trained", "peak_gib": peak, "error": peak and row["predicted_gib"] / peak - 1,
            "device_used_gib": device, "device_error": device and row["predicted_device_gib"] / device - 1,
            "step_seconds": max(seconds), "tokens_per_second":
            nproc * config.get("batch", 2) * config.get("seq", 64) / max(seconds),
            "first_loss": ranks[0]["losses"][0], "last_loss": ranks[0]["losses"][-1]}


# --------------------------------------------------------------------------- one rank (python -m qlora_lab.fsdp OUT_DIR)


def _load(config: dict, device):
    """The rank's model: 4-bit with bf16 quant storage (FSDP's requirement), LoRA on all linears, in train mode.

    From config["checkpoint"], else (a random shape on a GPU) built on this rank's GPU with the same seed as the others.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = recipe.DTYPES[config.get("compute_dtype", "bf16")]
    storage = {**recipe.DTYPES, "uint8": torch.uint8}[config.get("quant_storage", "bf16")]
    if "checkpoint" in config:
        quant = models.bnb_config(config.get("quant"), double_quant=True, compute_dtype=dtype, quant_storage=storage)
        model = AutoModelForCausalLM.from_pretrained(config["checkpoint"], quantization_config=quant, dtype=dtype,
                                                     device_map={"": device})
    else:
        model = models.build_random_model(config["model"].removeprefix("random:"), quant=config.get("quant", "nf4"),
                                          device=device, compute_dtype=dtype, quant_storage=storage)
    models.keep_cpu_4bit_trainable(model)  # else a CPU's first no-grad forward repacks the codes as integers
    if config.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    torch.manual_seed(0)  # the same adapters on every rank
    model = get_peft_model(model, LoraConfig(r=config.get("r", 8), lora_alpha=2 * config.get("r", 8),
                                             target_modules="all-linear"))
    return model.train()


def _steps(model, optimizer, ids, config: dict, log, rank: int, world: int) -> dict:
    """Train config["steps"] steps on one batch; a CUDA out-of-memory ends the loop and is returned as a result."""
    import torch

    losses, seconds = [], []
    for step in range(config.get("steps", 4)):
        start = time.perf_counter()
        try:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ids.is_cuda:
                torch.cuda.synchronize(ids.device)
        except torch.OutOfMemoryError as err:
            print(f"rank {rank}/{world}: step {step + 1} ran out of memory", file=log, flush=True)
            return {"losses": losses, "step_seconds": seconds, "out_of_memory": str(err).split(". ")[0]}
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        print(f"rank {rank}/{world}: step {step + 1} loss {losses[-1]:.4f} in {seconds[-1]:.2f} s", file=log, flush=True)
    return {"losses": losses, "step_seconds": seconds}


def rank_main(out_dir: str | Path) -> None:
    """One rank of launch(): load, wrap in FSDP (FULL_SHARD), train a few steps, write what it saw.

    On CUDA, config["gpu_memory_bytes"] holds PyTorch's allocator to that many bytes from the first step on (the
    load is not held: a random shape is built whole on each GPU before FSDP shards it, where a real checkpoint
    would stream through CPU RAM); a rank that runs out of memory writes its result and ends the job.
    """
    import torch
    import torch.distributed as dist
    from accelerate.utils import convert_outputs_to_fp32
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    backend = config.get("backend", "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if backend == "gloo" else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    cuda = device.type == "cuda"
    log = open(out_dir / f"rank{rank}.log", "a")
    load_start = time.perf_counter()
    model = _load(config, device)
    ids = torch.randint(0, model.config.vocab_size, (config.get("batch", 2), config.get("seq", 64)),
                        generator=torch.Generator().manual_seed(0)).to(device)  # the same batch on every rank
    amp = config.get("mixed_precision") in ("bf16", "fp16")  # autocast as accelerate applies it for Trainer(bf16=True)
    autocast = torch.autocast(device.type, dtype=recipe.DTYPES[config.get("mixed_precision") or "bf16"], enabled=amp)
    with torch.no_grad(), autocast:
        unsharded_loss = model(input_ids=ids, labels=ids).loss.item()  # the reference: no FSDP
    load_peak = torch.cuda.max_memory_allocated(device) if cuda else None
    if cuda and "checkpoint" not in config:  # built whole on this GPU: stage it in CPU RAM, as a real load would be,
        model.to("cpu")  # so FSDP moves each unit in compactly (else the build's half-freed blocks stay reserved)
        torch.cuda.empty_cache()
    param_dtype = config.get("param_dtype")  # FSDP mixed precision; None: the parameters' own dtype
    model = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=device, use_orig_params=False,
                 sharding_strategy=ShardingStrategy.FULL_SHARD, limit_all_gathers=True,
                 cpu_offload=CPUOffload(offload_params=bool(config.get("cpu_offload"))),
                 mixed_precision=MixedPrecision(param_dtype=recipe.DTYPES[param_dtype]) if param_dtype else None)
    if amp:  # accelerate.prepare_model's wrapping
        model.forward = convert_outputs_to_fp32(autocast(model.forward))
    local_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # this rank's shards
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.get("lr", 1e-3))
    print(f"rank {rank}/{world}: loaded and sharded in {time.perf_counter() - load_start:.0f} s", file=log, flush=True)
    if cuda:
        torch.cuda.empty_cache()
        if config.get("gpu_memory_bytes"):
            torch.cuda.set_per_process_memory_fraction(
                config["gpu_memory_bytes"] / torch.cuda.get_device_properties(device).total_memory, device)
        torch.cuda.reset_peak_memory_stats(device)
    result = {"rank": rank, "world": world, "backend": backend, "device": str(device), "unsharded_loss": unsharded_loss,
              "local_param_bytes": local_bytes, "load_peak_bytes": load_peak, "versions": {"torch": torch.__version__},
              **_steps(model, optimizer, ids, config, log, rank, world)}
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        result.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device), device_used_bytes=total - free)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    if "out_of_memory" in result:
        os._exit(3)  # a peer may wait in a collective: a non-zero exit makes torchrun stop the job
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1])
