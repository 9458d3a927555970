"""Measure the memory of real training steps: the ground truth for the VRAM calculator.

`measure(setup)` builds the model a `vram.Setup` describes (a `random:` shape, so any size can be measured with no
download), trains it for a few real steps in train mode, and reports the peak of the last step, when the optimizer
state already exists:

- on CUDA: `torch.cuda.max_memory_allocated` (what the calculator predicts), each phase's peak,
  `max_memory_reserved`, and the device-level use (`mem_get_info`: context, paged state too);
- on CPU: the peak of live tensor bytes (a TorchDispatchMode sees every tensor an op creates and when its storage is
  freed) plus the bytes alive before the step: max_memory_allocated's CPU analogue (no allocator rounding, no CUDA
  workspaces); process RSS is reported beside it.

The recipe: `models.load_model` -> `lora.add_lora` (peft's prepare for k-bit bases) -> optimizer -> loss, backward,
step, zero_grad(set_to_none=True), on random token ids of full length (no padding). Pitfall: transformers turns
gradient checkpointing off in eval mode, so a "training" step measured after model.eval() is the no-checkpointing
memory; `measure` asserts train mode.
"""

import ctypes
import gc
import re
import resource
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate.utils import convert_outputs_to_fp32
from datasets import Dataset
from peft import prepare_model_for_kbit_training
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from qlora_lab import env, leftovers, lora, models, quant, recipe, vram

# What a peak-memory number measures, in words: every figure and table that shows one says which.
CUDA_ALLOCATED = "torch.cuda.max_memory_allocated"  # the most bytes live tensors held (the calculator's quantity)
CPU_LIVE_TENSORS = "peak live tensor bytes (TorchDispatchMode)"  # the CPU analogue, counted op by op
CPU_PEAK_RSS = "peak RSS of this process (VmHWM)"  # everything the process holds: Python, libraries, data


@dataclass
class Measurement:
    """One measured training step (the last of `steps`)."""

    device: str  # "cuda" or "cpu"
    peak_allocated_bytes: int  # CUDA: max_memory_allocated over the step; CPU: peak live tensor bytes
    memory_kind: str = ""  # what peak_allocated_bytes measures: CUDA_ALLOCATED or CPU_LIVE_TENSORS
    after: dict = field(default_factory=dict)  # allocated/live bytes after "load", "forward", "backward", "step"
    phase_peaks: dict = field(default_factory=dict)  # peak allocated/live bytes within "forward", "backward", "optimizer"
    peak_reserved_bytes: int | None = None  # CUDA: max_memory_reserved (what the caching allocator held)
    device_used_bytes: int | None = None  # CUDA: total - free from mem_get_info after the step (context, paged state too)
    paged_bytes: int = 0  # optimizer state in CUDA unified memory (outside PyTorch's allocator)
    rss_bytes: int | None = None  # CPU: peak resident set size of this process (includes everything)
    step_peaks: list = field(default_factory=list)  # Trainer: the peak of every optimizer step, in order
    timeline: list = field(default_factory=list)  # (event, phase, allocated bytes) at each decoder layer's start/end
    step_seconds: float = 0.0  # wall time of the measured step
    loss: float = 0.0  # loss of the measured step (a sanity check that it trained)
    setup: dict = field(default_factory=dict)  # the vram.Setup measured, as a dict


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created inside the mode that are still alive, and their peak (storages that
    existed before, weights and optimizer state, are not counted). Example: with LiveTensorBytes() as live: ..."""

    def __init__(self):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in _live_tensors()}
        self.live: dict[int, int] = {}  # storage pointer -> bytes
        self.current = 0  # bytes alive now
        self.peak = 0  # highest `current` seen

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self.live or key in self.known:
            return
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def reset_peak(self):
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map(self._track, out)
        return out


def _live_tensors():
    """Every real tensor the garbage collector knows (not weak proxies, meta tensors, storage-less FakeTensors)."""
    tensors = []
    for o in gc.get_objects():
        if type(o) in weakref.ProxyTypes:  # isinstance() on a dead proxy raises ReferenceError
            continue
        if isinstance(o, torch.Tensor) and o.device.type != "meta":
            try:
                o.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                continue
            tensors.append(o)
    return tensors


def owned_tensor_bytes(model, optimizer=None, *extra: torch.Tensor) -> int:
    """Bytes of the distinct storages a training run owns: parameters (with 4-bit quant states), buffers, optimizer
    state and any extra tensors (the batch); not other tensors in the process (an earlier model a notebook holds)."""
    tensors = list(model.parameters()) + list(model.buffers()) + list(extra)
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    for per_param in getattr(optimizer, "state", {}).values():
        tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    seen = {}
    for t in tensors:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def saved_activation_bytes(model, input_ids: torch.Tensor) -> int:
    """Bytes of distinct tensors autograd saves for backward in one forward (parameters excluded), counted with
    torch.autograd.graph.saved_tensors_hooks, deduplicated by storage: the calculator's `activations` (+ saved loss)
    term, measured."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    del loss
    return sum(seen.values())


