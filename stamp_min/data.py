"""Datasets and federated continual scenarios (METHOD §1.1).

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

A scenario says which client sees which images at which task:

    permutation  [code] every client k draws its own permutation of all classes and cuts it into
                 tasks of `classes_per_task` classes; clients' tasks at the same step are unrelated
                 (heterogeneous). A class is held by every client at some task; its training images
                 are split disjointly among those clients (default, [reading]) or shared
                 (`share_samples=True`, what the authors' code does).
    dirichlet    one class order shared by all clients; each class of a task is split over the
                 clients by proportions ~ Dirichlet(alpha) (label skew), retried until every client
                 has at least `min_samples` images in every task.

The test data of client k's task t are all test images of the classes of that task.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import UserError, imagefolder

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
SCENARIOS = ("permutation", "dirichlet")


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


def _holdout(y, fraction, seed):
    """Stratified split of indices: `fraction` of every class goes to the test side."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = max(1, round(fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _split(x, y):
    """(x_train, y_train, x_test, y_test): a stratified 20 % of every class held out (seed 0)."""
    tr, te = _holdout(y, 0.2, seed=0)
    return x[tr], y[tr], x[te], y[te]


def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255 / 16))).to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8)
    return (*_split(x, torch.from_numpy(d.target).long()), 10)


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


def to_device_if_small(ds, device, limit_bytes=2 * 2**30):
    """Move the whole dataset to `device` once when it fits in `limit_bytes` (batches are then
    gathered on the device, with no host-to-device copy per batch)."""
    size = sum(t.nbytes for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    if size > limit_bytes:
        return ds
    return Dataset(ds.name, ds.x_train.to(device), ds.y_train.to(device), ds.x_test.to(device),
                   ds.y_test.to(device), ds.num_classes, ds.mean, ds.std)


# ----------------------------------------------------------------------------------------------
# scenarios

@dataclass
class Task:
    classes: tuple          # sorted class ids of this task
    train_idx: torch.Tensor  # (n,) indices into Dataset.x_train
    test_idx: torch.Tensor   # (m,) indices into Dataset.x_test: all test images of `classes`


@dataclass
class Scenario:
    kind: str
    tasks: list             # tasks[k][t]: Task of client k at step t

    @property
    def num_clients(self):
        return len(self.tasks)

    @property
    def num_tasks(self):
        return len(self.tasks[0])

    def table(self):
        """Client x task table of class ids (and training-sample counts)."""
        cells = [[" ".join(map(str, t.classes)) + f" ({len(t.train_idx)})" for t in row] for row in self.tasks]
        width = max(max(len(c) for row in cells for c in row), 8)
        lines = ["client | " + " | ".join(f"task {t}".ljust(width) for t in range(self.num_tasks))]
        lines.append("-" * len(lines[0]))
        lines += [f"{k:>6} | " + " | ".join(c.ljust(width) for c in row) for k, row in enumerate(cells)]
        return "\n".join(lines)


def _test_idx(ds, classes):
    return torch.nonzero(torch.isin(ds.y_test, torch.tensor(classes))).flatten()


def _permutation(ds, num_clients, num_tasks, cpt, share_samples, seed):
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(ds.num_classes, generator=g).tolist() for _ in range(num_clients)]   # π_k
    classes = [[tuple(sorted(p[t * cpt:(t + 1) * cpt])) for t in range(num_tasks)] for p in perms]
    # every (client, task) holding class c gets either all its images or a disjoint share of them
    pieces = {}  # (k, t, c) -> indices
    for c in range(ds.num_classes):
        holders = [(k, t) for k in range(num_clients) for t in range(num_tasks) if c in classes[k][t]]
        idx = torch.nonzero(ds.y_train == c).flatten()
        if not holders:
            continue
        if not share_samples:
            if len(idx) < len(holders):
                raise UserError(f"num_clients={num_clients}: class {c} has {len(idx)} training images, too few "
                                f"to split disjointly among {len(holders)} clients; allowed: fewer clients or share_samples")
            idx = idx[torch.randperm(len(idx), generator=g)]
        parts = torch.tensor_split(idx, len(holders)) if not share_samples else [idx] * len(holders)
        for (k, t), part in zip(holders, parts):
            pieces[k, t, c] = part.sort().values
    return [[Task(cl, torch.cat([pieces[k, t, c] for c in cl]), _test_idx(ds, cl))
             for t, cl in enumerate(classes[k])] for k in range(num_clients)]


