"""The pictures the CLI and the notebooks draw. Each function returns a matplotlib Figure.

- `accuracy_matrix(A)`: heatmap of A[t, j] (rows: after task t, columns: evaluated on task j).
  The diagonal is how well a task was learnt; a column fading downwards is forgetting.
- `curves(series)`: lines over rounds, e.g. current-task accuracy per method.
- `cosine_map(C)`: a pairwise cosine matrix of updates, red = conflicting (negative) pairs.
- `bars(groups)`: one bar per label, the mean over seeds with its 95 % interval as an error bar.
- `forest(comparisons)`: paired comparisons (study.compare) as intervals coloured by verdict.

`use_style()` sets the course's one look (every notebook calls it in its setup cell): figures
sharp enough for slides (dpi 120 on screen, 150 saved), fonts legible from the back of a room,
labelled grids, and the Okabe–Ito palette, which colour-blind readers can tell apart.
"""

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

from .metrics import t_quantile

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
STYLE = {"figure.dpi": 120, "savefig.dpi": 150, "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 10, "legend.framealpha": 0.85,
         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
         "axes.prop_cycle": mpl.cycler(color=PALETTE), "image.cmap": "viridis", "figure.autolayout": False}


def use_style():
    """Apply the course's style to every figure drawn from now on (matplotlib rcParams)."""
    mpl.rcParams.update(STYLE)


def interval(values):
    """(mean, half-width of its 95 % t interval) of per-seed values; half-width 0 for one value."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (t_quantile(0.975, len(v) - 1) * float(v.std(ddof=1)) / np.sqrt(len(v)) if len(v) > 1 else 0.0)


def accuracy_matrix(A, title="accuracy matrix A[t, j]", ax=None, annotate=None):
    """annotate: write each value in its cell (default: only up to 12 tasks, where they fit)."""
    A = np.asarray(A, dtype=float)
    T = A.shape[0]
    annotate = T <= 12 if annotate is None else annotate
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(1.0 + 0.6 * T, 0.8 + 0.55 * T))
    masked = np.ma.masked_invalid(A)
    im = ax.imshow(masked, vmin=0, vmax=1, cmap="viridis")
    for t in range(T):
        for j in range(T):
            if annotate and np.isfinite(A[t, j]):
                ax.text(j, t, f"{A[t, j]:.2f}", ha="center", va="center",
                        color="white" if A[t, j] < 0.6 else "black", fontsize=9 if T <= 6 else 7)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task t")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_title(title)
    ax.grid(False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    return fig


def curves(series, xlabel="round", ylabel="accuracy", title=None, ax=None, x=None, bands=None):
    """series: {label: list of y values} drawn against x (default: their index).
    bands: {label: list of half-widths} drawn as a shaded band around that line (e.g. a 95 % interval)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.6))
    for label, ys in series.items():
        xs = range(len(ys)) if x is None else x
        line, = ax.plot(xs, ys, label=label, marker="o", markersize=3)
        if bands and label in bands:
            ys, hw = np.asarray(ys, dtype=float), np.asarray(bands[label], dtype=float)
            ax.fill_between(xs, ys - hw, ys + hw, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def bars(groups, ylabel="accuracy", title=None, ax=None, xlabel="method"):
    """groups: {label: per-seed values}. One bar per label at the mean, with the 95 % t interval as an
    error bar (none for a single seed), and every seed as a dot. Returns the Figure."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(1.2 + 0.9 * len(groups), 3.6))
    for i, (label, values) in enumerate(groups.items()):
        mean, hw = interval(values)
        ax.bar(i, mean, color=PALETTE[i % 6], alpha=0.85, yerr=hw if len(values) > 1 else None,
               capsize=4, error_kw={"elinewidth": 1.2})
        ax.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)), values, s=10, color="black",
                   zorder=3)
    ax.set_xticks(range(len(groups)), list(groups), rotation=30 if len(groups) > 4 else 0, ha="right"
                  if len(groups) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    n = {len(v) for v in groups.values()}
    ax.set_title(title or (f"mean over {n.pop()} seeds, 95 % interval" if len(n) == 1 else "mean, 95 % interval"))
    fig.tight_layout()
    return fig


VERDICT_COLOURS = {"supported": PALETTE[2], "contradicted": PALETTE[3], "inconclusive": "#888888"}


def forest(comparisons, title=None, ax=None, xlabel=None):
    """One row per comparison (a study.Comparison, or a dict with its fields: a, b, mean, low, high,
    verdict, delta, metric; "label" names the row, else "a vs b"): the mean paired difference as a
    dot, its 95 % interval as a line, coloured by verdict; 0 as a line and ±δ as a band (the
    verdict rule: metrics.verdict). An interval without end (one seed) is drawn to the edge, open."""
    rows = [c if isinstance(c, dict) else vars(c) for c in comparisons]
    metrics = {c.get("metric", "") for c in rows}
    labels = [c.get("label") or f"{c['a']} vs {c['b']}" + (f" · {c.get('metric')}" if len(metrics) > 1 else "")
              for c in rows]
    ends = [v for c in rows for v in (c["low"], c["high"], c["mean"], c["delta"], -c["delta"]) if np.isfinite(v)]
    lo, hi = min(ends + [0.0]), max(ends + [0.0])
    lo, hi = lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1)
    width = 4.5 + 0.075 * max(len(x) for x in labels)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(min(width, 16), 1.4 + 0.42 * len(rows)))
    for i, c in enumerate(rows):
        y = len(rows) - 1 - i
        colour = VERDICT_COLOURS.get(c["verdict"], "black")
        ax.fill_betweenx([y - 0.35, y + 0.35], -c["delta"], c["delta"], color="#cccccc", alpha=0.5, linewidth=0)
        a, b = max(c["low"], lo), min(c["high"], hi)
        ax.plot([a, b], [y, y], color=colour, linewidth=2.2, solid_capstyle="butt")
        for end, inside, mark in ((c["low"], c["low"] >= lo, "<"), (c["high"], c["high"] <= hi, ">")):
            if not inside:
                ax.plot([max(min(end, hi), lo)], [y], mark, color=colour, markersize=6)
        ax.plot([c["mean"]], [y], "o", color=colour, markersize=6)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(rows)), labels[::-1])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(xlabel or "paired difference A − B" + (f", {next(iter(metrics))}" if len(metrics) == 1 else "")
                  + " (> 0: A better)")
    for verdict in dict.fromkeys(c["verdict"] for c in rows):
        ax.plot([], [], color=VERDICT_COLOURS.get(verdict, "black"), linewidth=2.2, label=verdict)
    ax.fill_between([], [], color="#cccccc", alpha=0.5, label="±δ")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)
    ax.set_title(title or "mean paired difference, 95 % interval, verdict")
    ax.grid(axis="y", visible=False)
    fig.tight_layout()
    return fig


def cosine_map(C, labels=None, title="pairwise cosine of updates", ax=None):
    C = np.asarray(C, dtype=float)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.2, 3.5))
    im = ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu")
    labels = labels if labels is not None else [str(i) for i in range(len(C))]
    ax.set_xticks(range(len(C)), labels)
    ax.set_yticks(range(len(C)), labels)
    ax.set_xlabel("update")
    ax.set_ylabel("update")
    ax.set_title(title)
    ax.grid(False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine")
    fig.tight_layout()
    return fig


def save(fig, path, dpi=150):
    """Write the figure atomically (cli.atomic_write): a failed write leaves the previous picture,
    never half a file."""
    from pathlib import Path

    from .cli import atomic_write
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