def build(setup, device: str | None = None, seed: int = 0, wrap_mixed_precision: bool = True):
    """The model (in train mode) and optimizer a vram.Setup describes, on `device`. With mixed precision the model's
    forward is wrapped the way accelerate wraps it for Trainer (autocast around forward and loss, outputs converted to
    fp32), unless wrap_mixed_precision is False (Trainer wraps it itself)."""
    device = device or recipe.default_device()
    if setup.method == "qlora":
        model, _ = models.load_model(f"random:{setup.model}", quant=setup.quant, double_quant=setup.double_quant,
                                     device=device, compute_dtype=recipe.DTYPES[setup.compute_dtype], seed=seed,
                                     attn=setup.attn)
    else:
        model, _ = models.load_model(f"random:{setup.model}", quant=None, device=device,
                                     compute_dtype=recipe.DTYPES[setup.resolved_base_dtype()], seed=seed, attn=setup.attn)
    if setup.method == "full":
        model.requires_grad_(True)
        if setup.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
    else:
        config = lora.lora_config(r=setup.r, alpha=2 * setup.r, targets=setup.target_list(), dropout=setup.lora_dropout)
        model = lora.add_lora(model, config, gradient_checkpointing=setup.checkpointing, prepare=setup.prepare)
        cast_adapters(model, setup.adapter_dtype)
    if setup.autocast() and wrap_mixed_precision:
        autocast = torch.autocast(torch.device(device).type, dtype=recipe.DTYPES[setup.precision()])
        model.forward = convert_outputs_to_fp32(autocast(model.forward))  # accelerate.prepare_model's wrapping
    model.train()
    return model, recipe.make_optimizer(setup.optimizer, lora.trainable_parameters(model))


def cast_adapters(model, adapter_dtype: str) -> None:
    """Store the adapters in adapter_dtype (no-op if they are). peft upcasts them to fp32; the paper's script: bf16."""
    for p in lora.trainable_parameters(model):
        p.data = p.data.to(recipe.DTYPES[adapter_dtype])


def _timeline_hooks(model, events: list, phase: list, allocated) -> list:
    """Hooks recording (event, phase, allocated bytes) as each decoder layer starts and ends, forward and backward
    (with checkpointing, the recomputation shows up as forward events during the backward phase)."""
    handles = []
    for i, layer in enumerate(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: events.append((f"L{i} in", phase[0], allocated()))))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: events.append((f"L{i} out", phase[0], allocated()))))
        handles.append(layer.register_full_backward_hook(
            lambda m, gi, go, i=i: events.append((f"L{i} grad", phase[0], allocated()))))
    return handles


