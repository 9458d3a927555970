"""Lab 03's sweep over LoRA's r and alpha: short fine-tunes on one base model, cached per point.

`grid` lists the points (ranks x alpha rules: alpha fixed, alpha = r, alpha = 2r, plus
rsLoRA's alpha / sqrt(r)); `run_point` trains one with `train.finetune` and measures it
(losses, ||delta W|| over training, eval loss and exact match, singular values of every
layer's delta W, step time, peak memory); `run_sweep` runs every point that is not cached
yet. A point's cache file is keyed by a hash of the point AND every shared setting, so
re-running trains nothing, adding a point trains only it, and an interrupted sweep resumes.

Shortcut: one point at a time in this process, all on one loaded base model (adapters
attached, trained, measured and removed again with peft's `unload`).
"""

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from qlora_lab import data, env, evals, lora, models, paths, shapes, train
from qlora_lab.shapes import ALL_LINEAR

SWEEP_FORMAT = 1  # bump when what run_point stores changes: old cache entries then no longer match


@dataclass(frozen=True)
class SweepPoint:
    """One LoRA configuration of a sweep."""

    r: int  # rank
    alpha: float  # lora_alpha
    rslora: bool = False  # scale the update by alpha / sqrt(r) instead of alpha / r
    targets: str | tuple[str, ...] = ALL_LINEAR  # "all-linear" or module names such as ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        """The factor in front of B A. Example: SweepPoint(16, 32).scale -> 2.0"""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    @property
    def name(self) -> str:
        """The point's label. Example: SweepPoint(8, 16).name -> "r=8,alpha=16,rslora=False" """
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        label = f"r={self.r},alpha={alpha},rslora={self.rslora}"
        return label if self.targets == ALL_LINEAR else label + ",targets=" + "+".join(self.targets)


ALPHA_RULES = ("fixed", "r", "2r")  # alpha held fixed, alpha = r, alpha = 2r


def grid(ranks: list[int], alpha_rules: tuple[str, ...] = ALPHA_RULES, fixed_alpha: float = 16,
         rslora_ranks: list[int] = (), rslora_alpha: float | None = None) -> list[SweepPoint]:
    """Sweep points for every rank under every alpha rule, plus rsLoRA points; duplicates once.

    Example: [p.name for p in grid([8, 16], ("fixed",))] -> ["r=8,alpha=16,rslora=False", "r=16,alpha=16,rslora=False"]
    """
    unknown = set(alpha_rules) - set(ALPHA_RULES)
    if unknown:
        raise ValueError(f"unknown alpha rules {sorted(unknown)}; choose from {ALPHA_RULES}")
    alpha_for = {"fixed": lambda r: fixed_alpha, "r": lambda r: r, "2r": lambda r: 2 * r}
    points = [SweepPoint(r, alpha_for[rule](r)) for rule in alpha_rules for r in ranks]
    points += [SweepPoint(r, fixed_alpha if rslora_alpha is None else rslora_alpha, rslora=True) for r in rslora_ranks]
    return list(dict.fromkeys(points))


@dataclass(frozen=True)
class SweepSettings:
    """What every point of a sweep shares: model, data, training recipe, measurements."""

    model: str = "smollm2-135m"  # model spec for models.load_model
    quant: str | None = "nf4"  # base model storage ("nf4": QLoRA)
    train: "object" = None  # a train.TrainConfig; None: TrainConfig(steps=30, warmup_steps=3)
    eval_examples: int = 64  # first N rows of the eval split for the final eval loss and accuracy
    track_every: int = 5  # record ||delta W|| every this many steps
    dropout: float = 0.0  # LoRA dropout
    gradient_checkpointing: bool = True  # as in lab 05

    def train_config(self) -> "train.TrainConfig":
        """The TrainConfig each point runs: no periodic eval and no checkpoints (a point is all or nothing)."""
        return replace(self.train or train.TrainConfig(steps=30, warmup_steps=3), eval_every=0, save_every=0)

    def as_dict(self) -> dict:
        return {**asdict(replace(self, train=None)), "train": asdict(self.train_config())}


def point_key(point: SweepPoint, settings: SweepSettings) -> str:
    """The cache key of a point: a hash of the point, every shared setting and the cache format.

    Example: point_key(SweepPoint(8, 16), SweepSettings()) -> "3f2a9c01b7de"
    """
    return train.config_key({"point": asdict(point), "settings": settings.as_dict(), "format": SWEEP_FORMAT})


class DeltaWTracker(TrainerCallback):
    """A Trainer callback that records the total ||delta W|| at step 0 and every `every` steps."""

    def __init__(self, model, every: int = 5):
        self.model = model
        self.every = every  # steps between measurements
        self.steps: list[int] = []  # when it measured
        self.norms: list[float] = []  # total ||delta W||_F then

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        self.norms.append(lora.total_delta_w_norm(self.model))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.steps.append(state.global_step)
            self.norms.append(lora.total_delta_w_norm(self.model))


