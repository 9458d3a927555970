"""Plots for the labs: each function draws one figure from measured results and returns it.

Conventions: functions take plain data (dicts, lists, tensors), create their own figure with matplotlib's
object API, label axes with units, list every plotted series in the legend, and return the figure *closed*
(`_finish`), drawn once where the notebook displays it and inspectable by tests without a display. `table`
shows a pandas table without cutting long cells. Sections in lab order.
"""

import math
import textwrap

import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import pandas as pd
from IPython.display import display


def _finish(fig):
    """Lay out, close (so the notebook shows it only where it is displayed) and return a figure."""
    fig.tight_layout()
    plt.close(fig)
    return fig


class _PlainLogFormatter(ticker.LogFormatter):
    """matplotlib's choice of which log-axis ticks to label, written as plain numbers: 4, 0.01, 20,000 (not 2⁴, 3×10⁰)."""

    def __call__(self, x, pos=None):
        return (f"{x:,.0f}" if x >= 1e4 else f"{x:.4g}") if super().__call__(x, pos) else ""


def _log_axis(ax, which: str = "y", base: float = 10, ticks: list | None = None):
    """Log scale on ax's "x", "y" or "xy" axes with plain tick labels; ticks: explicit positions (the ranks run, say)."""
    for w in which:
        getattr(ax, f"set_{w}scale")("log", base=base)
        axis = getattr(ax, f"{w}axis")
        axis.set_major_formatter(_PlainLogFormatter(base))
        axis.set_minor_formatter(_PlainLogFormatter(base, labelOnlyBase=False))
        if ticks is not None:
            axis.set_ticks(ticks, [f"{t:g}" for t in ticks], minor=False)
            axis.set_minor_locator(ticker.NullLocator())


def table(frame: pd.DataFrame, digits: int | None = None) -> None:
    """Display a DataFrame with every cell in full (pandas cuts text at 50 characters by default).

    Example: table(pd.DataFrame({"reference": ['{"name": "Lorenzo", ...}'], "generated": [...]}))
    """
    with pd.option_context("display.max_colwidth", None, "display.width", 250):
        if digits is not None:  # cell by cell: a transposed frame holds its numbers in text (object) columns
            frame = frame.map(lambda v: round(v, digits) if isinstance(v, float) else v)
        display(frame)


# ---- lab 04: only LoRA trains


