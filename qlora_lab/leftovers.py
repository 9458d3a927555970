"""What libraries keep after their objects are gone, and how to let it go: the second model of a notebook kernel
should start from the memory a fresh process has.

Three holders outlive a training run:
- bitsandbytes' GlobalPageManager keeps every paged optimizer buffer (CUDA unified memory) and never frees it
  (`free_optimizer` takes it out and frees it);
- bitsandbytes' GlobalOptimManager keeps every nn.Embedding that Trainer registers when the optimizer is an 8-bit
  one, and with it the embedding's weight (`release_trainer`);
- accelerate's Accelerator keeps the model, optimizer and data loaders it prepared (`release_trainer`).
Both bitsandbytes managers are process-wide singletons; `measure.release` then empties the allocator's cache.

Shortcut: `_free_managed` calls the CUDA driver (libcuda) directly through ctypes; without it the bytes stay.
"""

import ctypes

import torch
from bitsandbytes.functional import GlobalPageManager
from bitsandbytes.optim import GlobalOptimManager


def free_optimizer(optimizer) -> int:
    """Drop an optimizer's state, paged state included (bitsandbytes allocates each paged buffer in CUDA unified memory,
    keeps it in its page manager and never frees it: here it leaves the manager and is freed with cuMemFree). Returns
    the paged bytes that could not be freed (they stay on the device). Example: free_optimizer(optimizer) -> 0"""
    paged = _paged_tensors(optimizer)
    optimizer.state.clear()
    if paged:  # out of bitsandbytes' page manager, and no kernel may still use them
        manager, ids = GlobalPageManager.get_instance(), {id(t) for t in paged}
        manager.paged_tensors = [t for t in manager.paged_tensors if id(t) not in ids]
        torch.cuda.synchronize()
    pointers = [(t.data_ptr(), t.numel() * t.element_size()) for t in paged]
    del paged
    return sum(nbytes for pointer, nbytes in pointers if not _free_managed(pointer))


def _free_managed(pointer: int) -> bool:
    """cuMemFree a CUDA unified-memory pointer; False where the driver library is missing or refuses."""
    try:
        return ctypes.CDLL("libcuda.so.1").cuMemFree_v2(ctypes.c_void_p(pointer)) == 0
    except (OSError, AttributeError):
        return False


def paged_state_bytes(optimizer) -> int:
    """Bytes of optimizer state that bitsandbytes placed in CUDA unified (paged) memory."""
    return sum(t.numel() * t.element_size() for t in _paged_tensors(optimizer))


def _paged_tensors(optimizer) -> list[torch.Tensor]:
    return [v for state in getattr(optimizer, "state", {}).values() for v in state.values()
            if isinstance(v, torch.Tensor) and getattr(v, "is_paged", False)]


def release_trainer(trainer) -> int:
    """Drop what a finished Trainer leaves holding its model, so that `del model; gc.collect()` frees the model.

    accelerate's Accelerator keeps the model, optimizer and data loaders it prepared (free_memory() drops them);
    bitsandbytes' GlobalOptimManager keeps for good every nn.Embedding module that Trainer registers when the
    optimizer is an 8-bit one (paged_adamw_8bit, adamw_bnb_8bit: it asks for 32-bit state for embeddings). The module
    holds its weight: after prepare's fp32 upcast a vocab x hidden x 4 byte tensor, 0.49 GiB for llama-2-7b
    (measured on an H200), still allocated when the next model is measured.
    The model itself stays usable. Returns how many of bitsandbytes' registrations were dropped.
    Example: release_trainer(trainer) -> 1 (the input embedding, after training with paged_adamw_8bit)
    """
    dropped = 0
    if trainer.model is not None:
        manager = GlobalOptimManager.get_instance()
        mine = {id(module) for module in trainer.model.modules()}
        kept = [entry for entry in manager.module_weight_config_triple if id(entry[0]) not in mine]
        dropped = len(manager.module_weight_config_triple) - len(kept)
        manager.module_weight_config_triple = kept
        for p in trainer.model.parameters():  # keyed by id(): a later tensor at the same address must not inherit it
            manager.pid2config.pop(id(p), None)
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    return dropped
