"""Federated continual scenarios: which client sees which images at which task (METHOD §1.1).

A scenario cuts a data.Dataset into a client x task grid of `Task`s:

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

from dataclasses import dataclass

import numpy as np
import torch

from . import UserError

SCENARIOS = ("permutation", "dirichlet")


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


# Draws of a task's Dirichlet split before giving up. 100 was too few for a split people use: digits with the
# validation split held out, 5 clients, α 0.1, 2 classes per task failed for tuning seeds 10001, 10003, 10004
# (and seeds 3, 7, 8, 9); with 1,000 every one builds (0.3 s for all seven). A split found within fewer draws is
# the same: the draws come from one seeded generator, in order (tests/test_data.py checks both).
MAX_DRAWS = 1000


def _dirichlet(ds, num_clients, num_tasks, cpt, alpha, min_samples, seed, max_retries=MAX_DRAWS):
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
