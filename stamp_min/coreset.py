"""The prototypical coreset and MixStyle: STAMP's "network-free" memory (METHOD §1.5).

STAMP keeps no generative model. After each task a client keeps a few raw images per class
(the coreset M_j of task j) and replays them later, when temporal gradient matching (TAM,
METHOD §1.3) needs an update Δ_j for every previous task j. The pieces:

- `prototypes`: the prototype p_c of class c is the mean embedding z = f(x) of its images,
  f = `model.features` (the model minus its last linear layer).
- Selection of m images of one class, rules with one signature, (n, D) -> (m,) indices:
  `select_prototypical` (greedy herding, iCaRL: each pick makes the mean of the picked
  embeddings closest to p_c), `select_nearest` (the m closest to p_c), `select_random`,
  `select_k_center` (picks that cover the class: each the farthest from those before).
- `Buffer`: the bounded store, m raw images per class, filled at the end of a task, keyed by the
  task's class set (a recurring task is stored once), iterated per past task during TAM.
- `MixStyle` + the `mixstyle(model, ...)` context manager (mixstyle.py, re-exported here): mixes
  per-instance feature statistics after an early block, to diversify the small buffer when replayed.

Paper vs our reading. The paper states a prototypical, model-agnostic coreset and MixStyle; the
authors' public code has no working coreset (METHOD §1.3). Our reading [METHOD §1.5]: herding
towards p_c, raw images, m per class, MixStyle on only while replaying the buffer (Beta(0.1, 0.1)
per METHOD; the MixStyle release defaults to 0.3). Choices neither the paper nor METHOD fix:
- Herding runs in float64 (ties: lowest index) on the end-of-task model's features, eval mode.
- A class already held under an earlier task (overlapping class sets) is not stored again, so no
  class ever has more than m images; the first task keeps it.
- MixStyle: see mixstyle.py (σ biased, μ and σ detached, as the original code).
"""

import torch

from . import UserError
from .mixstyle import MixStyle, mixstyle  # noqa: F401  (replaying the buffer mixes styles: mixstyle.py)

# ---------------------------------------------------------------------------------------------
# prototypes and selection rules


def prototypes(features, labels):
    """Per-class mean embeddings: (N, D), (N,) -> classes (K,) sorted, prototypes (K, D).

    Row k of the prototypes is p_c for c = classes[k].
    """
    classes, inverse = labels.unique(sorted=True, return_inverse=True)   # (K,), (N,)
    sums = torch.zeros(len(classes), features.size(1), dtype=features.dtype, device=features.device)
    sums.index_add_(0, inverse, features)                                 # (K, D)
    counts = torch.bincount(inverse, minlength=len(classes)).to(features.dtype)
    return classes, sums / counts[:, None]


def select_prototypical(features, m, seed=0):
    """Greedy herding: (n, D) embeddings of ONE class -> (min(m, n),) indices in pick order.

    Step k picks, among the images not picked yet, the i minimising
    || (z_1 + ... + z_{k-1} + z_i) / k - p ||, p = the class prototype. `seed` is unused
    (deterministic rule); it is there so that the three rules share one signature.
    On the embeddings as they are (METHOD §1.5); iCaRL L2-normalises them first: that is the
    rule "prototypical_l2" (`select_prototypical_l2`).
    """
    n = len(features)
    if m >= n:
        return torch.arange(n)
    z = features.double()                       # (n, D); float64: picks do not hinge on rounding
    p = z.mean(0)                               # (D,) prototype
    total = torch.zeros_like(p)                 # sum of the picked embeddings
    free = torch.ones(n, dtype=torch.bool, device=z.device)
    picks = []
    for k in range(1, m + 1):
        dist = ((total + z) / k - p).pow(2).sum(1)        # (n,) distance if i were picked
        dist[~free] = float("inf")                        # no repeats
        i = int(dist.argmin())                            # first minimum on ties
        picks.append(i)
        free[i] = False
        total += z[i]
    return torch.tensor(picks, dtype=torch.long)


