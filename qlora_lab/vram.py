"""A VRAM budget calculator that says where every byte of a training run goes.

`estimate(model="llama-2-7b", method="qlora", batch=4, seq=512, ...)` predicts the peak of
a training step, the highest point of `torch.cuda.max_memory_allocated` over forward,
backward and the optimizer step once the optimizer state exists, and of the whole run
(loading with from_pretrained and prepare_model_for_kbit_training included). It counts
tensors exactly from the architecture and models the run users launch:

    from_pretrained (k-bit or 16-bit) -> prepare_model_for_kbit_training (k-bit) -> LoRA (peft)
    -> Trainer(bf16=True): autocast around forward and loss, outputs to fp32, gradient
       accumulation over `grad_accum` micro-batches, the optimizer by its Trainer name
(`mixed_precision="no"` and `keep_outputs=True` describe hand-written loops.)

The step peaks at one of a few moments, each a sum of terms (`step_phases`; each term is a
function in `terms`, whose docstring gives its formula and source):
  forward        at the loss: weights + saved activations + logits, their fp32 copy and log-softmax
  layer-forward  with checkpointing: inside one layer's forward, its transient MLP tensors
  loss-backward  at the start of backward: the three vocabulary-sized fp32 buffers of cross-entropy
  layer-backward a decoder layer's backward (with checkpointing: its recomputed activations)
  optimizer      gradients + optimizer state + the optimizer's temporaries
  backward-end   full fine-tuning: every weight's gradient at once
Paged optimizer state (bitsandbytes) lives in CUDA unified memory, outside PyTorch's caching
allocator: it is `paged_bytes`, not in the peak. CUDA context and allocator slack are
`overhead_bytes`; `budget.verdict` holds all three tiers against a card. `setup_warnings`
names setups that do not do what they seem to. tests/test_vram.py checks the terms by hand
and the estimate against live tensor bytes; lab 01 checks it against GPU peaks.

Shortcuts: decoder-only Llama-style architectures (Llama, Mistral, Qwen2, SmolLM2); batches of
full-length sequences with no padding mask; the formulas follow transformers 5.x, peft 0.21,
accelerate 1.x and PyTorch's SDPA/eager attention; small terms (RoPE caches, int64 labels) are
left out. Everything is plain arithmetic: one estimate takes microseconds.
"""

from dataclasses import asdict, dataclass, field, replace

from qlora_lab import models, recipe, shapes, terms
from qlora_lab.recipe import DTYPE_BYTES
from qlora_lab.shapes import Arch

GiB = 2**30
METHODS = ("full", "lora", "qlora")
ATTENTIONS = ("sdpa", "eager")
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # Trainer's bf16=/fp16= (accelerate's mixed_precision)
CUBLAS_WORKSPACE = 32 * 2**20  # cuBLAS workspace PyTorch allocates per stream on Hopper-class GPUs (CUDA only)
CUDA_CONTEXT = 750 * 2**20  # CUDA context + kernels of torch/cuBLAS/bitsandbytes: device minus reserved, H100
ALLOCATOR_SLACK = 0.15  # reserved / allocated - 1 at the peak: 7-32 % measured on an H100; 15 % assumed


class SetupError(ValueError):
    """A setup the calculator cannot evaluate; the message says what is allowed."""


