"""Comparing 4-bit formats on real weights: errors, code use, blocksizes, storage (lab 02's measurements).

`quant` is the quantizer itself (bit-exact with bitsandbytes); this module measures what it
does to a model's weights: `error_stats` per tensor and `summarize_errors` over many (MSE,
SQNR, worst case, bits per weight, how often each of the 16 codes is used), how weights fall
once each block is divided by its absmax (`block_scaled`), whether weights already went
through a 4-bit format (`distinct_per_block`), the blocksize sweep, the bit-exactness cases
against bitsandbytes (`bitexact_cases`, `compare_with_bitsandbytes`), and what double
quantization saves on a whole architecture (`dq_saving_bytes`).

Shortcut: weights are studied one tensor at a time on the device they live on.
"""

import copy
import math

import bitsandbytes.functional as bnbf
import torch

from qlora_lab import env, shapes
from qlora_lab.quant import dequantize, layout_bytes, quantize, stored_bytes, unpack
from qlora_lab.recipe import CODEBOOKS


def block_scaled(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """w flattened and divided by its block's absmax: what the code book has to cover, in [-1, 1].

    Example: block_scaled(torch.tensor([0.5, -2.0] * 32)).unique() -> tensor([-1.0000, 0.2500])
    """
    x = w.detach().reshape(-1).float()
    blocks = -(-x.numel() // blocksize)
    grid = torch.nn.functional.pad(x, (0, blocks * blocksize - x.numel())).view(blocks, blocksize)
    absmax = grid.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    return (grid / absmax).reshape(-1)[: x.numel()]


def distinct_per_block(w: torch.Tensor, blocksize: int = 32) -> torch.Tensor:
    """(blocks,) how many distinct values each block of consecutive values holds.

    A tensor that went through a 4-bit format with this blocksize has at most 16 per block.
    Example: distinct_per_block(torch.tensor([1.0, 1.0, 2.0, 3.0]), 2) -> tensor([1, 2])
    """
    x = w.detach().reshape(-1)
    x = x[: x.numel() // blocksize * blocksize].view(-1, blocksize).sort(dim=1).values
    return 1 + (x.diff(dim=1) != 0).sum(dim=1)


def error_stats(w: torch.Tensor, quant_type: str, blocksize: int = 64, double_quant: bool = False) -> dict:
    """Quantize and dequantize w; return sums that add up across tensors (see summarize_errors).

    Keys: n (values), sq_err and sq_w (sums of squared error and of squared weights, fp64),
    max_abs (largest |error|), max_rel (largest |error| / its block's absmax), codes ((16,) use
    count of each code), bytes (stored_bytes). Example: error_stats(w, "nf4")["sq_err"] / w.numel() -> MSE
    """
    packed, state = quantize(w, quant_type, blocksize, double_quant)
    x = w.detach().reshape(-1).float()  # (n,)
    err = (dequantize(packed, state).reshape(-1).float() - x).abs()  # (n,)
    blocks = -(-x.numel() // blocksize)
    pad = blocks * blocksize - x.numel()
    absmax = torch.nn.functional.pad(x.abs(), (0, pad)).view(blocks, blocksize).amax(dim=1, keepdim=True)
    rel = torch.nn.functional.pad(err, (0, pad)).view(blocks, blocksize) / absmax.clamp(min=1e-30)  # (blocks, blocksize)
    codes = unpack(packed, x.numel()).long()
    return {"n": x.numel(), "sq_err": err.double().pow(2).sum().item(), "sq_w": x.double().pow(2).sum().item(),
            "max_abs": err.max().item(), "max_rel": rel.max().item(),
            "codes": torch.bincount(codes, minlength=16).cpu(), "bytes": stored_bytes(packed, state)}


def summarize_errors(stats: list[dict]) -> dict:
    """Combine error_stats of several tensors: MSE, SQNR in dB, worst |error|, bits per parameter, code use.

    SQNR = 10 log10(sum w^2 / sum error^2): how far the signal stands above the quantization noise.
    Example: summarize_errors([error_stats(w, "nf4") for w in weights]) -> {"mse": 3.3e-4, "sqnr_db": 20.5, ...}
    """
    n = sum(s["n"] for s in stats)
    sq_err, sq_w = sum(s["sq_err"] for s in stats), sum(s["sq_w"] for s in stats)
    codes = sum(s["codes"] for s in stats)
    return {"mse": sq_err / n, "sqnr_db": 10 * math.log10(sq_w / sq_err) if sq_err else float("inf"),
            "max_abs": max(s["max_abs"] for s in stats), "max_rel": max(s["max_rel"] for s in stats),
            "bits_per_param": 8 * sum(s["bytes"] for s in stats) / n, "code_share": (codes / codes.sum()).tolist(),
            "n": n}


def entropy_bits(shares) -> float:
    """Shannon entropy of code use in bits: 4.0 when all 16 codes are used equally often.

    Example: entropy_bits([1 / 16] * 16) -> 4.0
    """
    return -sum(p * math.log2(p) for p in shares if p > 0)


# --------------------------------------------------------------------------- whole models


def linear_weights(model, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The nn.Linear weights inside the decoder layers (what QLoRA quantizes), by name.

    layers picks decoder layers by index (None: all). Example: linear_weights(model, [0]) ->
    {"model.layers.0.self_attn.q_proj": tensor(576, 576), ...}
    """
    out = {}
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and ".layers." in name:
            index = int(name.split(".layers.")[1].split(".")[0])
            if layers is None or index in layers:
                out[name] = module.weight
    return out


def layer_type(name: str) -> str:
    """Short layer type of a module name. Example: layer_type("model.layers.3.mlp.down_proj") -> "down_proj" """
    return name.rsplit(".", 1)[-1]


@torch.no_grad()
def quantize_dequantize_(model, quant_type: str, blocksize: int = 64, double_quant: bool = False) -> int:
    """Replace every decoder nn.Linear weight by dequantize(quantize(weight)), in place; returns layers changed.

    Simulates 4-bit storage of any code book (INT4 included) in a 16-bit model, so its eval
    loss can be compared with bitsandbytes' NF4/FP4 models. Example: quantize_dequantize_(m, "int4") -> 210
    """
    weights = linear_weights(model)
    for w in weights.values():
        w.copy_(dequantize(*quantize(w, quant_type, blocksize, double_quant)))
    return len(weights)


def compare_with_bitsandbytes(w: torch.Tensor, quant_type: str, blocksize: int = 64,
                              double_quant: bool = False) -> dict:
    """Quantize w with this module and with bitsandbytes; report which parts are identical.

    Example: compare_with_bitsandbytes(torch.randn(1000), "fp4") -> {"packed": True, "absmax": True,
             "nested": True, "dequantized": True, "equal": True}
    """
    packed, state = quantize(w, quant_type, blocksize, double_quant)
    ref_packed, ref_state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                               compress_statistics=double_quant)
    result = {"packed": torch.equal(packed, ref_packed), "absmax": torch.equal(state.absmax, ref_state.absmax),
              "nested": True}
    if double_quant:
        result["nested"] = (torch.equal(state.absmax_scale, ref_state.state2.absmax)
                            and torch.equal(state.offset, ref_state.offset)
                            and torch.equal(state.absmax_code, ref_state.state2.code))
    # bitsandbytes 0.50.2's AVX-512 CPU kernel looks absmax up per row and goes wrong when a row is not a
    # whole number of blocks (e.g. 576 values, blocksize 128); asking for the flat shape avoids that path.
    flat_state = copy.copy(ref_state)
    flat_state.shape = torch.Size([w.numel()])
    ref_values = bnbf.dequantize_4bit(ref_packed, flat_state).reshape(state.shape)
    result["dequantized"] = torch.equal(dequantize(packed, state), ref_values)
    result["equal"] = all(result.values())
    return result


def bitexact_cases(weights: dict[str, torch.Tensor], random_shapes: list[tuple], blocksizes: list[int],
                   device: str, seed: int = 0) -> list[tuple]:
    """The cases lab 02 compares with bitsandbytes: real weights at blocksize 64, and random tensors of awkward
    sizes at every blocksize, each for NF4 and FP4, with and without double quantization.

    Returns (label, tensor, quant_type, blocksize, double_quant) tuples.
    Example: len(bitexact_cases({"q": w}, [(33, 100)], [64], "cpu")) -> 8
    """
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            cases += [(f"{name.removeprefix('model.')} {tuple(w.shape)}", w.detach(), quant_type, 64, double_quant)
                      for name, w in weights.items()]
            for shape in random_shapes:  # fresh random values for every format and setting
                w = (torch.randn(shape, generator=gen) * 0.02).to(device, torch.bfloat16)
                cases += [(f"random {shape}", w, quant_type, b, double_quant) for b in blocksizes]
    return cases


def check_cases(cases: list[tuple], progress: bool = True) -> list[dict]:
    """compare_with_bitsandbytes over every case: one row per case with which parts are identical."""
    return [{"case": label, "format": quant_type, "blocksize": blocksize, "double_quant": double_quant,
             **compare_with_bitsandbytes(w, quant_type, blocksize, double_quant)}
            for label, w, quant_type, blocksize, double_quant in env.progress(cases, desc="compare with bitsandbytes",
                                                                     disable=not progress)]


def errors_by_type(samples: dict[str, torch.Tensor], blocksize: int = 64) -> tuple[dict, dict]:
    """Quantize every sample with every code book: ({format: summary over all}, {format: {layer type: summary}}).

    Example: overall, by_type = errors_by_type({"model.layers.0.self_attn.q_proj": w}); overall["nf4"]["mse"] -> 3.4e-4
    """
    stats = {fmt: {} for fmt in CODEBOOKS}
    for name, w in env.progress(samples.items(), desc="quantize with " + ", ".join(f.upper() for f in CODEBOOKS)):
        for fmt in CODEBOOKS:
            stats[fmt].setdefault(layer_type(name), []).append(error_stats(w, fmt, blocksize))
    overall = {fmt: summarize_errors([s for per_type in stats[fmt].values() for s in per_type]) for fmt in stats}
    return overall, {fmt: {t: summarize_errors(s) for t, s in stats[fmt].items()} for fmt in stats}


def mse_by_blocksize(weights: dict[str, torch.Tensor], blocksizes: list[int], values: int | None = None) -> dict:
    """{format: {blocksize: MSE}} over the first `values` values of each weight (None: all).

    Example: mse_by_blocksize({"q": w}, [64, 256])["nf4"][256] > mse_by_blocksize({"q": w}, [64, 256])["nf4"][64] -> True
    """
    out = {fmt: {} for fmt in CODEBOOKS}
    for blocksize in env.progress(blocksizes, desc="blocksize sweep"):
        for fmt in CODEBOOKS:
            out[fmt][blocksize] = summarize_errors([error_stats(w.reshape(-1)[:values], fmt, blocksize)
                                                    for w in weights.values()])["mse"]
    return out


def dq_saving_bytes(arch) -> dict:
    """4-bit storage of an architecture's decoder linears without and with double quantization (bytes).

    Example: dq_saving_bytes("llama-65b")["saving"] / 1e9 -> 3.04
    """
    a, sizes = shapes.of(arch), [d_in * d_out for d_in, d_out in shapes.linears(arch).values()]
    no_dq = a.layers * sum(layout_bytes(n, 64, False) for n in sizes)
    dq = a.layers * sum(layout_bytes(n, 64, True) for n in sizes)
    return {"quantized": a.layers * sum(sizes), "no_dq": no_dq, "dq": dq, "saving": no_dq - dq}
