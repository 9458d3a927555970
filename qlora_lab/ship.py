"""Ship a fine-tune: save and reload the adapter, merge it, and see what merging keeps (labs 05, 07).

- `save_adapter` / `load_adapter`: peft's adapter files (megabytes) and a fresh base to put them on;
  `check_adapter_base` warns when an adapter meets another base model than it was trained on.
- `merge_adapter`: W + (alpha/r) B A folded into a 16-bit base (peft's `merge_and_unload`), the
  original 16-bit weights or the NF4 round trip the adapter was trained against
  (`replace_with_dequantized`); `merge_into_4bit`: peft's merge into the 4-bit layers, which
  dequantizes, adds and quantizes again.
- `update_vs_step`: per layer, how big the update is next to the NF4 step of the weights it
  lands on, and how much of it survives quantizing W + delta W again (bitsandbytes' own kernels).
- `generation_speed`: generated tokens per second, fixed length, repeated.
- Lab 07: `VARIANTS` (five ways to ship), `adapter_for` (lab 05's adapter, or trained the same way),
  `build_variant` (build one and save what it would ship) and `measure_variant`.

Shortcuts: 4-bit layers are bitsandbytes' `Linear4bit`; the survival check quantizes with the layer's
own settings (NF4/FP4, blocksize, double quantization), as peft's merge does.
"""

import json
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

import bitsandbytes.functional as bnbf
import torch
from peft import PeftModel

from qlora_lab import data, evals, lora, models, quant, recipe, shapes, train


def save_adapter(model, out_dir: str | Path) -> dict:
    """Save only the LoRA adapter (peft's save_pretrained, safetensors); returns where and how big.

    The folder holds adapter_config.json (r, alpha, targets, base model name) and
    adapter_model.safetensors (the A and B matrices): megabytes, against the base model's
    hundreds of megabytes or gigabytes.
    Example: save_adapter(model, "runs/adapter")["bytes"] -> 19_579_000
    """
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    weights = out_dir / "adapter_model.safetensors"
    return {"dir": str(out_dir), "file": str(weights), "bytes": weights.stat().st_size,
            "total_bytes": sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())}


def load_adapter(adapter_dir: str | Path, spec: str, quant: str | None = "nf4", **load_kwargs):
    """Load a fresh base model (models.load_model) and put a saved adapter on it; eval mode.

    Example: model, tok = load_adapter("runs/adapter", "smollm2-135m")  # 4-bit base + adapter
    """
    base, tokenizer = models.load_model(spec, quant=quant, **load_kwargs)
    return attach_adapter(base, adapter_dir), tokenizer


def attach_adapter(base, adapter_dir: str | Path):
    """Put a saved adapter on a loaded base (peft wraps it in place), once check_adapter_base has looked; eval mode.

    Example: model = attach_adapter(base, "runs/adapter")  # base now carries the LoRA layers
    """
    check_adapter_base(adapter_dir, base)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()


def check_adapter_base(adapter_dir: str | Path, base) -> str | None:
    """Warn (and return the warning) when an adapter was trained on another base model than `base`.

    Shapes can match by accident (two fine-tunes of one architecture): peft then loads the adapter
    without a word, and it answers nonsense. Compares adapter_config.json's base_model_name_or_path
    with the base's name_or_path, when both are known.
    Example: check_adapter_base("runs/adapter", base) -> None
    """
    trained_on = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    loaded = getattr(base, "name_or_path", "") or getattr(getattr(base, "config", None), "_name_or_path", "") or ""
    if trained_on and loaded and Path(trained_on).name != Path(loaded).name:
        message = f"the adapter in {adapter_dir} was trained on {trained_on!r}, but the base loaded is {loaded!r}"
        warnings.warn(message, stacklevel=2)
        return message
    return None