def plot_setup_losses(curves: dict[str, list[float]], title: str = "Loss on one batch per training setup",
                      ylabel: str = "loss on the batch (nats per answer token)"):
    """One line per training setup: its loss on a single repeated batch after 0, 1, 2, ... optimizer steps.

    A healthy setup falls; one that trains nothing stays flat; wrong gradients fall slowly.
    Example: plot_setup_losses({"correct": [1.8, 1.1, 0.6], "optimizer built before LoRA": [1.8, 1.8, 1.8]})
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)), (0, (8, 2))]  # identical curves stay visible
    markers = "sv^Dxo+"
    for i, (name, losses) in enumerate(curves.items()):
        main = name == "correct"
        ax.plot(range(len(losses)), losses, label=name, linewidth=3.5 if main else 1.6, zorder=1 if main else 2,
                linestyle="-" if main else styles[i % len(styles)], marker="o" if main else markers[i % len(markers)])
    ax.set_xlabel("optimizer steps taken on the batch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig)


# ---- lab 02: NF4 vs FP4


LAB02_COLORS = {"nf4": "tab:blue", "fp4": "tab:orange", "int4": "tab:green", "bf16": "tab:gray"}


def plot_levels_on_normal(levels: dict, sigma_per_unit: float):
    """Top: the standard normal density in NF4's units with the 16 NF4 levels and the probability
    between neighbouring levels; bottom: the 16 levels of each code book on [-1, 1].

    levels: {"nf4": tensor(16), "fp4": ..., "int4": ...}; sigma_per_unit: Q(1 - delta), the number of
    standard deviations that NF4's level 1.0 stands for (about 1.85).
    Example: plot_levels_on_normal({"nf4": quant.nf4_levels(), ...}, 1.848)
    """
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), height_ratios=[2.2, 1], sharex=True)
    nf4 = sorted(float(v) for v in levels["nf4"])
    xs = [-1.15 + i * 2.3 / 600 for i in range(601)]
    density = [sigma_per_unit * math.exp(-0.5 * (x * sigma_per_unit) ** 2) / math.sqrt(2 * math.pi) for x in xs]
    top.plot(xs, density, color="black", linewidth=1)
    cdf = [0.5 * (1 + math.erf(v * sigma_per_unit / math.sqrt(2))) for v in nf4]
    for i in range(15):
        lo, hi = nf4[i], nf4[i + 1]
        seg = [(x, d) for x, d in zip(xs, density) if lo <= x <= hi]
        top.fill_between([x for x, _ in seg], [d for _, d in seg], color=LAB02_COLORS["nf4"],
                         alpha=0.35 if i % 2 else 0.15, linewidth=0)
        mass = cdf[i + 1] - cdf[i]
        top.text((lo + hi) / 2, 0.02, f"{100 * mass:.1f}%", rotation=90, ha="center", va="bottom", fontsize=7)
    for v in nf4:
        top.axvline(v, color=LAB02_COLORS["nf4"], linewidth=0.8)
    top.set_ylabel("density of a N(0, 1) weight\n(x in units of absmax)")
    top.set_title(f"NF4: levels at evenly spaced probabilities of N(0, 1); level 1.0 = {sigma_per_unit:.3f} sigma")
    for row, (name, values) in enumerate(levels.items()):
        vals = [float(v) for v in values]
        bottom.scatter(vals, [row] * len(vals), color=LAB02_COLORS.get(name, "black"), s=30, zorder=3)
        zeros = sum(v == 0 for v in vals)
        unused = sum(abs(v) > 1 for v in vals)
        note = f"{len(set(vals))} distinct values" + (f", {zeros} zeros" if zeros > 1 else "")
        note += f", {unused} outside [-1, 1]" if unused else ""
        bottom.text(1.2, row, note, va="center", fontsize=8)
    bottom.set_yticks(range(len(levels)), [name.upper() for name in levels])
    bottom.set_ylim(-0.7, len(levels) - 0.3)
    bottom.set_xlim(-1.2, 1.9)
    bottom.set_xlabel("level (value / block absmax)")
    bottom.grid(axis="x", alpha=0.3)
    return _finish(fig)


def plot_block_histograms(histograms: dict, edges, levels: dict):
    """One panel per layer type: how its weights fall once each block is divided by its absmax,
    with the levels of each code book drawn as ticks along the top.

    histograms: {layer_type: counts per bin}; edges: bin edges on [-1, 1]; levels: {format: tensor(16)}.
    Example: plot_block_histograms({"q_proj": counts}, torch.linspace(-1, 1, 202), {"nf4": quant.nf4_levels()})
    """
    edges = [float(e) for e in edges]
    n = len(histograms)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, counts) in zip(axes.flat, histograms.items()):
        counts = [float(c) for c in counts]
        total = sum(counts)
        width = edges[1] - edges[0]
        density = [c / total / width for c in counts]
        ax.stairs(density, edges, fill=True, color="0.6")
        inner = sorted(density[1:-1])  # the edge bins hold the absmax spikes; scale to the bulk
        ax.set_ylim(0, inner[-1] * 1.6)
        for band, (fmt, values) in enumerate(levels.items()):
            y0, y1 = 0.97 - 0.08 * (band + 1), 0.97 - 0.08 * band
            ax.vlines([float(v) for v in values if abs(float(v)) <= 1], y0, y1, color=LAB02_COLORS.get(fmt, "black"),
                      linewidth=1.2, transform=ax.get_xaxis_transform())
        ax.set_title(name, fontsize=10)
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("weight / block absmax")
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("density")
    handles = [plt.Line2D([], [], color=LAB02_COLORS.get(fmt, "black"), label=f"{fmt.upper()} levels") for fmt in levels]
    fig.legend(handles=handles, loc="lower right", fontsize=8)
    return _finish(fig)


def plot_code_usage(usage: dict, levels: dict):
    """How often each of the 16 codes is used, one panel per format; the dashed line is 1/16 (uniform).

    usage: {format: 16 fractions, indexed by code}; levels: {format: tensor(16)} for the tick labels.
    Example: plot_code_usage({"nf4": counts / counts.sum()}, {"nf4": quant.nf4_levels()})
    """
    fig, axes = plt.subplots(1, len(usage), figsize=(4.2 * len(usage), 3.4), sharey=True, squeeze=False)
    for ax, (fmt, fractions) in zip(axes[0], usage.items()):
        values = [float(v) for v in levels[fmt]]
        order = sorted(range(16), key=lambda c: (values[c], c))  # by level value, so the bars read left to right
        ax.bar(range(16), [100 * float(fractions[c]) for c in order], color=LAB02_COLORS.get(fmt, "gray"))
        ax.axhline(100 / 16, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(16), [f"{values[c]:.3g}" if abs(values[c]) <= 1 else "unused" for c in order],
                      rotation=90, fontsize=7)
        ax.set_title(f"{fmt.upper()} codes, sorted by level", fontsize=10)
        ax.set_xlabel("level")
    axes[0, 0].set_ylabel("share of weights (%)")
    return _finish(fig)


def plot_error_by_layer(errors: dict, metric: str = "sqnr_db", label: str = "SQNR (dB, higher is better)"):
    """Grouped bars: one group per layer type, one bar per format.

    errors: {format: {layer_type: {"mse": ..., "sqnr_db": ..., "max_abs": ...}}}.
    Example: plot_error_by_layer({"nf4": {"q_proj": {"sqnr_db": 20.1}}, "fp4": {"q_proj": {"sqnr_db": 17.9}}})
    """
    formats = list(errors)
    layer_types = list(next(iter(errors.values())))
    width = 0.8 / len(formats)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(layer_types) + 2), 3.8))
    for i, fmt in enumerate(formats):
        xs = [j + (i - (len(formats) - 1) / 2) * width for j in range(len(layer_types))]
        ax.bar(xs, [errors[fmt][t][metric] for t in layer_types], width=width, label=fmt.upper(),
               color=LAB02_COLORS.get(fmt))
    ax.set_xticks(range(len(layer_types)), layer_types)
    ax.set_ylabel(label)
    ax.set_title("Quantization error per layer type (blocksize 64)")
    ax.set_ylim(0, max(errors[f][t][metric] for f in formats for t in layer_types) * 1.2)
    ax.legend(fontsize=8, ncol=len(formats), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig)


def plot_error_vs_blocksize(mse: dict, bits: dict):
    """MSE of each format against blocksize (log scale), with the bits per parameter each blocksize costs.

    mse: {format: {blocksize: mse}}; bits: {blocksize: bits per parameter}.
    Example: plot_error_vs_blocksize({"nf4": {32: 1e-4, 64: 1.2e-4}}, {32: 5.0, 64: 4.5})
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for fmt, by_size in mse.items():
        sizes = sorted(by_size)
        ax.plot(sizes, [by_size[s] for s in sizes], marker="o", label=fmt.upper(), color=LAB02_COLORS.get(fmt))
    sizes = sorted(bits)
    _log_axis(ax, "x", 2, sizes)
    ax.set_xticks(sizes, [f"{s}\n{bits[s]:.3g} bits" for s in sizes], fontsize=8)
    ax.set_xlabel("blocksize (values per absmax), and bits per parameter it costs without double quantization")
    ax.set_ylabel("mean squared error")
    ax.set_title("Bigger blocks: fewer scales to store, larger error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig)


def plot_eval_losses(losses: dict, baseline: str = "bf16"):
    """Eval loss per format as bars, the baseline's loss as a dashed line, the difference on each bar.

    losses: {label: loss in nats per answer token}. Example: plot_eval_losses({"bf16": 1.54, "NF4": 1.60})
    """
    names = list(losses)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names) + 1.5), 3.8))
    colors = [LAB02_COLORS.get(n.split(" ")[0].lower(), "tab:purple") for n in names]
    bars = ax.bar(names, [losses[n] for n in names], color=colors)
    base = losses.get(baseline)
    if base is not None:
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"{baseline} = {base:.3f}")
        for bar, n in zip(bars, names):
            if n != baseline:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{losses[n] - base:+.3f}",
                        ha="center", va="bottom", fontsize=8)
        ax.legend(fontsize=8)
    ax.set_ylabel("eval loss (nats per answer token)")
    ax.set_title("What 4-bit storage does to the model")
    ax.tick_params(axis="x", labelsize=8)
    return _finish(fig)


