"""Interactive controls for the labs (ipywidgets), each with a non-interactive twin.

`vram_panel()` is lab 01's calculator panel: model, method, r, targets, optimizer, batch,
gradient accumulation, sequence length, checkpointing, mixed precision and GPU; any change
re-estimates (microseconds), prints the three-tier verdict and redraws
the breakdown. Where widgets cannot render (papermill, a static notebook viewer) the lab
calls `vram_report(...)`, which prints the same numbers as a table and draws the same chart.
The panel's peak label carries the CSS class `qlora-peak` so a browser test can read it.
"""

import ipywidgets as W
from IPython.display import clear_output, display

from qlora_lab import budget, env, plots, recipe, shapes, vram

TARGET_CHOICES = {"all-linear": "all-linear", "q,v": ("q_proj", "v_proj"),
                  "q,k,v,o": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp (gate,up,down)": ("gate_proj", "up_proj", "down_proj")}


def vram_report(gpu: str = "T4 16GB", show_chart: bool = True, **setup) -> vram.Estimate:
    """Print the breakdown table (and draw the chart) for one setup; returns the estimate.

    Example: vram_report(model="llama-2-7b", method="qlora", batch=4, seq=512)
    """
    est = vram.estimate(**setup)
    print(est.table())
    print(f"{gpu}: {budget.predicted_verdict(est, budget.gpu_bytes(gpu))}")
    if show_chart:
        fig = plots.plot_vram_breakdown({f"{est.setup.method} {est.setup.model}": est},
                                        gpu_gib={gpu: budget.gpu_bytes(gpu) / vram.GiB})
        display(fig)
    return est


def vram_panel(model: str = "llama-2-7b", method: str = "qlora", r: int = 16, targets: str = "all-linear",
               optimizer: str = "paged_adamw_8bit", batch: int = 4, seq: int = 512, checkpointing: bool = True,
               gpu: str = "T4 16GB", mixed_precision: str = "bf16", grad_accum: int = 1):
    """The interactive calculator: returns an ipywidgets box that redraws on every change."""
    style = {"description_width": "90px"}
    controls = {
        "model": W.Dropdown(options=list(shapes.ARCHITECTURES), value=model, description="model", style=style),
        "method": W.ToggleButtons(options=list(vram.METHODS), value=method, description="method", style=style),
        "r": W.Dropdown(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=r, description="LoRA r", style=style),
        "targets": W.Dropdown(options=list(TARGET_CHOICES), value=targets, description="targets", style=style),
        "optimizer": W.Dropdown(options=list(recipe.OPTIMIZERS), value=optimizer, description="optimizer", style=style),
        "batch": W.IntSlider(value=batch, min=1, max=64, description="batch", style=style, continuous_update=False),
        "seq": W.Dropdown(options=[128, 256, 512, 1024, 2048, 4096, 8192, 16384], value=seq, description="seq len",
                          style=style),
        "checkpointing": W.Checkbox(value=checkpointing, description="gradient checkpointing"),
        "mixed_precision": W.ToggleButtons(options=list(vram.MIXED_PRECISIONS), value=mixed_precision,
                                           description="mixed prec.", style=style),
        "grad_accum": W.IntSlider(value=grad_accum, min=1, max=32, description="grad accum", style=style,
                                  continuous_update=False),
        "gpu": W.Dropdown(options=list(budget.GPUS) + ([budget.THIS_GPU] if env.gpu_memory_bytes() else []), value=gpu,
                          description="GPU", style=style),
    }
    peak = W.HTML()
    peak.add_class("qlora-peak")
    out = W.Output()

    def redraw(*_):
        values = {k: c.value for k, c in controls.items()}
        gpu_name = values.pop("gpu")
        values["targets"] = TARGET_CHOICES[values["targets"]]
        if values["method"] == "full":  # mixed precision is modelled for LoRA and QLoRA
            values["mixed_precision"] = "no"
        try:
            est = vram.estimate(**values)
        except vram.SetupError as err:
            peak.value = f"<b style='color:#c44e52'>{err}</b>"
            return
        verdict = budget.predicted_verdict(est, budget.gpu_bytes(gpu_name))
        peak.value = (f"<b>predicted peak: <span class='qlora-peak-gib'>{est.peak_allocated_bytes / vram.GiB:.2f}</span> GiB"
                      f"</b> allocated, {est.device_bytes / vram.GiB:.2f} GiB on the device. {gpu_name}: {verdict}")
        with out:
            clear_output(wait=True)
            fig = plots.plot_vram_breakdown({f"{est.setup.method} {est.setup.model}": est},
                                            gpu_gib={gpu_name: budget.gpu_bytes(gpu_name) / vram.GiB})
            display(fig)
            print(est.table())

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    left = W.VBox([controls[k] for k in ("model", "method", "r", "targets", "optimizer")])
    right = W.VBox([controls[k] for k in ("batch", "grad_accum", "seq", "checkpointing", "mixed_precision", "gpu")])
    return W.VBox([W.HBox([left, right]), peak, out])
