"""Lab 05 under the smoke profile (4 steps of batch 2): train, evaluate, save, reload, merge and compare all run."""

import pytest
from labrun import run_lab


def check(r: dict):
    assert r["reload_identical"] is True  # a saved adapter on a fresh 4-bit base: the same logits, bit for bit
    assert 4 * r["trainable_params"] <= r["adapter_bytes"] < 4 * r["trainable_params"] + 200_000  # fp32 A, B + header
    assert r["adapter_bytes"] < r["base_bytes_16bit"] / 10
    # merging into the original 16-bit weights changes the base under the adapter; into the NF4 round trip much less
    assert r["merge_max_abs_diff"] > 0 and r["merge_nf4_mean_abs_diff"] < r["merge_mean_abs_diff"] / 2
    assert r["qlora_peak_bytes"] > 0 and r["lora_peak_bytes"] > 0
    assert r["qlora_step_seconds"] > 0 and r["lora_step_seconds"] > 0 and r["train_seconds"] > 0
    accuracy = ("accuracy_before", "accuracy_after", "merged_accuracy", "lora_accuracy")
    if r["model_source"] == "random":  # accuracy of random weights is no finding: not recorded
        assert not set(accuracy) & set(r) and r["findings_withheld"] >= 1
    for name in accuracy:
        assert r["model_source"] == "random" or 0 <= r[name] <= 1


@pytest.mark.notebooks
@pytest.mark.xdist_group("browser")  # not at the same time as the browser test's lab 05 (same checkpoint folder)
def test_lab05_smoke():
    r = run_lab("05_qlora_finetune")
    check(r)
    assert r["model_source"] == "default" and r["accuracy_before"] == 0.0
    assert r["eval_loss_after"] < r["eval_loss_before"] - 0.1  # 4 small steps already lower the answer loss
    assert list(r["periodic_eval_accuracy"]) == ["2", "4"]
    assert r["memory_kind"].startswith("peak RSS")


@pytest.mark.gpu
@pytest.mark.lab("05_qlora_finetune")
def test_lab05_gpu(gpu_lab):
    r = gpu_lab("05_qlora_finetune")
    check(r)
    assert r["memory_kind"] == "torch.cuda.max_memory_allocated"
    assert r["qlora_peak_bytes"] < r["lora_peak_bytes"]  # the 4-bit base is what QLoRA saves