def _dirichlet(ds, num_clients, num_tasks, cpt, alpha, min_samples, seed, max_retries=100):
    rng = np.random.default_rng(seed)
    order = rng.permutation(ds.num_classes)
    tasks = [[None] * num_tasks for _ in range(num_clients)]
    for t in range(num_tasks):
        task_classes = sorted(order[t * cpt:(t + 1) * cpt].tolist())
        for _ in range(max_retries):
            parts = [[] for _ in range(num_clients)]
            for c in task_classes:
                idx = torch.nonzero(ds.y_train == c).flatten()
                idx = idx[torch.from_numpy(rng.permutation(len(idx)))]
                cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
                for k, part in enumerate(np.split(idx.numpy(), cuts)):
                    parts[k].append(torch.from_numpy(part))
            sizes = [sum(len(p) for p in ps) for ps in parts]
            if min(sizes) >= min_samples:
                break
        else:
            raise UserError(f"alpha={alpha}: after {max_retries} draws some client still had fewer than "
                            f"min_samples={min_samples} images in task {t}; allowed: a larger alpha, fewer "
                            f"clients, or a smaller min_samples")
        for k in range(num_clients):
            idx = torch.cat(parts[k]).sort().values
            cl = tuple(sorted(torch.unique(ds.y_train[idx]).tolist()))
            tasks[k][t] = Task(cl, idx, _test_idx(ds, cl))
    return tasks


MAX_INDICES = 50_000_000        # image indices a scenario may hold (int64: 400 MB)


def check_size(ds, kind, K, T, cpt, share_samples, min_samples):
    """Before building: the scenario's index tensors fit in MAX_INDICES, and a Dirichlet split can
    give every client min_samples images of every task."""
    train, test = (torch.bincount(y, minlength=ds.num_classes) for y in (ds.y_train, ds.y_test))
    need = K * T * cpt * (int(test.max()) + (int(train.max()) if share_samples else 0)) + len(ds.y_train)
    if need > MAX_INDICES:
        shared = " with share_samples" if share_samples else ""
        raise UserError(f"num_clients={K}: {K} clients x {T} tasks{shared} would hold {need:,} image indices "
                        f"({need * 8 / 1e9:.1f} GB); allowed: at most {MAX_INDICES:,} (fewer clients or tasks"
                        f"{', or no share_samples' if share_samples else ''})")
    if kind == "dirichlet" and K * min_samples > int(train.sort(descending=True).values[:cpt].sum()):
        raise UserError(f"num_clients={K}: a task of {cpt} classes has too few images to give {K} clients "
                        f"min_samples={min_samples} each; allowed: fewer clients or more classes per task")


def make_scenario(ds, kind="permutation", num_clients=5, num_tasks=None, classes_per_task=2,
                  alpha=0.5, share_samples=False, min_samples=10, seed=0):
    """Cut `ds` into a client x task grid of `Task`s. num_tasks=None: as many as the classes allow."""
    if kind not in SCENARIOS:
        raise UserError(f"scenario={kind!r} is unknown; allowed: {', '.join(SCENARIOS)}")
    for field, v in (("num_clients", num_clients), ("classes_per_task", classes_per_task)):
        if v < 1:
            raise UserError(f"{field}={v} must be positive; allowed: >= 1")
    max_tasks = ds.num_classes // classes_per_task
    if max_tasks < 1:
        raise UserError(f"classes_per_task={classes_per_task}: {ds.name} has only {ds.num_classes} classes; "
                        f"allowed: 1..{ds.num_classes}")
    num_tasks = max_tasks if num_tasks is None else num_tasks
    if not 1 <= num_tasks <= max_tasks:
        raise UserError(f"num_tasks={num_tasks}: {num_tasks} tasks of {classes_per_task} classes need "
                        f"{num_tasks * classes_per_task} classes, {ds.name} has {ds.num_classes}; allowed: 1..{max_tasks}")
    check_size(ds, kind, num_clients, num_tasks, classes_per_task, share_samples, min_samples)
    if kind == "permutation":
        tasks = _permutation(ds, num_clients, num_tasks, classes_per_task, share_samples, seed)
    else:
        if alpha <= 0:
            raise UserError(f"alpha={alpha} must be positive; allowed: > 0")
        tasks = _dirichlet(ds, num_clients, num_tasks, classes_per_task, alpha, min_samples, seed)
    scenario = Scenario(kind, tasks)
    check_scenario(scenario, ds, disjoint=not share_samples)
    return scenario


def check_scenario(scenario, ds, disjoint=True):
    """Invariants: classes exist, no empty task, labels match, indices in range, splits disjoint."""
    seen = torch.zeros(len(ds.y_train), dtype=torch.int32)
    for k, row in enumerate(scenario.tasks):
        for t, task in enumerate(row):
            where = f"client {k} task {t}"
            assert task.classes and all(0 <= c < ds.num_classes for c in task.classes), f"{where}: bad classes"
            assert len(task.train_idx) > 0 and len(task.test_idx) > 0, f"{where}: empty task"
            assert int(task.train_idx.max()) < len(ds.y_train) and int(task.test_idx.max()) < len(ds.y_test)
            assert set(ds.y_train[task.train_idx].tolist()) <= set(task.classes), f"{where}: foreign labels"
            seen[task.train_idx] += 1
    if disjoint:
        assert int(seen.max()) <= 1, "a training image was given to two (client, task) pairs"
