"""A VRAM budget calculator that says where every byte of a training step goes.

`estimate(model="llama-2-7b", method="qlora", batch=4, seq=512, ...)` predicts the peak of
steady-state training: the highest point of `torch.cuda.max_memory_allocated` over one step
(forward, backward, optimizer step) once the optimizer state exists. It counts tensors
exactly from the architecture (embeddings tied or not, grouped-query attention, MLP, norms,
biases) and models the lab's training recipe term by term:

    load (k-bit or 16-bit) -> peft prepare_model_for_kbit_training (k-bit) -> LoRA (peft)
    -> loss = model(ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

The step peaks at one of a few moments, each a sum of terms (see `_phases`):
  forward        at the loss: weights + saved activations + logits, their fp32 copy and log-softmax
  layer-forward  with checkpointing: inside one layer's forward, its transient MLP tensors
  loss-backward  at the start of backward: the three vocabulary-sized fp32 buffers of cross-entropy
  layer-backward a decoder layer's backward (with checkpointing: its recomputed activations)
  optimizer      gradients + optimizer state + the optimizer's temporaries
  backward-end   full fine-tuning: every weight's gradient at once
Paged optimizer state (bitsandbytes) lives in CUDA unified memory, outside PyTorch's caching
allocator: it is reported as `paged_bytes`, not in the peak. CUDA context and allocator slack
are `overhead_bytes`, so the prediction compares both with max_memory_allocated and with
nvidia-smi. Every term is a function below whose docstring gives its formula and source;
`tests/test_vram.py` checks them against hand computations, and labs/01 against GPU peaks.

Shortcuts: decoder-only Llama-style architectures (Llama, Mistral, Qwen2, SmolLM2); batches of
full-length sequences with no padding mask; the activation formulas follow transformers 5.x
modules and PyTorch's SDPA/eager attention; a few small terms (bias-free RoPE caches, int64
labels) are folded into `misc`. Everything is plain arithmetic: one estimate takes microseconds.
"""

import math
from dataclasses import asdict, dataclass, field, replace

from qlora_lab import models, recipe, shapes
from qlora_lab.recipe import DTYPE_BYTES
from qlora_lab.shapes import Arch

GiB = 2**30
METHODS = ("full", "lora", "qlora")
ATTENTIONS = ("sdpa", "eager")
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # Trainer's bf16=/fp16= (accelerate's mixed_precision)
ALLOC_ROUND = 512  # PyTorch's CUDA caching allocator rounds every tensor up to a multiple of 512 bytes
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only state tensors of at least 1e5 elements
BNB_8BIT_MIN_NUMEL = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this
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
    base_dtype: str | None = None  # full/lora weights: "fp32" | "bf16" | "fp16" (None: full fp32, lora bf16)
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
    mixed_precision: str | None = None  # "no" | "bf16" | "fp16" (Trainer's bf16=/fp16=); None: bf16 for (Q)LoRA, no for full
    grad_accum: int = 1  # micro-batches per optimizer step; gradients of earlier ones stay alive
    keep_outputs: bool = False  # a hand loop that keeps `out = model(...)` (its logits) alive through backward

    def precision(self) -> str:
        """The mixed precision in force. The default is bf16 for LoRA and QLoRA because that is the run users
        launch: Trainer with bf16=True, as in the QLoRA guides' recipes; full fine-tunes are modelled without it."""
        return self.mixed_precision or ("no" if self.method == "full" else "bf16")

    def autocast(self) -> bool:
        """Whether forward runs under autocast (accelerate's way: Trainer with bf16=True or fp16=True)."""
        return self.precision() != "no"

    def resolved_base_dtype(self) -> str:
        return self.base_dtype or ("fp32" if self.method == "full" else "bf16")

    def target_list(self) -> list[str]:
        return shapes.target_list(self.targets)


