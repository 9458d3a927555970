"""Plots for the labs: each function draws one figure from measured results and returns it.

Conventions: functions take plain data (dicts, lists, tensors), create their own figure
with matplotlib's object API (`fig, ax = plt.subplots(...)`), label axes with units, and
return the figure, so notebooks show it and tests can inspect it without a display.
matplotlib is imported inside the functions: importing this module costs nothing.
Sections below are in lab order.
"""


# ---- lab 04: only LoRA trains


def plot_setup_losses(curves: dict[str, list[float]], title: str = "Loss on one batch per training setup"):
    """One line per training setup: its loss on a single repeated batch after 0, 1, 2, ... optimizer steps.

    A healthy setup falls; one that trains nothing stays flat; wrong gradients fall slowly.
    Example: plot_setup_losses({"correct": [1.8, 1.1, 0.6], "optimizer built before LoRA": [1.8, 1.8, 1.8]})
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)), (0, (8, 2))]  # identical curves stay visible
    markers = "sv^Dxo+"
    for i, (name, losses) in enumerate(curves.items()):
        main = name == "correct"
        ax.plot(range(len(losses)), losses, label=name, linewidth=3.5 if main else 1.6, zorder=1 if main else 2,
                linestyle="-" if main else styles[i % len(styles)], marker="o" if main else markers[i % len(markers)])
    ax.set_xlabel("optimizer steps taken on the batch")
    ax.set_ylabel("loss on the batch (nats per answer token)")
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---- lab 02: NF4 vs FP4


LAB02_COLORS = {"nf4": "tab:blue", "fp4": "tab:orange", "int4": "tab:green", "bf16": "tab:gray"}


def plot_levels_on_normal(levels: dict, sigma_per_unit: float):
    """Top: the standard normal density in NF4's units with the 16 NF4 levels and the probability
    between neighbouring levels; bottom: the 16 levels of each code book on [-1, 1].

    levels: {"nf4": tensor(16), "fp4": ..., "int4": ...}; sigma_per_unit: Q(1 - delta), the number of
    standard deviations that NF4's level 1.0 stands for (about 1.85).
    Example: plot_levels_on_normal({"nf4": quant.nf4_levels(), ...}, 1.848)
    """
    import math

    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    return fig


def plot_block_histograms(histograms: dict, edges, levels: dict):
    """One panel per layer type: how its weights fall once each block is divided by its absmax,
    with the levels of each code book drawn as ticks along the top.

    histograms: {layer_type: counts per bin}; edges: bin edges on [-1, 1]; levels: {format: tensor(16)}.
    Example: plot_block_histograms({"q_proj": counts}, torch.linspace(-1, 1, 202), {"nf4": quant.nf4_levels()})
    """
    import matplotlib.pyplot as plt

    edges = [float(e) for e in edges]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    n = len(histograms)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, counts) in zip(axes.flat, histograms.items()):
        counts = [float(c) for c in counts]
        total = sum(counts)
        width = edges[1] - edges[0]
        density = [c / total / width for c in counts]
        ax.bar(centers, density, width=width, color="0.6")
        inner = sorted(density[1:-1])  # the edge bins hold the absmax spikes; scale to the bulk
        ax.set_ylim(0, inner[-1] * 1.6)
        for band, (fmt, values) in enumerate(levels.items()):
            y0, y1 = 0.97 - 0.08 * (band + 1), 0.97 - 0.08 * band
            for v in values:
                if abs(float(v)) <= 1:
                    ax.plot([float(v)] * 2, [y0, y1], color=LAB02_COLORS.get(fmt, "black"), linewidth=1.2,
                            transform=ax.get_xaxis_transform())
        ax.set_title(name, fontsize=10)
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("weight / block absmax")
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("density")
    handles = [plt.Line2D([], [], color=LAB02_COLORS.get(fmt, "black"), label=f"{fmt.upper()} levels") for fmt in levels]
    fig.legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_code_usage(usage: dict, levels: dict):
    """How often each of the 16 codes is used, one panel per format; the dashed line is 1/16 (uniform).

    usage: {format: 16 fractions, indexed by code}; levels: {format: tensor(16)} for the tick labels.
    Example: plot_code_usage({"nf4": counts / counts.sum()}, {"nf4": quant.nf4_levels()})
    """
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    return fig


def plot_error_by_layer(errors: dict, metric: str = "sqnr_db", label: str = "SQNR (dB, higher is better)"):
    """Grouped bars: one group per layer type, one bar per format.

    errors: {format: {layer_type: {"mse": ..., "sqnr_db": ..., "max_abs": ...}}}.
    Example: plot_error_by_layer({"nf4": {"q_proj": {"sqnr_db": 20.1}}, "fp4": {"q_proj": {"sqnr_db": 17.9}}})
    """
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    return fig


def plot_error_vs_blocksize(mse: dict, bits: dict):
    """MSE of each format against blocksize (log scale), with the bits per parameter each blocksize costs.

    mse: {format: {blocksize: mse}}; bits: {blocksize: bits per parameter}.
    Example: plot_error_vs_blocksize({"nf4": {32: 1e-4, 64: 1.2e-4}}, {32: 5.0, 64: 4.5})
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for fmt, by_size in mse.items():
        sizes = sorted(by_size)
        ax.plot(sizes, [by_size[s] for s in sizes], marker="o", label=fmt.upper(), color=LAB02_COLORS.get(fmt))
    sizes = sorted(bits)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{s}\n{bits[s]:.3g} bits" for s in sizes], fontsize=8)
    ax.set_xlabel("blocksize (values per absmax), and bits per parameter it costs without double quantization")
    ax.set_ylabel("mean squared error")
    ax.set_title("Bigger blocks: fewer scales to store, larger error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_eval_losses(losses: dict, baseline: str = "bf16"):
    """Eval loss per format as bars, the baseline's loss as a dashed line, the difference on each bar.

    losses: {label: loss in nats per answer token}. Example: plot_eval_losses({"bf16": 1.54, "NF4": 1.60})
    """
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    return fig