@dataclass(frozen=True)
class Setup:
    """One training configuration: everything that decides the memory of a step."""

    model: str = "llama-2-7b"  # preset shape (shapes.ARCHITECTURES), or a checkpoint dir / hub id
    method: str = "qlora"  # "full" (all weights train), "lora" (16-bit base + adapters), "qlora" (k-bit base + adapters)
    quant: str = "nf4"  # qlora base storage: "nf4" | "fp4" | "int8"
    base_dtype: str | None = None  # full/lora weights: "fp32" | "bf16" | "fp16" (None: full fp32, lora its 16-bit precision)
    compute_dtype: str = "bf16"  # dtype k-bit layers compute in (and unquantized parts are loaded in)
    double_quant: bool = True  # quantize the absmax scales again (QLoRA's double quantization)
    blocksize: int = 64  # weights per absmax scale (bitsandbytes 4-bit)
    prepare: bool = True  # qlora: peft's prepare_model_for_kbit_training (upcasts embeddings, norms, lm_head to fp32)
    r: int = 16  # LoRA rank
    targets: str | tuple = "all-linear"  # LoRA target modules: "all-linear" or names like ("q_proj", "v_proj")
    lora_dropout: float = 0.0  # LoRA dropout probability (> 0 keeps a dropped copy of each adapter input)
    adapter_dtype: str = "fp32"  # peft stores adapters in fp32 by default (autocast_adapter_dtype=True)
    optimizer: str = "adamw_torch"  # a transformers optim name from recipe.OPTIMIZERS (older names are aliases)
    batch: int = 1  # sequences per step
    seq: int = 512  # tokens per sequence
    checkpointing: bool = True  # gradient checkpointing of every decoder layer
    attn: str = "sdpa"  # attention implementation: "sdpa" (flash/efficient kernels) or "eager" (keeps s x s scores)
    mixed_precision: str | None = None  # "no" | "bf16" | "fp16" (Trainer's bf16=/fp16=); None: the compute dtype
    # for (Q)LoRA, "no" for full
    grad_accum: int = 1  # micro-batches per optimizer step; gradients of earlier ones stay alive
    keep_outputs: bool = False  # a hand loop that keeps `out = model(...)` (its logits) alive through backward

    @classmethod
    def of(cls, config: dict) -> "Setup":
        """The Setup of a grid entry, whose other keys (label, path, reason, ...) say how to measure or report it.

        Example: Setup.of({"model": "smollm2-135m", "batch": 2, "label": "small"}).batch -> 2
        """
        return cls(**{k: v for k, v in config.items() if k in cls.__dataclass_fields__})

    def precision(self) -> str:
        """The mixed precision in force. The default for LoRA and QLoRA is the compute dtype (bf16, or fp16 on a
        T4) because that is the run users launch: Trainer with bf16=True, as in the QLoRA guides' recipes (fp16=True
        where bf16 is not native); full fine-tunes are modelled without it."""
        return self.mixed_precision or ("no" if self.method == "full" else self.compute_dtype)

    def autocast(self) -> bool:
        """Whether forward runs under autocast (accelerate's way: Trainer with bf16=True or fp16=True)."""
        return self.precision() != "no"

    def resolved_base_dtype(self) -> str:
        """The weights' dtype: full fp32; LoRA in the 16-bit type it trains in (fp16 on a T4), else bf16."""
        return self.base_dtype or ("fp32" if self.method == "full" else
                                   self.precision() if self.precision() in ("bf16", "fp16") else "bf16")

    def target_list(self) -> list[str]:
        return shapes.target_list(self.targets)


def _arch(model) -> Arch:
    """The architecture of a preset name, an Arch, a transformers config, or a checkpoint dir / hub id."""
    if isinstance(model, str) and model not in shapes.ARCHITECTURES:
        try:
            return replace(shapes.of(models.config_for(model)), name=model)
        except models.HubUnavailable as err:  # a hub id that cannot be had now: its message names the fix
            raise SetupError(str(err)) from None
        except (models.ModelSpecError, OSError, ValueError) as err:
            raise SetupError(f"unknown model {model!r}: use a preset ({', '.join(shapes.ARCHITECTURES)}), "
                             f"a transformers config, or a checkpoint directory / hub id ({' '.join(str(err).split())})"
                             ) from None  # transformers' messages span lines: one line here
    try:
        return shapes.of(model)
    except ValueError as err:
        raise SetupError(str(err)) from None