def _arch(model) -> Arch:
    """The architecture of a preset name, an Arch, a transformers config, or a checkpoint dir / hub id."""
    if isinstance(model, str) and model not in shapes.ARCHITECTURES:
        try:
            return replace(shapes.of(models.config_for(model)), name=model)
        except (models.ModelSpecError, OSError, ValueError) as err:
            raise SetupError(f"unknown model {model!r}: use a preset ({', '.join(shapes.ARCHITECTURES)}), "
                             f"a transformers config, or a checkpoint directory / hub id ({err})") from None
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


# --------------------------------------------------------------------------- persistent terms


def _round(nbytes: float) -> int:
    """Bytes the CUDA caching allocator books for one tensor: rounded up to 512."""
    return int(math.ceil(nbytes / ALLOC_ROUND) * ALLOC_ROUND) if nbytes > 0 else 0


def weight_bytes(setup: Setup, sh: Arch) -> int:
    """Stored base weights, quantization constants excluded.

    qlora nf4/fp4: each decoder linear of n weights is a uint8 tensor of ceil(n/2) bytes (two
    4-bit codes per byte, bitsandbytes Params4bit); int8: n bytes (Int8Params). Everything else
    (embeddings, lm_head when untied, norms, biases) stays unquantized: fp32 after
    prepare_model_for_kbit_training's upcast, else the compute dtype.
    lora/full: every parameter in the base dtype (2 bytes bf16/fp16, 4 bytes fp32).
    Example: weight_bytes(Setup(method="lora"), shapes.of("llama-2-7b")) -> 13_476_831_232 (2 x 6.74e9)
    """
    if setup.method != "qlora":
        return shapes.parameter_counts(sh)["total"] * DTYPE_BYTES[setup.resolved_base_dtype()]
    per_weight = 0.5 if setup.quant in ("nf4", "fp4") else 1
    linear = sum(_round(math.ceil(a * b * per_weight)) for a, b in shapes.linears(sh).values())
    other = 4 if setup.prepare else DTYPE_BYTES[setup.compute_dtype]
    bias = sum(_round(n * other) for n in (sh.q_dim, sh.kv_dim, sh.kv_dim)) if sh.qkv_bias else 0
    embeddings = _round(sh.vocab * sh.hidden * other) * (1 if sh.tied else 2)
    return sh.layers * (linear + bias + 2 * _round(sh.hidden * other)) + _round(sh.hidden * other) + embeddings


def quant_constant_bytes(setup: Setup, sh: Arch) -> int:
    """Quantization constants of the k-bit linears.

    4-bit, per linear of n weights, blocks = ceil(n / blocksize):
      no double quant: absmax fp32 (4 x blocks) + the 16-value code book (64 B)
      double quant:    absmax as uint8 (blocks B) + second-level absmax fp32 (4 x ceil(blocks/256))
                       + 16-value code (64 B) + offset (4 B); the 256-value dynamic map is shared
    (bitsandbytes functional.quantize_4bit; each tensor rounded up to 512 B by the allocator).
    int8: one fp32 scale per output row (SCB).
    Example: nf4 with double quant stores 8/64 + 32/(64*256) = 0.127 bits per weight of constants
    """
    if setup.method != "qlora":
        return 0
    total = 0
    for d_in, d_out in shapes.linears(sh).values():
        n = d_in * d_out
        if setup.quant == "int8":
            total += _round(4 * d_out)
            continue
        blocks = math.ceil(n / setup.blocksize)
        if setup.double_quant:
            total += _round(blocks) + _round(4 * math.ceil(blocks / 256)) + _round(64) + _round(4)
        else:
            total += _round(4 * blocks) + _round(64)
    return total * sh.layers


