"""metrics.py against hand-computed matrices."""

import math

import torch

import pytest

from stamp_min.metrics import average_accuracy, bwt, current_task_accuracy, forgetting, summary, tensor_bytes

nan = float("nan")

# forgetting peaks on the diagonal
A1 = [[0.9, nan, nan],
      [0.6, 0.8, nan],
      [0.5, 0.7, 0.9]]
# task 0 improves after it was trained (max is off the diagonal), task 1 improves at the end
A2 = [[0.5, nan, nan],
      [0.8, 0.6, nan],
      [0.7, 0.9, 0.4]]


def test_hand_computed_a1():
    assert average_accuracy(A1) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert forgetting(A1) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert bwt(A1) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_hand_computed_a2_max_off_the_diagonal():
    assert average_accuracy(A2) == pytest.approx((0.7 + 0.9 + 0.4) / 3)
    assert forgetting(A2) == pytest.approx(((0.8 - 0.7) + (0.6 - 0.9)) / 2)
    assert bwt(A2) == pytest.approx(((0.7 - 0.5) + (0.9 - 0.6)) / 2)


def test_one_task_has_no_forgetting_defined():
    s = summary([[0.75]])
    assert s["avg_accuracy"] == 0.75 and math.isnan(s["avg_forgetting"]) and math.isnan(s["bwt"])


def test_current_task_accuracy_is_best_over_rounds():
    assert current_task_accuracy([[0.1, 0.5, 0.4], [0.3]]) == [0.5, 0.3]


def test_tensor_bytes():
    import torch
    assert tensor_bytes({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}) == 48 + 10


def test_evaluation_leaves_the_model_in_the_mode_it_found():
    import torch.nn as nn
    from stamp_min.metrics import correct
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Dropout(0.5))
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    model.train()
    correct(model, x, y)
    assert model.training
    model.eval()
    correct(model, x, y)
    assert not model.training
