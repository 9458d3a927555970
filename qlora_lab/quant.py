"""Blockwise 4-bit quantization in plain PyTorch: NF4, FP4 and INT4, bit-exact with bitsandbytes.

What bitsandbytes stores for a 4-bit weight (`bitsandbytes.functional.quantize_4bit`), written
out step by step so that each one can be read and checked:

1. flatten the weight and cut it into blocks of `blocksize` values (64 by default);
2. find each block's absolute maximum (`absmax`, fp32) and divide the block by it, so every
   value lands in [-1, 1];
3. replace each value by the nearest of 16 levels of a code book (NF4, FP4 or INT4) and keep
   the level's 4-bit index (its *code*);
4. pack two codes per byte, the first value in the high nibble;
5. optionally (double quantization) quantize the fp32 absmax values themselves: subtract
   their mean, then 8-bit blockwise quantization (blocks of 256) with bitsandbytes' signed
   dynamic map, keeping one fp32 scale per 256 absmax values.

`dequantize` runs it backwards: level[code] * absmax. tests/test_quant.py checks that
`quantize` gives the same packed bytes and absmax, and `dequantize` the same values, as
bitsandbytes 0.50.2 on CPU (and, in the gpu tests, on CUDA), for NF4 and FP4, with and
without double quantization, for blocksizes 32..4096 and sizes that are not a multiple of
the blocksize.

The CPU and CUDA kernels of bitsandbytes agree on almost every value but round a few
differently, so `quantize` follows the rules of the device its input is on (or the `rules`
you name, to see the other device's rounding on a CPU):

- CPU (PyTorch kernel): values are scaled by 1/absmax (the last, partial block is divided by
  absmax instead, and stores 1e-38 as its absmax when it is all zeros); the nearest level wins and
  an exact tie goes to the lower level; for FP4
  a tiny positive value gets the code of -0 and a tiny negative one the code of +0 (the sort
  order of the two zeros). The 8-bit absmax code of double quantization goes through a
  65,536-entry lookup table, so a value within ~1.5e-5 of a midpoint can get the farther code.
- CUDA: bitsandbytes is compiled with fast math, so 1/absmax is the GPU's approximate
  reciprocal (the MUFU.RCP instruction, PTX rcp.approx.ftz.f32), which can be one ulp off the
  exact one; on a CUDA tensor the reference uses the same instruction (through Triton, which
  ships with PyTorch's CUDA builds) and otherwise the exact reciprocal. NF4 and FP4 use
  hard-coded decision trees `x > t` whose thresholds are 16-digit decimal literals rounded
  once to fp32 by the compiler; four of NF4's land one ulp away from the fp32 midpoints (the
  midpoints are exact fp32 ties, so the literal's last digit decides), and FP4's differ from
  the midpoints in the 7th digit (0.583333 instead of 0.58333337). FP4 takes the sign from
  the value (tiny positive -> +0); an all-zero block scales to NaN and gets code 0. The
  8-bit absmax code uses a binary search whose ties go to the level it reached. (Read off
  the kernel's machine code, `cuobjdump -sass`: MUFU.RCP, FMUL.FTZ, FSETP.GT with these
  constants.)

What the formats do to a model's weights (errors, code use, blocksizes) is measured in
`formats`, on top of this module.

Shortcuts: uint8 storage only (bitsandbytes also packs into other dtypes); inputs are fp32,
bf16 or fp16; INT4 is this lab's symmetric baseline, not a bitsandbytes format (bitsandbytes
has no INT4 storage), and uses the CPU rules on every device; code books are constants
shared by all layers, so storage counts leave them out.
"""

import functools
from dataclasses import dataclass
from fractions import Fraction

import torch

