"""Lab 01 under the smoke profile: the calculator meets a CPU measurement, the eval-mode pitfall shows."""

import pytest
from labrun import run_lab


@pytest.mark.notebooks
def test_lab01_smoke():
    r = run_lab("01_vram_budget")
    assert r["calc_device"] == "cpu" and r["calc_configs"] >= 2
    assert r["calc_max_abs_error"] < 0.05 and r["calc_median_abs_error"] <= r["calc_max_abs_error"]
    assert set(r["calc_errors"]) and all(abs(e) < 0.05 for e in r["calc_errors"].values())
    assert r["eval_mode_saved_ratio"] > 2  # eval mode silently disables checkpointing
    assert r["estimate_seconds"] < 1e-3  # the widget redraws on every change: one estimate must stay under 1 ms


@pytest.mark.gpu
@pytest.mark.lab("01_vram_budget")
def test_lab01_gpu(gpu_lab):
    """The calculator against torch.cuda.max_memory_allocated: every config within 10 %, median within 5 %."""
    r = gpu_lab("01_vram_budget")
    assert r["calc_device"] == "cuda" and r["calc_configs"] >= 12
    assert r["calc_max_abs_error"] <= 0.10 and r["calc_median_abs_error"] <= 0.05
    assert r["paged_state_outside_allocator"] is True