def select_nearest(features, m, seed=0):
    """The m embeddings closest to the class prototype, nearest first. `seed` is unused."""
    n = len(features)
    if m >= n:
        return torch.arange(n)
    z = features.double()
    dist = (z - z.mean(0)).pow(2).sum(1)                  # (n,)
    return dist.argsort(stable=True)[:m]


def select_random(features, m, seed=0):
    """m indices drawn uniformly without replacement, reproducible from `seed`."""
    n = len(features)
    if m >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]


def select_prototypical_l2(features, m, seed=0):
    """Herding on L2-normalised embeddings, as iCaRL does (each z_i / ||z_i|| before herding)."""
    return select_prototypical(torch.nn.functional.normalize(features.double(), dim=1), m, seed)


def select_k_center(features, m, seed=0):
    """Greedy k-center (Gonzalez 1985; as a coreset, Sener & Savarese 2018): the image nearest the
    class prototype, then each time the image whose distance to its nearest pick is largest, so that
    the picks cover the class: (n, D) -> (min(m, n),) indices in pick order, also when m >= n (the
    order the search ran; it changes how a pooled buffer is shuffled). Ties: lowest index. `seed` is
    unused. The buffer of the `replay_kcenter` preset (issue 25's search, docs/claims.md V6)."""
    z = features.double()                                 # (n, D)
    if len(z) == 0:
        return torch.zeros(0, dtype=torch.long)
    picks = [int((z - z.mean(0)).norm(dim=1).argmin())]
    dist = (z - z[picks[0]]).norm(dim=1)                  # (n,) distance to the nearest pick
    while len(picks) < min(m, len(z)):
        dist[picks[-1]] = -1.0                            # a pick is never picked again
        picks.append(int(dist.argmax()))
        dist = torch.minimum(dist, (z - z[picks[-1]]).norm(dim=1))
    return torch.tensor(picks, dtype=torch.long)


SELECTORS = {"prototypical": select_prototypical, "random": select_random, "nearest": select_nearest,
             "prototypical_l2": select_prototypical_l2, "k_center": select_k_center}

# ---------------------------------------------------------------------------------------------
# the buffer


def task_key(classes):
    """A task's key in the buffer: its class set as a sorted tuple of ints."""
    return tuple(sorted({int(c) for c in classes}))


