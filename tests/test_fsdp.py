"""qlora_lab.fsdp: the per-GPU calculator against the single-GPU one and by hand, each failure point of the
checker where it flips, the CLI, and a real two-process FSDP + QLoRA job on this CPU (gloo) read back."""

import json
import math

import pytest

from qlora_lab import budget, fsdp, shapes, terms, vram

SETUP = dict(batch=2, seq=2048, r=8, prepare=False)  # PEFT's FSDP + QLoRA guide, Llama-2-70B


def test_one_gpu_is_the_single_gpu_estimate_plus_the_gathered_units():
    one = fsdp.estimate("llama-2-7b", gpus=1, **SETUP)
    single = vram.estimate("llama-2-7b", **SETUP)
    units = fsdp.unit_bytes(single.setup, single.shape)
    for phase, total in one.phases.items():
        assert total - single.phases[phase] == {
            "forward": units["root"], "loss-backward": units["root"] + units["layer"], "optimizer": 0,
            "layer-forward": units["root"] + 2 * units["layer"],
            "layer-backward": units["root"] + 2 * units["layer"] + units["layer_lora"]}[phase], phase


def test_sharded_terms_divide_by_the_gpus_and_the_rest_does_not():
    sh = shapes.of("llama-2-70b")
    setup = vram.Setup(model="llama-2-70b", **SETUP)
    for gpus in (2, 4, 8):
        e = fsdp.estimate("llama-2-70b", gpus=gpus, **SETUP)
        t = e.terms
        assert t["weights"] == math.ceil(terms.weight_bytes(setup, sh) / gpus)
        assert t["lora_params"] == math.ceil(terms.lora_bytes(setup, sh) / gpus)
        assert t["quant_constants"] == terms.quant_constant_bytes(setup, sh)  # quant_state: on every GPU
        assert t["activations"] == vram.estimate("llama-2-70b", **SETUP).terms["activations"]  # the local batch
    per_gpu = [fsdp.estimate("llama-2-70b", gpus=g, **SETUP).peak_allocated_bytes for g in (2, 4, 8)]
    assert per_gpu[0] > per_gpu[1] > per_gpu[2]


def test_cpu_offload_moves_the_shards_to_cpu_ram():
    on = fsdp.estimate("llama-2-70b", gpus=2, cpu_offload=True, **SETUP)
    off = fsdp.estimate("llama-2-70b", gpus=2, **SETUP)
    assert not {"weights", "lora_params", "optimizer"} & set(on.terms)
    assert on.host_bytes > 2 * off.terms["weights"] and off.host_bytes == 0
    assert on.peak_allocated_bytes < off.peak_allocated_bytes - off.terms["weights"] + 2**30


def test_the_70b_verdicts_on_two_24_gib_gpus():
    """Without offload a 70B step does not fit two 24 GiB cards; with it, it does (PEFT's guide: 35.6 and 19.6 GB)."""
    off = fsdp.estimate("llama-2-70b", gpus=2, **SETUP)
    on = fsdp.estimate("llama-2-70b", gpus=2, cpu_offload=True, **SETUP)
    assert not budget.predicted_verdict(off, 24 * 2**30).fits
    assert budget.predicted_verdict(on, 24 * 2**30).fits


def test_bad_input_names_what_is_allowed():
    with pytest.raises(vram.SetupError, match="gpus must be a positive integer"):
        fsdp.estimate("llama-2-7b", gpus=0)
    with pytest.raises(vram.SetupError, match="not full fine-tuning"):
        fsdp.estimate("llama-2-7b", method="full")


