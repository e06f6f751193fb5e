"""MixStyle (Zhou et al., ICLR 2021): STAMP diversifies its small replayed buffer by mixing
per-instance feature statistics after an early block (METHOD §1.5; coreset.py is the buffer).

- `MixStyle`: the module; `mixstyle(model, ...)`: a context manager that hooks it after
  `model.early_block` while the buffer is replayed.

MixStyle's σ uses the biased (1/HW) variance, the original code the unbiased one: the output
depends on σ_mix/σ only, where the factor HW/(HW−1) cancels, so they agree up to eps, and ours
stays finite at H·W = 1. μ, σ are detached (constants in backward), as in the original code;
`detach=False` lets gradients flow through them too.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn


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
