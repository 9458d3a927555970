"""qlora_lab.vram: each term against a hand computation, the solvers, bad input, the CLI,
and the whole estimate against measurements: live tensor bytes on this CPU, and the H100
peaks recorded in tests/data (a run of labs/01's gpu profile measures them afresh)."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from qlora_lab import budget, leftovers, measure, models, shapes, terms, vram

GPU_DATA = json.loads((Path(__file__).parent / "data" / "h100_training_peaks.json").read_text())
LLAMA7 = shapes.of("llama-2-7b")


def test_shape_counts_match_the_model_table():
    for name in shapes.ARCHITECTURES:
        model = models.build_random_model(name, quant=None, device="meta")
        assert shapes.parameter_counts(name)["total"] == shapes.count_parameters(model)["total"], name


def test_shape_from_a_transformers_config():
    sh = shapes.of(shapes.config("mistral-7b"))
    assert (sh.hidden, sh.kv_heads, sh.head_dim, sh.vocab, sh.tied) == (4096, 8, 128, 32000, False)


def test_weights_by_hand():
    # 16-bit LoRA: every parameter in 2 bytes
    assert terms.weight_bytes(vram.Setup(method="lora"), LLAMA7) == 6_738_415_616 * 2
    # QLoRA NF4: half a byte per linear weight + fp32 embeddings, lm_head and norms
    linear = 32 * (4096 * 4096 * 4 + 4096 * 11008 * 3)
    fp32 = (2 * 32000 * 4096 + 65 * 4096) * 4
    assert terms.weight_bytes(vram.Setup(method="qlora"), LLAMA7) == pytest.approx(linear / 2 + fp32, abs=32 * 7 * 512)


def test_quant_constants_are_the_papers_bits_per_weight():
    linear = 32 * (4096 * 4096 * 4 + 4096 * 11008 * 3)
    dq = terms.quant_constant_bytes(vram.Setup(double_quant=True), LLAMA7) * 8 / linear
    plain = terms.quant_constant_bytes(vram.Setup(double_quant=False), LLAMA7) * 8 / linear
    assert dq == pytest.approx(8 / 64 + 32 / (64 * 256), abs=1e-3)  # 0.127 bits
    assert plain == pytest.approx(32 / 64, abs=1e-3)  # 0.5 bits


def test_lora_parameters_by_hand():
    per_layer = 16 * ((4096 + 4096) * 4 + (4096 + 11008) * 3)
    assert shapes.lora_parameter_count(LLAMA7, 16) == 32 * per_layer == 39_976_960
    assert shapes.lora_parameter_count(LLAMA7, 8, ("q_proj", "v_proj")) == 32 * 8 * (8192 + 8192)
    assert vram.estimate("llama-2-7b", r=16).params["trainable"] == 39_976_960


def test_optimizer_state_by_hand():
    setup = vram.Setup(r=16, optimizer="adamw")
    assert terms.optimizer_bytes(setup, LLAMA7) == (2 * 4 * 39_976_960, 0)  # two fp32 moments (all tensors 512-aligned)
    eight = terms.optimizer_bytes(vram.Setup(r=16, optimizer="adamw_8bit"), LLAMA7)[0]
    assert 2 * 39_976_960 < eight < 2.1 * 39_976_960  # one byte per moment + block scales
    alloc, paged = terms.optimizer_bytes(vram.Setup(r=64, optimizer="paged_adamw_32bit"), LLAMA7)
    # A: 64 x 4096 = 262,144 elements >= 1e5 -> paged; every tensor here is paged
    assert paged == 2 * 4 * shapes.lora_parameter_count(LLAMA7, 64) and alloc == 0
    assert terms.optimizer_bytes(vram.Setup(optimizer="sgd"), LLAMA7) == (0, 0)


def test_logits_terms_by_hand():
    no_autocast = vram.Setup(batch=2, seq=100, mixed_precision="no")
    assert terms.logits_bytes(no_autocast, LLAMA7) == {"logits": 200 * 32000 * 4, "fp32 copy": 0,
                                                       "log-softmax": 200 * 32000 * 4,
                                                       "grad buffers": 2 * 200 * 32000 * 4, "kept": 0}
    lg16 = terms.logits_bytes(vram.Setup(method="lora", batch=2, seq=100, mixed_precision="no"), LLAMA7)
    assert lg16["logits"] == 200 * 32000 * 2 and lg16["fp32 copy"] == 200 * 32000 * 4
    # Trainer's bf16=True: autocast runs the fp32 head in bf16 (bf16 logits, an fp32 copy); the returned logits are
    # converted to fp32, and a loop that keeps them holds that copy through backward
    bf16 = terms.logits_bytes(vram.Setup(batch=2, seq=100, keep_outputs=True), LLAMA7)
    assert (bf16["logits"], bf16["fp32 copy"], bf16["kept"]) == (200 * 32000 * 2, 200 * 32000 * 4, 200 * 32000 * 4)
    casts = terms.autocast_cast_bytes(vram.Setup(r=16), LLAMA7)
    assert casts == {"adapters": 2 * 39_976_960, "lm_head": 2 * 32000 * 4096}
    assert terms.autocast_cast_bytes(vram.Setup(r=16, mixed_precision="no"), LLAMA7) == {"adapters": 0, "lm_head": 0}


def test_layer_activations_by_hand():
    sh = shapes.of("smollm2-135m")  # h 576, q 576, kv 192, I 1536, 9 heads
    qlora = terms.layer_activation_bytes(vram.Setup(model="smollm2-135m", r=16, mixed_precision="no"), sh, device="cpu")
    # fp32 stream: norms 2(4h+4), attention 4(2q+2kv)+4*9, MLP 3*4I, shared adapter inputs h (qkv) + h (gate/up)
    # + I (down) in fp32, lora_B inputs 7 * 4r
    assert qlora["total"] == 2 * (4 * 576 + 4) + 4 * (2 * 576 + 2 * 192) + 36 + 12 * 1536 + 4 * (576 + 576 + 1536) + 7 * 64
    lora = terms.layer_activation_bytes(vram.Setup(model="smollm2-135m", method="lora", r=16, mixed_precision="no"), sh,
                                       device="cpu")
    # bf16 stream: each of the 7 adapters keeps its own fp32 copy of its input
    assert lora["inputs"] == 4 * (5 * 576 + 576 + 1536) + 7 * 64
    # bf16 autocast (measured tensor by tensor with saved-tensor hooks): q, k, v and the output saved in bf16, and
    # every adapter its own bf16 copy of its input (o_proj's too), lora_B a bf16 r-wide input
    bf16 = terms.layer_activation_bytes(vram.Setup(model="smollm2-135m", r=16), sh, device="cpu")
    assert bf16["attention"] == 2 * (2 * 576 + 2 * 192) + 36
    assert bf16["inputs"] == 2 * (6 * 576 + 1536) + 7 * 2 * 16  # q k v o gate up: 576 wide, down: 1536
    with_ckpt = terms.activation_bytes(vram.Setup(model="smollm2-135m", batch=3, seq=10), sh)
    assert with_ckpt == 30 * (30 * 4 * 576 + 4 * 576 + 4)  # one fp32 hidden state per layer + final norm


def test_attention_falls_back_to_scores_for_fp32_gqa_on_cuda():
    mistral, llama2 = shapes.of("mistral-7b"), shapes.of("llama-2-7b")
    no_autocast = vram.Setup(model="mistral-7b", mixed_precision="no")
    assert terms.attention_kernel(no_autocast, mistral) == "scores"
    assert terms.attention_kernel(no_autocast, mistral, device="cpu") == "fused"
    assert terms.attention_kernel(vram.Setup(model="mistral-7b", method="lora", mixed_precision="no"), mistral) == "fused"
    assert terms.attention_kernel(vram.Setup(model="mistral-7b"), mistral) == "fused"  # bf16 autocast: flash attention
    assert terms.attention_kernel(vram.Setup(), llama2) == "fused"
    assert terms.attention_kernel(vram.Setup(attn="eager"), llama2) == "scores"


def test_checkpointing_and_size_move_the_peak_the_right_way():
    base = dict(model="llama-2-7b", method="qlora", batch=2, seq=1024)
    on, off = vram.estimate(**base), vram.estimate(**base, checkpointing=False)
    assert off.peak_allocated_bytes > 2 * on.peak_allocated_bytes
    peaks = [vram.estimate(**{**base, "seq": s}).peak_allocated_bytes for s in (256, 512, 1024, 2048)]
    assert peaks == sorted(peaks)
    methods = [vram.estimate(**{**base, "method": m}).peak_allocated_bytes for m in ("qlora", "lora", "full")]
    assert methods == sorted(methods)
    paged = vram.estimate(**base, optimizer="paged_adamw_8bit", r=64)
    assert paged.paged_bytes > 0
    assert paged.device_bytes == paged.peak_allocated_bytes + paged.paged_bytes + paged.overhead_bytes


def test_solvers_find_the_boundary():
    kwargs = dict(model="llama-2-7b", method="qlora", seq=512)
    b = budget.max_batch("T4 16GB", **kwargs)
    assert b >= 1
    assert budget.fits(vram.estimate(batch=b, **kwargs), "T4 16GB")
    assert not budget.fits(vram.estimate(batch=b + 1, **kwargs), "T4 16GB")
    s = budget.max_seq("T4 16GB", model="llama-2-13b", method="qlora", batch=4)
    assert s < 4096  # memory, not the context length, sets this one
    assert budget.fits(vram.estimate("llama-2-13b", method="qlora", batch=4, seq=s), "T4 16GB")
    assert not budget.fits(vram.estimate("llama-2-13b", method="qlora", batch=4, seq=s + 1), "T4 16GB")
    assert budget.max_seq("RTX 4090 24GB", model="llama-2-13b", method="qlora", batch=1) == 4096  # the context caps it
    assert budget.max_batch("T4 16GB", model="llama-65b", method="lora", seq=512) == 0


@pytest.mark.parametrize("bad, message", [
    (dict(batch=0), "batch must be a positive integer"),
    (dict(seq=-5), "seq must be a positive integer"),
    (dict(r=0), "r must be a positive integer"),
    (dict(r=8192), "larger than"),
    (dict(targets=("q_proj", "qkv_proj")), "unknown target modules"),
    (dict(method="prefix"), "method must be one of"),
    (dict(optimizer="adam9"), "unknown optimizer 'adam9'; use one of adamw_torch"),
    (dict(quant="nf3"), "quant must be one of"),
    (dict(blocksize=48), "blocksize"),
    (dict(method="lora", base_dtype="bf16", mixed_precision="fp16"), "promotes to fp32.*base_dtype='fp16'"),
])
def test_bad_input_says_what_is_allowed(bad, message):
    with pytest.raises(vram.SetupError, match=message):
        vram.estimate("llama-2-7b", **bad)


def test_unknown_model_and_gpu():
    with pytest.raises(vram.SetupError, match="llama-2-7b"):
        vram.estimate("llama-5-1t")
    with pytest.raises(vram.SetupError, match="T4 16GB"):
        budget.fits(vram.estimate("llama-2-7b"), "GTX 970")


def test_a_rehearsal_says_its_speed_is_the_real_cards():
    assert budget.env.device_label({"gpu": "NVIDIA H200"}) == "NVIDIA H200"
    held = budget.env.device_label({"gpu": "NVIDIA H200", "gpu_budget_gib": 15.0})
    assert held.startswith("NVIDIA H200 (held to 15.0 GiB") and "speed is this card's" in held
    assert budget.env.device_label({"gpu": None, "torch_threads": 2}) == "CPU, 2 threads"


def test_lora_base_follows_its_16_bit_precision():
    """A T4 (fp16) LoRA run loads its base in fp16, as users do: a bf16 base under fp16 autocast measured +17 % on an
    H200 (llama-3.2-1b, b4x1024, no checkpointing), PyTorch promoting bf16 + fp16 to fp32."""
    assert vram.Setup(method="lora", compute_dtype="fp16").resolved_base_dtype() == "fp16"
    assert vram.Setup(method="lora", mixed_precision="fp16").resolved_base_dtype() == "fp16"
    assert vram.Setup(method="lora").resolved_base_dtype() == "bf16"
    assert vram.Setup(method="lora", mixed_precision="no").resolved_base_dtype() == "bf16"
    assert vram.Setup(method="full", mixed_precision="no").resolved_base_dtype() == "fp32"
    model, _ = measure.build(vram.Setup(model="smollm2-135m", method="lora", r=4, compute_dtype="fp16"), "cpu")
    assert model.base_model.model.model.embed_tokens.weight.dtype == torch.float16


def test_this_gpu_is_the_planned_budget(monkeypatch):
    """"this GPU" judges against what env plans for (a rehearsal's 15 GiB, not the card's name); without CUDA it says so."""
    monkeypatch.setattr(budget.env, "gpu_memory_bytes", lambda: 15 * vram.GiB)
    assert budget.gpu_bytes(budget.THIS_GPU) == 15 * vram.GiB
    seven_b = vram.estimate("llama-2-7b", method="qlora", batch=32, seq=2048)
    assert budget.fits(seven_b, "H100 80GB") and not budget.fits(seven_b, budget.THIS_GPU)
    monkeypatch.setattr(budget.env, "gpu_memory_bytes", lambda: None)
    with pytest.raises(vram.SetupError, match="needs CUDA"):
        budget.gpu_bytes(budget.THIS_GPU)


def test_cli_json(capsys):
    from qlora_lab.__main__ import main

    assert main(["vram", "--model", "llama-2-7b", "--method", "qlora", "--batch", "4", "--seq", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_allocated_bytes"] == vram.estimate("llama-2-7b", batch=4, seq=512).peak_allocated_bytes
    assert {"weights", "quant_constants", "lora_params", "optimizer", "activations", "logits"} <= set(out["terms"])
    assert sum(out["terms"].values()) == out["peak_allocated_bytes"]
    assert {"paged_bytes", "overhead_bytes"} <= set(out)
    assert main(["vram", "--model", "llama-2-7b", "--batch", "0"]) == 2
    assert "batch must be a positive integer" in capsys.readouterr().err
    assert main(["vram", "--model", "llama-2-7b", "--targets", "q_proj,v_proj", "--no-checkpointing",
                 "--optimizer", "paged_adamw_8bit", "--gpu", "T4 16GB"]) == 0
    out = capsys.readouterr().out
    assert "T4 16GB: fits 15.0 GiB (allocated" in out and "the device total decides" in out
    assert "warning: prepare_model_for_kbit_training(model) turns gradient checkpointing ON" in out  # asked for no ckpt
    assert main(["vram", "--gpu", "RTX 9090"]) == 2 and "unknown GPU 'RTX 9090'" in capsys.readouterr().err
    assert main(["vram", "--json", "--gpu", "T4 16GB"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] == {"T4 16GB": True}


def test_estimate_matches_recorded_h100_peaks():
    """Within 10 % of every measured peak, median within 5 % (recorded H100 run; see meta)."""
    errors = []
    for row in GPU_DATA["measurements"]:
        predicted = vram.estimate(**{"mixed_precision": "no", **row["config"]}).peak_allocated_bytes  # a loop, no autocast
        errors.append(abs(predicted / row["peak_allocated_bytes"] - 1))
    assert len(errors) >= 12
    assert max(errors) <= 0.10 and statistics.median(errors) <= 0.05, errors


@pytest.mark.parametrize("config", [
    dict(method="qlora", batch=2, seq=32),
    dict(method="qlora", batch=2, seq=32, checkpointing=False, lora_dropout=0.1),
    dict(method="lora", batch=1, seq=48, checkpointing=False, targets=("q_proj", "v_proj")),
    dict(method="full", base_dtype="bf16", batch=2, seq=32),
    dict(method="qlora", batch=2, seq=32, attn="eager", optimizer="adamw_8bit"),
], ids=["qlora", "qlora-dropout", "lora-qv", "full", "eager-8bit"])
def test_estimate_matches_cpu_measurement(tiny_shape, config):
    """The calculator (device='cpu') against live tensor bytes of real steps on this CPU."""
    measured = measure.measure(vram.Setup(model=tiny_shape, **config), device="cpu")
    predicted = vram.estimate(tiny_shape, device="cpu", **config)
    assert predicted.peak_allocated_bytes == pytest.approx(measured.peak_allocated_bytes, rel=0.05)
    assert measured.loss > 0 and math.isfinite(measured.loss)


def test_measure_refuses_a_single_step(tiny_shape):
    with pytest.raises(ValueError, match="2 steps"):
        measure.measure(vram.Setup(model=tiny_shape), steps=1, device="cpu")


def test_measure_variants_starts_each_variant_clean(tiny_shape, monkeypatch):
    """Lab 06's variants share one model: release() runs before each, new adapters get a fresh optimizer after the old
    one is freed (free_optimizer), and the cast goes both ways, so fp32 adapters again measure what they did first."""
    calls = {"release": 0, "free": 0}
    release, free = measure.release, leftovers.free_optimizer

    def counting(name, real):
        return lambda *a: calls.__setitem__(name, calls[name] + 1) or real(*a)
    monkeypatch.setattr(measure, "release", counting("release", release))
    monkeypatch.setattr(leftovers, "free_optimizer", counting("free", free))
    variants = {"fp32": {}, "long": {"seq": 48}, "bf16": {"adapter_dtype": "bf16"}, "fp32 again": {"adapter_dtype": "fp32"}}
    runs = measure.measure_variants(vram.Setup(model=tiny_shape, seq=32), variants, timeline=False, device="cpu")
    assert calls == {"release": 1 + len(variants) + 1, "free": 2 + 1}  # before the build, each variant, the end
    peaks = {label: run["result"].peak_allocated_bytes for label, run in runs.items()}
    assert peaks["bf16"] < peaks["fp32"] < peaks["long"] and peaks["fp32 again"] == pytest.approx(peaks["fp32"], rel=1e-3)
    assert [runs[k]["setup"].adapter_dtype for k in variants] == ["fp32", "fp32", "bf16", "fp32"]
    assert runs["long"]["prediction"].peak_allocated_bytes == vram.estimate(tiny_shape, seq=48).peak_allocated_bytes


def test_free_optimizer_frees_the_paged_state(monkeypatch):
    """bitsandbytes never frees a paged buffer (CUDA unified memory, kept in its page manager): free_optimizer takes it
    out of the manager and frees it; what the driver refuses to free is returned, as bytes left on the device."""
    from types import SimpleNamespace

    from bitsandbytes.functional import GlobalPageManager

    paged, small = torch.zeros(1000), torch.zeros(10)
    paged.is_paged = True
    manager, pointer = GlobalPageManager.get_instance(), paged.data_ptr()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    for driver_frees, left in ((True, 0), (False, 4000)):
        monkeypatch.setattr(manager, "paged_tensors", [paged])
        freed = []
        monkeypatch.setattr(leftovers, "_free_managed", lambda p, ok=driver_frees, seen=freed: seen.append(p) or ok)
        optimizer = SimpleNamespace(state={"p": {"state1": paged, "state2": small}})
        assert leftovers.free_optimizer(optimizer) == left
        assert freed == [pointer] and optimizer.state == {} and manager.paged_tensors == []
    assert leftovers.free_optimizer(SimpleNamespace(state={"p": {"exp_avg": small}})) == 0


@pytest.mark.gpu
def test_paged_state_lives_outside_the_allocator():
    def allocated():  # without cuBLAS's workspace, which the first matmul of the process allocates and keeps
        torch._C._cuda_clearCublasWorkspaces()
        return torch.cuda.memory_allocated()

    before = allocated()
    result = measure.measure(vram.Setup(model="llama-3.2-1b", r=64, optimizer="paged_adamw_32bit", batch=1, seq=128))
    predicted = vram.estimate("llama-3.2-1b", r=64, optimizer="paged_adamw_32bit", batch=1, seq=128)
    assert result.paged_bytes == predicted.paged_bytes > 0
    assert result.phase_peaks["optimizer"] == pytest.approx(predicted.phases["optimizer"], rel=0.1)
    assert allocated() - before < 64 * 2**20


def test_live_tensor_bytes_ignores_fake_tensors_left_alive():
    """Regression: another library's FakeTensors (no storage) alive in the process made it raise."""
    from torch._functorch import config as functorch_config
    from torch._subclasses.fake_tensor import FakeTensorMode

    with functorch_config.patch(fake_tensor_allow_unsafe_data_ptr_access=False), FakeTensorMode():
        fake = torch.empty(0, 1)  # noqa: F841 (kept alive on purpose; its data_ptr() raises, as bnb's left ones do)
    with measure.LiveTensorBytes() as live:
        x = torch.ones(1024, dtype=torch.float32)  # 4 KiB
    assert live.peak == x.untyped_storage().nbytes() == 4096