@pytest.mark.parametrize("bad, good, name", [
    (dict(quant_storage="uint8"), dict(quant_storage="bf16"), "quant_storage"),
    (dict(param_dtype="fp32"), dict(param_dtype="bf16"), "param_dtype"),
    (dict(setup=vram.Setup(prepare=True)), dict(setup=vram.Setup(prepare=False)), "prepare_upcast"),
    (dict(use_orig_params=True), dict(use_orig_params=False), "use_orig_params"),
    (dict(setup=vram.Setup(prepare=False, optimizer="paged_adamw_8bit"), save_optimizer=True),
     dict(setup=vram.Setup(prepare=False, optimizer="adamw_torch"), save_optimizer=True), "optimizer_save"),
    (dict(setup=vram.Setup(model="llama-2-70b", prepare=False), cpu_ram_bytes=64 * 2**30),
     dict(setup=vram.Setup(model="llama-2-70b", prepare=False), cpu_ram_bytes=256 * 2**30), "cpu_ram"),
    (dict(setup=vram.Setup(model="llama-2-70b", prepare=False, **{k: v for k, v in SETUP.items() if k != "prepare"}),
          gpu_bytes=24 * 2**30),
     dict(setup=vram.Setup(model="llama-2-70b", prepare=False, **{k: v for k, v in SETUP.items() if k != "prepare"}),
          gpu_bytes=24 * 2**30, cpu_offload=True), "per_gpu_memory"),
])
def test_each_failure_point_flips(bad, good, name):
    assert name in [p.name for p in fsdp.check(**bad)]
    assert name not in [p.name for p in fsdp.check(**good)]
    assert all(p.fix and p.source for p in fsdp.check(**bad))


def test_cli_per_gpu_json_and_the_fsdp_flag(capsys):
    assert budget.main(["--model", "llama-2-70b", "--fsdp", "--gpus", "2", "--batch", "2", "--seq", "2048", "--r", "8",
                        "--no-prepare", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    per_gpu = fsdp.estimate("llama-2-70b", gpus=2, **SETUP).peak_allocated_bytes
    assert out["gpus"] == 2 and out["peak_allocated_bytes"] == per_gpu
    assert budget.main(["--model", "llama-2-70b", "--gpus", "2"]) == 2
    assert "add --fsdp" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_checkpoint():
    return fsdp.checkpoint("tiny")


def test_two_cpu_ranks_shard_qlora_and_train_like_one_process(tiny_checkpoint, tmp_path):
    """A real FSDP job (torchrun, gloo): each rank holds half of the 4-bit model as the calculator says, the first
    sharded forward gives the unsharded model's loss exactly, and the loss falls."""
    config = {"backend": "gloo", "checkpoint": str(tiny_checkpoint), "quant": "nf4", "steps": 3, "batch": 2, "seq": 32,
              "r": 4, "lr": 1e-2}
    ranks = fsdp.launch(2, config, tmp_path, progress=False)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["losses"][0] == r["unsharded_loss"] and r["losses"][-1] < r["losses"][0]
    predicted = fsdp.estimate(str(tiny_checkpoint), gpus=2, device="cpu", prepare=False, r=4, batch=2, seq=32).terms
    assert ranks[0]["local_param_bytes"] == pytest.approx(predicted["weights"] + predicted["lora_params"], rel=0.03)


def test_a_case_with_checkpointing_and_autocast_is_one_table_row(tiny_checkpoint, tmp_path):
    """measure_case: the job lab 08 runs on GPUs (checkpointing, bf16 autocast as accelerate applies it), here on two
    CPU ranks: the sharded loss still equals the unsharded one under the same autocast, and the row reads back."""
    config = {"backend": "gloo", "model": "tiny", "checkpoint": str(tiny_checkpoint), "quant": "nf4", "steps": 3,
              "batch": 2, "seq": 32, "r": 4, "lr": 1e-2, "checkpointing": True, "mixed_precision": "bf16"}
    row = fsdp.measure_case(2, config, tmp_path)
    assert row["outcome"] == "trained" and row["gpus"] == 2 and row["peak_gib"] is None and row["error"] is None
    assert row["last_loss"] < row["first_loss"] and row["step_seconds"] > 0
    assert row["predicted_gib"] == fsdp.predict(config, 2).peak_allocated_bytes / 2**30
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert all(r["losses"][0] == r["unsharded_loss"] for r in ranks)


def test_a_failed_job_raises_with_the_ranks_error(tiny_checkpoint, tmp_path):
    config = {"backend": "gloo", "checkpoint": str(tiny_checkpoint), "quant": "nf4", "quant_storage": "uint8", "steps": 1}
    with pytest.raises(RuntimeError, match="Cannot flatten integer dtype tensors"):
        fsdp.launch(2, config, tmp_path, progress=False)
