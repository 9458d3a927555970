"""Measure the memory of real training steps: the ground truth for the VRAM calculator.

`measure(setup)` builds the model a `vram.Setup` describes (a `random:` shape, so any size
can be measured with no download), trains it for a few real steps in train mode, and reports
the peak of the last step, when the optimizer state already exists:

- on CUDA: `torch.cuda.max_memory_allocated` (what the calculator predicts), the peak of each
  phase (forward, backward, optimizer step), `max_memory_reserved` (what the caching
  allocator holds) and the device-level use from `torch.cuda.mem_get_info`, which also sees
  the CUDA context and paged optimizer state living in unified memory;
- on CPU: the peak of live tensor bytes, counted by a TorchDispatchMode that sees every
  tensor an op creates and when its storage is freed, plus the bytes that were alive before
  the step. This is the CPU analogue of max_memory_allocated (no allocator rounding, no
  CUDA kernels' workspaces); process RSS is reported beside it.

The training recipe is the lab's: `models.load_model` -> `lora.add_lora` (peft's
prepare_model_for_kbit_training for k-bit bases) -> optimizer -> `loss = model(input_ids,
labels=input_ids).loss; loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)`,
on random token ids of full length (no padding, no attention mask). Pitfall worth knowing:
transformers turns gradient checkpointing off in eval mode, so measuring a "training" step
after model.eval() silently measures the no-checkpointing memory; `measure` asserts train mode.
"""

import gc
import resource
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from qlora_lab import lora, models