def _trainable_tensors(setup: Setup, sh: Arch) -> list[tuple[int, int, int]]:
    """(numel, bytes per element, how many such tensors) for every kind of trainable tensor."""
    if setup.method == "full":
        b = DTYPE_BYTES[setup.resolved_base_dtype()]
        tensors = [(a * c, b, sh.layers) for a, c in shapes.linears(sh).values()]
        tensors += [(sh.hidden, b, 2 * sh.layers + 1), (sh.vocab * sh.hidden, b, 1 if sh.tied else 2)]
        if sh.qkv_bias:
            tensors += [(sh.q_dim, b, sh.layers), (sh.kv_dim, b, 2 * sh.layers)]
        return tensors
    f = DTYPE_BYTES[setup.adapter_dtype]
    lin = shapes.linears(sh)
    tensors = []
    for t in setup.target_list():
        d_in, d_out = lin[t]
        tensors += [(setup.r * d_in, f, sh.layers), (setup.r * d_out, f, sh.layers)]
    return tensors


def lora_bytes(setup: Setup, sh: Arch) -> int:
    """Adapter weights: lora_parameter_count x 4 bytes (peft keeps A and B in fp32)."""
    if setup.method == "full":
        return 0
    return sum(k * _round(n * b) for n, b, k in _trainable_tensors(setup, sh))


def gradient_bytes(setup: Setup, sh: Arch) -> int:
    """One gradient per trainable tensor, in its dtype (LoRA: fp32 adapters only; full: every weight)."""
    return sum(k * _round(n * b) for n, b, k in _trainable_tensors(setup, sh))


def optimizer_bytes(setup: Setup, sh: Arch) -> tuple[int, int]:
    """(allocator bytes, paged bytes) of optimizer state.

    adamw_torch(_fused): two states per trainable tensor in its own dtype (exp_avg, exp_avg_sq)
    adamw_bnb_8bit:      two uint8 states + two fp32 absmax per 256-block for tensors of >= 4096
                         elements; two fp32 states below that (bitsandbytes Optimizer2State)
    paged_* (bnb):       the same (paged_adamw_32bit: fp32 states), but state tensors of >= 1e5
                         elements are allocated in CUDA unified memory (F.get_paged): outside
                         PyTorch's allocator, pageable to CPU
    sgd: none; sgd_momentum: one momentum buffer per tensor.
    """
    opt = recipe.optimizer(setup.optimizer)
    bnb = opt.eight_bit or opt.paged
    alloc = paged = 0
    for n, b, k in _trainable_tensors(setup, sh):
        if not bnb:
            alloc += k * opt.states * _round(n * b)
            continue
        eight_bit = opt.eight_bit and n >= BNB_8BIT_MIN_NUMEL
        state = n if eight_bit else 4 * n
        if opt.paged and n >= PAGED_MIN_NUMEL:
            paged += k * 2 * state
        else:
            alloc += k * 2 * _round(state)
        if eight_bit:
            alloc += k * (2 * _round(4 * math.ceil(n / 256)) + _round(4))  # absmax1/2 + unorm_vec
    return alloc, paged


def optimizer_temp_bytes(setup: Setup, sh: Arch, device: str = "cuda") -> int:
    """Temporaries of one optimizer step.

    torch AdamW's foreach implementation (adamw_torch, the default on CUDA) computes
    sqrt(exp_avg_sq) for all tensors at once into new tensors: one more copy of the state's
    size. On CPU it loops over tensors (no such copy); the fused kernel (adamw_torch_fused),
    bitsandbytes' kernels and SGD update in place.
    """
    if recipe.optimizer(setup.optimizer).name != "adamw_torch" or device != "cuda":
        return 0
    return gradient_bytes(setup, sh)  # one temporary per state tensor, same sizes as the gradients


# --------------------------------------------------------------------------- activations


def stream_bytes(setup: Setup) -> int:
    """Bytes per element of the hidden states between layers.

    qlora with prepare_model_for_kbit_training: 4 — the embeddings are upcast to fp32, so the
    residual stream is fp32 (the 4-bit layers cast their input to the compute dtype and their
    output back). Otherwise the dtype of the weights.
    """
    if setup.method == "qlora":
        return 4 if setup.prepare else DTYPE_BYTES[setup.compute_dtype]
    return DTYPE_BYTES[setup.resolved_base_dtype()]


