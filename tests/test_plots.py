"""plots.py: the figures hold the data they are given."""

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from stamp_min import plots  # noqa: E402


def test_accuracy_matrix_annotates_small_matrices_only():
    A = np.tril(np.full((3, 3), 0.5))
    A[np.triu_indices(3, 1)] = np.nan
    fig = plots.accuracy_matrix(A)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["0.50"] * 6
    big = plots.accuracy_matrix(np.eye(20))
    assert len(big.axes[0].texts) == 0
    image = fig.axes[0].images[0].get_array()
    assert image.mask[0, 2] and image[2, 0] == 0.5                     # NaN above the diagonal is left blank


def test_curves_use_the_given_x():
    fig = plots.curves({"a": [1, 2, 3]}, x=[10, 20, 30])
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [10, 20, 30] and list(line.get_ydata()) == [1, 2, 3]
    assert list(plots.curves({"b": [5, 6]}).axes[0].lines[0].get_xdata()) == [0, 1]


def test_cosine_map_scales_to_the_conflicts_it_shows():
    """A conflict of −0.1 among cosines no larger than 0.3 in size is drawn on a −0.3 … 0.3 scale (not ±1, where
    it would look white), every off-diagonal value is written in its cell, and the diagonal (1) is left blank."""
    C = np.array([[1.0, -0.1, 0.3], [-0.1, 1.0, 0.05], [0.3, 0.05, 1.0]])
    fig = plots.cosine_map(C)
    image = fig.axes[0].images[0]
    assert image.get_clim() == (-0.3, 0.3)
    assert image.get_array().mask.diagonal().all()
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(["-0.10", "-0.10", "0.30", "0.30", "0.05", "0.05"])
    assert plots.cosine_map(C, vmax=1).axes[0].images[0].get_clim() == (-1, 1)    # a shared scale, when asked


def test_counted_axes_get_whole_ticks_and_bars_keep_their_colours():
    ax = plots.curves({"a": list(range(8))}).axes[0]
    ax.set_xlim(0, 7)
    assert all(float(t).is_integer() for t in ax.get_xticks())
    fig = plots.bars({"x": [1, 2], "y": [2, 3]}, colors={"y": "#000000"})
    assert [tuple(p.get_facecolor()[:3]) for p in fig.axes[0].patches][1] == (0.0, 0.0, 0.0)
