"""LoRA adapters on a (4-bit) base model, through peft, and what they cost.

The lab never re-implements LoRA: adapters are peft's (`LoraConfig`, `get_peft_model`), and
the 4-bit preparation is peft's `prepare_model_for_kbit_training`. This module holds the
lab's defaults in one place and the arithmetic a learner should be able to do by hand.

In a LoRA layer the frozen weight W (d_out x d_in) gets a trainable low-rank update:

    y = W x + (alpha / r) * B (A x)        A: (r, d_in), B: (d_out, r), B starts at zero

so each targeted linear layer adds r * (d_in + d_out) trainable parameters, and at step 0
the model is exactly the base model.

Lab 03 adds: the parameter count from an architecture's shapes (`lora_parameter_count`),
the learned update itself (`delta_w`, its norm and singular values computed from the r x r
factors), and a sweep runner over (r, alpha, scaling rule, targets) whose points are cached
on disk keyed by their full configuration (`SweepPoint`, `SweepSettings`, `run_sweep`).
Shortcuts: counts cover Llama-style decoder layers only; the sweep trains one point at a
time in this process, all on one loaded base model (adapters attached, trained, removed).
"""

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import TrainerCallback

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output head


def lora_config(r: int = 16, alpha: float = 32, targets: str | list[str] = ALL_LINEAR, dropout: float = 0.0,
                rslora: bool = False, modules_to_save: list[str] | None = None):
    """peft's LoraConfig with the lab's defaults (a causal LM, no bias training).

    Example: lora_config(r=8, alpha=16, targets=["q_proj", "v_proj"]).r -> 8
    """
    from peft import LoraConfig

    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, use_rslora=rslora,
                      bias="none", task_type="CAUSAL_LM", modules_to_save=modules_to_save)


def add_lora(model, config=None, gradient_checkpointing: bool = True, prepare: bool = True, **config_kwargs):
    """Prepare a (k-bit) model for training and attach LoRA adapters; returns the peft model.

    prepare=True runs peft's prepare_model_for_kbit_training on quantized models: it freezes
    every base parameter, upcasts the 16-bit ones (embeddings, norms, lm_head) to fp32, makes
    the input embeddings' output require grad so checkpointed layers get gradients, and turns
    on gradient checkpointing (when asked). On a 16-bit base it only freezes and checkpoints.
    Example: add_lora(model, r=16).print_trainable_parameters()
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = config or lora_config(**config_kwargs)
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if prepare and quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing:
        model.config.use_cache = False  # caching is useless in training and clashes with checkpointing
    return get_peft_model(model, config)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters an optimizer should get: exactly those with requires_grad."""
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- counting (lab 03)


def linear_shapes(arch) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear layer inside one decoder layer of an architecture.

    arch is a shape name from models.ARCHITECTURES or an models.Arch. Grouped-query
    attention shows up here: k_proj and v_proj output kv_heads * head_dim, not hidden.
    Example: linear_shapes("smollm2-135m")["k_proj"] -> (576, 192)
    """
    from qlora_lab import models

    a = models.ARCHITECTURES[arch] if isinstance(arch, str) else arch
    q_out, kv_out = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return {"q_proj": (a.hidden, q_out), "k_proj": (a.hidden, kv_out), "v_proj": (a.hidden, kv_out),
            "o_proj": (q_out, a.hidden), "gate_proj": (a.hidden, a.intermediate),
            "up_proj": (a.hidden, a.intermediate), "down_proj": (a.intermediate, a.hidden)}


def lora_parameter_count(arch, r: int, targets: str | list[str] = ALL_LINEAR) -> int:
    """Trainable LoRA parameters from the architecture alone: layers * sum of r * (d_in + d_out).

    targets is "all-linear" (every linear layer of the decoder layers; peft leaves the
    output head out) or a list of module names such as ["q_proj", "v_proj"].
    Example: lora_parameter_count("smollm2-135m", r=8, targets=["q_proj", "v_proj"]) -> 460800
    """
    from qlora_lab import models

    a = models.ARCHITECTURES[arch] if isinstance(arch, str) else arch
    shapes = linear_shapes(a)
    names = list(shapes) if targets == ALL_LINEAR else list(targets)
    unknown = sorted(set(names) - set(shapes))
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; a decoder layer has {list(shapes)} (or use {ALL_LINEAR!r})")
    return a.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def equal_budget_rank(arch, r: int, targets: list[str], reference: str | list[str] = ALL_LINEAR) -> int:
    """The rank for `targets` whose parameter count is closest to `reference` at rank r.

    Example: equal_budget_rank("smollm2-135m", 4, ["q_proj", "v_proj"]) -> 21  (vs all-linear at r=4)
    """
    budget = lora_parameter_count(arch, r, reference)
    per_rank = lora_parameter_count(arch, 1, targets)
    return max(1, round(budget / per_rank))


# --------------------------------------------------------------------------- the learned update


def lora_modules(model, adapter: str = "default") -> dict:
    """The peft LoRA layers of a model that carry `adapter`, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {})}


