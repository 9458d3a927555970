"""The calculator against measurements: the configurations lab 01 measures, and the comparison.

`GRIDS` holds the configurations per profile. On a GPU ("gpu") they are the runs users
launch: transformers' `Trainer` with bf16=True (accelerate's autocast), gradient
accumulation, Trainer's optimizer names, 0.5B to 13B shapes (lab 06 measures 33B-70B), sequences of 512 to 8192
tokens, adapters on q,v or on every linear layer; plus a few runs without autocast, a few
hand-written loops that keep the model's outputs through backward ("path": "loop"), and a
few bases loaded with from_pretrained from a 16-bit checkpoint saved to disk ("checkpoint").
On a CPU the same machinery runs on small shapes, measured as live tensor bytes.
`compare` measures each configuration and puts the calculator's prediction beside it.

Shortcut: random weights (memory does not depend on values); two or three steps per run.
"""

import tempfile
from dataclasses import asdict, replace

import torch

from qlora_lab import budget, env, measure, models, recipe, vram

GUIDE = dict(model="llama-3.1-8b", method="qlora", r=16, lora_dropout=0.05, batch=4, seq=512, grad_accum=4,
             optimizer="paged_adamw_8bit", mixed_precision="bf16")  # the QLoRA guides' complete training example
GUIDE_LABEL = "guide recipe (llama-3.1-8b b4x512 x4 accum)"  # its row in lab 01's tables
GRIDS = {
    "gpu": [
        {**GUIDE, "label": GUIDE_LABEL},
        dict(model="qwen2.5-0.5b", method="qlora", r=16, batch=8, seq=1024, optimizer="adamw_torch"),
        dict(model="llama-3.2-1b", method="qlora", r=64, batch=16, seq=512, grad_accum=2, optimizer="paged_adamw_32bit"),
        dict(model="llama-3.2-1b", method="lora", r=8, targets=("q_proj", "v_proj"), batch=4, seq=1024, checkpointing=False),
        dict(model="smollm2-1.7b", method="qlora", r=32, batch=2, seq=2048, optimizer="paged_adamw_8bit"),
        dict(model="mistral-7b", method="qlora", r=16, batch=2, seq=2048, optimizer="paged_adamw_8bit"),
        dict(model="mistral-7b", method="qlora", r=8, targets=("q_proj", "v_proj"), batch=1, seq=8192,
             optimizer="adamw_torch_fused"),
        dict(model="qwen2.5-7b", method="qlora", r=16, batch=4, seq=512, grad_accum=2, optimizer="paged_adamw_8bit"),
        dict(model="llama-2-7b", method="qlora", r=16, batch=8, seq=512, checkpointing=False, prepare=False,
             optimizer="paged_adamw_8bit"),
        dict(model="llama-2-7b", method="lora", r=16, batch=2, seq=1024, optimizer="adamw_torch"),
        dict(model="llama-3.1-8b", method="qlora", r=64, batch=1, seq=8192, optimizer="paged_adamw_8bit"),
        dict(model="llama-2-13b", method="qlora", r=16, batch=4, seq=1024, optimizer="paged_adamw_8bit"),
        {**GUIDE, "mixed_precision": "no", "label": f"{GUIDE_LABEL}, no autocast"},
        {**GUIDE, "grad_accum": 1, "keep_outputs": True, "path": "loop", "label": "loop keeping outputs, bf16"},
        dict(model="llama-2-7b", method="qlora", r=16, batch=4, seq=1024, keep_outputs=True, mixed_precision="no",
             path="loop"),
        dict(model="qwen2.5-0.5b", method="qlora", r=16, batch=4, seq=512, checkpoint=True),
        dict(model="smollm2-1.7b", method="qlora", r=16, batch=4, seq=512, checkpoint=True, optimizer="paged_adamw_8bit"),
    ],
    "cpu": [
        dict(model="smollm2-135m", method="qlora", batch=2, seq=64, r=16),
        dict(model="smollm2-135m", method="qlora", batch=2, seq=64, r=16, checkpointing=False, mixed_precision="no",
             path="loop"),
        dict(model="smollm2-135m", method="lora", batch=2, seq=64, r=8, checkpointing=False),
        dict(model="smollm2-135m", method="qlora", batch=1, seq=128, r=64, targets=("q_proj", "v_proj"), checkpointing=False,
             grad_accum=2),
        dict(model="smollm2-135m", method="qlora", batch=2, seq=64, r=16, lora_dropout=0.1, checkpointing=False),
        dict(model="smollm2-135m", method="qlora", batch=2, seq=64, r=16, attn="eager", checkpointing=False, path="loop"),
        dict(model="smollm2-135m", method="full", base_dtype="bf16", batch=2, seq=64, mixed_precision="no", path="loop"),
        dict(model="smollm2-135m", method="qlora", batch=2, seq=64, r=16, keep_outputs=True, path="loop"),
    ],
    "cpu-small": [dict(model="smollm2-135m", method="qlora", batch=1, seq=64, r=16),
                  dict(model="smollm2-135m", method="lora", batch=1, seq=64, r=8, checkpointing=False, mixed_precision="no",
                       path="loop")],
}


def for_device(configs: list[dict], device: str) -> list[dict]:
    """The configurations in this device's 16-bit type: where it is fp16 (a T4 or V100, or $QLORA_LAB_COMPUTE_DTYPE=fp16)
    every bf16 becomes fp16, since Trainer(bf16=True) would run emulated there; elsewhere unchanged.

    Example: for_device([GUIDE], "cpu")[0]["mixed_precision"] -> "bf16"
    """
    name = recipe.dtype_name(recipe.default_compute_dtype(device))
    if name == "bf16":
        return configs
    return [{**c, "compute_dtype": name, **({"mixed_precision": name} if c.get("mixed_precision") == "bf16" else {})}
            for c in configs]  # labels stay: label() names the dtype


