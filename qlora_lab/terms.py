"""The terms of a training step's memory, one function each: the formula and its source in the docstring.

`vram.estimate` adds these up at each candidate peak moment of a step; lab 01 shows them one
by one. Every function takes a `vram.Setup` and the architecture (`shapes.Arch`) and returns
bytes. `tests/test_vram.py` checks them against hand computations and, through the estimate,
against live tensor bytes on a CPU and `torch.cuda.max_memory_allocated` on a GPU.

Shortcut: decoder-only Llama-style models, full-length sequences without a padding mask.
"""

import math
from dataclasses import replace

from qlora_lab import recipe, shapes
from qlora_lab.recipe import DTYPE_BYTES
from qlora_lab.shapes import Arch

ALLOC_ROUND = 512  # PyTorch's CUDA caching allocator rounds every tensor up to a multiple of 512 bytes
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only state tensors of at least 1e5 elements
BNB_8BIT_MIN_NUMEL = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this


# --------------------------------------------------------------------------- persistent terms


def alloc_round(nbytes: float) -> int:
    """Bytes the CUDA caching allocator books for one tensor: rounded up to 512."""
    return int(math.ceil(nbytes / ALLOC_ROUND) * ALLOC_ROUND) if nbytes > 0 else 0


def weight_bytes(setup, sh: Arch) -> int:
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
    linear = sum(alloc_round(math.ceil(a * b * per_weight)) for a, b in shapes.linears(sh).values())
    other = _unquantized_bytes(setup)
    bias = sum(alloc_round(n * other) for n in (sh.q_dim, sh.kv_dim, sh.kv_dim)) if sh.qkv_bias else 0
    return sh.layers * (linear + bias + 2 * alloc_round(sh.hidden * other)) + outer_bytes(setup, sh)


def _unquantized_bytes(setup) -> int:
    """Bytes per element of parameters that stay unquantized: fp32 after prepare's upcast, else the compute dtype
    (qlora); lora/full: the base dtype."""
    if setup.method != "qlora":
        return DTYPE_BYTES[setup.resolved_base_dtype()]
    return 4 if setup.prepare else DTYPE_BYTES[setup.compute_dtype]


def outer_bytes(setup, sh: Arch) -> int:
    """The parameters outside the decoder layers: embeddings, lm_head when untied, the final norm.

    Example: outer_bytes(Setup(prepare=False), shapes.of("llama-2-70b")) -> 1_048_592_384 (bf16, untied head)
    """
    other = _unquantized_bytes(setup)
    return alloc_round(sh.vocab * sh.hidden * other) * (1 if sh.tied else 2) + alloc_round(sh.hidden * other)


def quant_constant_bytes(setup, sh: Arch) -> int:
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
            total += alloc_round(4 * d_out)
            continue
        blocks = math.ceil(n / setup.blocksize)
        if setup.double_quant:
            total += alloc_round(blocks) + alloc_round(4 * math.ceil(blocks / 256)) + alloc_round(64) + alloc_round(4)
        else:
            total += alloc_round(4 * blocks) + alloc_round(64)
    return total * sh.layers


def _trainable_tensors(setup, sh: Arch) -> list[tuple[int, int, int]]:
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


def lora_bytes(setup, sh: Arch) -> int:
    """Adapter weights: lora_parameter_count x 4 bytes (peft keeps A and B in fp32)."""
    if setup.method == "full":
        return 0
    return sum(k * alloc_round(n * b) for n, b, k in _trainable_tensors(setup, sh))


def gradient_bytes(setup, sh: Arch) -> int:
    """One gradient per trainable tensor, in its dtype (LoRA: fp32 adapters only; full: every weight)."""
    return sum(k * alloc_round(n * b) for n, b, k in _trainable_tensors(setup, sh))


def optimizer_bytes(setup, sh: Arch) -> tuple[int, int]:
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
            alloc += k * opt.states * alloc_round(n * b)
            continue
        eight_bit = opt.eight_bit and n >= BNB_8BIT_MIN_NUMEL
        state = n if eight_bit else 4 * n
        if opt.paged and n >= PAGED_MIN_NUMEL:
            paged += k * 2 * state
        else:
            alloc += k * 2 * alloc_round(state)
        if eight_bit:
            alloc += k * (2 * alloc_round(4 * math.ceil(n / 256)) + alloc_round(4))  # absmax1/2 + unorm_vec
    return alloc, paged


def optimizer_temp_bytes(setup, sh: Arch, device: str = "cuda") -> int:
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


def stream_bytes(setup) -> int:
    """Bytes per element of the hidden states between layers.

    qlora with prepare_model_for_kbit_training: 4 — the embeddings are upcast to fp32, so the
    residual stream is fp32 (the 4-bit layers cast their input to the compute dtype and their
    output back). Otherwise the dtype of the weights.
    """
    if setup.method == "qlora":
        return 4 if setup.prepare else DTYPE_BYTES[setup.compute_dtype]
    return DTYPE_BYTES[setup.resolved_base_dtype()]


def attention_kernel(setup, sh: Arch, device: str = "cuda") -> str:
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


def layer_activation_bytes(setup, sh: Arch, device: str = "cuda") -> dict[str, int]:
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


def _adapter_input_bytes(setup, sh: Arch, sdpa: bool, device: str) -> dict[str, int]:
    """Per token: the adapters' saved inputs (and with dropout, the dropped copies and masks); see layer_activation_bytes.
    peft casts a LoRA input to the adapters' dtype (not on a 4-bit base under autocast, which casts to 16 bits itself):
    one tensor per input is saved where nothing needed a cast, else one copy per module."""
    a, f = stream_bytes(setup), DTYPE_BYTES[setup.adapter_dtype]
    copy = 2 if setup.autocast() else f  # bytes of the tensor lora_A saves
    shared = (a == f) if not setup.autocast() else (setup.method == "qlora" and a == 2)
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
        elif shared:  # without autocast, sdpa's saved output is o_proj's input; with it, o_proj's input is a 16-bit copy
            inputs += 0 if (group == ("o_proj",) and sdpa and not setup.autocast()) else copy * width
        else:
            inputs += len(hit) * copy * width
    parts = {"inputs": inputs + len(targets) * (2 if setup.autocast() else f) * setup.r}
    return {**parts, "dropout": dropout} if dropout else parts


def activation_bytes(setup, sh: Arch, device: str = "cuda") -> int:
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


def logits_bytes(setup, sh: Arch) -> dict[str, int]:
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


def autocast_cast_bytes(setup, sh: Arch) -> dict[str, int]:
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


def layer_forward_temp_bytes(setup, sh: Arch) -> int:
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


def layer_backward_temp_bytes(setup, sh: Arch) -> int:
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


# --------------------------------------------------------------------------- loading


def load_phases(setup, sh: Arch) -> dict[str, int]:
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