def attention_kernel(setup: Setup, sh: Arch, device: str = "cuda") -> str:
    """Which attention computation runs: "fused" (flash / memory-efficient / CPU flash) or "scores".

    "scores" materialises the s x s attention probabilities: eager attention always, and
    PyTorch's SDPA on CUDA when the stream is fp32 and the model uses grouped-query attention:
    flash attention needs 16-bit inputs and the memory-efficient kernel does not take GQA, so
    SDPA falls back to its math kernel. That is QLoRA after prepare_model_for_kbit_training
    (fp32 stream) on Llama-3, Mistral, Qwen2 or SmolLM2 (measured on an H100, torch 2.11),
    without mixed precision; Trainer's bf16=True casts q, k, v to bf16 and flash attention runs.
    Example: attention_kernel(Setup(model="mistral-7b"), shapes.of("mistral-7b")) -> "scores"
    """
    if setup.attn == "eager":
        return "scores"
    if device == "cuda" and not setup.autocast() and stream_bytes(setup) == 4 and sh.kv_heads < sh.heads:
        return "scores"  # under autocast SDPA gets 16-bit inputs, and flash attention takes them
    return "fused"


def layer_activation_bytes(setup: Setup, sh: Arch, device: str = "cuda") -> dict[str, int]:
    """Bytes autograd saves for backward in one decoder layer, per token, by part (no checkpointing).

    With a = stream bytes, f = adapter bytes (4), m = bytes of what attention and the adapters
    compute in (2 under autocast, else a and f), h/q/kv/I = hidden/query/kv/intermediate sizes,
    s = sequence length, n = query heads:
      norms      2 x (4h + 4): RMSNorm saves an fp32 copy of its input (the input itself when
                 already fp32) and 1/rms; trainable norms (full) also save the normalised a*h
      attention  fused kernels: q, k, v and the output, m*(2q + 2kv), + fp32 logsumexp per head;
                 with scores (eager, or SDPA's math fallback, see attention_kernel): q and k, v
                 repeated to every head (3mq) + the softmax probabilities, s*n*4 in fp32, plus
                 their cast copy s*n*m when attention computes in 16 bits
      mlp        SiLU saves gate (aI); the product saves silu(gate) and up: 3aI
      inputs     what the consumers of each linear's input keep. full: every base linear saves
                 its input for its weight gradient (the two norm outputs, the MLP product, and
                 the attention output, which sdpa already saved). LoRA/QLoRA without autocast:
                 each targeted lora_A saves its input cast to fp32 — one shared tensor per input
                 when the stream is already fp32, one copy per module otherwise; lora_B saves
                 lora_A's output (f*r). Under autocast every lora_A saves its own 16-bit copy
                 of its input (2*d_in; o_proj's too: peft casts it to fp32 first, autocast back)
                 and lora_B a 16-bit input (2r)
      dropout    lora_dropout > 0: per targeted module a dropped copy (f * d_in, 2 * d_in under
                 autocast) and the mask (bool on CUDA, 1 byte; fp32 on CPU, 4 bytes)
    Measured per tensor with autograd's saved-tensor hooks (tests/test_vram.py checks the totals).
    Example: layer_activation_bytes(Setup(mixed_precision="no"), shapes.of("smollm2-135m"))["total"] -> 40_324
    """
    a = stream_bytes(setup)
    h, q, kv, inter, s, n = sh.hidden, sh.q_dim, sh.kv_dim, sh.intermediate, setup.seq, sh.heads
    m = 2 if setup.autocast() else a
    sdpa = attention_kernel(setup, sh, device) == "fused"
    parts = {"norms": 2 * (4 * h + 4) + (2 * a * h if setup.method == "full" else 0)}
    if sdpa:
        parts["attention"] = m * (2 * q + 2 * kv) + 4 * n
    else:
        parts["attention"] = 3 * m * q + s * n * (4 + (m if m != 4 else 0))
    parts["mlp"] = 3 * a * inter
    if setup.method == "full":
        parts["inputs"] = a * (2 * h + inter + (0 if sdpa else q))
        return {**parts, "total": sum(parts.values())}
    parts.update(_adapter_input_bytes(setup, sh, sdpa, device))
    return {**parts, "total": sum(parts.values())}


