"""The server: aggregation of client updates, FedAvg or spatial gradient matching (SAM, METHOD §1.4).

Round r: the participating clients send updates Δ_k = θ_k − θ; the server moves the global
model θ ← θ + step, where

    FedAvg:  step = Σ_k n_k Δ_k / Σ_k n_k                (sample-size-weighted mean)
    SAM:     step = η_s · GM(Δ_1, …, Δ_K)                (server GM settings, METHOD §1.2)

GM treats clients alike (no sample weights), as in the paper. With one participant there is
nothing to match and SAM passes its update through (scaled by η_s). GM and η_s act on the
trainable parameters; BatchNorm running statistics are averaged as in FedAvg. Communication per round is
the full model down and up for each participating client, nothing else, for both rules.
"""

import torch

from . import gradmatch

SERVER_RULES = ("mean", "gm")      # cfg.server_rule (config.py): FedAvg | SAM


def weighted_mean(updates, weights):
    """Σ_k w_k Δ_k / Σ_k w_k over a list of {name: tensor} updates."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    return {name: sum(wk * u[name] for wk, u in zip(w, updates)) for name in updates[0]}


def aggregate(theta, updates, weights, cfg, params=None, G=None, match=gradmatch.match):
    """(new global state, the step taken) from the clients' updates and sample counts, by the
    server rule `cfg.server_rule`: mean (FedAvg) or gm (SAM, matching with `match`).

    params: the names of the trainable parameters (default: every entry). SAM matches those
    only; the other entries (BatchNorm running statistics) get the sample-weighted mean, as in
    FedAvg: scaling statistics by GM's weights could make a variance negative.
    G: the Gram matrix of the updates' `params` entries, if the caller has it already.
    A variant is a function with this signature (without `match`), passed to `fcl_loop.run`."""
    if cfg.server_rule == "mean":
        step = weighted_mean(updates, weights)
    else:
        params = list(theta) if params is None else params
        p_updates = [{n: u[n] for n in params} for u in updates]
        matched = (match(p_updates, c=cfg.gm_c, solver=cfg.gm_solver, normalize=cfg.gm_normalize, G=G,
                         **gradmatch.SERVER) if len(updates) > 1 else p_updates[0])
        rest = [n for n in theta if n not in matched]                    # BatchNorm statistics: plain mean
        step = weighted_mean([{n: u[n] for n in rest} for u in updates], weights) if rest else {}
        step.update({n: cfg.eta_s * v for n, v in matched.items()})
    return {name: theta[name] + step[name] for name in theta}, step


def participants(num_clients, fraction, generator):
    """The sorted ids of the clients taking part in a round: max(1, round(fraction·K)) of them."""
    m = max(1, round(fraction * num_clients))
    return sorted(torch.randperm(num_clients, generator=generator)[:m].tolist())
