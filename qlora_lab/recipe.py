"""The vocabulary of a training recipe, defined once: devices, dtypes, quant types, optimizers.

Every other module (the calculator, the measurements, training, the widgets) takes these
names from here, so a name means the same thing everywhere.

- Optimizers are spelled as transformers spells `TrainingArguments(optim=...)`:
  `adamw_torch`, `adamw_torch_fused`, `adamw_bnb_8bit`, `paged_adamw_8bit`,
  `paged_adamw_32bit`, `sgd`. The lab's older names stay as aliases (`adamw`,
  `adamw_8bit`); `sgd_momentum` is the lab's name for Trainer's
  `optim="sgd", optim_args="momentum=0.9"`.
- Quantization: bitsandbytes loads NF4, FP4 (4-bit) and int8; lab 02's from-scratch code
  books are NF4, FP4 and a plain INT4 baseline.
- The default device is CUDA when visible, else the CPU; the compute dtype is bf16 where the
  device computes in it, else fp16.

Shortcut: only the optimizers the lab measures are in the table.
"""

import os
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------- dtypes and quant types

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # name -> torch dtype
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # name -> bytes per element
FOUR_BIT = ("nf4", "fp4")  # bitsandbytes' 4-bit storage formats
LOAD_QUANTS = FOUR_BIT + ("int8",)  # what load_model(quant=...) and the calculator take (None: 16-bit)
CODEBOOKS = FOUR_BIT + ("int4",)  # lab 02's code books: bitsandbytes' two and a plain symmetric INT4


def check_quant(quant: str | None, allowed: tuple = LOAD_QUANTS + (None,)) -> None:
    """Raise ValueError naming the accepted values. Example: check_quant("nf3") -> ValueError(...)"""
    if quant not in allowed:
        raise ValueError(f"quant must be one of {allowed}, got {quant!r}")


# --------------------------------------------------------------------------- devices


def default_device() -> str:
    """"cuda" when a CUDA GPU is visible, else "cpu". Example: default_device() -> "cpu" """
    return "cuda" if torch.cuda.is_available() else "cpu"


COMPUTE_DTYPE_ENV = "QLORA_LAB_COMPUTE_DTYPE"  # "bf16" or "fp16": force it (rehearse a T4's fp16 path on any GPU)


def default_compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bf16 where the device runs it natively, else fp16; $QLORA_LAB_COMPUTE_DTYPE forces one.

    GPUs run bf16 natively from compute capability 8.0 (Ampere) on. A T4 (7.5) or V100 (7.0)
    does not, although torch.cuda.is_bf16_supported() says True there (it emulates it,
    slowly): they get fp16. Every CPU that PyTorch supports computes in bf16.
    Example: default_compute_dtype("cpu") -> torch.bfloat16
    """
    forced = os.environ.get(COMPUTE_DTYPE_ENV)
    if forced:
        if forced not in ("bf16", "fp16"):
            raise ValueError(f"{COMPUTE_DTYPE_ENV} must be bf16 or fp16, got {forced!r}")
        return DTYPES[forced]
    device = torch.device(device or default_device())
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.bfloat16


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype in DTYPES. Example: dtype_name(torch.bfloat16) -> "bf16" """
    return next(name for name, d in DTYPES.items() if d == dtype)


# --------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class Optimizer:
    """What an optimizer keeps per trainable tensor, by its transformers name."""

    name: str  # TrainingArguments(optim=name)
    states: int  # state tensors per trainable tensor: Adam's two moments, SGD momentum's one, or none
    eight_bit: bool = False  # bitsandbytes 8-bit blockwise state (for tensors of >= 4096 elements)
    paged: bool = False  # state in CUDA unified memory (bitsandbytes, tensors of >= 1e5 elements)
    fused: bool = False  # torch's fused kernel: updates in place, no foreach temporaries
    optim_args: str = ""  # TrainingArguments(optim_args=...) that goes with it


OPTIMIZERS = {o.name: o for o in (
    Optimizer("adamw_torch", 2),
    Optimizer("adamw_torch_fused", 2, fused=True),
    Optimizer("adamw_bnb_8bit", 2, eight_bit=True),
    Optimizer("paged_adamw_8bit", 2, eight_bit=True, paged=True),
    Optimizer("paged_adamw_32bit", 2, paged=True),
    Optimizer("sgd", 0),
    Optimizer("sgd_momentum", 1, optim_args="momentum=0.9"),
)}
OPTIMIZER_ALIASES = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit"}  # the lab's older names


def optimizer(name: str) -> Optimizer:
    """The table entry for a Trainer name or an alias; ValueError listing the accepted names.

    Example: optimizer("adamw").name -> "adamw_torch"
    """
    entry = OPTIMIZERS.get(OPTIMIZER_ALIASES.get(name, name))
    if entry is None:
        raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)} "
                         f"(or the older names {', '.join(OPTIMIZER_ALIASES)})")
    return entry


def trainer_optim(name: str) -> tuple[str, str]:
    """(optim, optim_args) for TrainingArguments. Example: trainer_optim("sgd_momentum") -> ("sgd", "momentum=0.9")"""
    entry = optimizer(name)
    return ("sgd" if entry.name == "sgd_momentum" else entry.name), entry.optim_args


def make_optimizer(name: str, params, lr: float = 1e-4, weight_decay: float = 0.0):
    """The torch / bitsandbytes optimizer a name stands for, over params (what Trainer would build).

    Example: make_optimizer("paged_adamw_8bit", lora.trainable_parameters(model))
    """
    entry, params = optimizer(name), list(params)
    if entry.name.startswith("adamw_torch"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=entry.fused or None)
    if entry.name.startswith("sgd"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9 if entry.states else 0.0, weight_decay=weight_decay)
    import bitsandbytes as bnb  # only the 8-bit and paged optimizers need it

    classes = {"adamw_bnb_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return classes[entry.name](params, lr=lr, weight_decay=weight_decay)
