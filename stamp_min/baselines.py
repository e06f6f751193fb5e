"""The baselines STAMP must beat, as small client-side pieces on the same loop (METHOD §1.7).

Each baseline changes local training in one place. `client.local_train` takes `extra_losses`
(functions whose values are added to the cross-entropy of every batch) and an `after_backward`
hook (may edit the gradients before the optimiser step); a baseline is one of those, built here:

    FedProx   extra  (μ/2)·||w − θ||²                         pull towards the received model θ
    FL+EWC    extra  (λ/2)·Σ_i F_i (w_i − w*_i)²              F: diagonal Fisher at the end of each
                                                               task, w*: the weights then
    FL+LwF    extra  α·T²·KL(p_old^T || p^T) on old classes    distil the previous task's global model
    FL+ER     data   the current task's images + the buffer   (random selection, same buffer size)
    FL+A-GEM  hook   g ← g − (g·g_ref / ||g_ref||²)·g_ref if g·g_ref < 0,  g_ref = gradient on a
                                                               buffer batch (Chaudhry et al., 2019)

The server is FedAvg for all of them. Client state they need (EWC's Fisher and anchor, LwF's old
model, the ER/A-GEM buffer) lives in `ClientState.extra` / `ClientState.buffer`, on the CPU.
"""

import torch
import torch.nn.functional as F


def fedprox_loss(global_params, mu):
    """FedProx (Li et al., 2020): (μ/2)·||w − θ||² over the trainable parameters."""
    def extra(model, z, logits, xb, yb):
        return 0.5 * mu * sum(((p - global_params[n]) ** 2).sum() for n, p in model.named_parameters())
    return extra


def fisher_diagonal(model, x, y, max_samples=256):
    """Empirical diagonal Fisher: F_i = mean over samples of (∂ log p(y|x) / ∂w_i)², computed one
    sample at a time (exact, not the square of a batch gradient) on up to `max_samples` images."""
    device = next(model.parameters()).device
    model.eval()
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    n = min(len(y), max_samples)
    for i in range(n):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1].to(device)), y[i:i + 1].to(device)).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                fisher[name] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {name: (f / n).cpu() for name, f in fisher.items()}


def ewc_update_state(model, x, y, extra):
    """End of a task: add this task's Fisher to the running sum and re-anchor at the current weights."""
    fisher = fisher_diagonal(model, x, y)
    old = extra.get("ewc_fisher")
    extra["ewc_fisher"] = fisher if old is None else {n: old[n] + fisher[n] for n in fisher}
    extra["ewc_anchor"] = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def ewc_loss(extra, lam, device):
    """EWC penalty (λ/2)·Σ F (w − w*)²; zero before the first task ends and at the anchor."""
    if "ewc_fisher" not in extra:
        return None
    fisher = {n: f.to(device) for n, f in extra["ewc_fisher"].items()}
    anchor = {n: a.to(device) for n, a in extra["ewc_anchor"].items()}

    def extra_loss(model, z, logits, xb, yb):
        return 0.5 * lam * sum((fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters())
    return extra_loss


def lwf_loss(old_model, old_classes, alpha, temperature):
    """LwF (Li & Hoiem, 2017): distil the old model's outputs on the old classes from current data."""
    if old_model is None or not old_classes:
        return None
    cols = torch.tensor(sorted(old_classes), device=next(old_model.parameters()).device)

    def extra(model, z, logits, xb, yb):
        with torch.no_grad():
            target = F.softmax(old_model(xb)[:, cols] / temperature, dim=1)
        log_p = F.log_softmax(logits[:, cols] / temperature, dim=1)
        return alpha * temperature ** 2 * F.kl_div(log_p, target, reduction="batchmean")
    return extra


def agem_hook(buffer_x, buffer_y, batch_size, generator):
    """A-GEM: project the gradient so it does not increase the loss on a buffer batch."""
    def after_backward(model):
        params = [p for p in model.parameters() if p.grad is not None]
        g = torch.cat([p.grad.flatten() for p in params])
        idx = torch.randperm(len(buffer_y), generator=generator)[:batch_size]
        device = params[0].device
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(buffer_x[idx].to(device)), buffer_y[idx].to(device)).backward()
        g_ref = torch.cat([p.grad.flatten() for p in params])
        g = agem_project(g, g_ref)
        offset = 0
        for p in params:
            p.grad.copy_(g[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return after_backward


def agem_project(g, g_ref):
    """g if it agrees with g_ref, else its projection onto the half-space {v : v·g_ref >= 0}."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - dot / torch.dot(g_ref, g_ref).clamp_min(1e-12) * g_ref
