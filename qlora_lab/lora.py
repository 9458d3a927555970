"""LoRA adapters on a (4-bit) base model, through peft, and what they cost.

The lab never re-implements LoRA: adapters are peft's (`LoraConfig`, `get_peft_model`), and
the 4-bit preparation is peft's `prepare_model_for_kbit_training`. This module holds the
lab's defaults in one place and the arithmetic a learner should be able to do by hand.

In a LoRA layer the frozen weight W (d_out x d_in) gets a trainable low-rank update:

    y = W x + (alpha / r) * B (A x)        A: (r, d_in), B: (d_out, r), B starts at zero

so each targeted linear layer adds r * (d_in + d_out) trainable parameters, and at step 0
the model is exactly the base model.
"""

import torch

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