def _adapter_input_bytes(setup: Setup, sh: Arch, sdpa: bool, device: str) -> dict[str, int]:
    """Per token: the adapters' saved inputs (and with dropout, the dropped copies and masks); see layer_activation_bytes."""
    a, f = stream_bytes(setup), DTYPE_BYTES[setup.adapter_dtype]
    copy = 2 if setup.autocast() else f  # bytes of the copy lora_A saves
    targets = set(setup.target_list())
    d_in = {"q_proj": sh.hidden, "k_proj": sh.hidden, "v_proj": sh.hidden, "o_proj": sh.q_dim, "gate_proj": sh.hidden,
            "up_proj": sh.hidden, "down_proj": sh.intermediate}
    mask = 1 if device == "cuda" else 4
    inputs = dropout = 0
    for group in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)):
        hit = [t for t in group if t in targets]
        if not hit:
            continue
        width = d_in[hit[0]]
        if setup.lora_dropout > 0:
            dropout += len(hit) * (copy + mask) * width
        elif setup.autocast() or a != f:
            inputs += len(hit) * copy * width
        else:
            inputs += 0 if (group == ("o_proj",) and sdpa) else f * width  # sdpa saved the o_proj input already
    parts = {"inputs": inputs + len(targets) * (2 if setup.autocast() else f) * setup.r}
    return {**parts, "dropout": dropout} if dropout else parts


def activation_bytes(setup: Setup, sh: Arch, device: str = "cuda") -> int:
    """Saved activations of the whole forward (logits and loss excluded), for batch x seq tokens.

    No checkpointing: layers x layer_activation_bytes + the final norm (4h + 4).
    Checkpointing (transformers, non-reentrant, one checkpoint per decoder layer): each layer
    keeps only its input, a x h per token; the final norm as above.
    """
    t = setup.batch * setup.seq
    a = stream_bytes(setup)
    final_norm = 4 * sh.hidden + 4 + (a * sh.hidden if setup.method == "full" else 0)
    per_layer = a * sh.hidden if setup.checkpointing else layer_activation_bytes(setup, sh, device)["total"]
    return t * (sh.layers * per_layer + final_norm)


def logits_bytes(setup: Setup, sh: Arch) -> dict[str, int]:
    """The vocabulary-sized tensors of the loss, for batch x seq tokens (t) and vocab V.

    logits:     t x V in the lm_head's dtype (fp32 after prepare's upcast, else the weights' dtype;
                2 bytes under autocast, which runs lm_head in 16 bits)
    fp32 copy:  transformers' ForCausalLMLoss calls logits.float(): a t x V x 4 copy unless already
                fp32 (under autocast accelerate then converts the returned logits to fp32 too: the
                same size, at a moment when the first copy is gone)
    log-softmax output: t x V x 4, saved by cross_entropy for backward
    backward:   nll_loss's gradient and log_softmax's gradient, each t x V x 4
    kept:       keep_outputs: the returned logits held through backward (t x V x 4 under autocast)
    """
    t, v = setup.batch * setup.seq, sh.vocab
    a_l = 2 if setup.autocast() else stream_bytes(setup) if setup.method != "qlora" or not setup.prepare else 4
    kept = t * v * (4 if setup.autocast() else a_l) if setup.keep_outputs else 0
    return {"logits": t * v * a_l, "fp32 copy": 0 if a_l == 4 else t * v * 4, "log-softmax": t * v * 4,
            "grad buffers": 2 * t * v * 4, "kept": kept}