@torch.no_grad()
def embed(model, x, batch_size=256):
    """z = model.features(x) in eval mode, in batches, returned on the CPU: (N, ...) -> (N, D)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()                                # no dropout / batch-norm updates / MixStyle
    try:
        z = [model.features(xb.to(device)).float().cpu() for xb in x.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(z)


class Buffer:
    """The coreset memory: at most `m_per_class` raw images per class, grouped by task.

    `rule` is a key of SELECTORS or a selector of yours, a function like them: (features (n, D) of
    one class, m, seed=) -> (≤ m,) indices into the n images (give it from your `new_state`:
    `state.buffer = Buffer(m, my_selector)`). `seed` feeds the random rule (class c uses seed + c).
    Images keep the dtype they arrive in (uint8 for our datasets) and live on the CPU; labels are
    int64. `for key, x, y in buffer` yields the stored tasks in the order they were added; `put`
    sets a task's contents directly (a buffer with another policy, e.g. a reservoir).
    """

    def __init__(self, m_per_class, rule="prototypical", seed=0):
        if not (callable(rule) or rule in SELECTORS):
            raise UserError(f"coreset rule={rule!r} is unknown; allowed: {', '.join(SELECTORS)}, or a function "
                            f"(features, m, seed=) -> indices")
        if int(m_per_class) < 1:
            raise UserError(f"m_per_class={m_per_class!r} is invalid; allowed: an integer >= 1")
        self.m, self.rule, self.seed = int(m_per_class), rule, int(seed)
        self.tasks = {}                         # key -> (x (n, C, H, W), y (n,) int64)

    def add_task(self, model, x, y, classes=None, batch_size=256):
        """Select and store m images per class of a finished task; returns the task's key.

        x: (N, C, H, W) raw images of the task, y: (N,) labels; classes: the task's class set
        (default: the labels present). Called again for the same class set, it stores nothing.
        """
        key = task_key(y.unique() if classes is None else classes)
        held = self.classes()
        todo = [c for c in key if c not in held]
        if key in self.tasks or not todo or len(y) == 0:
            return key
        z = embed(model, x, batch_size)                   # (N, D), the end-of-task model
        y = y.cpu().long()
        keep = []
        for c in todo:
            idx = (y == c).nonzero().squeeze(1)           # (n_c,) this class's rows
            if len(idx):
                pick = self.select(z[idx], self.m, seed=self.seed + c)
                if not (torch.is_tensor(pick) and pick.dim() == 1 and not pick.is_floating_point() and len(pick) <= self.m
                        and (len(pick) == 0 or (int(pick.min()) >= 0 and int(pick.max()) < len(idx)))):
                    raise UserError(f"coreset rule {self.name} returned {pick!r:.60} for class {c}; allowed: a 1-D "
                                    f"integer tensor of at most m={self.m} indices into its {len(idx)} images")
                keep.append(idx[pick])
        if keep:
            keep = torch.cat(keep)                        # (≤ m·|todo|,)
            self.tasks[key] = (x[keep.to(x.device)].cpu(), y[keep])
        return key

    @property
    def select(self):
        return self.rule if callable(self.rule) else SELECTORS[self.rule]

    @property
    def name(self):
        return f"{self.rule.__module__}.{self.rule.__qualname__}" if callable(self.rule) else self.rule

    def put(self, classes, x, y):
        """Set the images stored under the task of `classes` to x (n, C, H, W), y (n,) (n = 0 removes
        it), whatever the rule; kept on the CPU, labels as int64. What `nbytes` counts."""
        if not (torch.is_tensor(x) and torch.is_tensor(y) and x.dim() == 4 and y.shape == (len(x),)):
            raise UserError(f"Buffer.put: x {getattr(x, 'shape', x)!s:.40}, y {getattr(y, 'shape', y)!s:.40}; allowed: "
                            f"images (n, C, H, W) and labels (n,)")
        key = task_key(classes)
        if len(x):
            self.tasks[key] = (x.detach().cpu(), y.detach().cpu().long())
        else:
            self.tasks.pop(key, None)

    def __iter__(self):
        for key, (x, y) in self.tasks.items():
            yield key, x, y

    def __len__(self):
        return len(self.tasks)                  # number of stored tasks

    def __contains__(self, classes):
        return task_key(classes) in self.tasks

    def classes(self):
        """The set of class ids held, over all tasks."""
        return {int(c) for _, y in self.tasks.values() for c in y.unique()}

    @property
    def nbytes(self):
        """Bytes of the stored tensors: images + labels (what 'buffer bytes' reports)."""
        return sum(x.nbytes + y.nbytes for x, y in self.tasks.values())

    def state_dict(self):
        """Plain tensors, ints, strings and lists: safe for torch.load(weights_only=True)."""
        return {"m_per_class": self.m, "rule": self.name, "seed": self.seed,
                "keys": [list(k) for k in self.tasks],
                "x": [x for x, _ in self.tasks.values()],
                "y": [y for _, y in self.tasks.values()]}

    def load_state_dict(self, state):
        """A library rule is taken from `state`; a selector function cannot be, so it must be this one's."""
        if callable(self.rule) or state["rule"] not in SELECTORS:
            if state["rule"] != self.name:
                raise ValueError(f"a buffer of rule {state['rule']} restored into one of rule {self.name}")
        else:
            self.rule = state["rule"]
        self.m, self.seed = int(state["m_per_class"]), int(state["seed"])
        self.tasks = {tuple(k): (x, y) for k, x, y in zip(state["keys"], state["x"], state["y"])}