def measure(setup, steps: int = 2, device: str | None = None, seed: int = 0, timeline: bool = False) -> Measurement:
    """Train `steps` real steps of a vram.Setup and measure the last one (see module docstring). timeline=True also
    records allocated memory at every decoder layer's start and end in forward and backward (CUDA only; a few hooks).
    Example: measure(vram.Setup(model="smollm2-135m", batch=2, seq=128)).peak_allocated_bytes -> 312345678
    """
    if steps < 2:
        raise ValueError("measure needs at least 2 steps: the first creates the optimizer state")
    device = torch.device(device or recipe.default_device())
    baseline = release(device)  # tensors of earlier runs must not count as this one's
    model, optimizer = build(setup, str(device), seed)
    result = measure_steps(model, optimizer, setup, steps, seed, timeline, baseline)
    del model, optimizer
    release(device)
    return result


_DEVICE = {"floor": None, "leftover": 0}  # device-level use at the first release (the context), and earlier runs' now


def release(device: str | torch.device = "cuda") -> int:
    """Free what earlier runs of this process left (cycles, cached blocks, cuBLAS's workspace); return the bytes still
    allocated (0 on a CPU; a plan subtracts them) and note in _DEVICE the device-level bytes still held (paged state,
    say): readings subtract both. Example: release("cuda") -> 0 (nothing left from earlier runs)"""
    gc.collect()
    if torch.device(device).type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    free, total = torch.cuda.mem_get_info()
    _DEVICE["floor"] = min(_DEVICE["floor"] or total - free, total - free)
    _DEVICE["leftover"] = total - free - _DEVICE["floor"]
    return torch.cuda.memory_allocated()


def _device_readings() -> tuple[int, int]:
    """(max_memory_reserved, device-level use from mem_get_info less what earlier runs left: not this run's)."""
    reserved, (free, total) = torch.cuda.max_memory_reserved(), torch.cuda.mem_get_info()
    return reserved, total - free - _DEVICE["leftover"]


