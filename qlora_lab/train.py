"""Fine-tune (lab 05) with the transformers `Trainer`, and ship the result (labs 05 and 07).

Training is configured in one place (`TrainConfig`, `make_trainer`) and run by `finetune`,
which adds what the lab measures: per-step wall time, peak memory (`measure.MemoryMeter`) and
resuming an interrupted run from its last checkpoint. Trainer's periodic eval uses the
teacher-forced exact match of `evals.evaluate` (`exact_match_metrics`).
`run_dir` names where a configuration's checkpoints and adapter live, so lab 07 finds lab 05's
adapter. Evaluation lives in `evals`; saving, reloading and merging the adapter in `ship`.

Shortcuts: one device, no gradient accumulation, no packing; Trainer's periodic eval loss is the
mean of per-batch means (evals.evaluate's is a mean over all answer tokens), so the two differ slightly.
"""

import hashlib
import json
import shutil
import statistics
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from safetensors import safe_open
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from qlora_lab import data, leftovers, measure, paths, recipe

# --------------------------------------------------------------------------- training (lab 05)


@dataclass
class TrainConfig:
    """Everything that decides a fine-tuning run besides the model, the adapter and the data."""

    steps: int = 120  # optimizer steps; each step sees one batch
    batch_size: int = 8  # examples per step
    lr: float = 3e-4  # peak learning rate
    warmup_steps: int = 10  # linear warm-up from 0 to lr, then linear decay to 0 at `steps`
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (0: plain Adam update)
    optim: str = "auto"  # a transformers optimizer name; "auto": paged_adamw_8bit on CUDA, adamw_torch on CPU
    eval_every: int = 40  # Trainer's periodic eval every this many steps (0: none)
    eval_batch_size: int = 16  # examples per eval forward pass
    save_every: int = 40  # write a resumable checkpoint every this many steps (0: none)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep on disk
    log_every: int = 1  # log the training loss every this many steps
    seed: int = 0  # data order (and everything else Trainer seeds)

    def key(self) -> str:
        """A short hash of the configuration. Example: TrainConfig().key() -> 'a1b2c3d4e5f6'"""
        return config_key(asdict(self))


def config_key(config: dict) -> str:
    """12 hex digits identifying a JSON-able configuration (key order does not matter).

    Example: config_key({"r": 8, "alpha": 16}) == config_key({"alpha": 16, "r": 8}) -> True
    """
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def resolve_optimizer(optim: str = "auto", device: str | torch.device | None = None) -> str:
    """The optimizer name Trainer gets: paged 8-bit AdamW on CUDA (QLoRA's choice), torch AdamW on CPU.

    Paged optimizers keep their state in unified memory that can spill to CPU RAM under
    memory pressure; 8-bit states quarter Adam's two fp32 moments. Both need bitsandbytes'
    CUDA backend, so on CPU "auto" means plain torch AdamW (with LoRA the states are tiny anyway).
    Example: resolve_optimizer("auto", "cpu") -> "adamw_torch"
    """
    if optim != "auto":
        return recipe.optimizer(optim).name
    return "paged_adamw_8bit" if torch.device(device or recipe.default_device()).type == "cuda" else "adamw_torch"


def answer_argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Trainer's preprocess_logits_for_metrics: keep only the predicted token ids, not 49k logits each.

    Example: answer_argmax(torch.randn(2, 5, 10), labels).shape -> (2, 5)
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)  # (batch, seq)


def exact_match_metrics(eval_prediction) -> dict:
    """Trainer's compute_metrics: teacher-forced exact match, the same rule as `evaluate`.

    predictions[:, t] is the model's guess for token t+1; an example is correct when every
    answer token (label != -100) was guessed. Trainer pads across batches with -100, which
    lines up with padded labels.
    Example: exact_match_metrics(EvalPrediction(predictions=preds, label_ids=labels)) -> {"accuracy": 0.7}
    """
    preds = torch.as_tensor(eval_prediction.predictions)[:, :-1]  # (examples, seq-1)
    labels = torch.as_tensor(eval_prediction.label_ids)[:, 1:]  # (examples, seq-1)
    mask = labels != data.IGNORE_INDEX
    hits = (preds == labels) | ~mask
    return {"accuracy": hits.all(dim=1).float().mean().item()}


class StepTimer(TrainerCallback):
    """A Trainer callback that records each optimizer step's wall time (seconds), evals and saves excluded."""

    def __init__(self):
        self.seconds: list[float] = []  # one entry per step, in order
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None


