"""Lab 08 under the smoke profile: the per-GPU predictions, the checker's verdicts, a two-process FSDP + QLoRA job
on the CPU that shards as predicted, and a failure point run on purpose; on two GPUs, an 8B job on them against
one GPU, and Llama-2-70B held to 24 GiB per GPU with and without CPU offload."""

import pytest
import torch
from labrun import run_lab

from qlora_lab import fsdp

GUIDE = dict(batch=2, seq=2048, r=8, prepare=False)


def check(r: dict):
    predicted = r["predicted_gib"]
    assert predicted["2 GPUs, FSDP"] == round(fsdp.estimate("llama-2-70b", gpus=2, **GUIDE).device_bytes / 2**30, 2)
    assert predicted["1 GPU"] > predicted["2 GPUs, FSDP"] > predicted["4 GPUs, FSDP"]
    assert predicted["2 GPUs, FSDP + CPU offload"] < 24 < predicted["2 GPUs, FSDP"]
    assert {"quant_storage", "param_dtype", "prepare_upcast", "optimizer_save", "use_orig_params", "cpu_ram"} <= set(
        r["naive_problems"]) and r["recipe_problems"] == []
    assert r["first_loss_equals_unsharded"] is True and r["losses"][-1] < r["losses"][0]
    for local in r["local_param_bytes"]:
        assert abs(local / r["predicted_local_bytes"] - 1) < 0.05
    assert "Cannot flatten integer dtype tensors" in r["demo_outcomes"]["quant_storage"]


@pytest.mark.notebooks
def test_lab08_smoke():
    r = run_lab("08_multi_gpu_fsdp")
    check(r)
    assert len(r["local_param_bytes"]) == 2 and "peak_allocated_bytes" not in r  # the CPU: no GPU memory to read


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (the nvidia-h200-x2 machine)")
def test_lab08_two_gpus():
    r = run_lab("08_multi_gpu_fsdp", "gpu")
    check(r)
    assert all(b > 0 for b in r["peak_allocated_bytes"]) and abs(r["peak_error"]) <= 0.10  # the 8B job, per GPU
    assert set(r["step_seconds"]) == {"1 GPU", "2 GPUs"}
    big = r["big_cases"]  # Llama-2-70B at PEFT's guide's settings
    assert big["CPU offload, held to 24 GiB"]["outcome"] == "trained"
    assert all(abs(c["error"]) <= 0.10 for c in big.values() if c["outcome"] == "trained")
    if big["no offload, not held"]["peak_gib"] > 24:  # needs more than 24 GiB: held to 24 it must run out, recorded
        assert big["no offload, held to 24 GiB"]["outcome"].startswith("out of memory")
