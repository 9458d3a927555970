"""Lab 07 under the smoke profile: five ways to ship lab 05's adapter are built, saved, measured and explained;
weight-dependent results are recorded only for real weights."""

import json

import pytest
from labrun import run_lab

from qlora_lab import paths

VARIANTS = ("adapter on NF4", "merged into NF4", "merged into 16-bit", "NF4 dequantized, merged", "that, re-quantized")


def check(r: dict):
    assert set(r["tokens_per_second"]) == set(VARIANTS) == set(r["disk_bytes"])
    assert all(v > 0 for v in r["tokens_per_second"].values())
    disk = r["disk_bytes"]  # what you ship: a 16-bit model is about 3x a 4-bit one (embeddings stay 16-bit in both)
    assert disk["merged into 16-bit"] > 2 * disk["merged into NF4"] and disk["NF4 dequantized, merged"] > 2 * disk[
        "that, re-quantized"]
    assert disk["adapter on NF4"] > disk["merged into NF4"]  # the same 4-bit base, plus the adapter
    assert r["update_step_ratio_median"] > 0 and r["requantization_error_median"] > 0
    weight_dependent = ("adapter_accuracy", "merge_16bit_accuracy", "merge_4bit_accuracy", "merge_16bit_kl", "merge_4bit_kl")
    if r["model_source"] == "random":
        assert not set(weight_dependent) & set(r) and r["findings_withheld"] >= 1
        return
    assert all(0 <= r[k] <= 1 for k in weight_dependent if k.endswith("accuracy"))
    assert r["merge_16bit_kl"] >= 0 and r["merge_4bit_kl"] >= 0


def test_lab07_trains_with_lab05s_recipe():
    """Lab 07 finds lab 05's adapter only if its training settings are lab 05's, profile by profile."""
    def profiles(stem):
        nb = json.loads((paths.LABS_DIR / f"{stem}.ipynb").read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        namespace = {}
        exec("".join(cell["source"]), namespace)  # the parameters cell: plain assignments
        return namespace["PROFILES"]

    keys = ("model", "r", "alpha", "steps", "batch_size", "lr", "warmup_steps", "eval_every", "save_every")
    lab05, lab07 = profiles("05_qlora_finetune"), profiles("07_after_training")
    for name in ("smoke", "cpu", "gpu"):
        assert {k: lab05[name][k] for k in keys} == {k: lab07[name][k] for k in keys}, name


@pytest.mark.notebooks
@pytest.mark.xdist_group("lab05-adapter")  # after lab 05's smoke test, on the same worker
def test_lab07_smoke():
    r = run_lab("07_after_training")
    check(r)
    assert r["model_source"] == "default"


@pytest.mark.gpu
@pytest.mark.lab("07_after_training")
def test_lab07_gpu(gpu_lab):
    check(gpu_lab("07_after_training"))