from qlora_lab import recipe
from qlora_lab.recipe import CODEBOOKS

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts for 4-bit
NESTED_BLOCKSIZE = 256  # blocksize of the second-level (8-bit) quantization of absmax
# NF4's outermost quantile sits at probability 1 - delta, delta = (1/32 + 1/30) / 2 = 0.0322917 (the mean of
# half a 1/16 and half a 1/15 probability bin): bitsandbytes' constant; Q(1) itself would be infinite.
NF4_OFFSET = 0.9677083
# CUDA's FP4 decision thresholds on |x| (bitsandbytes csrc dQuantizeFP4), with the magnitude
# code each interval gets: |x| <= 0.00260417 -> 0b000 (0), ... , |x| > 0.8333333 -> 0b011 (1)
CUDA_FP4_THRESHOLDS = ("0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")
CUDA_FP4_MAGNITUDE_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
# CUDA's NF4 decision thresholds (bitsandbytes csrc dQuantizeNF4), ascending; `x > t` moves up one code
CUDA_NF4_THRESHOLDS = ("-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
                       "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
                       "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
                       "0.5016634166240692", "0.6427869200706482", "0.8614784181118011")


# --------------------------------------------------------------------------- code books


def nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels (code order = ascending), built from normal quantiles as QLoRA does.

    8 positive levels are the standard normal quantiles Q(p) at 8 evenly spaced probabilities
    p from 1 - delta down to (just above) 1/2, 7 negative levels likewise at 7 probabilities,
    plus an exact zero; all divided by the largest, Q(1 - delta), so they span [-1, 1].
    Asymmetric on purpose: 16 codes, an exact zero, and 8 + 7 non-zero levels.
    Computed like bitsandbytes' create_normal_map: fp32 probabilities, fp64 quantiles, fp32
    levels, so the result equals bitsandbytes' hard-coded table bit for bit.
    Example: nf4_levels()[[0, 7, 15]] -> tensor([-1., 0., 1.])
    """
    p_pos = torch.linspace(offset, 0.5, 9)[:-1].double()  # (8,) probabilities, fp32 then fp64
    p_neg = torch.linspace(offset, 0.5, 8)[:-1].double()  # (7,)
    positive = torch.special.ndtri(p_pos)  # standard normal quantiles (inverse CDF)
    negative = -torch.special.ndtri(p_neg)
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return levels / levels.max()


def fp4_levels() -> torch.Tensor:
    """The 16 FP4 levels in code order: bit 3 sign, bits 2-1 exponent, bit 0 mantissa.

    bitsandbytes' FP4 encodes the exponent its own way: exponent field e = 1, 2, 3 means a scale
    of 2**3, 2**2, 2**1 and e = 0 is subnormal, so the magnitudes are 0, 0.0625, 8, 12, 4, 6, 2, 3
    for the codes 0..7, divided by the largest (12). Codes 0 and 8 are both zero (+0 and -0):
    one of the 16 codes is wasted, and 0.0625/12 = 0.0052 is nearly a third zero.
    Example: fp4_levels()[[0, 1, 3, 8, 11]] -> tensor([0.0000, 0.0052, 1.0000, 0.0000, -1.0000])
    """
    code = torch.arange(16)
    sign = 1 - 2 * (code >> 3)  # bit 3
    exponent = (code >> 1) & 0b11  # bits 2-1
    mantissa = code & 1  # bit 0
    normal = (1 + 0.5 * mantissa) * 2.0 ** (4 - exponent)
    subnormal = mantissa * 0.0625
    magnitude = torch.where(exponent == 0, subnormal, normal).float()
    levels = sign * magnitude
    return levels / levels.abs().max()


def int4_levels() -> torch.Tensor:
    """The 16 INT4 levels in code order: signed integers -8..7 (code = integer + 8) divided by 7.

    Symmetric absmax quantization rounds x / absmax * 7 to an integer in -7..7: 15 evenly
    spaced levels; code 0 (-8/7) lies outside [-1, 1] and is never used.
    Example: int4_levels()[[1, 8, 15]] -> tensor([-1., 0., 1.])
    """
    return (torch.arange(16) - 8).float() / 7


LEVELS = {"nf4": nf4_levels, "fp4": fp4_levels, "int4": int4_levels}


def levels(quant_type: str) -> torch.Tensor:
    """The 16 levels of a code book by name. Example: levels("nf4").shape -> torch.Size([16])"""
    recipe.check_quant(quant_type, CODEBOOKS)
    return LEVELS[quant_type]()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()): 256 sorted levels in [-1, 1].

    Each 8-bit code is a sign, a run of zeros that sets a decimal exponent 10**-6 .. 10**0, and
    the remaining bits as a linear fraction in (0.1, 1): fine steps near 0 and coarse ones near
    1, like a float. Used for the absmax values in double quantization.
    Example: dynamic_map()[[0, 127, 255]] -> tensor([-0.9930, 0.0000, 1.0000])
    """
    values = []
    for i in range(7):  # exponent 10**(i-6); 2**i fraction steps per sign
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(values + [0.0, 1.0]), dtype=torch.float32)


