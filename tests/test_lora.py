"""qlora_lab.lora: counts against peft, the LoRA forward pass, delta W, and the cached sweep."""

import dataclasses
import math

import pytest
import torch
from peft import get_peft_model

from qlora_lab import lora, models, shapes, sweep
from qlora_lab.train import TrainConfig


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m", "qwen2.5-0.5b", "mistral-7b"])
@pytest.mark.parametrize("r,targets", [(1, "all-linear"), (8, "all-linear"), (16, ["q_proj", "v_proj"]),
                                       (4, ["k_proj", "down_proj"])])
def test_parameter_count_from_architecture_matches_peft(tiny_shape, shape, r, targets):
    model = models.build_random_model(shape, quant=None, device="meta")  # shapes only, no memory
    peft_model = get_peft_model(model, lora.lora_config(r=r, targets=targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert shapes.lora_parameter_count(shape, r, targets) == trainable


def test_parameter_count_by_hand_and_bad_targets():
    # SmolLM2-135M, one layer: q,o 576->576, k,v 576->192, gate,up 576->1536, down 1536->576
    per_layer = 2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)
    assert shapes.lora_parameter_count("smollm2-135m", 1) == 30 * per_layer
    assert shapes.lora_parameter_count("smollm2-135m", 8, ["q_proj", "v_proj"]) == 30 * 8 * (1152 + 768)
    with pytest.raises(ValueError, match="unknown target modules.*qkv_proj"):
        shapes.lora_parameter_count("smollm2-135m", 8, ["qkv_proj"])
    r_qv = lora.equal_budget_rank("smollm2-135m", 4, ["q_proj", "v_proj"])
    budget = shapes.lora_parameter_count("smollm2-135m", 4)
    gaps = [abs(shapes.lora_parameter_count("smollm2-135m", r, ["q_proj", "v_proj"]) - budget)
            for r in (r_qv - 1, r_qv, r_qv + 1)]
    assert gaps[1] == min(gaps)


@pytest.fixture
def tiny_lora(tiny_shape):
    def make(r=4, alpha=8, rslora=False, targets="all-linear"):
        model, tok = models.load_model(f"random:{tiny_shape}", quant="nf4", device="cpu")
        torch.manual_seed(0)
        return lora.add_lora(model, r=r, alpha=alpha, rslora=rslora, targets=targets), tok
    return make


@pytest.mark.parametrize("rslora", [False, True])
def test_one_layer_forward_is_w_x_plus_scaled_b_a_x(tiny_lora, rslora):
    model, _ = tiny_lora(r=4, alpha=8, rslora=rslora)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4) if rslora else 8 / 4)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)  # B starts at zero; make the update visible
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)  # (batch, seq, d_in)
    with torch.no_grad():
        got = layer(x).float()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, d_in), (d_out, r)
        by_hand = layer.base_layer(x).float() + layer.scaling["default"] * (x.float() @ A.T @ B.T)
        assert torch.allclose(got, by_hand, atol=2e-2, rtol=2e-2)
        assert torch.allclose(lora.delta_w(layer), layer.scaling["default"] * B @ A)


def test_model_starts_exactly_at_the_base_model(tiny_lora):
    model, tok = tiny_lora(r=8, alpha=16)
    assert all(torch.count_nonzero(m.lora_B["default"].weight) == 0 for m in lora.lora_modules(model).values())
    ids = torch.randint(0, 4096, (2, 12))
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    assert torch.equal(with_adapter, without)
    assert lora.total_delta_w_norm(model) == 0.0


def test_delta_w_norm_and_singular_values_from_the_factors(tiny_lora):
    model, _ = tiny_lora(r=6, alpha=12)
    for module in lora.lora_modules(model).values():
        with torch.no_grad():
            module.lora_B["default"].weight.normal_()
        full = lora.delta_w(module)  # (d_out, d_in)
        assert lora.delta_w_norm(module) == pytest.approx(torch.linalg.matrix_norm(full).item(), rel=1e-4)
        expected = torch.linalg.svdvals(full)[:6]
        assert torch.allclose(lora.delta_w_singular_values(module), expected, rtol=1e-3, atol=1e-5)
        assert torch.linalg.svdvals(full)[6:].abs().max() < 1e-3 * expected[0]  # rank at most r


def test_effective_rank():
    assert lora.effective_rank([3.0, 0.9, 0.1]) == 1  # 9 / 9.82 >= 0.9
    assert lora.effective_rank([3.0, 1.0, 0.1]) == 2  # 9 / 10.01 < 0.9
    assert lora.effective_rank([1.0, 1.0, 1.0, 1.0]) == 4
    assert lora.effective_rank([1.0, 1.0, 1.0, 1.0], energy=0.5) == 2
    assert lora.effective_rank([0.1, 3.0]) == 1  # order does not matter


