"""Shared test fixtures: tiny datasets in the exact on-disk formats of the real loaders."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from stamp_min.data import Dataset


def write_cifar100(root, n_train_per_class=3, n_test_per_class=2, num_classes=100, seed=0):
    """Write a tiny CIFAR-100 in torchvision's on-disk format: root/cifar-100-python/{train,test,meta}.

    Each file is a pickle of a dict; 'data' is (N, 3072) uint8, rows = the R, G, B planes of a
    32x32 image; labels under 'fine_labels' (and 'coarse_labels'); meta holds 'fine_label_names'.
    Returns the (N, 3, 32, 32) images and labels written to each split, for comparison.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = np.repeat(np.arange(num_classes), n)
        images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
        entry = {"filenames": [f"img{i}.png" for i in range(len(labels))], "batch_label": split,
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "data": images.reshape(len(labels), 3072)}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
        written[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    meta = {"fine_label_names": [f"class{i}" for i in range(num_classes)],
            "coarse_label_names": [f"super{i}" for i in range(num_classes // 5)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)
    return written


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """torchvision checks the md5 of the real CIFAR files; tiny files cannot match it."""
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


def toy_dataset(num_classes=6, per_class=20, size=8, channels=1, seed=0):
    """A small in-memory Dataset whose classes are separable (class-dependent mean brightness)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    base = (y.float() * 255 / num_classes).view(-1, 1, 1, 1)
    x = (base + 20 * torch.randn(len(y), channels, size, size, generator=g)).clamp(0, 255).to(torch.uint8)
    yt = torch.arange(num_classes).repeat_interleave(5)
    xt = (yt.float() * 255 / num_classes).view(-1, 1, 1, 1).expand(-1, channels, size, size).to(torch.uint8)
    return Dataset("toy", x, y, xt.contiguous(), yt, num_classes, (0.5,) * channels, (0.25,) * channels)


def assert_same_run(a, b):
    """Results dicts a and b of one experiment (e.g. interrupted and resumed vs uninterrupted) agree
    exactly: accuracy matrix, summary metrics, bytes, and every round's loss."""
    for key in ("acc_matrix", "avg_accuracy", "avg_forgetting", "bwt", "current_task_accuracy", "comm_bytes", "buffer_bytes"):
        assert a[key] == b[key], key
    assert [x["loss"] for x in a["rounds"]] == [x["loss"] for x in b["rounds"]]
