"""Architecture shapes, and everything counted from them: the one place the lab knows a model's size.

`ARCHITECTURES` holds the public config.json numbers of the models the lab talks about.
From an `Arch` follow the shapes of the seven linear layers of a decoder layer
(`linears`), the parameter counts by kind (`parameter_counts`), the LoRA parameters of a
configuration (`lora_parameter_count`) and a transformers config to build the model
(`config`). For a live model, `logical_numel` and `count_parameters` count a packed 4-bit
weight at its real size (bitsandbytes stores two 4-bit values per uint8 element, so
`numel()` is half the truth).

Shortcut: decoder-only Llama-style architectures only (Llama, Mistral, Qwen2, SmolLM2):
q/k/v/o projections, a gated MLP, RMSNorm, optional q/k/v biases.
"""

from dataclasses import dataclass, replace

import torch

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # one decoder layer's
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer of the decoder layers (not the output head)


@dataclass(frozen=True)
class Arch:
    """The numbers that fix a decoder-only transformer's memory and compute."""

    family: str  # transformers model_type: "llama", "mistral" or "qwen2"
    hidden: int  # hidden size d_model
    intermediate: int  # MLP inner size (gate/up output, down input)
    layers: int  # number of decoder layers
    heads: int  # attention (query) heads
    kv_heads: int  # key/value heads (< heads means grouped-query attention)
    vocab: int  # vocabulary size = embedding rows = lm_head outputs
    tied: bool  # lm_head shares the embedding matrix
    max_positions: int = 4096  # context length in the public config
    rope_theta: float = 10000.0  # rotary base
    qkv_bias: bool = False  # q/k/v projections have a bias (Qwen2)
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    head_dim: int | None = None  # size of one attention head (None: hidden // heads)
    name: str = ""  # the table key, or where the config came from

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


# Public config.json numbers of each model (hub ids in the comments).
ARCHITECTURES: dict[str, Arch] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": Arch("llama", 576, 1536, 30, 9, 3, 49152, True, 8192, 100000.0),
    # HuggingFaceTB/SmolLM2-360M-Instruct
    "smollm2-360m": Arch("llama", 960, 2560, 32, 15, 5, 49152, True, 8192, 100000.0),
    # HuggingFaceTB/SmolLM2-1.7B-Instruct
    "smollm2-1.7b": Arch("llama", 2048, 8192, 24, 32, 32, 49152, True, 8192, 130000.0),
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": Arch("qwen2", 896, 4864, 24, 14, 2, 151936, True, 32768, 1000000.0, True, 1e-6),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": Arch("llama", 2048, 8192, 16, 32, 8, 128256, True, 131072, 500000.0),
    # meta-llama/Llama-2-7b-hf
    "llama-2-7b": Arch("llama", 4096, 11008, 32, 32, 32, 32000, False, 4096, 10000.0),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": Arch("mistral", 4096, 14336, 32, 32, 8, 32000, False, 32768, 10000.0),
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": Arch("qwen2", 3584, 18944, 28, 28, 4, 152064, False, 131072, 1000000.0, True, 1e-6),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": Arch("llama", 4096, 14336, 32, 32, 8, 128256, False, 131072, 500000.0),
    # meta-llama/Llama-2-13b-hf
    "llama-2-13b": Arch("llama", 5120, 13824, 40, 40, 40, 32000, False, 4096, 10000.0),
    # huggyllama/llama-30b (the "33B" of the LLaMA paper and the QLoRA paper)
    "llama-33b": Arch("llama", 6656, 17920, 60, 52, 52, 32000, False, 2048, 10000.0, False, 1e-6),
    # huggyllama/llama-65b
    "llama-65b": Arch("llama", 8192, 22016, 80, 64, 64, 32000, False, 2048, 10000.0, False, 1e-5),
    # meta-llama/Llama-2-70b-hf
    "llama-2-70b": Arch("llama", 8192, 28672, 80, 64, 8, 32000, False, 4096, 10000.0),
    # meta-llama/Llama-3.1-70B
    "llama-3.1-70b": Arch("llama", 8192, 28672, 80, 64, 8, 128256, False, 131072, 500000.0),
}