def _factors(module, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor, float]:
    A = module.lora_A[adapter].weight.detach().float()  # (r, d_in)
    B = module.lora_B[adapter].weight.detach().float()  # (d_out, r)
    return A, B, float(module.scaling[adapter])


def delta_w(module, adapter: str = "default") -> torch.Tensor:
    """The update a LoRA layer adds to its frozen weight: scaling * B @ A, shape (d_out, d_in), fp32.

    scaling is alpha / r (or alpha / sqrt(r) with rsLoRA), read from the layer.
    Example: delta_w(model.base_model.model.model.layers[0].self_attn.q_proj).shape -> (576, 576)
    """
    A, B, scale = _factors(module, adapter)
    return scale * (B @ A)


def delta_w_norm(module, adapter: str = "default") -> float:
    """Frobenius norm of delta_w without forming it: ||BA||^2 = sum((B^T B) * (A A^T)), r x r matrices.

    Example: delta_w_norm(layer) == torch.linalg.matrix_norm(delta_w(layer)) (up to rounding)
    """
    A, B, scale = _factors(module, adapter)
    squared = ((B.T @ B) * (A @ A.T)).sum().clamp_min(0)  # both factors symmetric: trace(BtB AAt)
    return abs(scale) * math.sqrt(squared.item())


def delta_w_singular_values(module, adapter: str = "default") -> torch.Tensor:
    """Singular values of delta_w (at most r, descending) from the factors' QR decompositions.

    B = Qb Rb and A^T = Qa Ra give B A = Qb (Rb Ra^T) Qa^T with orthonormal Qb, Qa, so B A
    has the singular values of the small r x r matrix Rb Ra^T.
    Example: delta_w_singular_values(layer)[:3] -> tensor([0.41, 0.12, 0.05])
    """
    A, B, scale = _factors(module, adapter)
    _, r_b = torch.linalg.qr(B)  # (k, r)
    _, r_a = torch.linalg.qr(A.T)  # (k', r)
    return abs(scale) * torch.linalg.svdvals(r_b @ r_a.T)


def effective_rank(singular_values, energy: float = 0.9) -> int:
    """How many of the largest singular values hold `energy` of the squared norm (sum of sigma^2).

    Example: effective_rank([3.0, 0.9, 0.1]) -> 1  (9 of 9.82 is 92 %)
    """
    squares = sorted((float(s) ** 2 for s in singular_values), reverse=True)
    total, running = sum(squares), 0.0
    for k, square in enumerate(squares, start=1):
        running += square
        if running >= energy * total:
            return k
    return len(squares)


def total_delta_w_norm(model, adapter: str = "default") -> float:
    """sqrt of the sum of squared ||delta_w|| over all LoRA layers: how far the model has moved."""
    return math.sqrt(sum(delta_w_norm(m, adapter) ** 2 for m in lora_modules(model, adapter).values()))


# --------------------------------------------------------------------------- the sweep (lab 03)

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

    def train_config(self):
        """The TrainConfig each point runs: no periodic eval and no checkpoints (a point is all or nothing)."""
        from qlora_lab.train import TrainConfig

        return replace(self.train or TrainConfig(steps=30, warmup_steps=3), eval_every=0, save_every=0)

    def as_dict(self) -> dict:
        return {**asdict(replace(self, train=None)), "train": asdict(self.train_config())}