def label(config: dict) -> str:
    """A configuration's short name; a named row says a compute dtype other than bf16 (in place of "bf16", or appended).

    Example: label(GRIDS["cpu-small"][0]) -> "smollm2-135m qlora r16 b1x64 bf16"
    """
    setup = vram.Setup.of(config)
    if config.get("label"):
        name, dtype = config["label"], setup.compute_dtype
        return name if dtype == "bf16" else name.replace("bf16", dtype) if "bf16" in name else f"{name}, {dtype}"
    parts = [setup.model, setup.method, "" if setup.method == "full" else
             f"r{setup.r}" + ("" if setup.targets == "all-linear" else " q,v"),
             f"b{setup.batch}x{setup.seq}" + (f" x{setup.grad_accum} accum" if setup.grad_accum > 1 else ""),
             setup.precision() if setup.autocast() else "no autocast",
             "" if setup.checkpointing else "no ckpt", "" if setup.prepare or setup.method != "qlora" else "no prepare",
             f"dropout {setup.lora_dropout:g}" if setup.lora_dropout else "", "eager" if setup.attn == "eager" else "",
             "loop keeping outputs" if setup.keep_outputs else "loop" if config.get("path") == "loop" else "",
             "from_pretrained" if config.get("checkpoint") else ""]
    return " ".join(p for p in parts if p)


def measure_config(config: dict, device: str):
    """Measure one configuration the way it says: Trainer (default), a hand loop, or from_pretrained first."""
    setup = vram.Setup.of(config)
    if config.get("path") == "loop":
        return measure.measure(setup, steps=3, device=device)
    if not config.get("checkpoint"):
        return measure.measure_trainer(setup, steps=2, device=device)
    with tempfile.TemporaryDirectory(prefix="qlora-lab-ckpt-") as directory:
        models.save_random_checkpoint(setup.model, directory)  # 16-bit shards on disk, as a hub model arrives
        return measure.measure_trainer(setup, steps=2, device=device, checkpoint=directory)


def compare(configs: list[dict], device: str, progress: bool = True) -> list[dict]:
    """Measure each configuration and put the calculator's prediction beside it; an out-of-memory is a row too.

    Rows: label, config, measured and predicted peak bytes (the step peak; with a checkpoint the
    whole run's, loading included), error (predicted / measured - 1), phase peaks on both sides,
    paged and device-level bytes, what the measured number is (memory_kind).
    Example: compare(GRIDS["cpu-small"], "cpu")[0]["error"] -> 0.001
    """
    rows = []
    for config in env.progress(configs, desc=f"measuring on {device}", unit="config", disable=not progress):
        predicted = vram.estimate(device=device, **asdict(vram.Setup.of(config)))
        row = {"label": label(config), "config": config, "predicted_phases": predicted.phases,
               "predicted_paged": predicted.paged_bytes, "predicted_device": predicted.device_bytes}
        try:
            result = measure_config(config, device)
        except torch.cuda.OutOfMemoryError as err:
            rows.append({**row, "error_text": str(err).splitlines()[0]})
            continue
        whole_run = bool(config.get("checkpoint"))
        predicted_peak = predicted.run_peak_bytes if whole_run else predicted.peak_allocated_bytes
        measured_peak = max([result.peak_allocated_bytes] + [result.phase_peaks.get(p, 0) for p in ("load", "prepare")]) \
            if whole_run else result.peak_allocated_bytes
        rows.append({**row, "measured": measured_peak, "predicted": predicted_peak,
                     "error": predicted_peak / measured_peak - 1,
                     "measured_phases": result.phase_peaks, "step_peaks": result.step_peaks,
                     "reserved": result.peak_reserved_bytes, "device_used": result.device_used_bytes,
                     "paged": result.paged_bytes, "memory_kind": result.memory_kind})
    return rows


PITFALL = {"checkpointing on": (True, False),  # lab 01's prepare pitfall: label -> (checkpointing, prepare_defaults)
           "'off': prepare(model) + TrainingArguments(gradient_checkpointing=False)": (False, True),
           "off: prepare(model, use_gradient_checkpointing=False)": (False, False)}


def pitfall(model: str, batch: int, seq: int, device: str, budget_bytes: float | None = None) -> dict:
    """The prepare pitfall, measured: label -> Measurement, or the out-of-memory's first line (a result, not a crash).

    On a GPU the sequence is cut to what the no-checkpointing run needs within 90 % of budget_bytes less what
    earlier runs of this process still hold. Example: pitfall("smollm2-135m", 1, 64, "cpu")["checkpointing on"]
    """
    if device == "cuda":
        left = 0.9 * (budget_bytes or torch.cuda.get_device_properties(0).total_memory) - measure.release()
        seq = max(16, min(seq, budget.largest("seq", left, model=model, batch=batch, checkpointing=False)))  # 16: try
    setup = vram.Setup(model=model, method="qlora", r=16, batch=batch, seq=seq, checkpointing=False)
    runs = {}
    for name, (checkpointing, prepare_defaults) in PITFALL.items():
        try:
            runs[name] = measure.measure_trainer(replace(setup, checkpointing=checkpointing), steps=2, device=device,
                                                 prepare_defaults=prepare_defaults)
        except torch.cuda.OutOfMemoryError as err:
            runs[name] = str(err).splitlines()[0]
    return {"setup": setup, "runs": runs}