# ---- lab 01: VRAM budget

VRAM_TERM_COLORS = {"weights": "#4c72b0", "quant_constants": "#8172b2", "lora_params": "#64b5cd",
                    "optimizer": "#dd8452", "gradients": "#c44e52", "activations": "#55a868",
                    "logits": "#ccb974", "temporaries": "#937860", "cuda_workspace": "#8c8c8c", "casts": "#da8bc3",
                    "all-gathered": "#1b9e77"}  # all-gathered: FSDP's unsharded units (fsdp.estimate)


def plot_vram_breakdown(estimates: dict, gpu_gib: dict | None = None,
                        title: str = "Where the memory of a training step goes"):
    """Stacked horizontal bars: one bar per labelled vram.Estimate, one segment per term (GiB).

    The legend lists every term that appears in any bar; gpu_gib draws vertical lines at GPU
    sizes, e.g. {"T4 16GB": 15.0}.
    Example: plot_vram_breakdown({"QLoRA 7B": vram.estimate("llama-2-7b")}, {"T4 16GB": 15.0})
    """
    fig, ax = plt.subplots(figsize=(10, 1.9 + 0.6 * len(estimates)))
    labels = list(estimates)
    terms = list(dict.fromkeys(term for est in estimates.values() for term in est.terms))  # every term, first-seen order
    for row, label in enumerate(labels):
        left = 0.0
        for term, nbytes in estimates[label].terms.items():
            width = nbytes / 2**30
            ax.barh(row, width, left=left, color=VRAM_TERM_COLORS.get(term, "#cccccc"), edgecolor="white", linewidth=0.5)
            left += width
        ax.text(left, row, f" {left:.1f} GiB", va="center", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=VRAM_TERM_COLORS.get(term, "#cccccc"), label=term) for term in terms]
    for style, (name, gib) in zip((":", "--", "-."), (gpu_gib or {}).items()):
        handles.append(ax.axvline(gib, color="black", linestyle=style, linewidth=1, label=f"{name} ({gib:.1f} GiB)"))
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("GiB at the step's peak (predicted torch.cuda.max_memory_allocated)")
    ax.set_title(title)
    ax.set_xlim(0, ax.get_xlim()[1] * 1.12)  # room for the totals
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return _finish(fig)