def train_step(model, optimizer, input_ids: torch.Tensor, mark=lambda phase: None, keep_outputs: bool = False,
               grad_accum: int = 1) -> float:
    """One optimizer step of the lab's recipe over grad_accum micro-batches; mark(phase) is called as each forward, each
    backward and the optimizer step end. keep_outputs=True is the hand-written loop that keeps `out = model(...)` alive
    through `out.loss.backward()`: its logits stay allocated during backward.
    Example: train_step(model, optimizer, input_ids) -> 10.83
    """
    assert model.training, "measure a training step in train mode (eval mode disables checkpointing)"
    for _ in range(grad_accum):
        out = model(input_ids=input_ids, labels=input_ids)
        loss = out.loss / grad_accum
        if not keep_outputs:
            del out
        mark("forward")
        loss.backward()
        mark("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("optimizer")
    return loss.item() * grad_accum


class CudaMemory:
    """Reads PyTorch's CUDA allocator phase by phase: the peak within each phase and what is left after it,
    less `baseline`, the bytes other runs' tensors held before this one started."""

    kind = CUDA_ALLOCATED

    def __init__(self, baseline: int = 0):
        self.baseline = baseline

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return self

    def current(self) -> int:
        return torch.cuda.memory_allocated() - self.baseline

    def read(self) -> tuple[int, int]:
        """(peak since the last read, allocated now)"""
        torch.cuda.synchronize()
        peak, now = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return peak - self.baseline, now - self.baseline

    def __exit__(self, *exc):
        return False


class CpuLiveTensors:
    """The same readings on a CPU: bytes that existed before (`base`) plus the tensors created since."""

    kind = CPU_LIVE_TENSORS

    def __init__(self, base: int):
        self.base = base  # bytes of the run's own tensors before the step (weights, optimizer state, batch)
        self.live = LiveTensorBytes()

    def __enter__(self):
        self.live.__enter__()
        return self

    def current(self) -> int:
        return self.base + self.live.current

    def read(self) -> tuple[int, int]:
        peak, now = self.base + self.live.peak, self.current()
        self.live.reset_peak()
        return peak, now

    def __exit__(self, *exc):
        return self.live.__exit__(*exc)


def measure_steps(model, optimizer, setup, steps: int = 2, seed: int = 0, timeline: bool = False,
                  baseline: int = 0) -> Measurement:
    """Like `measure`, on a model and optimizer from `build` (kept alive, e.g. to inspect them after);
    baseline: CUDA bytes that belong to other runs, subtracted from every reading."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    after_load = torch.cuda.memory_allocated() - baseline if cuda else owned_tensor_bytes(model)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.base_model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (setup.batch, setup.seq), generator=gen).to(device)  # (batch, seq)
    keep, accum = setup.keep_outputs, setup.grad_accum
    for _ in range(steps - 1):
        train_step(model, optimizer, input_ids, keep_outputs=keep, grad_accum=accum)
    result = Measurement(device=device.type, peak_allocated_bytes=0, paged_bytes=leftovers.paged_state_bytes(optimizer),
                         setup=asdict(setup), after={"load": after_load})
    reader = CudaMemory(baseline) if cuda else CpuLiveTensors(owned_tensor_bytes(model, optimizer, input_ids))
    result.memory_kind = reader.kind
    phase = ["forward"]  # the phase the timeline hooks are in

    def mark(name):
        peak, result.after["step" if name == "optimizer" else name] = reader.read()
        result.phase_peaks[name] = max(peak, result.phase_peaks.get(name, 0))  # over every micro-batch
        phase[0] = "backward" if name == "forward" else "forward"

    handles = _timeline_hooks(model, result.timeline, phase, reader.current) if timeline and cuda else []
    start = time.perf_counter()
    with reader:
        result.after["start"] = reader.current()
        result.loss = train_step(model, optimizer, input_ids, mark, keep_outputs=keep, grad_accum=accum)
    result.step_seconds = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    result.peak_allocated_bytes = max(result.phase_peaks.values())
    if cuda:
        result.peak_reserved_bytes, result.device_used_bytes = _device_readings()
    else:
        result.rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def try_measure_steps(model, optimizer, setup, steps: int = 3, cap_gib: float | None = None,
                      timeline: bool = False, baseline: int = 0) -> tuple[Measurement | None, str | None]:
    """measure_steps with an out-of-memory recorded, not raised: (measurement, None) or (None, first line of the error).
    cap_gib caps PyTorch's allocator at that many GiB for this run (a smaller card, as far as PyTorch's tensors are
    concerned: torch.cuda.set_per_process_memory_fraction).
    Example: try_measure_steps(model, opt, setup, cap_gib=48) -> (Measurement(...), None)"""
    torch.cuda.empty_cache()
    try:
        if cap_gib:
            torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        return measure_steps(model, optimizer, setup, steps=steps, timeline=timeline, baseline=baseline), None
    except torch.cuda.OutOfMemoryError as err:
        optimizer.zero_grad(set_to_none=True)
        return None, str(err).splitlines()[0]
    finally:
        if cap_gib:  # back to $QLORA_LAB_GPU_MEMORY's hold where one is set, else none
            torch.cuda.set_per_process_memory_fraction(env.gpu_memory_bytes() / torch.cuda.mem_get_info()[1])


class _StepPeaks(TrainerCallback):
    """Records the peak memory of every optimizer step Trainer takes (CUDA allocator, or live tensors on a CPU)."""

    def __init__(self, cuda: bool, baseline: int = 0):
        self.cuda = cuda
        self.baseline = baseline  # CUDA bytes other runs' tensors hold
        self.peaks: list[int] = []  # one per step, in order
        self.live = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            gc.collect()
            self.base, self.live = owned_tensor_bytes(model, optimizer), LiveTensorBytes()
            self.live.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            self.peaks.append(torch.cuda.max_memory_allocated() - self.baseline)
        else:
            self.live.__exit__(None, None, None)
            self.peaks.append(self.base + self.live.peak)


def measure_trainer(setup, steps: int = 3, device: str | None = None, seed: int = 0, checkpoint: str | None = None,
                    prepare_defaults: bool = False) -> Measurement:
    """Train `steps` steps of a vram.Setup with transformers' Trainer and measure every step's peak.
    TrainingArguments carry what the setup says: bf16=/fp16= (mixed precision), gradient accumulation, the optimizer
    by its Trainer name, gradient_checkpointing=setup.checkpointing. The result's peak_allocated_bytes is the highest
    step peak (the first step included); step_peaks lists them all. checkpoint: load the base with from_pretrained
    from that directory (a 16-bit checkpoint quantized on the way in), and also measure the load and prepare peaks.
    prepare_defaults: call prepare_model_for_kbit_training(model) with its defaults, as most guides do, whatever
    setup.checkpointing says (the pitfall lab 01 measures).
    Example: measure_trainer(vram.Setup(model="smollm2-135m", batch=2, seq=128), device="cpu").step_peaks
    """
    device = torch.device(device or recipe.default_device())
    baseline = release(device)
    phases = {}
    if checkpoint or prepare_defaults:
        model, phases = _load_and_prepare(setup, str(device), checkpoint, prepare_defaults, seed)
        phases = {k: v - baseline for k, v in phases.items()}
    else:
        model, _ = build(setup, str(device), seed, wrap_mixed_precision=False)
    vocab = model.base_model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (setup.batch * setup.grad_accum * steps, setup.seq), generator=gen).tolist()
    optim, optim_args = recipe.trainer_optim(setup.optimizer)
    scratch = tempfile.TemporaryDirectory(prefix="qlora-lab-measure-")  # the Trainer's output_dir, removed on return
    args = TrainingArguments(
        output_dir=scratch.name, max_steps=steps, per_device_train_batch_size=setup.batch,
        gradient_accumulation_steps=setup.grad_accum, bf16=setup.precision() == "bf16",
        fp16=setup.precision() == "fp16", gradient_checkpointing=setup.checkpointing and not prepare_defaults,
        gradient_checkpointing_kwargs={"use_reentrant": False}, optim=optim, optim_args=optim_args or None,
        learning_rate=1e-4, weight_decay=0.0, logging_steps=10**6, save_strategy="no", report_to="none",
        use_cpu=device.type == "cpu", remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
    callback = _StepPeaks(device.type == "cuda", baseline)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                      callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # no log lines in the lab's output
    trainer.train()
    result = Measurement(device=device.type, peak_allocated_bytes=max(callback.peaks), step_peaks=callback.peaks,
                         phase_peaks={**phases, "step": max(callback.peaks)}, setup=asdict(setup),
                         memory_kind=CUDA_ALLOCATED if device.type == "cuda" else CPU_LIVE_TENSORS,
                         paged_bytes=leftovers.paged_state_bytes(trainer.optimizer),
                         loss=trainer.state.log_history[-1].get("train_loss", 0.0))
    if device.type == "cuda":
        result.peak_reserved_bytes, result.device_used_bytes = _device_readings()
    leftovers.release_trainer(trainer)
    del trainer, model
    release(device)
    return result


def _load_and_prepare(setup, device: str, checkpoint: str | None, prepare_defaults: bool, seed: int):
    """The base as users load it (from_pretrained with a checkpoint), prepared, with LoRA; on CUDA, load/prepare peaks."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    spec = checkpoint or f"random:{setup.model}"
    model, _ = models.load_model(spec, quant=setup.quant if setup.method == "qlora" else None, device=device,
                                 double_quant=setup.double_quant, compute_dtype=recipe.DTYPES[setup.compute_dtype],
                                 seed=seed)
    phases = {"load": torch.cuda.max_memory_allocated()} if cuda else {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if prepare_defaults:  # the guides' call: gradient checkpointing turned on, whatever comes later
        model = prepare_model_for_kbit_training(model)
    config = lora.lora_config(r=setup.r, alpha=2 * setup.r, targets=setup.target_list(), dropout=setup.lora_dropout)
    model = lora.add_lora(model, config, gradient_checkpointing=setup.checkpointing and not prepare_defaults,
                          prepare=setup.prepare and not prepare_defaults)
    if cuda:
        phases["prepare"] = torch.cuda.max_memory_allocated()
    return model, phases


def measure_variants(setup, variants: dict[str, dict], steps: int = 3, timeline: bool = True,
                     device: str = "cuda") -> dict[str, dict]:
    """Build the model of `setup` once, then measure each variant of it on that one model.

    variants: {label: Setup fields to change (seq, adapter_dtype, ...) plus an optional "cap_gib"}. Each variant starts
    clean: release() empties the caches, and its device reading subtracts only what earlier runs left (taken before the
    build), not this model. A new adapter_dtype or optimizer casts the adapters and makes a fresh optimizer, the old one
    freed first, paged state included (leftovers.free_optimizer). Returns {label: {"result", "error", "prediction", "setup",
    "cap_gib", "build_seconds", "storage"}}; an out-of-memory is a result (see try_measure_steps).
    Example: measure_variants(vram.Setup("llama-65b", r=64), {"paper": {}, "48 GiB": {"cap_gib": 48}})
    """
    plan = {label: (replace(setup, **{k: v for k, v in change.items() if k != "cap_gib"}), change.get("cap_gib"))
            for label, change in variants.items()}
    baseline = release(device)
    leftover, start = _DEVICE["leftover"], time.perf_counter()  # device bytes earlier runs left, before this build

    def run(variant, cap_gib, result=None, error=None, **common):
        return {"result": result, "error": error, "prediction": vram.estimate(**asdict(variant)), "setup": variant,
                "cap_gib": cap_gib, "build_seconds": 0.0, "storage": {}, **common}
    try:
        model, optimizer = build(setup, device)
    except torch.cuda.OutOfMemoryError as err:  # a result too: it did not even load
        release(device)
        error = "out of memory while building the model: " + str(err).splitlines()[0]
        return {label: run(variant, None, error=error) for label, (variant, _) in plan.items()}
    common = {"build_seconds": time.perf_counter() - start, "storage": quant.model_storage(model)}
    runs, current = {}, setup
    for label, (variant, cap_gib) in plan.items():
        if (variant.adapter_dtype, variant.optimizer) != (current.adapter_dtype, current.optimizer):
            leftover += leftovers.free_optimizer(optimizer)  # paged bytes it could not free stay: not this run's
            cast_adapters(model, variant.adapter_dtype)
            optimizer, current = recipe.make_optimizer(variant.optimizer, lora.trainable_parameters(model)), variant
        release(device)  # the last variant's cached blocks and cuBLAS workspace go; it re-reads the device ...
        _DEVICE["leftover"] = leftover  # ... but the live model is this variant's own, not an earlier run's
        result, error = try_measure_steps(model, optimizer, variant, steps, cap_gib, timeline, baseline)
        runs[label] = run(variant, cap_gib, result, error, **common)
    leftovers.free_optimizer(optimizer)
    del model, optimizer
    release(device)
    return runs


class MemoryMeter:
    """Peak memory while a block runs: CUDA's allocator peak (CUDA_ALLOCATED), or on Linux CPUs the process's peak
    resident set (CPU_PEAK_RSS: VmHWM, reset at the start), None elsewhere. RSS counts everything the process holds
    (Python, libraries, other objects), so compare two runs in the same process state, not as "the model's memory".
    Example: with MemoryMeter() as m: train(); m.peak_bytes -> 1_234_567_890"""

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device or recipe.default_device())
        self.kind = ""  # what was measured: CUDA_ALLOCATED, CPU_PEAK_RSS, or why nothing
        self.start_bytes: int | None = None  # at the start of the block
        self.peak_bytes: int | None = None  # the peak during the block

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = CUDA_ALLOCATED
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            try:
                _trim_malloc()
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.kind = CPU_PEAK_RSS
                self.start_bytes = _proc_status_bytes("VmRSS")
            except OSError:
                self.kind = "not measured (no /proc/self/clear_refs on this OS)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.start_bytes is not None:
            self.peak_bytes = _proc_status_bytes("VmHWM")
        return False


def _proc_status_bytes(field_name: str) -> int:
    match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024


def _trim_malloc() -> None:
    """Give freed heap memory back to the OS (glibc), so a new peak-RSS window starts low."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