def autocast_cast_bytes(setup: Setup, sh: Arch) -> dict[str, int]:
    """16-bit copies of fp32 weights that autocast makes and autograd keeps for backward.

    adapters: every fp32 lora_A/lora_B weight, cast once per forward (autocast caches casts of
              weights that require grad until the forward ends): 2 bytes per adapter parameter
    lm_head:  prepare_model_for_kbit_training upcast the output head to fp32; autocast runs it in
              16 bits, and the cast copy (V x h x 2) stays saved until the head's backward
    Example: autocast_cast_bytes(Setup(), shapes.of("llama-3.1-8b"))["lm_head"] -> 1_050_673_152 (128,256 x 4096 x 2)
    """
    if not setup.autocast() or setup.method == "full":
        return {"adapters": 0, "lm_head": 0}
    adapters = 2 * shapes.lora_parameter_count(sh, setup.r, setup.target_list()) if setup.adapter_dtype == "fp32" else 0
    fp32_head = setup.method == "qlora" and setup.prepare
    return {"adapters": adapters, "lm_head": 2 * sh.vocab * sh.hidden if fp32_head else 0}


def layer_forward_temp_bytes(setup: Setup, sh: Arch) -> int:
    """Transient tensors inside one checkpointed layer's forward (nothing is saved there).

    The MLP holds gate, silu(gate), up and their product at once (4 x a x t x I); a k-bit
    projection adds its 16-bit output before the cast back (2tI) and a dequantized weight;
    16-bit LoRA adds the fp32 copy of the down projection's input for its adapter.
    """
    t, a = setup.batch * setup.seq, stream_bytes(setup)
    temp = 4 * a * t * sh.intermediate
    if setup.method == "qlora":
        temp += 2 * t * sh.intermediate + 2 * max(d_in * d_out for d_in, d_out in shapes.linears(sh).values())
    elif setup.method == "lora" and "down_proj" in setup.target_list() and a != DTYPE_BYTES[setup.adapter_dtype]:
        temp += DTYPE_BYTES[setup.adapter_dtype] * t * sh.intermediate
    return temp


def layer_backward_temp_bytes(setup: Setup, sh: Arch) -> int:
    """Transient gradient buffers while one decoder layer runs backward (peaking in its MLP).

    The gradients of the MLP's intermediate tensors (t x I each) coexist for a moment: the
    down projection's input gradient from the base layer (computed in 16-bit, cast to the
    stream dtype) and from the adapter, their sum, and the gradients of silu(gate) and up,
    while the saved inputs they consume are released: about (a + 4) bytes per t x I element,
    as measured with measure.LiveTensorBytes. A k-bit projection is dequantized for its input
    gradient: one 16-bit copy of the largest weight (bitsandbytes MatMul4Bit.backward).
    """
    t = setup.batch * setup.seq
    temp = t * sh.intermediate * (stream_bytes(setup) + 4)
    if setup.method == "qlora":
        temp += 2 * max(d_in * d_out for d_in, d_out in shapes.linears(sh).values())
    return temp


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
                "params": dict(self.params), "setup": asdict(self.setup), "model_shape": asdict(self.shape)}

    def table(self) -> str:
        """The breakdown as a text table (what the CLI prints), with any warnings."""
        s = self.setup
        head = (f"{s.model}  {s.method}" + (f" {s.quant}{'+dq' if s.double_quant else ''}" if s.method == "qlora" else
                                            f" {s.resolved_base_dtype()}")
                + (f"  r={s.r} targets={s.targets}" if s.method != "full" else "")
                + f"  {s.optimizer}  batch={s.batch} seq={s.seq}"
                + (f" x{s.grad_accum} accumulated" if s.grad_accum > 1 else "")
                + f"  checkpointing={'on' if s.checkpointing else 'off'}  mixed precision={s.precision()}")
        rows = [head, f"{'term':<22}{'GiB':>10}"]
        rows += [f"{k:<22}{v / GiB:>10.3f}" for k, v in self.terms.items()]
        rows += [f"{'peak allocated':<22}{self.peak_allocated_bytes / GiB:>10.3f}   (a step's peak, at {self.peak_phase})",
                 f"{'whole run':<22}{self.run_peak_bytes / GiB:>10.3f}   (loading included, at {self.run_peak_phase})",
                 f"{'paged optimizer':<22}{self.paged_bytes / GiB:>10.3f}   (CUDA unified memory)",
                 f"{'CUDA overhead':<22}{self.overhead_bytes / GiB:>10.3f}   (context + allocator slack)",
                 f"{'device total':<22}{self.device_bytes / GiB:>10.3f}   (compare with nvidia-smi)",
                 f"trainable {self.params['trainable']:,} of {self.params['total']:,} parameters"]
        return "\n".join(rows + [f"warning: {w}" for w in self.warnings])