def merge_adapter(adapter_dir: str | Path, spec: str, out_dir: str | Path | None = None,
                  base_from_4bit: bool = False, **load_kwargs):
    """Merge a saved adapter into a 16-bit base (W + (alpha/r) B A) and optionally save the result.

    By default the base is the original 16-bit checkpoint (models.load_model(quant=None)),
    which is what you would ship. base_from_4bit=True instead replaces every quantized
    layer's 16-bit weight by its NF4 round trip (quantize, then dequantize: the weights the
    adapter was trained against), to show where the merged model's difference comes from.
    Returns (merged transformers model, tokenizer).
    Example: merged, tok = merge_adapter("runs/adapter", "smollm2-135m", "runs/merged")
    """
    base, tokenizer = models.load_model(spec, quant=None, **load_kwargs)
    if base_from_4bit:
        quantized, _ = models.load_model(spec, quant="nf4", **load_kwargs)
        replace_with_dequantized(base, quantized)
        del quantized
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if out_dir is not None:
        merged.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    return merged.eval(), tokenizer


def frozen_to_compute_dtype(model, dtype: torch.dtype | None = None) -> int:
    """Cast the frozen fp32 parameters back to the 16-bit compute dtype; returns how many changed.

    prepare_model_for_kbit_training upcasts the frozen 16-bit parameters (embeddings, norms,
    output head) to fp32 for numerically stable training. A model reloaded from the saved
    adapter has them in 16-bit again, so after training cast them back (lossless: they were
    16-bit values to begin with) before comparing the two. LoRA weights (named lora_A/lora_B) stay fp32.
    Example: frozen_to_compute_dtype(model) -> 62  # 61 norms + the embedding of SmolLM2-135M
    """
    dtype = dtype or recipe.default_compute_dtype(next(model.parameters()).device)
    changed = 0
    for name, param in model.named_parameters():
        if "lora_" not in name and param.dtype == torch.float32:
            param.data = param.data.to(dtype)
            changed += 1
    return changed


@torch.no_grad()
def replace_with_dequantized(model16, model4) -> int:
    """Copy every 4-bit layer of model4, dequantized, into the same-named nn.Linear of model16.

    Returns how many weights were replaced. Example: replace_with_dequantized(base16, base4) -> 210
    """
    linears = dict(model16.named_modules())
    replaced = 0
    for name, module in model4.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        weight = bnbf.dequantize_4bit(module.weight.data, state)  # (d_out, d_in) in the compute dtype
        linears[name].weight.copy_(weight.to(linears[name].weight.dtype))
        replaced += 1
    return replaced


