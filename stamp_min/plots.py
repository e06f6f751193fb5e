"""The pictures the CLI and the notebooks draw. Each function returns a matplotlib Figure.

- `accuracy_matrix(A)`: heatmap of A[t, j] (rows: after task t, columns: evaluated on task j).
  The diagonal is how well a task was learnt; a column fading downwards is forgetting.
- `curves(series)`: lines over rounds, e.g. current-task accuracy per method.
- `cosine_map(C)`: a pairwise cosine matrix of updates, red = conflicting (negative) pairs.
"""

import matplotlib.pyplot as plt
import numpy as np


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
                        color="white" if A[t, j] < 0.6 else "black", fontsize=8)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task t")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def curves(series, xlabel="round", ylabel="accuracy", title=None, ax=None, x=None):
    """series: {label: list of y values} drawn against x (default: their index)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3))
    for label, ys in series.items():
        ax.plot(range(len(ys)) if x is None else x, ys, label=label, marker="o", markersize=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def cosine_map(C, labels=None, title="pairwise cosine of updates", ax=None):
    C = np.asarray(C, dtype=float)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(3.6, 3.0))
    im = ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu")
    labels = labels if labels is not None else [str(i) for i in range(len(C))]
    ax.set_xticks(range(len(C)), labels, fontsize=8)
    ax.set_yticks(range(len(C)), labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def save(fig, path, dpi=100):
    """Write the figure atomically (temp file in the same folder, then rename): a failed write
    leaves the previous picture, never half a file."""
    import os
    import tempfile
    from pathlib import Path
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
