"""Lab 01 under the smoke profile: the calculator meets a CPU measurement, the eval-mode pitfall shows."""

import pytest
from labrun import run_lab

from qlora_lab import budget, calibrate


@pytest.mark.notebooks
def test_lab01_smoke():
    r = run_lab("01_vram_budget")
    assert r["calc_device"] == "cpu" and r["calc_configs"] >= 2 and r["calc_trainer_bf16_configs"] >= 1
    assert r["calc_max_abs_error"] < 0.05 and r["calc_median_abs_error"] <= r["calc_max_abs_error"]
    assert set(r["calc_errors"]) and all(abs(e) < 0.05 for e in r["calc_errors"].values())
    # the pitfall, measured: prepare_model_for_kbit_training's default checkpointing survives gradient_checkpointing=False
    assert r["pitfall_off_equals_on"] is True and r["pitfall_really_off_ratio"] > 1.05
    assert r["eval_mode_saved_ratio"] > 2  # eval mode silently disables checkpointing
    assert r["estimate_seconds"] < 1e-3  # the widget redraws on every change: one estimate must stay under 1 ms


@pytest.mark.gpu
@pytest.mark.lab("01_vram_budget")
def test_lab01_gpu(gpu_lab):
    """The calculator against torch.cuda.max_memory_allocated of the runs users launch, on what this GPU (or
    $QLORA_LAB_GPU_MEMORY) holds: Trainer with bf16 autocast within 5 % everywhere and 2 % at the median, the guides'
    recipe within 3 %, loops keeping outputs within 6 %; the rest skipped as budget.plan says, none out of memory."""
    r = gpu_lab("01_vram_budget")
    measured, skipped = budget.plan(calibrate.GRIDS["gpu"], r["gpu_budget_bytes"])
    assert r["calc_device"] == "cuda" and r["calc_out_of_memory"] == 0
    assert r["calc_configs"] == len(measured) >= 5 and r["calc_skipped"] == len(skipped)
    trainer_bf16 = [c for c in measured if c.get("mixed_precision") != "no" and c.get("path") != "loop"]
    assert r["calc_trainer_bf16_configs"] == len(trainer_bf16)
    assert r["calc_trainer_bf16_median_abs_error"] <= 0.02 and r["calc_trainer_bf16_max_abs_error"] <= 0.05
    assert r["calc_max_abs_error"] <= 0.05
    assert ("calc_guide_error" in r) is any(c.get("label") == calibrate.GUIDE_LABEL for c in measured)
    assert abs(r.get("calc_guide_error", 0)) <= 0.03 and r.get("calc_keep_outputs_max_abs_error", 0) <= 0.06
    assert r.get("calc_load_max_abs_error", 0) <= 0.05
    assert r["paged_state_outside_allocator"] is True
    assert r["pitfall_off_equals_on"] is True and r["pitfall_really_off_ratio"] > 1.05