def merge_into_4bit(adapter_dir: str | Path, spec: str, **load_kwargs):
    """peft's merge into the 4-bit model: each layer dequantized, W + delta W added, then quantized again.

    What `merge_and_unload()` does on a bitsandbytes Linear4bit (peft's lora/bnb.py); peft warns that
    rounding may change generations. Returns (model with plain Linear4bit layers, tokenizer).
    Example: merged4, tok = merge_into_4bit("runs/adapter", "smollm2-135m")
    """
    model, tokenizer = load_adapter(adapter_dir, spec, quant="nf4", **load_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*4-bit linear.*rounding errors.*")  # measured in lab 07 instead
        merged = model.merge_and_unload()
    return merged.eval(), tokenizer


def dir_bytes(path: str | Path) -> int:
    """Bytes of all files under a folder: what a checkpoint costs on disk.

    Example: dir_bytes("runs/adapter") -> 19_600_000
    """
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _local_step(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Distance to the neighbouring levels of each code, in units of absmax: the mean of the gaps on both sides."""
    levels = levels.to(codes.device)
    up = levels[(codes + 1).clamp(max=15)] - levels[codes]  # 0 at the top level
    down = levels[codes] - levels[(codes - 1).clamp(min=0)]  # 0 at the bottom level
    return (up + down) / ((up > 0).float() + (down > 0).float())


@torch.no_grad()
def update_vs_step(model, adapter: str = "default") -> list[dict]:
    """Per LoRA layer on a 4-bit base: the update's size next to the NF4 step, and what survives quantizing again.

    For each layer: delta W = peft's get_delta_weight (scaling x B A); the local step of each weight is
    absmax of its block x the gap to the neighbouring code book levels; then W + delta W is quantized
    again with bitsandbytes (the layer's own settings, as peft's merge does) and dequantized.
    ratio: median |delta W| / step (below ~0.5 most weights round back to their old level);
    error: |delta W stored - delta W| / |delta W| (0: stored exactly; 1: as if dropped; above 1: the
    re-quantization, e.g. a block's new absmax, moved the weights by more than the update itself);
    unchanged: share of weights whose stored value did not move at all.
    Example: update_vs_step(peft_model)[0] -> {"name": "model.layers.0.self_attn.q_proj", "ratio": 0.03, "error": 1.0, ...}
    """
    rows = []
    for name, module in model.named_modules():
        weight = getattr(getattr(module, "base_layer", None), "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or adapter not in getattr(module, "lora_A", {}):
            continue
        w = bnbf.dequantize_4bit(weight.data, state).float()  # (d_out, d_in)
        delta = module.get_delta_weight(adapter).float()  # (d_out, d_in)
        codes = quant.unpack(weight.data, w.numel()).long()  # (numel,) code of each weight
        blocks = w.flatten().view(-1, state.blocksize)  # (blocks, blocksize)
        absmax = blocks.abs().amax(dim=1, keepdim=True)  # (blocks, 1): the block's extreme sits on level +-1
        step = (_local_step(codes, quant.levels(state.quant_type)).view_as(blocks) * absmax).view_as(w)
        packed, state2 = bnbf.quantize_4bit(w + delta, blocksize=state.blocksize,  # fp32, as peft's merge adds them
                                            compress_statistics=state.nested, quant_type=state.quant_type)
        effective = bnbf.dequantize_4bit(packed, state2).float() - w  # (d_out, d_in): the update that was stored
        rows.append({"name": name.removeprefix("base_model.model."), "layer": _layer_index(name),
                     "kind": name.rsplit(".", 1)[-1], "ratio": (delta.abs() / step).median().item(),
                     "error": ((effective - delta).norm() / delta.norm().clamp(min=1e-30)).item(),
                     "unchanged": (effective == 0).float().mean().item()})
    return rows


def _layer_index(name: str) -> int:
    """The decoder layer number in a module name. Example: _layer_index("model.layers.7.mlp.up_proj") -> 7"""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else -1


def generation_speed(model, tokenizer, rows, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Generated tokens per second: greedy, exactly `new_tokens` per row, one batch of all rows, after a warm-up.

    Returns the median over repeats and the range. Example: generation_speed(m, tok, rows[:8])["tokens_per_second"] -> 61.0
    """
    rows = list(rows)
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    evals.generate_answers(model, tokenizer, rows, max_new_tokens=4, batch_size=len(rows))  # warm-up
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        evals.generate_answers(model, tokenizer, rows, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               batch_size=len(rows))
        sync()
        seconds.append(time.perf_counter() - start)
    rates = [len(rows) * new_tokens / s for s in seconds]
    return {"tokens_per_second": statistics.median(rates), "range": [min(rates), max(rates)], "seconds": seconds,
            "batch": len(rows), "new_tokens": new_tokens}


# --------------------------------------------------------------------------- lab 07: five ways to ship


VARIANTS = {  # name -> how it is built (build_variant); the first is the reference the others are compared with
    "adapter on NF4": "the 4-bit base as trained, the adapter beside it (peft): what lab 05 measured",
    "merged into NF4": "peft's merge_and_unload on the 4-bit model: each layer dequantized, W + dW, quantized again",
    "merged into 16-bit": "the 16-bit base loaded and the adapter merged into it: the common recipe",
    "NF4 dequantized, merged": "the NF4 weights dequantized to 16-bit (what the adapter trained against), then merged",
    "that, re-quantized": "the previous model saved, then loaded in NF4 again, to serve in 4-bit",
}


def adapter_for(spec: str, r: int, alpha: float, config, progress: bool = True) -> tuple[Path, str]:
    """Lab 05's adapter for this configuration: the one lab 05 saved, else trained now the same way and saved.

    Returns (adapter folder, where it came from). Example: adapter_for("smollm2-135m", 16, 32, cfg)[1] -> "saved by lab 05"
    """
    out = train.run_dir("adapter", spec, r, alpha, config)
    if (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists():
        return out, f"saved by lab 05 ({out})"
    start = time.perf_counter()
    model, tokenizer = models.load_model(spec, quant="nf4", double_quant=True)
    torch.manual_seed(0)  # as lab 05 seeds the adapters' A matrices
    model = lora.add_lora(model, r=r, alpha=alpha, targets=shapes.ALL_LINEAR, dropout=0.0)
    train.finetune(model, tokenizer, data.load_task()["train"], None, replace(config, eval_every=0),  # its own folder:
                   train.run_dir("qlora-lab07", spec, r, alpha, config), resume=False, progress=progress)  # lab 05 may run
    frozen_to_compute_dtype(model)
    save_adapter(model, out)
    return out, (f"trained now with lab 05's recipe, {time.perf_counter() - start:.0f} s (no adapter in {out}: lab 05 "
                 f"has not run with this profile yet, or runs beside this lab)")


def build_variant(name: str, adapter_dir: str | Path, spec: str, out_dir: str | Path):
    """Build one of VARIANTS and save what it would ship into out_dir; returns (model, tokenizer, bytes on disk).

    Example: model, tok, size = build_variant("merged into 16-bit", adapter_dir, "smollm2-135m", "runs/ship")
    """
    out = Path(out_dir) / name.replace(" ", "-").replace(",", "")
    if name == "adapter on NF4":
        base, tokenizer = models.load_model(spec, quant="nf4", double_quant=True)
        base.save_pretrained(str(out))  # the 4-bit base alone, before the adapter's LoRA layers go into it
        return attach_adapter(base, adapter_dir), tokenizer, dir_bytes(out) + dir_bytes(adapter_dir)
    if name == "merged into NF4":
        model, tokenizer = merge_into_4bit(adapter_dir, spec)
        model.save_pretrained(str(out))
    elif name in ("merged into 16-bit", "NF4 dequantized, merged"):
        model, tokenizer = merge_adapter(adapter_dir, spec, out, base_from_4bit=name.startswith("NF4"))
    elif name == "that, re-quantized":
        source = Path(out_dir) / "NF4-dequantized-merged"
        model, tokenizer = models.load_model(str(source), quant="nf4", double_quant=True)
        model.save_pretrained(str(out))
    else:
        raise ValueError(f"unknown variant {name!r}; the variants are {list(VARIANTS)}")
    return model.eval(), tokenizer, dir_bytes(out)


def measure_variant(model, tokenizer, eval_rows, compare_rows, reference_logits, speed_rows, new_tokens: int,
                    repeats: int, max_new_tokens: int = 48) -> dict:
    """What lab 07 measures of one variant: generated exact match, outputs against the reference, speed.

    reference_logits: evals.answer_logits of the reference on compare_rows (None: this is the reference).
    Example: measure_variant(m, tok, rows, rows[:32], ref, rows[:8], 32, 3)["kl"] -> 0.0031
    """
    generated = evals.generation_eval(model, tokenizer, eval_rows, max_new_tokens=max_new_tokens)
    logits = evals.answer_logits(model, tokenizer, compare_rows)
    outputs = evals.compare_outputs(logits if reference_logits is None else reference_logits, logits,
                                    evals.answer_targets(tokenizer, compare_rows))
    speed = generation_speed(model, tokenizer, speed_rows, new_tokens=new_tokens, repeats=repeats)
    return {"accuracy": generated["accuracy"], "ci": generated["ci"], "correct": generated["correct"], **outputs,
            "tokens_per_second": speed["tokens_per_second"], "speed_range": speed["range"], "logits": logits}


def variant_table(results: dict[str, dict]) -> dict[str, dict]:
    """measure_variant results as table rows (name -> column -> value), in the units a reader wants.

    Example: pd.DataFrame(variant_table(results)).T
    """
    return {name: {"exact match (%)": f"{100 * r['accuracy']:.1f}",
                   "95 % interval (%)": f"{100 * r['ci'][0]:.1f}-{100 * r['ci'][1]:.1f}",
                   "KL from reference (nats)": f"{r['kl']:.2g}", "answer perplexity": f"{r['perplexity']:.4g}",
                   "same top token (%)": f"{100 * r['same_top1']:.1f}", "on disk (MiB)": f"{r['disk_bytes'] / 2**20:.0f}",
                   "tokens/s (median)": f"{r['tokens_per_second']:.0f}",
                   "tokens/s (range)": f"{r['speed_range'][0]:.0f}-{r['speed_range'][1]:.0f}"}
            for name, r in results.items()}
