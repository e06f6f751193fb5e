"""The baselines STAMP must beat, as small client-side pieces on the same loop (METHOD §1.7).

Each baseline changes local training in one place. `client.local_train` takes `extra_losses`
(functions whose values are added to the cross-entropy of every batch), an `after_backward`
hook (may edit the gradients before the optimiser step) and `memory` (buffer images joined to
every batch); a baseline is one of those, built here:

    FedProx   extra  (μ/2)·||w − θ||²                          pull towards the received model θ
    FL+EWC    extra  (λ/2)·Σ_i F_i (w_i − w*_i)²               F: diagonal Fisher at the end of each
                                                                task, w*: the weights then
    FL+LwF    extra  α·T²·KL(p_old^T || p^T) on old classes     distil the previous task's global model
    FL+ER     data   the current task's images + the buffer    (random selection, same buffer size;
                                                                replay_kcenter: k-center selection)
    FL+A-GEM  hook   g ← g − (g·g_ref / ||g_ref||²)·g_ref if g·g_ref < 0,  g_ref = gradient on a
                                                                buffer batch (Chaudhry et al., 2019)

The conventions, where the field has more than one (each is a Config field; the default is the
first, and gives what this library always gave):

    EWC    ewc_mode "online": ONE penalty, the Fisher summed over the tasks seen, anchored at the
           weights after the latest task (online EWC with decay 1, Schwarz et al. 2018);
           "separate": one penalty per old task, each with its own Fisher and anchor
           (Kirkpatrick et al. 2017). Both with the factor λ/2.
           Fisher: the *empirical* diagonal Fisher, mean over images of the squared per-image
           gradient of −log p(y|x) at the true label, on every image of the task
           (ewc_fisher_samples > 0: a seeded class-stratified sample of that many). Libraries that
           square the gradient of a *batch-averaged* loss (e.g. Avalanche's EWCPlugin with its
           batch size) get a Fisher about batch-size times smaller, so λ values do not transfer.
    LwF    lwf_t2 true: the distillation term is multiplied by T² (Hinton et al., 2015, so its
           gradient keeps its size as T changes); false: α·KL alone (Li & Hoiem, 2017; Avalanche).
    A-GEM  g_ref comes from agem_ref_size images (0: batch_size) drawn at random from the pooled
           buffer at every step (the A-GEM paper draws a fixed-size random subset of memory).
    ER     replay_share 0: the buffer joins the task's images in one pool that is shuffled and cut
           into batches, so a batch holds the buffer's share of the pool, which grows task by task
           (one client with a whole 712-image digits task: 7 %; each of 5 clients at cpt 2: 26 %
           of the second task's pool, 58 % of the fifth; bench/replay_share.py); s in (0, 0.9]:
           every batch of batch_size current images is joined by round(batch_size·s/(1−s)) buffer
           images (s = 0.5: as many as current ones, the default of Avalanche's replay loader), so
           an epoch is still one pass over the task.
    ER's buffer: "random" (client rule replay) or "k_center" (client rule replay_kcenter: greedy
           k-center on the end-of-task model's embeddings, coreset.select_k_center, the same m per
           class; issue 25's pre-registered search found it ahead of random replay at 1 and 2
           classes per task, docs/claims.md V6).

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


# ----------------------------------------------------------------------------- EWC

def stratified_sample(y, n, generator):
    """Indices of n images of labels y (n < len(y)) drawn at random, each class getting its share
    n·n_c/N rounded by largest remainder (ties: smaller class id), so a class-sorted task is
    sampled across all its classes, not from its first ones."""
    classes, counts = y.unique(return_counts=True)
    quota = counts.double() * n / len(y)
    take = quota.floor().long()
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]).item(), classes[i].item()))
    for i in order[:n - int(take.sum())]:
        take[i] += 1
    picks = [torch.nonzero(y == c).flatten()[torch.randperm(int(cnt), generator=generator)[:int(k)]]
             for c, cnt, k in zip(classes, counts, take)]
    return torch.cat(picks).sort().values


def fisher_diagonal(model, x, y, max_samples=0, generator=None):
    """Empirical diagonal Fisher: F_i = mean over images of (∂ log p(y|x) / ∂w_i)², computed one
    image at a time (exact, not the square of a batch gradient), on every image of (x, y), or on
    a class-stratified sample of `max_samples` of them (drawn with `generator`) when 0 < max_samples < len(y)."""
    if 0 < max_samples < len(y):
        idx = stratified_sample(y.cpu(), max_samples, generator)
        x, y = x[idx.to(x.device)], y[idx.to(y.device)]
    device = next(model.parameters()).device
    model.eval()
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1].to(device)), y[i:i + 1].to(device)).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                fisher[name] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {name: (f / len(y)).cpu() for name, f in fisher.items()}


def ewc_update_state(model, x, y, extra, mode="online", max_samples=0, generator=None):
    """End of a task: this task's Fisher and the current weights, kept by `mode`: online adds the
    Fisher to a running sum (extra["ewc_fisher"]) and re-anchors (extra["ewc_anchor"]); separate
    appends both to per-task lists (extra["ewc_fishers"], extra["ewc_anchors"])."""
    fisher = fisher_diagonal(model, x, y, max_samples, generator)
    anchor = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    if mode == "separate":
        extra.setdefault("ewc_fishers", []).append(fisher)
        extra.setdefault("ewc_anchors", []).append(anchor)
        return
    old = extra.get("ewc_fisher")
    extra["ewc_fisher"] = fisher if old is None else {n: old[n] + fisher[n] for n in fisher}
    extra["ewc_anchor"] = anchor


def ewc_loss(extra, lam, device):
    """EWC penalty Σ_j (λ/2)·Σ_i F_j,i (w_i − w*_j,i)² over the (Fisher, anchor) pairs kept: one
    pair in online mode, one per old task in separate mode. None before the first task ends."""
    if "ewc_fisher" in extra:
        pairs = [(extra["ewc_fisher"], extra["ewc_anchor"])]
    else:
        pairs = list(zip(extra.get("ewc_fishers", []), extra.get("ewc_anchors", [])))
    if not pairs:
        return None
    pairs = [({n: f.to(device) for n, f in fisher.items()}, {n: a.to(device) for n, a in anchor.items()})
             for fisher, anchor in pairs]

    def extra_loss(model, z, logits, xb, yb):
        return 0.5 * lam * sum((fisher[n] * (p - anchor[n]) ** 2).sum()
                               for fisher, anchor in pairs for n, p in model.named_parameters())
    return extra_loss


# ----------------------------------------------------------------------------- LwF

def lwf_loss(old_model, old_classes, alpha, temperature, t2=True):
    """LwF (Li & Hoiem, 2017): distil the old model's outputs on the old classes from current data,
    α·T²·KL(p_old^T || p^T) (t2=False: α·KL)."""
    if old_model is None or not old_classes:
        return None
    cols = torch.tensor(sorted(old_classes), device=next(old_model.parameters()).device)
    scale = alpha * (temperature ** 2 if t2 else 1.0)

    def extra(model, z, logits, xb, yb):
        with torch.no_grad():
            target = F.softmax(old_model(xb)[:, cols] / temperature, dim=1)
        log_p = F.log_softmax(logits[:, cols] / temperature, dim=1)
        return scale * F.kl_div(log_p, target, reduction="batchmean")
    return extra


# ----------------------------------------------------------------------------- ER and A-GEM

def replay_draws(n, m, generator):
    """Endless index tensors of m of the n buffer images: consecutive random permutations of
    range(n) cut m at a time, so every pass over the buffer sees each image once."""
    pool = torch.empty(0, dtype=torch.long)
    while True:
        while len(pool) < m:
            pool = torch.cat([pool, torch.randperm(n, generator=generator)])
        yield pool[:m]
        pool = pool[m:]


def replay_per_batch(batch_size, share):
    """Buffer images joined to every batch of `batch_size` current images so that they make `share`
    of it: round(batch_size·share/(1 − share)); 0 for share 0 (the pooled convention)."""
    return round(batch_size * share / (1 - share)) if share > 0 else 0


def agem_hook(buffer_x, buffer_y, batch_size, generator):
    """A-GEM: project the gradient so it does not increase the loss on a buffer batch of
    `batch_size` images drawn at random (without replacement) at every step."""
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