# --------------------------------------------------------------------------- state


@dataclass
class QuantState:
    """Everything besides the packed codes that dequantize needs (bitsandbytes' QuantState)."""

    quant_type: str  # "nf4", "fp4" or "int4"
    shape: torch.Size  # shape of the original tensor
    dtype: torch.dtype  # dtype of the original tensor; dequantize returns it
    blocksize: int  # values per absmax block
    absmax: torch.Tensor  # (blocks,) fp32 scale per block, or uint8 codes of it with double quantization
    code: torch.Tensor  # (16,) fp32 level of each 4-bit code
    offset: torch.Tensor | None = None  # double quantization: fp32 mean subtracted from absmax
    absmax_scale: torch.Tensor | None = None  # double quantization: (ceil(blocks/256),) fp32 scale per 256 absmax
    absmax_code: torch.Tensor | None = None  # double quantization: (256,) fp32 levels of the 8-bit dynamic map

    @property
    def double_quant(self) -> bool:
        return self.offset is not None


# --------------------------------------------------------------------------- quantize / dequantize


def quantize(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
             double_quant: bool = False, rules: str | None = None) -> tuple[torch.Tensor, QuantState]:
    """Quantize a tensor blockwise to 4-bit codes, two per byte; returns (packed, state).

    packed is uint8 of shape ((numel + 1) // 2, 1), like bitsandbytes. rules ("cpu" or "cuda",
    default: w's device) picks whose kernel's rounding to follow (see the module docstring).
    Example: packed, state = quantize(torch.randn(4096, 4096), "nf4", 64, double_quant=True)
             packed.shape, state.absmax.dtype -> (torch.Size([8388608, 1]), torch.uint8)
    """
    recipe.check_quant(quant_type, CODEBOOKS)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize takes fp32, bf16 or fp16 tensors, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    rules = _check_rules(rules, w)
    cuda_rules = rules == "cuda" and quant_type != "int4"
    x = w.detach().reshape(-1).float()  # (n,)
    n = x.numel()
    blocks = -(-n // blocksize)
    grid = torch.nn.functional.pad(x, (0, blocks * blocksize - n)).view(blocks, blocksize)  # zero padding
    absmax = grid.abs().amax(dim=1)  # (blocks,) fp32
    if not cuda_rules and n % blocksize:  # bitsandbytes' CPU path stores a zero partial block's absmax as 1e-38
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    scaled = _scale_blocks(grid, absmax, n, cuda_rules)  # (blocks, blocksize), in [-1, 1]
    codes = _cuda_4bit_codes(scaled, quant_type) if cuda_rules else _nearest_codes(scaled, levels(quant_type))
    codes = codes.reshape(-1)[: n + n % 2]  # an odd count keeps one padding code for the last byte
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)  # (ceil(n/2), 1): first value in the high nibble
    state = QuantState(quant_type, w.shape, w.dtype, blocksize, absmax, levels(quant_type).to(w.device))
    if double_quant:
        state.offset = absmax.mean()
        state.absmax, state.absmax_scale = quantize_absmax(absmax - state.offset, rules=rules)
        state.absmax_code = dynamic_map().to(w.device)
    return packed, state


