"""The server: aggregation of client updates (METHOD §1.4).

Round r: the participating clients send updates Δ_k = θ_k − θ; the server moves the global
model θ ← θ + step, where

    FedAvg:  step = Σ_k n_k Δ_k / Σ_k n_k          (sample-size-weighted mean)

Communication per round is the full model down and up for each participating client, nothing
else.
"""

import torch


def weighted_mean(updates, weights):
    """Σ_k w_k Δ_k / Σ_k w_k over a list of {name: tensor} updates."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    return {name: sum(wk * u[name] for wk, u in zip(w, updates)) for name in updates[0]}


def aggregate(global_state, updates, weights, cfg):
    """New global state {name: tensor} from the clients' updates and sample counts."""
    step = weighted_mean(updates, weights)
    return {name: global_state[name] + step[name] for name in global_state}


def participants(num_clients, fraction, generator):
    """The sorted ids of the clients taking part in a round: max(1, round(fraction·K)) of them."""
    m = max(1, round(fraction * num_clients))
    return sorted(torch.randperm(num_clients, generator=generator)[:m].tolist())
