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
