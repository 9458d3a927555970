"""Lab 04 under the smoke profile: the checker passes the correct QLoRA setup and catches every broken one."""

import pytest
from labrun import run_lab

LORA_R8 = 30 * 8 * 10_176  # SmolLM2-135M: 30 layers x r x sum(d_in + d_out) over q,k,v,o,gate,up,down
BASE = 134_515_008  # published parameter count
IN_4BIT = 106_168_320  # weights of the 210 Linear4bit layers


def test_lab04_smoke():
    r = run_lab("04_only_lora_trains")
    assert r["checks_passed"] == r["checks_total"] == 6 and all(r["checks"].values())
    assert r["trainable_params"] == r["lora_params_by_hand"] == LORA_R8
    assert r["total_params"] == BASE + LORA_R8
    assert r["naive_total_params"] == r["total_params"] - IN_4BIT // 2  # numel() of packed 4-bit: half
    assert abs(r["trainable_ratio"] - LORA_R8 / (BASE + LORA_R8)) < 1e-12
    # step 1: every A had zero gradient (B = 0); AdamW's decay alone moved it, without decay it stayed; step 2 it learned
    assert r["step1_a_zero_grad"] == r["lora_a_total"] == 210
    assert r["step1_a_moved_by_decay_only"] == r["step1_a_moved_with_decay"] == 210
    assert r["step1_a_moved_without_decay"] == 0 and r["step2_a_moved"] == 210
    # every broken setup caught; the CPU repack row only exists where bitsandbytes repacks
    assert r["negative_controls_total"] == (6 if r["cpu_repack_applies"] else 5)
    assert r["negative_controls_caught"] == r["negative_controls_total"] and all(r["negative_controls"].values())
    assert r["prepare_forgotten_checker_ok"] is True  # measured: on this stack forgetting prepare still trains only LoRA
    # the symptoms, measured on one batch
    change = r["loss_change"]
    assert change["correct"] < -0.1
    assert change["optimizer built before LoRA"] == 0 and change["no adapters"] == 0  # trains nothing
    assert change["optimizer over all parameters"] == change["correct"]  # no visible symptom
    if r["cpu_repack_applies"]:
        assert abs(change["eval pass with CPU repack"]) < abs(change["correct"]) / 2  # wrong gradients: learns slowly


@pytest.mark.gpu
@pytest.mark.lab("04_only_lora_trains")
def test_lab04_gpu(gpu_lab):
    """On CUDA (a random SmolLM2 shape in 4-bit): the checker passes the correct setup, catches the broken ones."""
    r = gpu_lab("04_only_lora_trains")
    assert r["checks_passed"] == r["checks_total"] == 6
    assert r["cpu_repack_applies"] is False and r["negative_controls_total"] == 5
    assert r["negative_controls_caught"] == r["negative_controls_total"]
    assert r["loss_change"]["correct"] < 0
