"""Datasets: images and labels in memory, their splits (METHOD §1.1).

A dataset is four tensors held in memory: raw uint8 images (N, C, H, W) and int64 labels, for a
train and a test split, plus the per-channel mean/std the model normalises with.

    digits       scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): offline, the default.
                 A stratified 20% is held out as the test split (fixed seed 0).
    cifar10/100  torchvision's loaders, files under `root`; downloaded only with download=True.
    imagefolder  `root/train/<class>/*` and `root/val/<class>/*` (or `root/test`), e.g. ImageNet at
                 32x32; with no train/ folder, `root/<class>/*` and a held-out 20% (imagefolder.py:
                 links, loops, empty classes and decompression bombs are refused, naming the file).

A Dataset given from memory (`fcl_loop.run(cfg, dataset=…)`) is checked by
`untrusted.check_dataset`: arrays of one length with the right dtypes and shapes, labels in
range, finite statistics.

Scenarios (which client sees which images at which task) are in scenarios.py.
"""

import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import UserError, imagefolder

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor   # (N, C, H, W) uint8
    y_train: torch.Tensor   # (N,) int64
    x_test: torch.Tensor    # (M, C, H, W) uint8
    y_test: torch.Tensor    # (M,) int64
    num_classes: int
    mean: tuple             # per channel, on the 0..1 scale
    std: tuple

    in_channels = property(lambda self: self.x_train.shape[1])
    image_size = property(lambda self: self.x_train.shape[-1])


def _stats(x):
    """Per-channel mean/std of uint8 images on the 0..1 scale."""
    x = x.float().div_(255)
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


def _holdout(y, fraction, seed, counts=None):
    """Stratified split of indices: `fraction` of every class (or counts[c] of class c) goes to the test side."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(counts[c]) if counts is not None else max(1, round(fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _split(x, y):
    """(x_train, y_train, x_test, y_test): a stratified 20 % of every class held out (seed 0)."""
    tr, te = _holdout(y, 0.2, seed=0)
    return x[tr], y[tr], x[te], y[te]


def _digits():
    """scikit-learn's digits, read from the file its wheel ships (datasets/data/digits.csv.gz: per row
    64 pixels in 0..16, then the label) as load_digits reads it, without importing scikit-learn, which
    costs every new process about 2 s; load_digits itself where that file is not as expected."""
    spec = importlib.util.find_spec("sklearn")                   # finds the package, does not import it
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    data = np.loadtxt(path, delimiter=",") if path and path.is_file() else None
    if data is not None and data.shape == (1797, 65):
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        images, target = d.images, d.target
    x = torch.from_numpy(np.round(images * (255 / 16))).to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8)
    return (*_split(x, torch.from_numpy(target).long()), 10)


def _cifar(name, root, download):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        splits = [cls(root=str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted ..."
        raise UserError(f"dataset={name!r}: no valid files under {root} ({e}); allowed: "
                        f"put them there, or pass --download on a machine with internet") from None
    except OSError as e:       # no network (URLError), a full disk, a folder that cannot be written
        raise UserError(f"dataset={name!r}: the download into {root} failed ({type(e).__name__}: {getattr(e, 'reason', e)}); "
                        f"allowed: internet and a writable data_root, or copy {cls.base_folder}/ into {root}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:   # a truncated or foreign batch file
        raise UserError(f"dataset={name!r}: a file under {Path(root) / cls.base_folder} is damaged ({type(e).__name__}); "
                        f"allowed: delete that folder and download it again") from None
    out = []
    for s in splits:
        out += [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets).long()]
    return (*out, len(splits[0].classes))


def load_dataset(name, root="data", download=False, image_size=32):
    """Load a dataset into memory as uint8 tensors. `image_size` is used by imagefolder only."""
    if name == "digits":
        parts = _digits()
    elif name in ("cifar10", "cifar100"):
        parts = _cifar(name, root, download)
    elif name == "imagefolder":
        (x, y), test, k = imagefolder.load(root, image_size)
        parts = (*(x, y), *test, k) if test else (*_split(x, y), k)
    else:
        raise UserError(f"dataset={name!r} is unknown; allowed: {', '.join(DATASETS)}")
    x, y, x_te, y_te, k = parts
    mean, std = _stats(x)
    return Dataset(name, x, y, x_te, y_te, k, mean, std)


def validation_split(ds, fraction=0.2, seed=1):
    """A copy of `ds` whose test split is a stratified `fraction` of its training images (for
    tuning hyper-parameters without ever looking at the test split)."""
    tr, va = _holdout(ds.y_train, fraction, seed)
    return Dataset(ds.name + "-val", ds.x_train[tr], ds.y_train[tr], ds.x_train[va], ds.y_train[va],
                   ds.num_classes, ds.mean, ds.std)


def resplit(ds, seed):
    """A copy of `ds` with its train and test images pooled and split again with `seed`, class by
    class, each class keeping its number of test images (test_split="per_seed": a fresh test split
    for every seed, so an interval over seeds covers test-set sampling too)."""
    x, y = torch.cat([ds.x_train, ds.x_test]), torch.cat([ds.y_train, ds.y_test])
    tr, te = _holdout(y, None, seed, counts=torch.bincount(ds.y_test, minlength=ds.num_classes))
    return Dataset(ds.name, x[tr], y[tr], x[te], y[te], ds.num_classes, *_stats(x[tr]))


def to_device_if_small(ds, device, limit_bytes=2 * 2**30):
    """Move the whole dataset to `device` once when it fits in `limit_bytes` (batches are then
    gathered on the device, with no host-to-device copy per batch)."""
    size = sum(t.nbytes for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    if size > limit_bytes:
        return ds
    return Dataset(ds.name, ds.x_train.to(device), ds.y_train.to(device), ds.x_test.to(device),
                   ds.y_test.to(device), ds.num_classes, ds.mean, ds.std)


# the scenarios lived here before scenarios.py; older notebooks import them from here
from .scenarios import SCENARIOS, Scenario, Task, check_scenario, make_scenario  # noqa: E402, F401