def point_key(point: SweepPoint, settings: SweepSettings) -> str:
    """The cache key of a point: a hash of the point, every shared setting and the cache format.

    Example: point_key(SweepPoint(8, 16), SweepSettings()) -> "3f2a9c01b7de"
    """
    from qlora_lab.train import config_key

    return config_key({"point": asdict(point), "settings": settings.as_dict(), "format": SWEEP_FORMAT})


class DeltaWTracker(TrainerCallback):
    """A Trainer callback that records the total ||delta W|| at step 0 and every `every` steps."""

    def __init__(self, model, every: int = 5):
        self.model = model
        self.every = every  # steps between measurements
        self.steps: list[int] = []  # when it measured
        self.norms: list[float] = []  # total ||delta W||_F then

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        self.norms.append(total_delta_w_norm(self.model))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.steps.append(state.global_step)
            self.norms.append(total_delta_w_norm(self.model))


def _arch_name(spec: str) -> str | None:
    from qlora_lab import models

    name = spec.removeprefix("random:")
    return name if name in models.ARCHITECTURES else None


def load_base(settings: SweepSettings):
    """(model, tokenizer) of the sweep's base model, as every point starts from it."""
    from qlora_lab import models

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
    from qlora_lab import data, train

    cfg = settings.train_config()
    start = time.perf_counter()
    model, tokenizer = base or load_base(settings)
    torch.manual_seed(cfg.seed)  # lora_A's random init: identical for identical r
    targets = point.targets if point.targets == ALL_LINEAR else list(point.targets)
    model = add_lora(model, lora_config(point.r, point.alpha, targets, settings.dropout, point.rslora),
                     gradient_checkpointing=settings.gradient_checkpointing)
    trainable = sum(p.numel() for p in trainable_parameters(model))
    task = data.load_task()
    train_rows = task["train"].select(range(min(len(task["train"]), cfg.steps * cfg.batch_size)))
    eval_rows = task["eval"].select(range(min(len(task["eval"]), settings.eval_examples)))
    tracker = DeltaWTracker(model, settings.track_every)
    with tempfile.TemporaryDirectory() as tmp:
        fit = train.finetune(model, tokenizer, train_rows, None, cfg, tmp, resume=False,
                             callbacks=[tracker], progress=progress)
    final = train.evaluate(model, tokenizer, eval_rows, batch_size=cfg.eval_batch_size)
    steps, losses = fit.losses()
    arch = _arch_name(settings.model)
    result = {
        "name": point.name, "point": asdict(point), "scale": point.scale,
        "trainable": trainable,
        "formula_trainable": lora_parameter_count(arch, point.r, targets) if arch else None,
        "steps": steps, "losses": losses,
        "eval_loss": final["loss"], "eval_accuracy": final["accuracy"],
        "delta_w_steps": tracker.steps, "delta_w_norms": tracker.norms,
        "spectra": {name: delta_w_singular_values(m).tolist() for name, m in lora_modules(model).items()},
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
    Example: run_sweep(grid([4, 16]), SweepSettings(), models.cache_dir() / "sweeps")["r=4,alpha=16,rslora=False"]["eval_loss"]
    """
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    results, base = {}, None
    bar = tqdm(points, desc="sweep", unit="point", disable=not progress)
    for point in bar:
        bar.set_postfix_str(point.name)
        key = point_key(point, settings)
        path = cache_dir / f"{key}.json"
        if path.exists():
            result, cached = json.loads(path.read_text())["result"], True
        else:
            base = base or load_base(settings)  # loaded once, by the first point that trains
            result, cached = run_point(point, settings, base=base), False
            tmp = path.with_suffix(".json.partial")
            tmp.write_text(json.dumps({"key": key, "settings": settings.as_dict(), "format": SWEEP_FORMAT,
                                       "result": result}))
            os.replace(tmp, path)
        results[point.name] = {**result, "cached": cached}
    return results
