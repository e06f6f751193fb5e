"""LoRA: low-rank adapters on the linear layers of any model (METHOD §2.1).

A frozen linear layer y = W0 x + b (W0: d×k, d outputs, k inputs) gets a trainable low-rank
increment:

    y = W0 x + b + s · B (A x),     A ∈ R^{r×k}, B ∈ R^{d×r},  s = α / r

- A starts Kaiming-uniform (the same rule nn.Linear uses for its weight: U(−1/√k, 1/√k)),
  B starts at zero, so a freshly injected model computes exactly what the base model does.
- Only A and B learn (plus any module you name in `trainable`, e.g. a new head); W0 and b are
  frozen. A client therefore sends r(d + k) numbers per module instead of d·k.
- `merge` folds s·BA into W0 (inference at zero extra cost); `unmerge` takes it out again.
- Dropout, when asked for, acts on the LoRA branch's input only, as in the original LoRA code.

The federated code (flora_na.py) sees a model's adapters as plain tensors:
`get_lora(model) -> {name: (A, B)}` and `set_lora(model, {name: (A, B)})`. All names are the
module names of `model.named_modules()`, e.g. "body.3" or "head".
"""

import fnmatch
import math

import torch
import torch.nn as nn

from . import UserError


def init_A(r, k, generator=None):
    """A fresh A factor (r, k): Kaiming-uniform with a=√5, i.e. U(−1/√k, 1/√k) like nn.Linear."""
    A = torch.empty(r, k)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A


class LoRALinear(nn.Module):
    """nn.Linear(k -> d) plus s·B A. The wrapped layer is kept as `self.base` (frozen)."""

    def __init__(self, base, r, alpha, dropout=0.0, generator=None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        d, k = base.weight.shape
        self.base, self.r, self.alpha, self.scale = base, r, alpha, alpha / r
        self.A = nn.Parameter(init_A(r, k, generator).to(base.weight))              # (r, k)
        self.B = nn.Parameter(torch.zeros(d, r).to(base.weight))                    # (d, r)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x):                          # x (..., k) -> (..., d)
        y = self.base(x)
        if self.merged:                            # s·BA already lives in base.weight
            return y
        return y + self.scale * (self.drop(x) @ self.A.T) @ self.B.T

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.scale * (self.B @ self.A)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.scale * (self.B @ self.A)
            self.merged = False

    def extra_repr(self):
        d, k = self.base.weight.shape
        return f"d={d}, k={k}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _matches(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def inject_lora(model, targets, r, alpha, dropout=0.0, trainable=(), generator=None):
    """Replace every nn.Linear whose name matches a pattern in `targets` by a LoRALinear.

    targets, trainable: module-name patterns (fnmatch: "head", "body.3", "*", "blocks.*.attn.*").
    Afterwards only the LoRA factors and the parameters of modules matching `trainable` require
    gradients. Works in place; returns the list of injected module names.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    trainable = [trainable] if isinstance(trainable, str) else list(trainable)
    if r < 1:
        raise UserError(f"rank={r} must be positive; allowed: >= 1")
    wrapped = {n + ".base" for n in lora_modules(model)}   # injecting twice must not wrap a wrapped W0
    linear = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n not in wrapped and _matches(n, targets)]
    if not linear:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise UserError(f"targets={targets} match no nn.Linear of the model; allowed: patterns over {names}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in linear:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, generator))
    for name, m in model.named_modules():
        if trainable and _matches(name, trainable):
            for p in m.parameters():
                p.requires_grad_(True)
    for m in lora_modules(model).values():     # a wrapped W0 stays frozen whatever `trainable` says
        m.A.requires_grad_(True)
        m.B.requires_grad_(True)
        for p in m.base.parameters():
            p.requires_grad_(False)
    return linear


def lora_modules(model):
    """{name: LoRALinear} in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def get_lora(model):
    """{name: (A (r,k), B (d,r))}: detached copies of every adapter's factors."""
    return {n: (m.A.detach().clone(), m.B.detach().clone()) for n, m in lora_modules(model).items()}


@torch.no_grad()
def set_lora(model, factors):
    """Copy {name: (A, B)} into the model's adapters (names must match exactly)."""
    mods = lora_modules(model)
    if set(factors) != set(mods):
        raise KeyError(f"LoRA modules differ: got {sorted(factors)}, model has {sorted(mods)}")
    for n, (A, B) in factors.items():
        if mods[n].merged:
            raise RuntimeError(f"{n} is merged; unmerge before setting its factors")
        mods[n].A.copy_(A)
        mods[n].B.copy_(B)


def merge_lora(model):
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model):
    for m in lora_modules(model).values():
        m.unmerge()


@torch.no_grad()
def fold_into_base(model, deltas):
    """W0 += s · Δ for {name: Δ (d, k)} given in product units (the units of B A)."""
    mods = lora_modules(model)
    for n, delta in deltas.items():
        mods[n].base.weight += mods[n].scale * delta.to(mods[n].base.weight)


def lora_shapes(model):
    """{name: (d, k, r)} of every adapter: what the payload accounting needs."""
    return {n: (*m.base.weight.shape, m.r) for n, m in lora_modules(model).items()}
