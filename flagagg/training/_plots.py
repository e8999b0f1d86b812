"""Figures of an experiment, drawn with matplotlib's Agg canvas (no display needed)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

__all__ = ["plot_curves", "plot_worst_case"]


def _figure(width, height):
    # Figure + FigureCanvasAgg directly: no pyplot, so no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(labels):
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(labels) <= 10 else colormaps["tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def plot_curves(results, f, path):
    """Accuracy against rounds, one panel per attack, one line per rule.

    Lines are the mean over seeds, bands one standard deviation.

    Parameters
    ----------
    results : Results
    f : int
        Number of faulty workers to plot.
    path : pathlib.Path
        PNG file to write.

    Returns
    -------
    path : pathlib.Path
    """
    cfg = results.config
    attacks = [a.label for a in cfg.attacks]
    rules = [r.label for r in cfg.rules]
    colors = _colors(rules)
    series = defaultdict(lambda: defaultdict(list))
    for row in results.curves:
        if row["f"] == f:
            series[(row["rule"], row["attack"])][row["round"]].append(row["accuracy"])
    ncols = min(3, len(attacks))
    nrows = math.ceil(len(attacks) / ncols)
    fig = _figure(4.2 * ncols, 3.2 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False))
    for ax, attack in zip(axes.flat, attacks, strict=False):
        for rule in rules:
            by_round = series.get((rule, attack))
            if not by_round:
                continue
            t = np.array(sorted(by_round))
            acc = [np.asarray(by_round[k]) for k in t]
            mean = np.array([a.mean() for a in acc])
            std = np.array([a.std(ddof=1) if a.size > 1 else 0.0 for a in acc])
            ax.plot(t, mean, color=colors[rule], label=rule, lw=1.5)
            ax.fill_between(t, mean - std, mean + std, color=colors[rule], alpha=0.15, lw=0)
        ax.set_title(attack)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(attacks):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("round")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{results.split} accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(rules), 7))
    fig.suptitle(f"{cfg.dataset}, {cfg.model}, p={cfg.workers}, f={f}")
    fig.savefig(path, dpi=110)
    return path


def plot_worst_case(results, f, path):
    """Bar chart of each rule's worst-case accuracy over attacks (best first).

    Parameters
    ----------
    results : Results
    f : int
        Number of faulty workers to plot.
    path : pathlib.Path
        PNG file to write.

    Returns
    -------
    path : pathlib.Path
    """
    cfg = results.config
    rows = [w for w in results.worst_case() if w["f"] == f]
    colors = _colors([r.label for r in cfg.rules])
    fig = _figure(7.0, 1.0 + 0.45 * len(rows))
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y, [r["worst"] for r in rows], xerr=[r["worst_std"] for r in rows], capsize=3,
            color=[colors.get(r["rule"], "gray") for r in rows])
    for yi, r in zip(y, rows, strict=True):
        ax.annotate(f"{100 * r['worst']:.1f}±{100 * r['worst_std']:.1f} ({r['worst_attack']})",
                    (r["worst"] + r["worst_std"], yi), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y, [r["rule"] for r in rows])
    ax.invert_yaxis()  # best on top
    ax.set_xlim(0, 1.45)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel(f"worst-case {results.split} accuracy over attacks (mean ± std over seeds)")
    ax.set_title(f"{cfg.dataset}, {cfg.model}, p={cfg.workers}, f={f}")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path