def test_live_tensor_bytes_ignores_dead_weak_proxies():
    """Regression: a dead weakref.proxy in the process (ipywidgets leave some) made isinstance() raise."""
    import weakref

    class Thing:
        pass

    thing = Thing()
    proxy = weakref.proxy(thing)  # noqa: F841 (kept alive on purpose, its referent is not)
    del thing
    with measure.LiveTensorBytes() as live:
        x = torch.ones(256)
    assert live.peak == x.untyped_storage().nbytes()


def test_lab01_grid_follows_the_devices_16_bit_type(monkeypatch):
    """A T4 has no native bf16: under fp16 every bf16 run of lab 01's grid becomes fp16, the labels say so, and the
    calculator's bytes stay those of a 16-bit type; runs without autocast stay without."""
    from qlora_lab import calibrate

    assert calibrate.for_device(calibrate.GRIDS["gpu"], "cpu") is calibrate.GRIDS["gpu"]
    monkeypatch.setenv("QLORA_LAB_COMPUTE_DTYPE", "fp16")
    grid = calibrate.for_device(calibrate.GRIDS["gpu"], "cuda")
    setups = [vram.Setup.of(c) for c in grid]
    assert {s.precision() for s in setups} == {"fp16", "no"} and {s.compute_dtype for s in setups} == {"fp16"}
    without = sum(c.get("mixed_precision") == "no" for c in calibrate.GRIDS["gpu"])
    assert sum(s.precision() == "no" for s in setups) == without
    unchanged = vram.Setup.of(calibrate.GRIDS["gpu"][1])
    assert vram.estimate(**vars(setups[1])).peak_allocated_bytes == vram.estimate(**vars(unchanged)).peak_allocated_bytes
    assert "bf16" not in " ".join(calibrate.label(c) for c in grid[1:])
    assert calibrate.label(grid[0]) == f"{calibrate.GUIDE_LABEL}, fp16"  # a named row says its dtype too
    assert calibrate.label(calibrate.GRIDS["cpu"][6]) == "smollm2-135m full b2x64 no autocast loop"  # no rank: no adapters
