"""QLoRA Lab: learn QLoRA (a frozen 4-bit NF4 base model plus trainable LoRA adapters) by measuring it.

One module per concern; import the one you need (`from qlora_lab import models`).
Importing the package itself is cheap and has no side effects: torch and friends load
only when a module that needs them is imported.

    models   load a model: the offline default, a local checkpoint, a hub id, or a random shape
    data     the task data set, chat formatting, prompt masking, batching
    runner   run the lab notebooks with papermill under a profile; summaries
    results  record(name, value): a notebook's key results, read back by the runner
    env      versions and device report
"""

from qlora_lab.results import record

__all__ = ["record"]
__version__ = "0.1.0"
