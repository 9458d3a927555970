"""qlora_lab.ship: an adapter saves and reloads bit for bit; merges differ for the reason the lab gives;
update_vs_step reproduces what peft's merge into a 4-bit model stores, and flips with the update's size."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from test_train import TinyRun

from qlora_lab import data, evals, lora, ship


@pytest.fixture
def tiny_run(tiny_shape):
    return TinyRun(tiny_shape)


def test_save_reload_is_identical_and_merge_differs_for_a_reason(tiny_run, tiny_shape, tmp_path):
    eval_rows = tiny_run.eval_rows
    model, tok = tiny_run.fresh()
    tiny_run.run(model, tok, tmp_path / "run")
    trainable = sum(p.numel() for p in lora.trainable_parameters(model))
    saved = ship.save_adapter(model, tmp_path / "adapter")
    assert saved["file"].endswith("adapter_model.safetensors")
    assert 4 * trainable <= saved["bytes"] < 4 * trainable + 64_000  # fp32 A and B, plus a header

    assert ship.frozen_to_compute_dtype(model) > 0  # undo the training-time fp32 upcast (lossless)
    trained = evals.answer_logits(model, tok, eval_rows)
    reloaded, _ = ship.load_adapter(tmp_path / "adapter", f"random:{tiny_shape}", device="cpu")
    assert torch.equal(evals.answer_logits(reloaded, tok, eval_rows), trained)

    merged, _ = ship.merge_adapter(tmp_path / "adapter", f"random:{tiny_shape}", tmp_path / "merged", device="cpu")
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert not lora.lora_modules(merged)
    into_16bit = (evals.answer_logits(merged, tok, eval_rows) - trained).abs().max().item()
    merged_nf4, _ = ship.merge_adapter(tmp_path / "adapter", f"random:{tiny_shape}", base_from_4bit=True, device="cpu")
    into_nf4 = (evals.answer_logits(merged_nf4, tok, eval_rows) - trained).abs().max().item()
    # merging into the original 16-bit weights changes the base the adapter was trained on (NF4);
    # merging into the NF4 round trip leaves only 16-bit rounding of W + delta W
    assert into_16bit > 0 and into_nf4 < into_16bit / 3


def _scaled_adapter(tiny_run, scale: float):
    """A fresh tiny 4-bit model whose LoRA B matrices are random (not zero) times `scale`."""
    model, tok = tiny_run.fresh()
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn_like(param) * scale
    return model, tok


@pytest.mark.parametrize("scale", [1e-5, 0.3])
def test_update_vs_step_is_what_peft_merge_stores(tiny_run, scale):
    model, _ = _scaled_adapter(tiny_run, scale)
    rows = {r["name"]: r for r in ship.update_vs_step(model)}
    assert len(rows) == 2 * 7  # every LoRA layer of the 2-layer shape
    before = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            w = module.base_layer.weight
            before[name.removeprefix("base_model.model.")] = (bnbf.dequantize_4bit(w.data, w.quant_state).float(),
                                                               module.get_delta_weight("default").float())
    merged = model.merge_and_unload()  # peft: dequantize, add, quantize again (Params4bit)
    for name, (w, delta) in before.items():
        layer = merged.get_submodule(name)
        stored = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float() - w
        error = ((stored - delta).norm() / delta.norm()).item()
        assert rows[name]["error"] == pytest.approx(error, rel=1e-5), name
        assert rows[name]["unchanged"] == pytest.approx((stored == 0).float().mean().item())
    ratio = sorted(r["ratio"] for r in rows.values())
    errors = [r["error"] for r in rows.values()]
    if scale < 1e-3:  # far below the NF4 step: merging into 4-bit stores rounding noise, not the update
        assert ratio[-1] < 0.01 and min(errors) > 0.9
    else:  # far above it: the update survives, up to NF4 rounding
        assert ratio[0] > 1 and max(errors) < 0.5


def test_generation_speed_times_fixed_length_generation(tiny_run):
    model, tok = tiny_run.fresh()
    rows = list(data.load_task()["eval"].select(range(3)))
    speed = ship.generation_speed(model, tok, rows, new_tokens=6, repeats=2)
    assert speed["batch"] == 3 and speed["new_tokens"] == 6 and len(speed["seconds"]) == 2
    low, high = speed["range"]
    assert 0 < low <= speed["tokens_per_second"] <= high
    assert speed["tokens_per_second"] == pytest.approx(3 * 6 / sorted(speed["seconds"])[0], rel=0.5)
    # what it times: every row gets exactly new_tokens tokens (min_new_tokens), end-of-turn or not
    ids = tok([data.prompt_text(r, tok) for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 6


def test_local_step_follows_the_codes_device():
    """On CUDA the unpacked codes live on the GPU and quant.levels on the CPU (lab 07 failed there): the step is
    computed where the codes are. The meta device stands in for the GPU on this CPU-only machine."""
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 0.875, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0])
    codes = torch.tensor([0, 2, 15])
    assert ship._local_step(codes, levels).tolist() == pytest.approx([0.5, 0.375, 0.01])
    assert ship._local_step(codes.to("meta"), levels).device.type == "meta"