def validate(setup: Setup, sh: Arch) -> None:
    """Raise SetupError naming what is allowed, for any input the calculator cannot honour."""
    def bad(msg):
        raise SetupError(msg)

    if setup.method not in METHODS:
        bad(f"method must be one of {METHODS}, got {setup.method!r}")
    if setup.method == "qlora" and setup.quant not in recipe.LOAD_QUANTS:
        bad(f"quant must be one of {recipe.LOAD_QUANTS} for qlora, got {setup.quant!r}")
    if setup.resolved_base_dtype() not in DTYPE_BYTES or setup.compute_dtype not in DTYPE_BYTES:
        bad(f"base_dtype and compute_dtype must be one of {tuple(DTYPE_BYTES)}")
    try:
        recipe.optimizer(setup.optimizer)
    except ValueError as err:
        bad(str(err))
    if setup.attn not in ATTENTIONS:
        bad(f"attn must be one of {ATTENTIONS}, got {setup.attn!r}")
    if setup.precision() not in MIXED_PRECISIONS:
        bad(f"mixed_precision must be one of {MIXED_PRECISIONS} (Trainer's bf16=True / fp16=True, or neither), "
            f"got {setup.mixed_precision!r}")
    if setup.autocast() and setup.method == "full":
        bad("mixed precision is modelled for LoRA and QLoRA; for a full fine-tune use mixed_precision='no'")
    if setup.method == "lora" and {setup.resolved_base_dtype(), setup.precision()} == {"bf16", "fp16"}:
        bad(f"a {setup.resolved_base_dtype()} base under {setup.precision()} autocast adds bf16 to fp16, which PyTorch "
            f"promotes to fp32 (a wider residual stream, not modelled): load the base in {setup.precision()} "
            f"(base_dtype='{setup.precision()}')")
    if not isinstance(setup.grad_accum, int) or setup.grad_accum <= 0:
        bad(f"grad_accum must be a positive integer, got {setup.grad_accum!r}")
    for name, value in (("batch", setup.batch), ("seq", setup.seq)):
        if not isinstance(value, int) or value <= 0:
            bad(f"{name} must be a positive integer, got {value!r}")
    if not 32 <= setup.blocksize <= 4096 or setup.blocksize & (setup.blocksize - 1):
        bad(f"blocksize must be a power of two from 32 to 4096, got {setup.blocksize!r}")
    if not 0.0 <= setup.lora_dropout < 1.0:
        bad(f"lora_dropout must be in [0, 1), got {setup.lora_dropout!r}")
    if setup.method != "full":
        if not isinstance(setup.r, int) or setup.r <= 0:
            bad(f"r must be a positive integer, got {setup.r!r}")
        try:
            targets = setup.target_list()
        except ValueError as err:
            bad(f"{err} ({sh.name})")
        for t in targets:
            d_in, d_out = shapes.linears(sh)[t]
            if setup.r > min(d_in, d_out):
                bad(f"r={setup.r} is larger than {t}'s dimensions ({d_in} -> {d_out}); use r <= {min(d_in, d_out)}")


# --------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """A predicted training-step peak and where its bytes go."""

    setup: Setup  # what was estimated
    shape: Arch  # the architecture's numbers
    terms: dict = field(default_factory=dict)  # bytes by term at the peak moment
    phases: dict = field(default_factory=dict)  # predicted allocated peak of each moment
    peak_allocated_bytes: int = 0  # predicted torch.cuda.max_memory_allocated over a training step
    peak_phase: str = ""  # which moment of the step sets that peak
    run_peak_bytes: int = 0  # the whole run: loading (from_pretrained + prepare) and every step
    run_peak_phase: str = ""  # which phase sets the whole run's peak ("load", "prepare" or a step's moment)
    warnings: list = field(default_factory=list)  # setups that do not do what they seem to (each names the fix)
    paged_bytes: int = 0  # optimizer state in CUDA unified memory (not in the peak, can spill to CPU)
    overhead_bytes: int = 0  # CUDA context + allocator slack: add to compare with nvidia-smi
    params: dict = field(default_factory=dict)  # parameter counts (total, trainable)
    gpus: int = 1  # GPUs the step is sharded over (fsdp.estimate); the bytes above are one GPU's
    host_bytes: int = 0  # CPU RAM held for the GPUs (FSDP CPU offload: sharded weights, gradients, optimizer state)

    @property
    def device_bytes(self) -> int:
        """What nvidia-smi would show at the run's peak: allocated + paged + overhead."""
        return max(self.peak_allocated_bytes, self.run_peak_bytes) + self.paged_bytes + self.overhead_bytes

    def to_dict(self) -> dict:
        return {"peak_allocated_bytes": self.peak_allocated_bytes, "paged_bytes": self.paged_bytes,
                "overhead_bytes": self.overhead_bytes, "device_bytes": self.device_bytes,
                "peak_phase": self.peak_phase, "run_peak_bytes": self.run_peak_bytes,
                "run_peak_phase": self.run_peak_phase, "warnings": list(self.warnings), "terms": dict(self.terms),
                "phases": dict(self.phases),
                "params": dict(self.params), "gpus": self.gpus, "host_bytes": self.host_bytes,
                "setup": asdict(self.setup), "model_shape": asdict(self.shape)}

    def table(self) -> str:
        """The breakdown as a text table (what the CLI prints), with any warnings."""
        s = self.setup
        head = (f"{s.model}  {s.method}" + (f" {s.quant}{'+dq' if s.double_quant else ''}" if s.method == "qlora" else
                                            f" {s.resolved_base_dtype()}")
                + (f"  r={s.r} targets={s.targets}" if s.method != "full" else "")
                + f"  {s.optimizer}  batch={s.batch} seq={s.seq}"
                + (f" x{s.grad_accum} accumulated" if s.grad_accum > 1 else "")
                + f"  checkpointing={'on' if s.checkpointing else 'off'}  mixed precision={s.precision()}"
                + (f"  FSDP over {self.gpus} GPUs (bytes per GPU)" if self.gpus > 1 else ""))
        rows = [head, f"{'term':<22}{'GiB':>10}"]
        rows += [f"{k:<22}{v / GiB:>10.3f}" for k, v in self.terms.items()]
        rows += [f"{'peak allocated':<22}{self.peak_allocated_bytes / GiB:>10.3f}   (a step's peak, at {self.peak_phase})",
                 f"{'whole run':<22}{self.run_peak_bytes / GiB:>10.3f}   (loading included, at {self.run_peak_phase})",
                 f"{'paged optimizer':<22}{self.paged_bytes / GiB:>10.3f}   (CUDA unified memory)",
                 f"{'CUDA overhead':<22}{self.overhead_bytes / GiB:>10.3f}   (context + allocator slack)",
                 f"{'device total':<22}{self.device_bytes / GiB:>10.3f}   (compare with nvidia-smi)",
                 f"trainable {self.params['trainable']:,} of {self.params['total']:,} parameters"]
        if self.host_bytes:
            rows.insert(-1, f"{'CPU offload (RAM)':<22}{self.host_bytes / GiB:>10.3f}   (all GPUs' shards, in CPU RAM)")
        return "\n".join(rows + [f"warning: {w}" for w in self.warnings])


