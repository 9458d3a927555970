"""qlora_lab.plots: log axes read as plain numbers, log axes leave out zeros, like is compared with like."""

import matplotlib

matplotlib.use("Agg")

from qlora_lab import plots  # noqa: E402

LOSS = [10.0, 9.0, 8.5, 8.2]
NORMS = [0.0, 0.9, 3.0, 4.5]


def _point(r: int, targets="all-linear") -> dict:
    return {"point": {"r": r, "targets": targets}, "scale": 2.0, "steps": [1, 2, 3, 4], "losses": LOSS,
            "delta_w_steps": [0, 2, 4, 6], "delta_w_norms": NORMS}


def _log_tick_labels(fig) -> list[str]:
    fig.canvas.draw()  # tick labels are made when the figure is drawn
    labels = []
    for ax in fig.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                labels += [t.get_text() for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True)]
    return [label for label in labels if label]


def test_log_axes_have_plain_tick_labels():
    """No 2⁴ or 3×10⁰: every labelled tick of every log axis is a plain number."""
    results = {"a": _point(1), "b": _point(4), "c": _point(16), "d": _point(64)}
    groups = {"fixed": {1: "a", 4: "b", 16: "c", 64: "d"}}
    figures = [
        plots.plot_sweep_curves(results, groups),
        plots.plot_sweep_curves(results, groups, x="delta_w_steps", y="delta_w_norms"),
        plots.plot_params_and_memory([1, 4, 16, 64], [3e5, 1.2e6, 4.9e6, 1.95e7], [3e5, 1.2e6, 4.9e6, 1.95e7],
                                     [2.0e9, 2.01e9, 2.05e9, 2.2e9], [4.9e6, 1.9e7, 7.8e7, 3.1e8]),
        plots.plot_spectra({"r=16": [[1.0 / (i + 1) for i in range(16)]] * 3}),
        plots.plot_predicted_vs_measured([{"label": "a", "measured": 3.0 * 2**30, "predicted": 3.1 * 2**30},
                                          {"label": "b", "measured": 26 * 2**30, "predicted": 25 * 2**30}]),
        plots.plot_update_vs_step([{"kind": "q_proj", "layer": i, "ratio": 0.01 * 10**i, "error": 1.0} for i in range(4)]),
    ]
    labels = [label for fig in figures for label in _log_tick_labels(fig)]
    assert labels and not [label for label in labels if "$" in label or "^" in label or "times" in label], labels
    for label in labels:
        float(label.replace(",", "").replace("\u2212", "-"))  # each reads as a number
    ranks_axis = figures[2].axes[0].xaxis
    assert [t.get_text() for t in ranks_axis.get_ticklabels()] == ["1", "4", "16", "64"]  # the ranks run, no others


def test_log_axis_leaves_out_the_zero_at_step_zero():
    results = {"a": _point(4)}
    on_log = plots.plot_sweep_curves(results, {"g": {4: "a"}}, x="delta_w_steps", y="delta_w_norms")
    assert list(on_log.axes[0].lines[0].get_xdata()) == [2, 4, 6]  # step 0's exact zero cannot sit on a log axis
    linear = plots.plot_sweep_curves(results, {"g": {4: "a"}}, x="delta_w_steps", y="delta_w_norms", log_y=False)
    assert list(linear.axes[0].lines[0].get_xdata()) == [0, 2, 4, 6]


def test_a_panel_mixing_target_sets_names_them():
    results = {"all": _point(8), "qv": _point(42, ["q_proj", "v_proj"])}
    fig = plots.plot_sweep_curves(results, {"same budget": {8: "all", 42: "qv"}})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["all-linear, r=8 (scale 2)", "q_proj+v_proj, r=42 (scale 2)"]
    single = plots.plot_sweep_curves(results, {"one set": {8: "all"}})
    assert [t.get_text() for t in single.axes[0].get_legend().get_texts()] == ["r=8 (scale 2)"]


def test_both_memory_lines_are_the_increase_over_the_smallest_rank():
    mib = 2**20
    fig = plots.plot_params_and_memory([1, 4], [1e5, 4e5], [1e5, 4e5], [None, 2.0e9], [10 * mib, 40 * mib])
    computed, = [line for line in fig.axes[1].lines if "computed" in line.get_label()]
    assert list(computed.get_ydata()) == [-30.0, 0.0]  # r=1 was not measured: both lines start at r=4
    fig = plots.plot_params_and_memory([1, 4], [1e5, 4e5], [1e5, 4e5], [2.0e9, 2.0e9 + 25 * mib], [10 * mib, 40 * mib])
    computed, measured = fig.axes[1].lines
    assert list(computed.get_ydata()) == [0.0, 30.0] and list(measured.get_ydata()) == [0.0, 25.0]
    assert "r=1" in fig.axes[1].get_ylabel() and "measured" in measured.get_label()