def _phases(setup: Setup, sh: Arch, device: str = "cuda") -> dict[str, dict[str, int]]:
    """Bytes by term at each candidate peak moment of a step (and of loading, see load_phases)."""
    t = setup.batch * setup.seq
    persistent = {"weights": weight_bytes(setup, sh), "quant_constants": quant_constant_bytes(setup, sh),
                  "lora_params": lora_bytes(setup, sh), "optimizer": optimizer_bytes(setup, sh)[0]}
    if device == "cuda":
        persistent["cuda_workspace"] = CUBLAS_WORKSPACE
    acts, lg, casts = activation_bytes(setup, sh, device), logits_bytes(setup, sh), autocast_cast_bytes(setup, sh)
    grads = gradient_bytes(setup, sh)
    kept_grads = grads if setup.grad_accum > 1 else 0  # earlier micro-batches' gradients, accumulating
    layer = layer_activation_bytes(setup, sh, device)["total"] * t
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
                            "temporaries": layer_backward_temp_bytes(setup, sh), "logits": lg["kept"],
                            "casts": saved_casts, "gradients": kept_grads + grads // sh.layers}
                           if setup.method != "full" else
                           {**persistent, "activations": layer, "temporaries": layer_backward_temp_bytes(setup, sh),
                            "gradients": grads}),
        "optimizer": {**persistent, "gradients": grads, "temporaries": optimizer_temp_bytes(setup, sh, device)},
    }
    if setup.checkpointing:  # inside a checkpointed layer's forward: only the checkpoints are kept
        phases["layer-forward"] = {**persistent, "activations": acts, "temporaries": layer_forward_temp_bytes(setup, sh),
                                   "casts": casts["adapters"], "gradients": kept_grads}
    if setup.method == "full":
        # every weight has its gradient by the end of backward; a tied embedding's gradient arrives
        # twice (lm_head and embedding backward): one more V x h gradient and the sum of the two
        tied = 2 * _round(sh.vocab * sh.hidden * DTYPE_BYTES[setup.resolved_base_dtype()]) if sh.tied else 0
        phases["backward-end"] = {**persistent, "gradients": grads, "temporaries": tied}
    return {name: {k: v for k, v in terms.items() if v} for name, terms in phases.items()}