def dequantize(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Undo quantize: level[code] * absmax per block, in the original shape and dtype.

    Example: w2 = dequantize(*quantize(w, "nf4")); (w - w2).abs().max() <= w.abs().max() * 0.16
    """
    n = state.shape.numel()
    absmax = state.absmax
    if state.double_quant:  # undo quantize_absmax: code[codes] * scale per block of 256, plus the mean
        nested = state.absmax_code[absmax.long()]  # (blocks,) fp32
        nested = torch.nn.functional.pad(nested, (0, state.absmax_scale.numel() * NESTED_BLOCKSIZE - nested.numel()))
        nested = nested.view(-1, NESTED_BLOCKSIZE) * state.absmax_scale[:, None]  # (nested blocks, 256)
        absmax = nested.reshape(-1)[: absmax.numel()] + state.offset
    codes = unpack(packed).long()  # (2 * bytes,)
    blocks = absmax.numel()
    values = state.code.to(packed.device)[codes]  # fp32 level of each code
    values = torch.nn.functional.pad(values, (0, blocks * state.blocksize - values.numel()))
    values = values.view(blocks, state.blocksize) * absmax[:, None]  # (blocks, blocksize)
    return values.reshape(-1)[:n].to(state.dtype).reshape(state.shape)


def unpack(packed: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """The 4-bit codes in a packed tensor, first value from the high nibble; numel drops the padding code.

    Example: unpack(torch.tensor([[0x7F]], dtype=torch.uint8)) -> tensor([7, 15], dtype=torch.uint8)
    """
    byte = packed.reshape(-1)
    return torch.stack([byte >> 4, byte & 0x0F], dim=1).reshape(-1)[:numel]


def quantize_absmax(centered: torch.Tensor, rules: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-level quantization of (absmax - mean) to 8-bit dynamic-map codes; returns (codes, scales).

    bitsandbytes.functional.quantize_blockwise(centered, blocksize=256); rules as in quantize.
    Example: codes, scales = quantize_absmax(absmax - absmax.mean())  # uint8 (blocks,), fp32 (blocks/256,)
    """
    n = centered.numel()
    blocks = -(-n // NESTED_BLOCKSIZE)
    grid = torch.nn.functional.pad(centered.float(), (0, blocks * NESTED_BLOCKSIZE - n)).view(blocks, NESTED_BLOCKSIZE)
    scale = grid.abs().amax(dim=1)  # (blocks,)
    rules = _check_rules(rules, centered)
    reciprocal = gpu_reciprocal(scale) if rules == "cuda" else 1.0 / scale  # the CUDA kernel's is MUFU.RCP too
    scaled = grid * reciprocal[:, None]  # NaN in an all-zero block: both kernels give it code 0
    code = dynamic_map().to(centered.device)
    q = _cuda_binary_search(scaled, code) if rules == "cuda" else _cpu_lookup_table(scaled, code)
    q = torch.where(scale[:, None] == 0, torch.zeros_like(q), q)
    return q.reshape(-1)[:n], scale


# --------------------------------------------------------------------------- the rounding rules


def _scale_blocks(grid: torch.Tensor, absmax: torch.Tensor, n: int, cuda_rules: bool) -> torch.Tensor:
    """Each block divided by its absmax, the way the device's kernel does it."""
    if cuda_rules:
        return grid * gpu_reciprocal(absmax)[:, None]  # 0 * inf = NaN for an all-zero block
    safe = absmax.clamp(min=1e-38)
    scaled = grid * (1.0 / safe)[:, None]
    if n % grid.shape[1]:  # bitsandbytes' CPU path divides the partial last block instead
        scaled[-1] = (grid[-1] / safe[-1]).clamp(-1, 1)
    return scaled.clamp(-1, 1)


def _nearest_codes(scaled: torch.Tensor, code_levels: torch.Tensor) -> torch.Tensor:
    """Code of the nearest level (bucketize against the sorted levels' midpoints); a value exactly halfway goes
    to the lower level."""
    code_levels = code_levels.to(scaled.device)
    order = torch.argsort(code_levels, stable=True)  # code of the k-th smallest level
    sorted_levels = code_levels[order]
    midpoints = (sorted_levels[:-1] + sorted_levels[1:]) / 2  # (15,) fp32
    index = torch.bucketize(scaled, midpoints, out_int32=True)  # rank of the nearest level
    if torch.equal(order, torch.arange(16, device=order.device)):  # NF4, INT4: codes already in order
        return index.to(torch.uint8)
    return order[index].to(torch.uint8)


def _cuda_4bit_codes(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """bitsandbytes' CUDA decision trees (dQuantizeNF4 / dQuantizeFP4), vectorised."""
    nan = scaled.isnan()
    thresholds = torch.tensor(_cuda_thresholds(quant_type), device=scaled.device)
    if quant_type == "nf4":  # bucketize counts the thresholds t with x > t: the tree's leaf, in code order
        codes = torch.bucketize(scaled, thresholds, out_int32=True).to(torch.uint8)
    else:
        magnitude = torch.tensor(CUDA_FP4_MAGNITUDE_CODES, device=scaled.device)[torch.bucketize(scaled.abs(), thresholds)]
        codes = (magnitude + 8 * (scaled < 0)).to(torch.uint8)
    return torch.where(nan, torch.zeros_like(codes), codes)  # every `x > t` is false for NaN


@functools.cache
def _cuda_thresholds(quant_type: str) -> tuple[float, ...]:
    """The CUDA tree's thresholds as fp32 values, converted once per format."""
    literals = CUDA_NF4_THRESHOLDS if quant_type == "nf4" else CUDA_FP4_THRESHOLDS
    return tuple(fp32_from_decimal(t) for t in literals)


def fp32_from_decimal(literal: str) -> float:
    """The fp32 value a C compiler gives the literal `<literal>f`: the decimal rounded once, to nearest.

    Not the same as float32(float(literal)), which rounds twice (to fp64, then to fp32) and
    goes wrong when the fp64 value is an exact fp32 tie, as NF4's midpoints are.
    Example: fp32_from_decimal("0.8614784181118011") -> 0.8614783883094788 (float32 of the float: 0.8614784479141235)
    """
    exact = Fraction(literal)
    near = torch.tensor(float(exact), dtype=torch.float32)
    candidates = [torch.nextafter(near, torch.tensor(-2.0)), near, torch.nextafter(near, torch.tensor(2.0))]
    errors = [abs(Fraction(c.item()) - exact) for c in candidates]
    best = min(errors)
    ties = [c for c, e in zip(candidates, errors) if e == best]
    return min(ties, key=lambda c: c.view(torch.int32).item() & 1).item()  # an exact tie goes to the even mantissa


def gpu_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1/x the way bitsandbytes' CUDA kernels compute it: the approximate MUFU.RCP (rcp.approx.ftz.f32).

    On a CUDA tensor this runs that instruction through a one-line Triton kernel; elsewhere (or
    without Triton) it returns the exact 1/x, which differs by at most an ulp.
    Example: gpu_reciprocal(torch.tensor([0.0732421875], device="cuda")) -> tensor([13.6533327...])
    """
    x = x.float().contiguous()
    kernel = _rcp_approx_kernel() if x.is_cuda else None
    if kernel is None:
        return 1.0 / x
    out = torch.empty_like(x)
    kernel[(-(-x.numel() // 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


@functools.lru_cache(maxsize=1)
def _rcp_approx_kernel():
    try:  # Triton ships with PyTorch's CUDA builds only: imported where a CUDA tensor needs it
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def rcp_approx(src, dst, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(src + i, mask=i < n, other=1.0)
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        tl.store(dst + i, y, mask=i < n)

    return rcp_approx


def _cpu_lookup_table(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer: a 65,536-entry table over [-1, 1] instead of a search; a value takes
    the nearest code of the grid point -1 + 2i/65535 nearest to it (not always its own nearest code)."""
    size = 65536
    table = _lookup_table(tuple(code.tolist()), size).to(scaled.device)
    scaled = scaled.nan_to_num(0.0).clamp(-1, 1)  # NaN only in all-zero blocks, which get code 0 anyway
    index = ((scaled + 1.0) * 0.5 * (size - 1) + 0.5).to(torch.int64)  # C's cast to an integer truncates
    return table[index]


@functools.lru_cache(maxsize=4)
def _lookup_table(code: tuple, size: int) -> torch.Tensor:
    """(size,) uint8: for each grid point -1 + 2i/(size-1), how many code midpoints lie below it."""
    code = torch.tensor(code, dtype=torch.float32)
    grid_points = -1.0 + (2.0 * torch.arange(size, dtype=torch.float32)) / (size - 1)
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.bucketize(grid_points, midpoints).to(torch.uint8)


def _cuda_binary_search(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA 8-bit quantizer (dQuantize): a 7-step binary search, then the closer neighbour;
    all values at once (the loop is over the 7 search steps, not over blocks)."""
    pivot = torch.full_like(scaled, 127, dtype=torch.int64)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(scaled, -1.0), torch.full_like(scaled, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = scaled > val
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, val, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = scaled > val
    go_up = right & (scaled > (upper + val) * 0.5)
    go_down = ~right & (scaled < (lower + val) * 0.5)
    q = torch.where(go_up, upper_pivot, torch.where(go_down, lower_pivot, pivot))
    return q.to(torch.uint8)


def _check_rules(rules: str | None, w: torch.Tensor) -> str:
    rules = rules or ("cuda" if w.is_cuda else "cpu")
    if rules not in ("cpu", "cuda"):
        raise ValueError(f"rules must be 'cpu' or 'cuda' (whose kernel to mimic), got {rules!r}")
    return rules


# --------------------------------------------------------------------------- storage


def stored_bytes(packed: torch.Tensor, state: QuantState) -> int:
    """Bytes this lab's (= bitsandbytes') layout stores for one tensor: codes, absmax and, with
    double quantization, the second-level scales and the offset (code books are shared constants).

    Example: stored_bytes(*quantize(torch.randn(64 * 256 * 4), "nf4", 64, True)) -> 33812
    """
    total = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.double_quant:
        total += state.absmax_scale.numel() * state.absmax_scale.element_size() + state.offset.element_size()
    return total


def layout_bytes(numel: int, blocksize: int = 64, double_quant: bool = False) -> int:
    """The same count from the size alone: what a tensor of numel values takes in 4-bit.

    Example: layout_bytes(4096 * 4096) -> 9437184  (4.5 bits per value)
    """
    blocks = -(-numel // blocksize)
    total = (numel + 1) // 2
    if double_quant:
        return total + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4
    return total + 4 * blocks


def theory_bits(blocksize: int = 64, double_quant: bool = False) -> float:
    """The QLoRA paper's bits per parameter: 4 + 32/blocksize, or 4 + 8/64 + 32/(64*256) with DQ.

    Example: theory_bits(64, False), theory_bits(64, True) -> (4.5, 4.126953125)
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize


def model_storage(model) -> dict:
    """What a bitsandbytes 4-bit model stores for its Linear4bit weights, from the tensors themselves.

    Counts packed weight bytes, absmax (fp32, or uint8 + nested fp32 absmax + offset with double
    quantization) per layer. Example: model_storage(nf4_model) -> {"params": 106168320,
    "bytes": 54770040, "bits_per_param": 4.12703, "layers": 210}
    """
    params = stored = layers = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        layers += 1
        params += state.shape.numel()
        stored += module.weight.numel() * module.weight.element_size()
        stored += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            stored += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.offset.element_size()
    return {"params": params, "bytes": stored, "bits_per_param": 8 * stored / params if params else float("nan"),
            "layers": layers}