@dataclass
class Measurement:
    """One measured training step (the last of `steps`)."""

    device: str  # "cuda" or "cpu"
    peak_allocated_bytes: int  # CUDA: max_memory_allocated over the step; CPU: peak live tensor bytes
    after: dict = field(default_factory=dict)  # allocated/live bytes after "load", "forward", "backward", "step"
    phase_peaks: dict = field(default_factory=dict)  # peak allocated/live bytes within "forward", "backward", "optimizer"
    peak_reserved_bytes: int | None = None  # CUDA: max_memory_reserved (what the caching allocator held)
    device_used_bytes: int | None = None  # CUDA: total - free from mem_get_info after the step (context, paged state too)
    paged_bytes: int = 0  # optimizer state in CUDA unified memory (outside PyTorch's allocator)
    rss_bytes: int | None = None  # CPU: peak resident set size of this process (includes everything)
    timeline: list = field(default_factory=list)  # (event, phase, allocated bytes) at each decoder layer's start/end
    step_seconds: float = 0.0  # wall time of the measured step
    loss: float = 0.0  # loss of the measured step (a sanity check that it trained)
    setup: dict = field(default_factory=dict)  # the vram.Setup measured, as a dict

    def to_dict(self) -> dict:
        return asdict(self)


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created inside the mode that are still alive, and their peak.

    Storages that existed before entering (weights, optimizer state) are not counted, so
    `peak` is the high-water mark of memory the step itself allocated.
    Example: with LiveTensorBytes() as live: loss.backward()  # live.peak -> bytes
    """

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
    """Every real tensor the garbage collector knows (skips weak proxies, meta tensors and tensor
    subclasses without storage, e.g. FakeTensors another library left alive)."""
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
    """Bytes of the distinct storages a training run owns: parameters (with 4-bit quant states),
    buffers, optimizer state and any extra tensors (the batch). Other tensors in the process
    (an earlier model a notebook still holds, say) are not counted."""
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
    """Bytes of distinct tensors autograd saves for backward in one forward (parameters excluded).

    Counted with torch.autograd.graph.saved_tensors_hooks, deduplicated by storage. This is
    the `activations` (+ saved loss) term of the calculator, measured.
    """
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


def make_optimizer(name: str, params, lr: float = 1e-4):
    """The optimizer a Setup names. Example: make_optimizer("paged_adamw_8bit", params)"""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    import bitsandbytes as bnb

    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return classes[name](params, lr=lr, weight_decay=0.0)


def build(setup, device: str | None = None, seed: int = 0):
    """The model (in train mode) and optimizer a vram.Setup describes, on `device`."""
    from qlora_lab import vram

    device = device or models.default_device()
    dtype = vram.DTYPES[setup.compute_dtype]
    if setup.method == "qlora":
        model, _ = models.load_model(f"random:{setup.model}", quant=setup.quant, double_quant=setup.double_quant,
                                     device=device, compute_dtype=dtype, seed=seed, attn=setup.attn)
    else:
        model, _ = models.load_model(f"random:{setup.model}", quant=None, device=device,
                                     compute_dtype=vram.DTYPES[setup.resolved_base_dtype()], seed=seed, attn=setup.attn)
    if setup.method == "full":
        model.requires_grad_(True)
        if setup.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
    else:
        config = lora.lora_config(r=setup.r, alpha=2 * setup.r, targets=setup.target_list(), dropout=setup.lora_dropout)
        model = lora.add_lora(model, config, gradient_checkpointing=setup.checkpointing, prepare=setup.prepare)
        if setup.adapter_dtype != "fp32":  # the QLoRA paper's script keeps adapters in bf16; peft upcasts to fp32
            for p in lora.trainable_parameters(model):
                p.data = p.data.to(vram.DTYPES[setup.adapter_dtype])
    model.train()
    optimizer = make_optimizer(setup.optimizer, lora.trainable_parameters(model))
    return model, optimizer


def _decoder_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def _timeline_hooks(model, events: list, phase: list, allocated) -> list:
    """Hooks recording (event, phase, allocated bytes) as each decoder layer starts and ends,
    forward and backward (with checkpointing, the recomputation shows up as forward events
    during the backward phase)."""
    handles = []
    for i, layer in enumerate(_decoder_layers(model)):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: events.append((f"L{i} in", phase[0], allocated()))))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: events.append((f"L{i} out", phase[0], allocated()))))
        handles.append(layer.register_full_backward_hook(
            lambda m, gi, go, i=i: events.append((f"L{i} grad", phase[0], allocated()))))
    return handles


def measure(setup, steps: int = 2, device: str | None = None, seed: int = 0, timeline: bool = False) -> Measurement:
    """Train `steps` real steps of a vram.Setup and measure the last one (see module docstring).

    timeline=True also records allocated memory at every decoder layer's start and end in
    forward and backward (CUDA only; a few hooks, negligible cost).

    Example: measure(vram.Setup(model="smollm2-135m", batch=2, seq=128)).peak_allocated_bytes -> 312345678
    """
    if steps < 2:
        raise ValueError("measure needs at least 2 steps: the first creates the optimizer state")
    device = torch.device(device or models.default_device())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()  # tensors of earlier runs held only by reference cycles must not count as this one's
    model, optimizer = build(setup, str(device), seed)
    result = measure_steps(model, optimizer, setup, steps, seed, timeline)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def measure_steps(model, optimizer, setup, steps: int = 2, seed: int = 0, timeline: bool = False) -> Measurement:
    """Like `measure`, on a model and optimizer from `build` (kept alive, e.g. to inspect them after)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    after_load = torch.cuda.memory_allocated() if cuda else owned_tensor_bytes(model)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.base_model.config.vocab_size
    input_ids = torch.randint(0, vocab, (setup.batch, setup.seq), generator=gen).to(device)

    def train_step():
        assert model.training, "measure a training step in train mode (eval mode disables checkpointing)"
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(steps - 1):
        train_step()
    paged = paged_state_bytes(optimizer)
    result = Measurement(device=device.type, peak_allocated_bytes=0, paged_bytes=paged, setup=asdict(setup))
    start = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
        result.after["load"] = after_load
        result.after["start"] = torch.cuda.memory_allocated()
        phase = ["forward"]
        handles = _timeline_hooks(model, result.timeline, phase, torch.cuda.memory_allocated) if timeline else []
        torch.cuda.reset_peak_memory_stats()
        phases = {}
        loss = model(input_ids=input_ids, labels=input_ids).loss
        phase[0] = "backward"
        torch.cuda.synchronize()
        phases["forward"], result.after["forward"] = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        phases["backward"], result.after["backward"] = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        phases["optimizer"], result.after["step"] = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        result.step_seconds = time.perf_counter() - start
        for handle in handles:
            handle.remove()
        result.phase_peaks = phases
        result.peak_allocated_bytes = max(phases.values())
        result.peak_reserved_bytes = torch.cuda.max_memory_reserved()
        free, total = torch.cuda.mem_get_info()
        result.device_used_bytes = total - free
    else:
        base = owned_tensor_bytes(model, optimizer, input_ids)
        result.after["load"], result.after["start"] = after_load, base
        live = LiveTensorBytes()
        with live:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            result.phase_peaks["forward"], result.after["forward"] = base + live.peak, base + live.current
            live.reset_peak()
            loss.backward()
            result.phase_peaks["backward"], result.after["backward"] = base + live.peak, base + live.current
            live.reset_peak()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.phase_peaks["optimizer"], result.after["step"] = base + live.peak, base + live.current
        result.step_seconds = time.perf_counter() - start
        result.peak_allocated_bytes = max(result.phase_peaks.values())
        result.rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.loss = float(loss.item())
    return result


def paged_state_bytes(optimizer) -> int:
    """Bytes of optimizer state that bitsandbytes placed in CUDA unified (paged) memory."""
    total = 0
    for state in getattr(optimizer, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and getattr(value, "is_paged", False):
                total += value.numel() * value.element_size()
    return total