def estimate(model="llama-2-7b", device: str = "cuda", **kwargs) -> Estimate:
    """Predict the peak memory of a training step. Keyword arguments are the fields of Setup.

    model is a preset name, a transformers config, a checkpoint dir / hub id, or a shapes.Arch.
    device="cpu" drops the CUDA-only terms (cuBLAS workspace, context), to compare with
    measure.measure on a CPU.
    Example: estimate("llama-2-7b", method="qlora", batch=4, seq=512).peak_allocated_bytes / 2**30 -> ~5.9
    """
    sh = _arch(model)
    setup = Setup(model=model if isinstance(model, str) else sh.name, **kwargs)
    validate(setup, sh)
    setup = replace(setup, optimizer=recipe.optimizer(setup.optimizer).name,  # aliases: one name in results
                    mixed_precision=setup.precision())
    phases = _phases(setup, sh, device)
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    peak_phase = max(totals, key=totals.get)
    run = {**load_phases(setup, sh), **totals}
    run_phase = max(run, key=run.get)
    counts = shapes.parameter_counts(sh)
    trainable = (shapes.lora_parameter_count(sh, setup.r, setup.target_list()) if setup.method != "full"
                 else counts["total"])
    est = Estimate(setup=setup, shape=sh, terms=phases[peak_phase], phases=totals,
                   peak_allocated_bytes=totals[peak_phase], peak_phase=peak_phase, run_peak_bytes=run[run_phase],
                   run_peak_phase=run_phase, warnings=setup_warnings(setup),
                   paged_bytes=optimizer_bytes(setup, sh)[1],
                   params={"total": counts["total"] + trainable * (setup.method != "full"), "trainable": trainable})
    est.overhead_bytes = CUDA_CONTEXT + int(ALLOCATOR_SLACK * est.run_peak_bytes) if device == "cuda" else 0
    return est


def load_phases(setup: Setup, sh: Arch) -> dict[str, int]:
    """Allocated peaks of getting the model onto the GPU, before the first step.

    load     from_pretrained of a 16-bit checkpoint, quantized on the way in: the model as
             loaded (unquantized parts in the compute dtype) plus the 16-bit copy of the largest
             linear weight being quantized, and bitsandbytes' temporaries (~1.5x that copy)
    prepare  prepare_model_for_kbit_training upcasts each 16-bit parameter to fp32 in turn: the
             prepared model plus the 16-bit original of the largest one (the V x h embedding)
    A 16-bit LoRA base only loads. Random shapes built layer by layer (models.build_random_model)
    peak lower than from_pretrained; the lab measures both paths.
    Example: load_phases(Setup(), shapes.of("llama-2-7b"))["prepare"] / 2**30 -> ~4.1
    """
    largest = max(d_in * d_out for d_in, d_out in shapes.linears(sh).values())
    loaded = replace(setup, prepare=False)
    base = weight_bytes(loaded, sh) + quant_constant_bytes(setup, sh)
    if setup.method != "qlora":
        return {"load": base}
    phases = {"load": base + int(2.5 * largest)}
    if setup.prepare:
        phases["prepare"] = weight_bytes(setup, sh) + quant_constant_bytes(setup, sh) + 2 * sh.vocab * sh.hidden
    return phases


def setup_warnings(setup: Setup) -> list[str]:
    """Setups that do not do what they seem to, each with the fix.

    Example: setup_warnings(Setup(checkpointing=False))[0] -> "prepare_model_for_kbit_training(model) turns ..."
    """
    out = []
    if setup.method == "qlora" and setup.prepare and not setup.checkpointing:
        out.append("prepare_model_for_kbit_training(model) turns gradient checkpointing ON by default, and "
                   "TrainingArguments(gradient_checkpointing=False) does not turn it off: call it with "
                   "use_gradient_checkpointing=False, or this 'no checkpointing' run will checkpoint (lab 01 measures "
                   "the pair).")
    if setup.autocast() and setup.method == "qlora" and setup.precision() != setup.compute_dtype:
        out.append(f"mixed precision {setup.mixed_precision} with a {setup.compute_dtype} compute dtype: autocast runs "
                   f"the adapters and attention in {setup.mixed_precision} while every 4-bit layer casts its input to "
                   f"{setup.compute_dtype} and back, so two 16-bit types meet in every layer (and fp16 can overflow "
                   f"where bf16 would not). Use the same dtype for both: bf16=True with bnb_4bit_compute_dtype="
                   f"torch.bfloat16 where the GPU supports it, fp16=True with float16 on a T4 or V100.")
    return out


