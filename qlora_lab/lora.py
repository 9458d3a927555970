"""LoRA adapters on a (4-bit) base model, through peft, and what they cost.

The lab never re-implements LoRA: adapters are peft's (`LoraConfig`, `get_peft_model`), and
the 4-bit preparation is peft's `prepare_model_for_kbit_training`. This module holds the
lab's defaults in one place and the arithmetic a learner should be able to do by hand.

In a LoRA layer the frozen weight W (d_out x d_in) gets a trainable low-rank update:

    y = W x + (alpha / r) * B (A x)        A: (r, d_in), B: (d_out, r), B starts at zero

so each targeted linear layer adds r * (d_in + d_out) trainable parameters, and at step 0
the model is exactly the base model.

Lab 03 adds the learned update itself (`delta_w`, its norm and singular values computed
from the r x r factors) and the rank that gives two target sets the same parameter budget;
the count itself is `shapes.lora_parameter_count`, the sweep over r and alpha is `sweep`.
Shortcut: Llama-style decoder layers only.
"""

import math

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer

from qlora_lab import shapes
from qlora_lab.shapes import ALL_LINEAR


def lora_config(r: int = 16, alpha: float = 32, targets: str | list[str] = ALL_LINEAR, dropout: float = 0.0,
                rslora: bool = False, modules_to_save: list[str] | None = None):
    """peft's LoraConfig with the lab's defaults (a causal LM, no bias training).

    Example: lora_config(r=8, alpha=16, targets=["q_proj", "v_proj"]).r -> 8
    """
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


# --------------------------------------------------------------------------- budgets (lab 03)


def equal_budget_rank(arch, r: int, targets: list[str], reference: str | list[str] = ALL_LINEAR) -> int:
    """The rank for `targets` whose parameter count is closest to `reference` at rank r.

    Example: equal_budget_rank("smollm2-135m", 4, ["q_proj", "v_proj"]) -> 21  (vs all-linear at r=4)
    """
    budget = shapes.lora_parameter_count(arch, r, reference)
    per_rank = shapes.lora_parameter_count(arch, 1, targets)
    return max(1, round(budget / per_rank))


# --------------------------------------------------------------------------- the learned update


def lora_modules(model, adapter: str = "default") -> dict:
    """The peft LoRA layers of a model that carry `adapter`, by module name."""
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
