"""The server: aggregation of client updates, FedAvg or spatial gradient matching (SAM, METHOD §1.4).

Round r: the participating clients send updates Δ_k = θ_k − θ; the server moves the global
model θ ← θ + step, where

    FedAvg:  step = Σ_k n_k Δ_k / Σ_k n_k                (sample-size-weighted mean)
    SAM:     step = η_s · GM(Δ_1, …, Δ_K)                (server GM settings, METHOD §1.2)

GM treats clients alike (no sample weights), as in the paper. With one participant there is
nothing to match and SAM passes its update through (scaled by η_s). GM and η_s act on the
trainable parameters; BatchNorm running statistics are averaged as in FedAvg. Communication per round is
the full model down and up for each participating client, nothing else, for both rules.

The server optimiser (`cfg.server_opt`, Reddi et al. 2021, "Adaptive Federated Optimization")
then treats the rule's step s = θ' − θ as a pseudo-gradient, on the trainable parameters
(BatchNorm statistics keep the rule's value: a moment on a variance could make it negative):

    sgd:       θ ← θ + η s                              (η = server_lr; η = 1: the rule's θ' itself)
    momentum:  m ← β m + s,              θ ← θ + η m     (FedAvgM; β = server_momentum, m₀ = 0)
    adam:      m ← β₁ m + (1 − β₁) s,  v ← β₂ v + (1 − β₂) s²,  θ ← θ + η m / (√v + τ)
               (FedAdam; β₁ = server_momentum, β₂ = server_beta2, τ = server_tau; m₀ = 0, v₀ = τ²
               as the paper's v₋₁ ≥ τ², no bias correction, as in the paper)

Its moments live in the `ServerState`, with what a server rule of yours keeps between rounds
(`extra`) and what it sends to every client with θ (`broadcast`); checkpoints and the Flower
ServerApp carry it, so a resumed run continues exactly.
"""

from dataclasses import dataclass, field

import torch

from . import gradmatch

SERVER_RULES = ("mean", "gm")      # cfg.server_rule (config.py): FedAvg | SAM
SERVER_OPTS = ("sgd", "momentum", "adam")    # cfg.server_opt


@dataclass
class ServerState:
    """What the server keeps between rounds (made by `new_server_state`, on the CPU or θ's device)."""
    opt: dict = field(default_factory=dict)        # the optimiser's moments: {"m": {name: tensor}, "v": {...}}
    extra: dict = field(default_factory=dict)      # a server rule's own memory: numbers, strings, tensors, lists, dicts
    broadcast: dict = field(default_factory=dict)  # {name: tensor} sent with θ to every client (ClientState.server)
    rounds: int = 0                                # server steps taken


def new_server_state(cfg):
    """The server's state before the first round (a variant may return one with `extra` filled)."""
    return ServerState()


def state_dict(state):
    """A ServerState as plain tensors, numbers, strings, lists and dicts (checkpoints)."""
    return {"opt": state.opt, "extra": state.extra, "broadcast": state.broadcast, "rounds": state.rounds}


def restore(state, d, device="cpu"):
    """Fill `state` (made by the run's new_server_state) with what `state_dict` saved; the optimiser's
    moments and the broadcast go to θ's device."""
    to = lambda x: {n: v.to(device) for n, v in x.items()}                 # noqa: E731
    state.opt = {k: to(v) for k, v in d["opt"].items()}
    state.extra, state.broadcast, state.rounds = d["extra"], to(d["broadcast"]), int(d["rounds"])
    return state


def summary(state):
    """What a results file records of the server's state: the steps taken and the names it holds."""
    return {"rounds": state.rounds, "opt": sorted(state.opt), "extra": sorted(map(str, state.extra)),
            "broadcast": sorted(state.broadcast)}


def server_step(theta, new, state, cfg, params):
    """θ'' by the server optimiser from θ and the server rule's θ' (see the top of this file), over
    `params`; updates the moments in `state.opt`. sgd with server_lr 1 returns θ' untouched."""
    state.rounds += 1
    if cfg.server_opt == "sgd" and cfg.server_lr == 1:
        return new
    out, lr, b1 = dict(new), cfg.server_lr, cfg.server_momentum
    m = state.opt.setdefault("m", {}) if cfg.server_opt != "sgd" else {}     # {name: tensor}, from the first step
    v = state.opt.setdefault("v", {}) if cfg.server_opt == "adam" else {}
    for n in params:
        s = new[n] - theta[n]                                          # the rule's step: a pseudo-gradient
        if cfg.server_opt == "sgd":
            u = s
        elif cfg.server_opt == "momentum":
            m[n] = u = b1 * m[n] + s if n in m else s                  # m₀ = 0
        else:
            m[n] = b1 * m[n] + (1 - b1) * s if n in m else (1 - b1) * s
            prev = v[n] if n in v else torch.full_like(s, cfg.server_tau ** 2)
            v[n] = cfg.server_beta2 * prev + (1 - cfg.server_beta2) * s * s
            u = m[n] / (v[n].sqrt() + cfg.server_tau)
        out[n] = theta[n] + lr * u
    return out


def weighted_mean(updates, weights):
    """Σ_k w_k Δ_k / Σ_k w_k over a list of {name: tensor} updates."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    return {name: sum(wk * u[name] for wk, u in zip(w, updates)) for name in updates[0]}


def aggregate(theta, updates, weights, cfg, params=None, G=None, match=gradmatch.match, state=None, infos=None):
    """(new global state, the step taken) from the clients' updates and sample counts, by the
    server rule `cfg.server_rule`: mean (FedAvg) or gm (SAM, matching with `match`).

    params: the names of the trainable parameters (default: every entry). SAM matches those
    only; the other entries (BatchNorm running statistics) get the sample-weighted mean, as in
    FedAvg: scaling statistics by GM's weights could make a variance negative.
    G: the Gram matrix of the updates' `params` entries, if the caller has it already.
    state, infos: the ServerState and the clients' infos (client_update's second result, in the
    updates' order); this rule needs neither (the server optimiser runs after it, in the loop).
    A variant is a function with this signature (without `match`; `state` and `infos` only if it
    uses them), passed to `fcl_loop.run`."""
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