def of(model) -> Arch:
    """The Arch of a table name, an Arch, or a transformers config (any object with its fields).

    Example: of("mistral-7b").kv_heads -> 8
    """
    if isinstance(model, Arch):
        return model
    if isinstance(model, str):
        if model not in ARCHITECTURES:
            raise KeyError(f"unknown architecture shape {model!r}; known shapes: {', '.join(ARCHITECTURES)}")
        return replace(ARCHITECTURES[model], name=model)
    config = getattr(model, "config", model)  # a model, or its config
    try:
        heads = config.num_attention_heads
        return Arch(config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                    getattr(config, "num_key_value_heads", None) or heads, config.vocab_size,
                    bool(getattr(config, "tie_word_embeddings", False)),
                    max_positions=getattr(config, "max_position_embeddings", None) or 4096,
                    qkv_bias=bool(getattr(config, "attention_bias", False) or config.model_type == "qwen2"),
                    head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                    name=getattr(config, "name_or_path", "") or type(config).__name__)
    except AttributeError as err:
        raise ValueError(f"{type(config).__name__} is not a decoder-only transformer config "
                         f"this lab knows ({err})") from None


def linears(arch) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear layer of one decoder layer. Grouped-query attention shows here:
    k_proj and v_proj output kv_heads * head_dim, not hidden.

    Example: linears("smollm2-135m")["k_proj"] -> (576, 192)
    """
    a = of(arch)
    h, i, q, kv = a.hidden, a.intermediate, a.q_dim, a.kv_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def parameter_counts(arch) -> dict[str, int]:
    """Exact parameter counts by kind. Example: parameter_counts("llama-2-7b")["total"] -> 6738415616"""
    a = of(arch)
    counts = {
        "embedding": a.vocab * a.hidden,
        "lm_head": 0 if a.tied else a.vocab * a.hidden,
        "linear": a.layers * sum(d_in * d_out for d_in, d_out in linears(a).values()),
        "bias": a.layers * (a.q_dim + 2 * a.kv_dim) if a.qkv_bias else 0,
        "norm": (2 * a.layers + 1) * a.hidden,
    }
    counts["total"] = sum(counts.values())
    return counts


def target_list(targets) -> list[str]:
    """LoRA target modules as a list: "all-linear" -> every linear; "q_proj,v_proj" or a list as given.

    Example: target_list("q_proj, v_proj") -> ["q_proj", "v_proj"]
    """
    if targets in (ALL_LINEAR, (ALL_LINEAR,), [ALL_LINEAR]):
        return list(LINEARS)
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in LINEARS]
    if unknown or not names:
        raise ValueError(f"unknown target modules {unknown or names}; a decoder layer has {list(LINEARS)} "
                         f"(or use {ALL_LINEAR!r})")
    return names


def lora_parameter_count(arch, r: int, targets=ALL_LINEAR) -> int:
    """Trainable LoRA parameters: r x (d_in + d_out) per targeted linear, in every decoder layer.

    Example: lora_parameter_count("smollm2-135m", 8, ["q_proj", "v_proj"]) -> 460800
    """
    a, shapes = of(arch), linears(arch)
    return a.layers * sum(r * sum(shapes[t]) for t in target_list(targets))


def config(arch):
    """A transformers config for an Arch (or a table name), to build the model from.

    Example: config("llama-2-7b").num_key_value_heads -> 32
    """
    from transformers import AutoConfig  # transformers is heavy; counting shapes does not need it

    a = of(arch)
    kwargs = dict(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                  num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                  tie_word_embeddings=a.tied, max_position_embeddings=a.max_positions,
                  rope_theta=a.rope_theta, rms_norm_eps=a.rms_norm_eps)
    if a.family in ("llama", "mistral"):
        kwargs.update(head_dim=a.head_dim)
    if a.family == "llama":
        kwargs.update(attention_bias=a.qkv_bias)
    if a.family == "mistral":
        kwargs.update(sliding_window=None)
    built = AutoConfig.for_model(a.family, **kwargs)
    built.rope_theta = a.rope_theta  # older/newer configs keep it in different places
    return built


# --------------------------------------------------------------------------- live models


def logical_numel(p: torch.Tensor) -> int:
    """Values a parameter represents: a packed 4-bit weight counts its unpacked shape.

    Example: logical_numel(q_proj.weight)  # Params4bit (165888, 1) uint8 -> 331776 (= 576 * 576)
    """
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def count_parameters(model) -> dict:
    """Logical parameter counts of a model (tied weights once, 4-bit weights at their real size).

    Example: count_parameters(model) -> {"total": 134515008, "trainable": 0, "quantized": 106168320}
    """
    unique = {id(p): p for p in model.parameters()}.values()
    return {"total": sum(logical_numel(p) for p in unique),
            "trainable": sum(logical_numel(p) for p in unique if p.requires_grad),
            "quantized": sum(logical_numel(p) for p in unique if getattr(p, "quant_state", None) is not None)}