def plot_vram_sweep(xs: list, series: dict, xlabel: str, gpu_gib: dict | None = None, title: str = ""):
    """Peak GiB against one swept setting (xs), one line per labelled list of GiB values."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in series.items():
        ax.plot(xs, values, marker="o", label=label)
    for name, gib in (gpu_gib or {}).items():
        ax.axhline(gib, color="black", linestyle=":", linewidth=1)
        ax.text(xs[0], gib, f" {name}", fontsize=8, va="bottom")
    _log_axis(ax, "x", 2, xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("predicted device total (GiB, as nvidia-smi shows)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig)


def plot_predicted_vs_measured(rows: list[dict], unit: str = "GiB", title: str = "Calculator vs measurement",
                               measured_label: str = "measured peak"):
    """Predicted against measured peaks, y = x and a ±10 % band; points are numbered and the
    legend lists each number's configuration and error. Numbers sit beside their points, on
    alternating sides in order of measured size, so neighbouring points' numbers do not collide.

    rows: dicts with "measured", "predicted" (bytes) and "label".
    Example: plot_predicted_vs_measured([{"label": "7b b4x512", "measured": 6.1e9, "predicted": 6.0e9}])
    """
    scale = 2**30 if unit == "GiB" else 2**20
    measured = [r["measured"] / scale for r in rows]
    predicted = [r["predicted"] / scale for r in rows]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    top, bottom = max(measured + predicted) * 1.15, min(measured + predicted) / 1.15
    line = [bottom * (top / bottom) ** (i / 100) for i in range(101)]
    ax.plot(line, line, color="black", linewidth=1, label="predicted = measured")
    ax.fill_between(line, [g * 0.9 for g in line], [g * 1.1 for g in line], color="grey", alpha=0.2, label="±10 %")
    ax.scatter(measured, predicted, s=25, zorder=3, color="#4c72b0")
    side = {i: k % 2 for k, i in enumerate(sorted(range(len(rows)), key=measured.__getitem__))}  # 1: below right
    for i, (r, x, y) in enumerate(zip(rows, measured, predicted)):
        ax.annotate(str(i + 1), (x, y), xytext=(10, -12) if side[i] else (-10, 8), textcoords="offset points",
                    fontsize=7, ha="center", va="center", zorder=4)
        ax.plot([], [], " ", label=f"{i + 1:2d}  {r.get('label', '')}  {y / x - 1:+.1%}")
    _log_axis(ax, "xy")
    ax.set_xlabel(f"{measured_label} ({unit})")
    ax.set_ylabel(f"predicted peak ({unit})")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _finish(fig)


def plot_step_timeline(timeline: list, phase_peaks: dict, card_gib: float | None = None,
                       title: str = "Allocated memory through one training step"):
    """Allocated memory at each decoder layer's entry and exit during one step (measure.Measurement.timeline),
    forward in blue, backward (with checkpointing: recomputation included) in red, with each phase's peak.

    Example: plot_step_timeline(m.timeline, m.phase_peaks, card_gib=48)
    """
    colors = {"forward": "#4c72b0", "backward": "#c44e52"}
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.scatter(range(len(timeline)), [b / 2**30 for _, _, b in timeline], s=4,
               c=[colors.get(p, "grey") for _, p, _ in timeline])
    for phase, peak in phase_peaks.items():  # in the legend: peaks a few MiB apart would print over each other
        ax.axhline(peak / 2**30, linestyle=":", linewidth=1, color=colors.get(phase, "#55a868"),
                   label=f"{phase} peak {peak / 2**30:.2f} GiB")
    ax.legend(fontsize=8, loc="best")
    if card_gib:
        ax.axhline(card_gib, color="black", linewidth=1)
        ax.text(0, card_gib, f" {card_gib:g} GiB card", fontsize=8, va="bottom")
    ax.set_xlabel("decoder-layer events in one training step (blue: forward, red: backward incl. recomputation)")
    ax.set_ylabel("torch.cuda.memory_allocated (GiB)")
    ax.set_title(title)
    return _finish(fig)


# ---- lab 03: LoRA r and alpha


def _smooth(values: list[float], window: int) -> list[float]:
    return [sum(c) / len(c) for c in (values[max(0, i - window + 1): i + 1] for i in range(len(values)))]


def plot_sweep_curves(results: dict[str, dict], groups: dict[str, dict[int, str]], x: str = "steps", y: str = "losses",
                      ylabel: str = "training loss (nats per answer token)", smooth: int = 1, log_y: bool = True,
                      title: str = "Training loss per scaling rule, one line per rank r"):
    """One panel per scaling rule, one line per rank: a per-step curve of each sweep point.

    groups maps a rule label to {r: point name}; results maps point names to run_sweep
    results. x/y name the lists to draw ("steps"/"losses" or "delta_w_steps"/"delta_w_norms");
    smooth averages the last `smooth` values (training losses of single batches are noisy). A log axis
    leaves out values <= 0 (||delta W|| is 0 at step 0); a panel that mixes target sets names them.
    Example: plot_sweep_curves(results, {"alpha=2r": {4: "r=4,alpha=8,rslora=False"}})
    """
    ranks, cmap = sorted({r for g in groups.values() for r in g}), plt.get_cmap("viridis")
    colors = {r: cmap(i / max(1, len(ranks) - 1)) for i, r in enumerate(ranks)}
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5.0, 3.6 * len(groups)), 3.6), sharey=True, squeeze=False)
    for ax, (label, by_rank) in zip(axes[0], groups.items()):
        runs = {r: results[name] for r, name in sorted(by_rank.items()) if name in results}
        targets = {r: t if isinstance(t := res["point"]["targets"], str) else "+".join(t) for r, res in runs.items()}
        for r, res in runs.items():
            xs, ys = res[x], _smooth(res[y], smooth)
            keep = [i for i, v in enumerate(ys) if v > 0 or not log_y]
            name = (f"{targets[r]}, " if len(set(targets.values())) > 1 else "") + f"r={r} (scale {res['scale']:.3g})"
            ax.plot([xs[i] for i in keep], [ys[i] for i in keep], color=colors[r], label=name)
        ax.set_title(textwrap.fill(label, 45), fontsize=10)
        ax.set_xlabel("optimizer step")
        if log_y:
            _log_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    return _finish(fig)


def plot_sweep_heatmaps(tables: dict[str, dict[str, dict[int, float]]], fmt: str = "{:.3g}"):
    """Heatmaps side by side: one per metric, rows = scaling rules, columns = ranks, NaN = not run.

    tables maps a metric title to {rule label: {r: value}}.
    Example: plot_sweep_heatmaps({"final eval loss": {"alpha=r": {4: 0.3, 16: 0.2}}})
    """
    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 3.4), squeeze=False)
    for ax, (metric, table) in zip(axes[0], tables.items()):
        rules = list(table)
        ranks = sorted({r for row in table.values() for r in row})
        grid = np.array([[table[rule].get(r, np.nan) for r in ranks] for rule in rules], dtype=float)
        cmap = "viridis_r" if "loss" in metric else "viridis"
        image = ax.imshow(grid, cmap=cmap, aspect="auto")
        for i in range(len(rules)):
            for j in range(len(ranks)):
                if not np.isnan(grid[i, j]):
                    red, green, blue, _ = image.cmap(image.norm(grid[i, j]))
                    light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
                    ax.text(j, i, fmt.format(grid[i, j]), ha="center", va="center", fontsize=8,
                            color="black" if light else "white")
        ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
        ax.set_yticks(range(len(rules)), rules)
        ax.set_xlabel("rank r")
        ax.set_title(metric)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _finish(fig)


def plot_params_and_memory(ranks: list[int], formula: list[int], peft: list[int], peak_bytes: list[float | None],
                           adapter_state_bytes: list[int], memory_kind: str = "peak memory"):
    """Trainable parameters (formula vs peft) and memory against r.

    adapter_state_bytes is what the adapters cost to train (weights, gradients, optimizer
    states), computed; peak_bytes is what each sweep point measured. Both memory lines are the
    increase over the smallest measured rank, so they are the same quantity.
    Example: plot_params_and_memory([1, 4], [1e5, 4e5], [1e5, 4e5], [2.1e9, 2.2e9], [1.6e6, 6.4e6])
    """
    fig, (ax_p, ax_m) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax_p.plot(ranks, formula, "o-", label="r x sum(d_in + d_out), from the architecture")
    ax_p.plot(ranks, peft, "x", markersize=10, color="black", label="peft's count")
    _log_axis(ax_p, "y")
    ax_p.set_ylabel("trainable parameters")
    mib, measured = 2 ** 20, {r: b for r, b in zip(ranks, peak_bytes) if b}
    ref = min(measured or ranks)  # the rank both memory lines start from
    state = dict(zip(ranks, adapter_state_bytes))
    ax_m.plot(ranks, [(state[r] - state[ref]) / mib for r in ranks], "o-", label="adapter training state (computed)")
    if measured:
        ax_m.plot(list(measured), [(b - measured[ref]) / mib for b in measured.values()], "s--",
                  label=f"{memory_kind} (measured)")
    ax_m.set_ylabel(f"MiB more than at r={ref}")
    for ax in (ax_p, ax_m):
        _log_axis(ax, "x", 2, ranks)
        ax.set_xlabel("rank r")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _finish(fig)


def plot_spectra(spectra: dict[str, list[list[float]]], title: str = "Singular values of the learned delta W"):
    """Normalised singular values sigma_i / sigma_1 of delta W, median over layers, one line per setup.

    spectra maps a label to a list of per-layer singular-value lists (descending).
    Example: plot_spectra({"r=16": [[0.5, 0.1, ...], ...]})
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, per_layer in spectra.items():
        k = min(len(s) for s in per_layer)
        normed = np.array([np.asarray(s[:k]) / max(s[0], 1e-30) for s in per_layer])  # (layers, k)
        median = np.median(normed, axis=0)
        low, high = np.percentile(normed, 25, axis=0), np.percentile(normed, 75, axis=0)
        index = np.arange(1, k + 1)
        line, = ax.plot(index, median, "o-", markersize=3, label=label)
        ax.fill_between(index, low, high, color=line.get_color(), alpha=0.15)
    _log_axis(ax, "x", 2)
    _log_axis(ax, "y")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("sigma_i / sigma_1 (median over layers, 25-75 % band)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig)


# ---- lab 05: fine-tune end to end


def plot_finetune_curves(log_history: list[dict], before: dict | None = None, after: dict | None = None,
                         title: str = "QLoRA fine-tuning", generated: tuple[dict, dict] | None = None):
    """Training loss per step and the periodic evals (loss and exact match) from Trainer's log history.

    before/after are evals.evaluate results (drawn at step 0 and at the last step), so the
    curve starts at the base model and ends at what the final evaluation measured; generated,
    two evals.generation_eval results, adds generated exact match with its 95 % interval there.
    Example: plot_finetune_curves(result.log_history, before, after, generated=(gen_before, gen_after))
    """
    train_logs = [h for h in log_history if "loss" in h and "eval_loss" not in h]
    eval_logs = [h for h in log_history if "eval_loss" in h]
    last = max([h["step"] for h in train_logs] or [0])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([h["step"] for h in train_logs], [h["loss"] for h in train_logs], color="tab:blue", alpha=0.6,
                 label="training loss (one batch)")
    eval_steps = [h["step"] for h in eval_logs]
    eval_loss = [h["eval_loss"] for h in eval_logs]
    eval_acc = [100 * h.get("eval_accuracy", float("nan")) for h in eval_logs]
    if before is not None:
        eval_steps, eval_loss = [0] + eval_steps, [before["loss"]] + eval_loss
        eval_acc = [100 * before["accuracy"]] + eval_acc
    ax_loss.plot(eval_steps, eval_loss, "o-", color="tab:orange", label="eval loss (periodic)")
    ax_acc.plot(eval_steps, eval_acc, "o-", color="tab:green", label="exact match, teacher-forced (periodic eval)")
    if after is not None:
        ax_loss.plot([last], [after["loss"]], "s", color="black", label=f"final eval ({after['examples']} examples)")
        ax_acc.plot([last], [100 * after["accuracy"]], "s", color="black",
                    label=f"final eval ({after['examples']} examples)")
    if generated is not None:
        pct = [100 * g["accuracy"] for g in generated]
        err = [[max(0.0, p - 100 * g["ci"][0]) for p, g in zip(pct, generated)],  # max: rounding at 0 % or 100 %
               [max(0.0, 100 * g["ci"][1] - p) for p, g in zip(pct, generated)]]
        ax_acc.errorbar([0, last], pct, yerr=err, fmt="D", color="tab:red", capsize=4,
                        label=f"generated exact match, 95 % interval (before: {generated[0]['examples']} items, "
                              f"after: {generated[1]['examples']})")
    _log_axis(ax_loss)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("cross-entropy per answer token (nats, log scale)")
    ax_acc.set_xlabel("optimizer step")
    ax_acc.set_ylabel("exact match (%)")
    ax_acc.set_ylim(-3, 103)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _finish(fig)


def plot_qlora_vs_lora(rows: dict[str, dict], memory_label: str = "peak memory"):
    """Bars for each setup: peak memory (MiB), median step time (s) and final exact match (%).

    rows maps a setup name to {"peak_bytes", "step_seconds", "accuracy"} and optionally "ci" (accuracy's interval).
    Example: plot_qlora_vs_lora({"QLoRA": {"peak_bytes": 2e9, "step_seconds": 2.9, "accuracy": 0.8}, "LoRA": {...}})
    """
    panels = [("peak_bytes", memory_label + " (MiB)", 1 / 2**20, "{:.0f}"),
              ("step_seconds", "median step time (s)", 1.0, "{:.2f}"),
              ("accuracy", "exact match on the eval split (%)", 100.0, "{:.1f}")]
    return bar_panels(rows, panels, "QLoRA (4-bit NF4 base) vs LoRA (16-bit base): same task, same steps")


def bar_panels(rows: dict[str, dict], panels: list[tuple], title: str):
    """One bar chart per panel (key, axis label, factor, number format), a bar per row, values written on the bars.

    A row's "ci" (a [low, high] fraction) draws an interval on the "accuracy" bars.
    Example: bar_panels({"a": {"kl": 0.1}, "b": {"kl": 0.3}}, [("kl", "KL (nats)", 1.0, "{:.2f}")], "KL")
    """
    names = list(rows)
    colors = ["tab:purple", "tab:gray", "tab:olive", "tab:cyan", "tab:brown", "tab:pink"][: len(names)]
    width = max(4.8, 1.15 * len(names))  # per panel: room for every bar's label
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.8 + 0.15 * max(len(n) for n in names)),
                             squeeze=False)
    for ax, (key, label, factor, fmt) in zip(axes[0], panels):
        values = [(rows[n].get(key) or 0) * factor for n in names]
        cis = [rows[n].get("ci") for n in names] if key == "accuracy" else [None]
        err = ([[max(0.0, v - 100 * c[0]) for v, c in zip(values, cis)],  # max: rounding at 0 % or 100 %
                [max(0.0, 100 * c[1] - v) for v, c in zip(values, cis)]] if all(cis) else None)  # 95 % intervals
        bars = ax.bar([textwrap.fill(n, 12, break_long_words=False) for n in names], values, color=colors, yerr=err,
                      capsize=5)
        for i, (bar, value) in enumerate(zip(bars, values)):
            top = value + (err[1][i] if err else 0)  # above the interval's cap
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom", fontsize=9)
        ax.set_ylabel(label)
        ax.set_ylim(0, max([v + (err[1][i] if err else 0) for i, v in enumerate(values)] + [1e-9]) * 1.15)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)  # names wrapped onto lines of 12 characters: no overlap
    fig.suptitle(title)
    return _finish(fig)


