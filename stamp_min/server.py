"""The server: aggregation of client updates, FedAvg or spatial gradient matching (SAM, METHOD §1.4).

Round r: the participating clients send updates Δ_k = θ_k − θ; the server moves the global
model θ ← θ + step, where

    FedAvg:  step = Σ_k n_k Δ_k / Σ_k n_k                (sample-size-weighted mean)
    SAM:     step = η_s · GM(Δ_1, …, Δ_K)                (server GM settings, METHOD §1.2)

GM treats clients alike (no sample weights), as in the paper. With one participant there is
nothing to match and SAM passes its update through (scaled by η_s). Communication per round is
the full model down and up for each participating client, nothing else, for both rules.
"""

import torch

from . import gradmatch

SAM_METHODS = ("stamp", "stamp_sam")


def weighted_mean(updates, weights):
    """Σ_k w_k Δ_k / Σ_k w_k over a list of {name: tensor} updates."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    return {name: sum(wk * u[name] for wk, u in zip(w, updates)) for name in updates[0]}


def aggregate(theta, updates, weights, cfg, G=None):
    """(new global state, the step taken) from the clients' updates and sample counts.
    G: the updates' Gram matrix if the caller has it already (SAM needs it)."""
    if cfg.method in SAM_METHODS and len(updates) > 1:
        matched = gradmatch.match(updates, c=cfg.gm_c, solver=cfg.gm_solver, normalize=cfg.gm_normalize, G=G,
                                  **gradmatch.SERVER)
        step = {name: cfg.eta_s * v for name, v in matched.items()}
    elif cfg.method in SAM_METHODS:
        step = {name: cfg.eta_s * v for name, v in updates[0].items()}
    else:
        step = weighted_mean(updates, weights)
    return {name: theta[name] + step[name] for name in theta}, step


def agreement(updates, step):
    """Mean cosine between each update and `step` (how well one combined direction serves each)."""
    dots = torch.zeros(len(updates), dtype=torch.float64)
    norms = torch.zeros(len(updates), dtype=torch.float64)
    step_norm = 0.0
    for name, s in step.items():
        s = s.double().flatten()
        step_norm += s.dot(s).item()
        for i, u in enumerate(updates):
            u = u[name].double().flatten()
            dots[i] += u.dot(s).item()
            norms[i] += u.dot(u).item()
    cos = dots / (norms.sqrt() * step_norm ** 0.5).clamp_min(1e-30)
    return cos.mean().item()


def participants(num_clients, fraction, generator):
    """The sorted ids of the clients taking part in a round: max(1, round(fraction·K)) of them."""
    m = max(1, round(fraction * num_clients))
    return sorted(torch.randperm(num_clients, generator=generator)[:m].tolist())