def load_base(settings: SweepSettings):
    """(model, tokenizer) of the sweep's base model, as every point starts from it."""
    return models.load_model(settings.model, quant=settings.quant, seed=settings.train_config().seed)


def run_point(point: SweepPoint, settings: SweepSettings, progress: bool = False, base=None) -> dict:
    """Train one sweep point and measure it; returns a JSON-able dict.

    base is (model, tokenizer) from load_base, or None to load it here. The adapters are
    attached to it, trained, measured and removed again (peft's unload), which leaves the
    frozen base exactly as it was, so the next point can reuse it; tests/test_lora.py
    checks that a point trained on a reused base equals one trained on a fresh load.
    Every point gets the same base weights, the same adapter initialisation for the same r
    (torch seeded before get_peft_model), the same training examples in the same order,
    and the same eval rows. Measured: training loss per step, ||delta W|| over training,
    final eval loss and exact-match accuracy, the singular values of every layer's delta W,
    trainable parameters, step time and peak memory.
    Example: run_point(SweepPoint(8, 16), SweepSettings())["eval_loss"] -> 0.21
    """
    cfg = settings.train_config()
    start = time.perf_counter()
    model, tokenizer = base or load_base(settings)
    torch.manual_seed(cfg.seed)  # lora_A's random init: identical for identical r
    targets = point.targets if point.targets == ALL_LINEAR else list(point.targets)
    model = lora.add_lora(model, lora.lora_config(point.r, point.alpha, targets, settings.dropout, point.rslora),
                          gradient_checkpointing=settings.gradient_checkpointing)
    trainable = sum(p.numel() for p in lora.trainable_parameters(model))
    task = data.load_task()
    train_rows = task["train"].select(range(min(len(task["train"]), cfg.steps * cfg.batch_size)))
    eval_rows = task["eval"].select(range(min(len(task["eval"]), settings.eval_examples)))
    tracker = DeltaWTracker(model, settings.track_every)
    with tempfile.TemporaryDirectory() as tmp:
        fit = train.finetune(model, tokenizer, train_rows, None, cfg, tmp, resume=False,
                             callbacks=[tracker], progress=progress)
    final = evals.evaluate(model, tokenizer, eval_rows, batch_size=cfg.eval_batch_size)
    steps, losses = fit.losses()
    arch = settings.model.removeprefix("random:")  # a shape's name: its parameter count has a formula
    result = {
        "name": point.name, "point": asdict(point), "scale": point.scale,
        "trainable": trainable,
        "formula_trainable": shapes.lora_parameter_count(arch, point.r, targets) if arch in shapes.ARCHITECTURES else None,
        "steps": steps, "losses": losses,
        "eval_loss": final["loss"], "eval_accuracy": final["accuracy"],
        "delta_w_steps": tracker.steps, "delta_w_norms": tracker.norms,
        "spectra": {name: lora.delta_w_singular_values(m).tolist() for name, m in lora.lora_modules(model).items()},
        "step_seconds": fit.step_seconds, "peak_bytes": fit.peak_bytes, "memory_kind": fit.memory_kind,
        "seconds": time.perf_counter() - start,  # (load +) train + eval
    }
    model.unload()  # take the adapters out again: the base model is as it was loaded
    return result


def run_sweep(points: list[SweepPoint], settings: SweepSettings, cache_dir: str | Path,
              progress: bool = True) -> dict[str, dict]:
    """Run every point that has no cached result yet; return all results by point name, in order.

    Each finished point is written to cache_dir/<point_key>.json (atomically: a temporary file
    renamed into place), keyed by the point AND every shared setting. So re-running the same
    sweep trains nothing, adding points trains only those, changing a shared setting trains
    everything again, and an interrupted sweep restarts at its first unfinished point.
    A result's "cached" says whether this call loaded it or trained it.
    Example: run_sweep(grid([4, 16]), SweepSettings(), paths.cache_dir() / "sweeps")["r=4,alpha=16,rslora=False"]
             -> {"eval_loss": 0.21, "cached": False, ...}
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    results, base = {}, None
    bar = env.progress(points, desc="sweep", unit="point", disable=not progress)
    for point in bar:
        bar.set_postfix_str(point.name)
        key = point_key(point, settings)
        path = cache_dir / f"{key}.json"
        if path.exists():
            result, cached = json.loads(path.read_text())["result"], True
        else:
            base = base or load_base(settings)  # loaded once, by the first point that trains
            result, cached = run_point(point, settings, base=base), False
            paths.atomic_write_text(path, json.dumps({"key": key, "settings": settings.as_dict(),
                                                      "format": SWEEP_FORMAT, "result": result}))
        results[point.name] = {**result, "cached": cached}
    return results
