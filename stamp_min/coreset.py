"""The prototypical coreset and MixStyle: STAMP's "network-free" memory (METHOD §1.5).

STAMP keeps no generative model. After each task a client keeps a few raw images per class
(the coreset M_j of task j) and replays them later, when temporal gradient matching (TAM,
METHOD §1.3) needs an update Δ_j for every previous task j. The pieces:

- `prototypes`: the prototype p_c of class c is the mean embedding z = f(x) of its images,
  f = `model.features` (the model minus its last linear layer).
- Selection of m images of one class, three rules with one signature, (n, D) -> (m,) indices:
  `select_prototypical` (greedy herding, iCaRL: each pick makes the mean of the picked
  embeddings closest to p_c), `select_nearest` (the m closest to p_c), `select_random`.
- `Buffer`: the bounded store, m raw images per class, filled at the end of a task, keyed by the
  task's class set (a recurring task is stored once), iterated per past task during TAM.
- `MixStyle` + the `mixstyle(model, ...)` context manager: mixes per-instance feature statistics
  after an early block, to diversify the small buffer when it is replayed.

Paper vs our reading. The paper states a prototypical, model-agnostic coreset and MixStyle; the
authors' public code has no working coreset (METHOD §1.3). Our reading [METHOD §1.5]: herding
towards p_c, raw images, m per class, MixStyle on only while replaying the buffer (Beta(0.1, 0.1)
per METHOD; the MixStyle release defaults to 0.3). Choices neither the paper nor METHOD fix:
- Herding runs in float64 (ties: lowest index) on the end-of-task model's features, eval mode.
- A class already held under an earlier task (overlapping class sets) is not stored again, so no
  class ever has more than m images; the first task keeps it.
- MixStyle's σ uses the biased (1/HW) variance, the original code the unbiased one: the output
  depends on σ_mix/σ only, where the factor HW/(HW−1) cancels, so they agree up to eps, and
  ours stays finite at H·W = 1. μ, σ are detached (constants in backward), as in the original
  code (Zhou et al., ICLR 2021); `detach=False` lets gradients flow through them too.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn

from . import UserError

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


SELECTORS = {"prototypical": select_prototypical, "random": select_random,
             "nearest": select_nearest, "prototypical_l2": select_prototypical_l2}

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

    `rule` is a key of SELECTORS; `seed` feeds the random rule (class c uses seed + c). Images
    keep the dtype they arrive in (uint8 for our datasets) and live on the CPU; labels are int64.
    `for key, x, y in buffer` yields the stored tasks in the order they were added.
    """

    def __init__(self, m_per_class, rule="prototypical", seed=0):
        if rule not in SELECTORS:
            raise UserError(f"coreset rule={rule!r} is unknown; allowed: {', '.join(SELECTORS)}")
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
                keep.append(idx[SELECTORS[self.rule](z[idx], self.m, seed=self.seed + c)])
        if keep:
            keep = torch.cat(keep)                        # (≤ m·|todo|,)
            self.tasks[key] = (x[keep.to(x.device)].cpu(), y[keep])
        return key

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
        return {"m_per_class": self.m, "rule": self.rule, "seed": self.seed,
                "keys": [list(k) for k in self.tasks],
                "x": [x for x, _ in self.tasks.values()],
                "y": [y for _, y in self.tasks.values()]}

    def load_state_dict(self, state):
        self.m, self.rule, self.seed = int(state["m_per_class"]), state["rule"], int(state["seed"])
        self.tasks = {tuple(k): (x, y) for k, x, y in zip(state["keys"], state["x"], state["y"])}

# ---------------------------------------------------------------------------------------------
# MixStyle


class MixStyle(nn.Module):
    """Mix per-instance, per-channel feature statistics within a batch (Zhou et al., ICLR 2021).

    For x (B, C, H, W): μ, σ = mean and sqrt(var + eps) over (H, W); a random permutation of the
    batch gives (μ', σ'); λ ~ Beta(alpha, alpha) per instance;
        out = (λσ + (1−λ)σ') · (x − μ)/σ + (λμ + (1−λ)μ').
    Applied with probability p per forward, and only in training mode (identity in eval mode).
    `generator` (a CPU torch.Generator) makes the coin, the permutation and λ reproducible.
    """

    def __init__(self, p=0.5, alpha=0.1, eps=1e-6, detach=True, generator=None):
        super().__init__()
        self.p, self.alpha, self.eps, self.detach, self.generator = p, alpha, eps, detach, generator

    def forward(self, x):                       # (B, C, H, W) -> (B, C, H, W)
        drawn = self.draw(x.size(0))
        return x if drawn is None else self.mix(x, drawn[0].to(x.device), drawn[1])

    def draw(self, n):
        """The random draws of one forward on a batch of n, in this order: None (no mixing: eval
        mode, p = 0, or the coin said no) or (permutation (n,), λ (n,)). clones.py draws ahead."""
        if not self.training or self.p <= 0:
            return None
        if torch.rand((), generator=self.generator).item() >= self.p:
            return None
        return torch.randperm(n, generator=self.generator), self._beta(n)

    def mix(self, x, perm, lam):
        """The mixing itself, with a given permutation (B,) and λ (a float or (B,))."""
        lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        mu = x.mean((2, 3), keepdim=True)                                  # (B, C, 1, 1)
        sig = (x.var((2, 3), keepdim=True, unbiased=False) + self.eps).sqrt()
        if self.detach:
            mu, sig = mu.detach(), sig.detach()
        mu_mix = lam * mu + (1 - lam) * mu[perm]
        sig_mix = lam * sig + (1 - lam) * sig[perm]
        return sig_mix * (x - mu) / sig + mu_mix

    def _beta(self, n):
        """(n,) draws of Beta(alpha, alpha), on the CPU; torch.distributions takes no generator, so
        with one we seed the CPU's default generator from it inside fork_rng, which restores it
        (only the CPU's: torch.manual_seed would also re-seed every CUDA generator, unrestored)."""
        beta = torch.distributions.Beta(float(self.alpha), float(self.alpha))
        if self.generator is None:
            return beta.sample((n,))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(torch.randint(2**62, (), generator=self.generator)))
            return beta.sample((n,))

    def extra_repr(self):
        return f"p={self.p}, alpha={self.alpha}, eps={self.eps}, detach={self.detach}"


@contextmanager
def mixstyle(model, ms=None):
    """Insert MixStyle after `model.early_block` for the duration of a `with` block.

        with mixstyle(model, MixStyle(p=0.5, alpha=0.1)):
            ...train on the replayed buffer...

    `ms` is not made a child of the model, so model.train()/eval() never reach it. The hook
    therefore mixes only when the hooked block is in training mode (which model.train()/eval()
    does set) AND ms.training is True (ms.eval() switches it off by hand). For
    `model.early_layout == "nhwc"` (Swin) the block's (B, H, W, C) output is viewed as NCHW
    for the mixing and permuted back. The hook is removed on exit, also on an exception.
    """
    ms = MixStyle() if ms is None else ms
    block = model.get_submodule(model.early_block)
    nhwc = model.early_layout == "nhwc"

    def hook(module, inputs, out):
        if not module.training:
            return out
        if nhwc:                                # (B, H, W, C) -> (B, C, H, W) -> back
            return ms(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return ms(out)

    handle = block.register_forward_hook(hook)
    try:
        yield ms
    finally:
        handle.remove()