def last_checkpoint(output_dir: str | Path) -> tuple[Path | None, int]:
    """The newest readable checkpoint-<step> folder under output_dir and its step, or (None, 0).

    A checkpoint with a damaged file (a truncated write, a full disk) is skipped with a one-line
    warning naming it, and the one before it is used.
    Example: last_checkpoint("runs/x") -> (Path("runs/x/checkpoint-80"), 80)
    """
    output_dir = Path(output_dir)
    found = sorted(((int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*")
                    if p.is_dir() and p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()), reverse=True)
    for step, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, step
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None, 0


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with a Trainer checkpoint folder (a file that does not parse), or None when it reads.

    Example: checkpoint_problem("runs/x/checkpoint-40") -> "adapter_model.safetensors is damaged (...)"
    """
    path = Path(path)
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"trainer_state.json does not parse ({err})"
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (path / name).exists():
            try:
                with safe_open(str(path / name), framework="pt") as tensors:
                    for key in tensors.keys():  # reading every tensor finds a truncated file
                        tensors.get_tensor(key)
            except Exception as err:  # safetensors raises its own error types
                return f"{name} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:100]})"
    for name in ("optimizer.pt", "scheduler.pt"):  # torch.save writes zip archives: check every member's CRC
        if (path / name).exists():
            try:
                with zipfile.ZipFile(path / name) as archive:
                    bad = archive.testzip()
            except (OSError, zipfile.BadZipFile) as err:
                return f"{name} is damaged ({err})"
            if bad:
                return f"{name} is damaged (member {bad} fails its checksum)"
    return None


def make_trainer(model, tokenizer, train_rows, eval_rows, config: TrainConfig, output_dir: str | Path,
                 callbacks: list | None = None, progress: bool = True):
    """A transformers Trainer for the lab's task with the lab's settings.

    train_rows/eval_rows are rows with system/prompt/answer (a datasets split or a list);
    they are encoded with the prompt masked. Gradient checkpointing is the model's own
    setting (lora.add_lora turns it on); Trainer does not change it.
    Example: make_trainer(model, tok, task["train"], task["eval"].select(range(100)), TrainConfig(), "runs/x").train()
    """
    def encoded(rows):
        return Dataset.from_list([data.encode(row, tokenizer) for row in rows]) if rows is not None else None

    device = next(model.parameters()).device
    optim, optim_args = recipe.trainer_optim(resolve_optimizer(config.optim, device))
    evaluate_too = bool(config.eval_every) and eval_rows is not None
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        learning_rate=config.lr,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        optim=optim,
        optim_args=optim_args or None,
        logging_steps=config.log_every,
        eval_strategy="steps" if evaluate_too else "no",
        eval_steps=config.eval_every or None,
        save_strategy="steps" if config.save_every else "no",
        save_steps=config.save_every or 500,
        save_total_limit=config.keep_checkpoints,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,  # our columns are exactly the model's inputs
        label_names=["labels"],
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=not progress,
    )
    trainer = Trainer(
        model=model, args=args, data_collator=data.Collator(tokenizer.pad_token_id),
        train_dataset=encoded(train_rows), eval_dataset=encoded(eval_rows) if evaluate_too else None,
        processing_class=tokenizer, compute_metrics=exact_match_metrics,
        preprocess_logits_for_metrics=answer_argmax,
        callbacks=callbacks)
    if not progress:
        trainer.remove_callback(PrinterCallback)  # without a progress bar, Trainer would print every log line
    return trainer


@dataclass
class FinetuneResult:
    """What one `finetune` call did and measured."""

    steps: int  # the global step training ended at
    resumed_from: int  # the checkpoint step it resumed from (0: started fresh)
    train_seconds: float  # wall time of trainer.train() in this call (evals and checkpoints included)
    step_seconds: float  # median wall time of one optimizer step in this call (evals excluded)
    peak_bytes: int | None  # MemoryMeter's peak during training (see memory_kind)
    memory_kind: str  # what peak_bytes measures
    log_history: list = field(default_factory=list)  # Trainer's logs: {"step", "loss"} and {"step", "eval_loss", ...}
    output_dir: str = ""  # where the checkpoints are

    def losses(self) -> tuple[list[int], list[float]]:
        """(steps, training losses). Example: result.losses() -> ([1, 2, ...], [1.71, 1.64, ...])"""
        rows = [h for h in self.log_history if "loss" in h and "eval_loss" not in h]
        return [h["step"] for h in rows], [h["loss"] for h in rows]

    def evals(self) -> list[dict]:
        """The periodic evals: [{"step": 40, "eval_loss": 0.2, "eval_accuracy": 0.6, ...}, ...]"""
        return [h for h in self.log_history if "eval_loss" in h]


def finetune(model, tokenizer, train_rows, eval_rows, config: TrainConfig, output_dir: str | Path,
             resume: bool = True, callbacks: list | None = None, progress: bool = True) -> FinetuneResult:
    """Train `model` (a peft model) with Trainer; resume an interrupted run; measure time and memory.

    With resume=True and an unfinished run's checkpoint in output_dir, training continues
    from it: adapter weights, optimizer and scheduler state, RNG states and the position in
    the data order all come back, so the result equals an uninterrupted run. A finished
    run's folder is cleared and trained again (this is a measurement, not a cache); so is
    any folder when resume=False. Use one output_dir per configuration (see TrainConfig.key).
    Example: finetune(model, tok, task["train"], task["eval"].select(range(100)), TrainConfig(steps=60), "runs/x")
             .evals()[-1] -> {"step": 60, "eval_loss": 0.05, "eval_accuracy": 0.78, ...}
    """
    output_dir = Path(output_dir)
    checkpoint, step = last_checkpoint(output_dir)
    if output_dir.exists() and (not resume or checkpoint is None or step >= config.steps):
        shutil.rmtree(output_dir)
        checkpoint, step = None, 0
    run = run_config(model, config)
    if checkpoint is not None:  # resuming: the stored configuration must be this one
        stored = json.loads((output_dir / RUN_CONFIG).read_text()) if (output_dir / RUN_CONFIG).exists() else {}
        differ = sorted(k for k in set(stored) | set(run) if stored.get(k) != run.get(k))
        if differ:
            raise ValueError(f"{output_dir} holds a checkpoint of another configuration (it differs in "
                             f"{', '.join(differ)}): use another output_dir, or finetune(..., resume=False) to start over")
    else:
        paths.atomic_write_text(output_dir / RUN_CONFIG, json.dumps(run, indent=1, sort_keys=True))
    timer = StepTimer()
    trainer = make_trainer(model, tokenizer, train_rows, eval_rows, config, output_dir,
                           callbacks=[timer, *(callbacks or [])], progress=progress)
    device = next(model.parameters()).device
    start = time.perf_counter()
    with measure.MemoryMeter(device) as meter:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - start
    result = FinetuneResult(
        steps=trainer.state.global_step, resumed_from=step, train_seconds=seconds,
        step_seconds=statistics.median(timer.seconds) if timer.seconds else float("nan"),
        peak_bytes=meter.peak_bytes, memory_kind=meter.kind, log_history=list(trainer.state.log_history),
        output_dir=str(output_dir))
    leftovers.release_trainer(trainer)  # afterwards only the caller's `model` keeps the model alive
    return result


def run_dir(kind: str, spec: str, r: int, alpha: float, config: TrainConfig) -> Path:
    """Where lab 05 keeps a configuration's files: kind "qlora" / "lora" (checkpoints) or "adapter" (the saved adapter).

    Labs 05 and 07 both call it, so lab 07 finds the adapter lab 05 trained with the same settings.
    Example: run_dir("adapter", "smollm2-135m", 16, 32, TrainConfig()).name -> "adapter-3f2a9c0d1e4b"
    """
    key = config_key({"spec": spec, "r": r, "alpha": alpha, "train": asdict(config)})
    return paths.cache_dir() / "lab05" / f"{kind}-{key}"


RUN_CONFIG = "qlora_lab_run.json"  # the configuration a run's checkpoints belong to, beside them


def run_config(model, config: TrainConfig) -> dict:
    """What a checkpoint must match to be resumed: the training settings and the adapter's, flattened.

    Example: run_config(model, TrainConfig())["r"] -> 16
    """
    adapter = next(iter(getattr(model, "peft_config", {"": None}).values()))
    flat = {k: v for k, v in asdict(config).items() if k not in ("eval_every", "eval_batch_size", "save_every",
                                                                  "keep_checkpoints", "log_every")}
    if adapter is not None:
        targets = adapter.target_modules
        flat.update(r=adapter.r, lora_alpha=adapter.lora_alpha, lora_dropout=adapter.lora_dropout,
                    target_modules=sorted(targets) if isinstance(targets, (set, list, tuple)) else targets)
    return json.loads(json.dumps(flat, default=str))


def step_times(setup, steps: int = 9, warmup: int = 3, device: str | None = None) -> dict:
    """Trainer step times of a vram.Setup on a random-weight model of its shape: the speed half of QLoRA vs LoRA.

    The model is built by measure.build (the calculator's setup: 4-bit or 16-bit base, LoRA, checkpointing), trained
    `steps` steps on random tokens with TrainingArguments(bf16/fp16 as the setup says, its optimizer); the first
    `warmup` steps are dropped. Returns median, min and max seconds, tokens/s at the median, and every step.
    Example: step_times(vram.Setup("llama-2-7b", method="qlora", batch=4, seq=512))["median_s"] -> 0.52 (H200)
    """
    device = device or recipe.default_device()
    model, _ = measure.build(setup, device, wrap_mixed_precision=False)
    ids = torch.randint(0, model.config.vocab_size, (setup.batch * steps, setup.seq),
                        generator=torch.Generator().manual_seed(0))  # (steps x batch, seq) random tokens
    args = TrainingArguments(output_dir=str(paths.cache_dir() / "step-times"), max_steps=steps, report_to="none",
                             per_device_train_batch_size=setup.batch, optim=setup.optimizer, learning_rate=1e-4,
                             bf16=setup.precision() == "bf16", fp16=setup.precision() == "fp16", save_strategy="no",
                             logging_steps=10**6, remove_unused_columns=False, disable_tqdm=True, use_cpu=device == "cpu")
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, callbacks=[timer],
                      train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    steady = timer.seconds[warmup:]
    median = statistics.median(steady)
    leftovers.release_trainer(trainer)
    return {"median_s": median, "min_s": min(steady), "max_s": max(steady), "steps": steady,
            "tokens_per_s": setup.batch * setup.seq / median}