def plot_update_vs_step(rows: list[dict], title: str = "Merging into 4-bit: the update against the NF4 step"):
    """Per LoRA layer (ship.update_vs_step): median |dW| / NF4 step, and the re-quantization error relative to dW.

    Example: plot_update_vs_step(ship.update_vs_step(model))
    """
    kinds = sorted({r["kind"] for r in rows})
    fig, (ax_ratio, ax_err) = plt.subplots(1, 2, figsize=(12, 4))
    for i, kind in enumerate(kinds):
        mine = [r for r in rows if r["kind"] == kind]
        for ax, key in ((ax_ratio, "ratio"), (ax_err, "error")):
            ax.plot([r["layer"] for r in mine], [r[key] for r in mine], "o-", ms=3, color=f"C{i}", label=kind)
    ax_ratio.axhline(0.5, color="black", ls="--", lw=1, label="half a step: below it, a weight rounds back")
    ax_err.axhline(1.0, color="black", ls="--", lw=1, label="1: as if the update were dropped")
    for ax, key, label in ((ax_ratio, "ratio", "median |dW| / local NF4 step"),
                           (ax_err, "error", "|dW stored - dW| / |dW|")):
        values = [r[key] for r in rows if r[key] > 0] + [0.5 if key == "ratio" else 1.0]
        wide = max(values) / min(values) > 10  # a log axis only where the values span more than a decade
        if wide:
            _log_axis(ax)
        ax.set_ylabel(label + (" (log)" if wide else ""))
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    return _finish(fig)
