"""QLoRA Lab: learn QLoRA (a frozen 4-bit NF4 base model plus trainable LoRA adapters) by measuring it.

One module per concern; import the one you need (`from qlora_lab import models`).
Importing the package itself is cheap: torch and friends load only when a module that
needs them is imported. Its side effects: hub requests get a timeout and a stall breaker
(`hub`), and one bitsandbytes log line is quieted (below).

    hub      the Hugging Face hub with limits: timeouts, a stall breaker, a reachability probe
    models   load a model: the offline default, a local checkpoint, a hub id, or a random shape
    data     the task data set, chat formatting, prompt masking, batching
    runner   run the lab notebooks with papermill under a profile; summaries
    results  record(name, value): a notebook's key results, read back by the runner
    env      versions and device report
    vram     the VRAM calculator: where every byte of a training step goes, and solvers
    measure  measured memory of real training steps (CUDA allocator, or live tensors on a CPU)
    leftovers what libraries keep after a run (bitsandbytes' managers, accelerate), and how to free it
    quant    NF4/FP4/INT4 from scratch, bit-exact with bitsandbytes (CPU and CUDA)
    lora     LoRA through peft: configs, parameter counts, the cached r/alpha sweep
    checks   the only-LoRA-trains checker
    train    Trainer fine-tuning (resumable, measured), step times
    evals    generated and teacher-forced exact match, perplexity;  stats: intervals, paired tests
    ship     save, reload, merge five ways, generation speed
    fsdp     FSDP across GPUs: per-GPU estimate, failure-point checker, launch and collect
    findings each lab's conclusions, built from the run's numbers
    plots    one function per figure;  widgets: the interactive panels
"""

import logging

from qlora_lab import hub
from qlora_lab.results import record

hub.install()  # before anything (bitsandbytes' import, transformers) asks the hub: no request waits forever

# bitsandbytes looks for an optional faster CPU kernel (the `kernels` package) and logs a warning when it is
# absent; its built-in CPU kernel is used then, which is what the labs measure. One line of noise per lab: hidden.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["record"]
__version__ = "0.1.0"