def step_phases(setup: Setup, sh: Arch, device: str = "cuda") -> dict[str, dict[str, int]]:
    """Bytes by term at each candidate peak moment of a step (and of loading, see load_phases)."""
    t = setup.batch * setup.seq
    persistent = {"weights": terms.weight_bytes(setup, sh), "quant_constants": terms.quant_constant_bytes(setup, sh),
                  "lora_params": terms.lora_bytes(setup, sh), "optimizer": terms.optimizer_bytes(setup, sh)[0]}
    if device == "cuda":
        persistent["cuda_workspace"] = CUBLAS_WORKSPACE
    acts, lg = terms.activation_bytes(setup, sh, device), terms.logits_bytes(setup, sh)
    casts = terms.autocast_cast_bytes(setup, sh)
    grads = terms.gradient_bytes(setup, sh)
    kept_grads = grads if setup.grad_accum > 1 else 0  # earlier micro-batches' gradients, accumulating
    layer = terms.layer_activation_bytes(setup, sh, device)["total"] * t
    saved_casts = casts["adapters"] if not setup.checkpointing else casts["adapters"] // sh.layers  # recomputed layer
    phases = {
        "forward": {**persistent, "activations": acts, "logits": lg["logits"] + lg["fp32 copy"] + lg["log-softmax"],
                    "casts": casts["adapters"] + casts["lm_head"], "gradients": kept_grads},
        "loss-backward": {**persistent, "activations": acts, "logits": lg["log-softmax"] + lg["grad buffers"] + lg["kept"],
                          "casts": casts["lm_head"] + (0 if setup.checkpointing else casts["adapters"]),
                          "gradients": kept_grads},
        # adapters: the top layer, all saved activations still alive (with checkpointing: plus its
        # recomputed activations); full fine-tuning: the bottom layer, every gradient already there
        "layer-backward": ({**persistent, "activations": acts + (layer if setup.checkpointing else 0),
                            "temporaries": terms.layer_backward_temp_bytes(setup, sh), "logits": lg["kept"],
                            "casts": saved_casts, "gradients": kept_grads + grads // sh.layers}
                           if setup.method != "full" else
                           {**persistent, "activations": layer, "temporaries": terms.layer_backward_temp_bytes(setup, sh),
                            "gradients": grads}),
        "optimizer": {**persistent, "gradients": grads, "temporaries": terms.optimizer_temp_bytes(setup, sh, device)},
    }
    if setup.checkpointing:  # inside a checkpointed layer's forward: only the checkpoints are kept
        phases["layer-forward"] = {**persistent, "activations": acts, "casts": casts["adapters"], "gradients": kept_grads,
                                   "temporaries": terms.layer_forward_temp_bytes(setup, sh)}
    if setup.method == "full":
        # every weight has its gradient by the end of backward; a tied embedding's gradient arrives
        # twice (lm_head and embedding backward): one more V x h gradient and the sum of the two
        tied = 2 * terms.alloc_round(sh.vocab * sh.hidden * DTYPE_BYTES[setup.resolved_base_dtype()]) if sh.tied else 0
        phases["backward-end"] = {**persistent, "gradients": grads, "temporaries": tied}
    return {name: {k: v for k, v in terms.items() if v} for name, terms in phases.items()}


def estimate(model="llama-2-7b", device: str = "cuda", **kwargs) -> Estimate:
    """Predict the peak memory of a training step. Keyword arguments are the fields of Setup.

    model is a preset name, a transformers config, a checkpoint dir / hub id, or a shapes.Arch.
    device="cpu" drops the CUDA-only terms (cuBLAS workspace, context), to compare with
    measure.measure on a CPU.
    Example:
    >>> round(estimate("llama-2-7b", method="qlora", batch=4, seq=512).peak_allocated_bytes / 2**30, 2)
    6.57
    """
    sh = _arch(model)
    setup = Setup(model=model if isinstance(model, str) else sh.name, **kwargs)
    validate(setup, sh)
    setup = replace(setup, optimizer=recipe.optimizer(setup.optimizer).name,  # aliases: one name in results
                    mixed_precision=setup.precision())
    phases = step_phases(setup, sh, device)
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    peak_phase = max(totals, key=totals.get)
    run = {**terms.load_phases(setup, sh), **totals}
    run_phase = max(run, key=run.get)
    counts = shapes.parameter_counts(sh)
    trainable = (shapes.lora_parameter_count(sh, setup.r, setup.target_list()) if setup.method != "full"
                 else counts["total"])
    est = Estimate(setup=setup, shape=sh, terms=phases[peak_phase], phases=totals,
                   peak_allocated_bytes=totals[peak_phase], peak_phase=peak_phase, run_peak_bytes=run[run_phase],
                   run_peak_phase=run_phase, warnings=setup_warnings(setup, sh),
                   paged_bytes=terms.optimizer_bytes(setup, sh)[1],
                   params={"total": counts["total"] + trainable * (setup.method != "full"), "trainable": trainable})
    est.overhead_bytes = CUDA_CONTEXT + int(ALLOCATOR_SLACK * est.run_peak_bytes) if device == "cuda" else 0
    return est


def setup_warnings(setup: Setup, sh: Arch | None = None) -> list[str]:
    """Setups that do not do what they seem to, each with the fix.

    Example: setup_warnings(Setup(checkpointing=False))[0] -> "prepare_model_for_kbit_training(model) turns ..."
    """
    out = []
    if sh is not None and setup.seq > sh.max_positions:
        out.append(f"seq={setup.seq} is longer than {sh.name or 'the model'}'s context ({sh.max_positions} positions): "
                   f"the model was not trained for it, and RoPE scaling would be needed; use seq <= {sh.max_positions}.")
    if setup.method == "qlora" and setup.prepare and not setup.checkpointing:
        out.append("prepare_model_for_kbit_training(model) turns gradient checkpointing ON by default, and "
                   "TrainingArguments(gradient_checkpointing=False) does not turn it off: call it with "
                   "use_gradient_checkpointing=False, or this 'no checkpointing' run will checkpoint (lab 01 measures "
                   "the pair in section 7).")
    if setup.autocast() and setup.method == "qlora" and setup.precision() != setup.compute_dtype:
        out.append(f"mixed precision {setup.mixed_precision} with a {setup.compute_dtype} compute dtype: autocast runs "
                   f"the adapters and attention in {setup.mixed_precision} while every 4-bit layer casts its input to "
                   f"{setup.compute_dtype} and back, so two 16-bit types meet in every layer (and fp16 can overflow "
                   f"where bf16 would not). Use the same dtype for both: bf16=True with bnb_4bit_compute_dtype="
                   f"torch.bfloat16 where the GPU supports it, fp16=True with float16 on a T4 or V100.")
    return out


