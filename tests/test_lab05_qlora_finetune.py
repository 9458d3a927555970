"""Lab 05 under the smoke profile (4 steps of batch 2): train, evaluate (generated and teacher-forced), check
forgetting, save, reload and compare with LoRA all run; weight-dependent results are recorded only for real weights."""

import pytest
from labrun import run_lab


def check(r: dict):
    assert r["reload_identical"] is True  # a saved adapter on a fresh 4-bit base: the same logits, bit for bit
    assert 4 * r["trainable_params"] <= r["adapter_bytes"] < 4 * r["trainable_params"] + 200_000  # fp32 A, B + header
    assert r["adapter_bytes"] < r["base_bytes_16bit"] / 10
    assert r["qlora_peak_bytes"] > 0 and r["lora_peak_bytes"] > 0
    assert r["qlora_step_seconds"] > 0 and r["lora_step_seconds"] > 0 and r["train_seconds"] > 0
    accuracy = ("gen_accuracy_before", "gen_accuracy_after", "teacher_forced_accuracy_after", "lora_gen_accuracy")
    weight_dependent = (*accuracy, "gen_accuracy_after_ci", "qlora_vs_lora_difference_ci", "general_perplexity_after")
    if r["model_source"] == "random":  # accuracy of random weights is no finding: not recorded
        assert not set(weight_dependent) & set(r) and r["findings_withheld"] >= 1
        return
    for name in accuracy:
        assert 0 <= r[name] <= 1
    low, high = r["gen_accuracy_after_ci"]
    assert low <= r["gen_accuracy_after"] <= high
    low, high = r["qlora_vs_lora_difference_ci"]
    assert low <= r["gen_accuracy_after"] - r["lora_gen_accuracy"] <= high
    assert r["general_perplexity_before"] > 1 and r["general_perplexity_after"] > 1


@pytest.mark.notebooks
@pytest.mark.xdist_group("lab05-adapter")  # lab 07's smoke test reads the adapter this one saves
def test_lab05_smoke():
    r = run_lab("05_qlora_finetune")
    check(r)
    assert r["model_source"] == "default" and r["gen_accuracy_before"] == 0.0 == r["teacher_forced_accuracy_before"]
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