def test_grid_names_rules_and_duplicates():
    points = sweep.grid([8, 16], fixed_alpha=16, rslora_ranks=[16])
    names = [p.name for p in points]
    # fixed alpha=16 at r=16 is the same point as alpha=r at r=16 and as alpha=2r at r=8: listed once
    assert names == ["r=8,alpha=16,rslora=False", "r=16,alpha=16,rslora=False", "r=8,alpha=8,rslora=False",
                     "r=16,alpha=32,rslora=False", "r=16,alpha=16,rslora=True"]
    assert points[-1].scale == 4.0 and points[0].scale == 2.0
    assert sweep.SweepPoint(21, 42, targets=("q_proj", "v_proj")).name == "r=21,alpha=42,rslora=False,targets=q_proj+v_proj"
    with pytest.raises(ValueError, match="unknown alpha rules"):
        sweep.grid([8], ("3r",))


@pytest.fixture
def tiny_sweep(tiny_shape, tmp_path, monkeypatch):
    """Settings for a seconds-long sweep on the tiny shape, and a log of which points trained."""
    settings = sweep.SweepSettings(model=f"random:{tiny_shape}", train=TrainConfig(steps=3, batch_size=2, warmup_steps=1,
                                  eval_batch_size=4), eval_examples=4, track_every=1, gradient_checkpointing=False)
    trained = []
    real = sweep.run_point

    def logged(point, settings, progress=False, base=None):
        trained.append(point.name)
        return real(point, settings, progress, base)

    monkeypatch.setattr(sweep, "run_point", logged)
    return settings, tmp_path / "cache", trained


def test_sweep_caches_every_point_by_its_full_configuration(tiny_sweep):
    settings, cache, trained = tiny_sweep
    first = sweep.run_sweep([sweep.SweepPoint(2, 4), sweep.SweepPoint(4, 4)], settings, cache, progress=False)
    assert trained == ["r=2,alpha=4,rslora=False", "r=4,alpha=4,rslora=False"]
    r2 = first["r=2,alpha=4,rslora=False"]
    assert r2["cached"] is False and r2["trainable"] == r2["formula_trainable"] == shapes.lora_parameter_count("tiny", 2)
    assert r2["steps"] == [1, 2, 3] and len(r2["losses"]) == 3 and r2["delta_w_steps"] == [0, 1, 2, 3]
    assert r2["delta_w_norms"][0] == 0.0 and r2["delta_w_norms"][-1] > 0
    assert all(len(sv) == 2 for sv in r2["spectra"].values()) and len(r2["spectra"]) == 2 * 7

    # the same sweep again: nothing trains, same numbers; an extended grid trains only the new point
    again = sweep.run_sweep([sweep.SweepPoint(2, 4), sweep.SweepPoint(4, 4), sweep.SweepPoint(4, 8)], settings, cache,
                           progress=False)
    assert trained[2:] == ["r=4,alpha=8,rslora=False"]
    assert again["r=2,alpha=4,rslora=False"]["cached"] is True
    assert again["r=2,alpha=4,rslora=False"]["eval_loss"] == r2["eval_loss"]

    # a changed shared setting is a different configuration: trained again
    sweep.run_sweep([sweep.SweepPoint(2, 4)], dataclasses.replace(settings, eval_examples=3), cache, progress=False)
    assert trained[3:] == ["r=2,alpha=4,rslora=False"]


def test_sweep_points_are_reproducible_and_independent_of_order(tiny_sweep):
    """A cached result is what training the point again on a freshly loaded base gives, whichever
    points trained before it on the shared base (same seed, same data order, base left unchanged)."""
    settings, cache, _ = tiny_sweep
    points = [sweep.SweepPoint(2, 16), sweep.SweepPoint(4, 8, rslora=True),
              sweep.SweepPoint(3, 6, targets=("q_proj", "v_proj"))]
    swept = sweep.run_sweep(points, settings, cache, progress=False)
    for point in points[1:]:
        fresh = sweep.run_point(point, settings)  # its own fresh base
        assert fresh["losses"] == swept[point.name]["losses"] and fresh["eval_loss"] == swept[point.name]["eval_loss"]
        assert fresh["delta_w_norms"] == swept[point.name]["delta_w_norms"]


def test_interrupted_sweep_resumes_at_the_first_unfinished_point(tiny_sweep, monkeypatch):
    settings, cache, trained = tiny_sweep
    points = [sweep.SweepPoint(1, 2), sweep.SweepPoint(2, 4), sweep.SweepPoint(3, 6)]
    logged = sweep.run_point

    def interrupted(point, settings, progress=False, base=None):
        if point.r == 2:
            raise KeyboardInterrupt  # the learner stops the kernel in the middle of the second point
        return logged(point, settings, progress, base)

    monkeypatch.setattr(sweep, "run_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(points, settings, cache, progress=False)
    assert trained == ["r=1,alpha=2,rslora=False"] and len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob("*.partial"))

    monkeypatch.setattr(sweep, "run_point", logged)
    results = sweep.run_sweep(points, settings, cache, progress=False)
    assert trained[1:] == ["r=2,alpha=4,rslora=False", "r=3,alpha=6,rslora=False"]
    assert [r["cached"] for r in results.values()] == [True, False, False]
