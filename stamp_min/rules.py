"""The rules of a run: the five functions the loop calls, their names, and the checks on them.

    client_update(model, theta, state, x, y, classes, cfg) -> (Δ {name: tensor}, info {"loss": float, …})
    end_task(model, theta, state, x, y, classes, cfg)          at a task's end, θ = the final model
    new_state(k, cfg) -> client.ClientState                     client k before its first round
    aggregate(theta, updates, weights, cfg, params=None, G=None) -> (θ', step)
    match(updates, c=, solver=, normalize=, G=, **solver settings) -> the matched update

The library's own (DEFAULTS) pick their behaviour from `cfg.client_rule` / `cfg.server_rule`;
its `client_update` (TAM) and `aggregate` (SAM) take one more argument, the `match` in use, which
`bind` fixes. A user's rule is any function with the signature above. A run records every
rule's qualified name (a lambda with its line, a functools.partial with what it fixes), so a
results file says what produced it and a resume can refuse other functions.

What the rules `bind` returns check (the loop and the Flower apps call only those), so that a
variant's mistake is one clear line and never a silent wrong result: every rule is a function; a
`match` that nothing would call is refused; a rule may not change θ in place (θ is shared by every
client of a round); Δ and θ' have θ's names and shapes and are finite; `new_state` returns client
k's ClientState with its own random stream.
"""

import functools
import re

import torch

from . import UserError, client, gradmatch, server

DEFAULTS = {"client_update": client.client_update, "end_task": client.end_task, "new_state": client.new_state,
            "aggregate": server.aggregate, "match": gradmatch.match}


def qualname(fn):
    """"module.qualified_name" of a function; a lambda adds its line ("…<lambda>:12"); a partial
    shows what it fixes ("stamp_min.server.aggregate(match=mymodule.per_layer)")."""
    if isinstance(fn, functools.partial):
        show = lambda v: qualname(v) if callable(v) else repr(v)             # noqa: E731
        fixed = [show(a) for a in fn.args] + [f"{k}={show(v)}" for k, v in fn.keywords.items()]
        return f"{qualname(fn.func)}({', '.join(fixed)})"
    name = f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    code = getattr(fn, "__code__", None)
    return f"{name}:{code.co_firstlineno}" if "<lambda>" in name and code is not None else name


def short(fn):
    """A short, file-name-safe name: "pcgrad"; "aggregate-per_layer" for partial(aggregate, match=per_layer)."""
    if isinstance(fn, functools.partial):
        return "-".join([short(fn.func)] + [short(v) for v in (*fn.args, *fn.keywords.values()) if callable(v)])
    return re.sub(r"\W+", "_", getattr(fn, "__name__", type(fn).__name__)).strip("_") or "rule"


def bind(client_update=None, end_task=None, new_state=None, aggregate=None, match=None):
    """(the rules to call {keyword: function}, their qualified names {keyword: str}, the short names
    of the rules that are not the library's {keyword: str}). A rule not given is the library's.
    The rules to call are the given ones wrapped in the checks below (`checked`): what the loop and
    the Flower apps call, so no caller repeats a check."""
    given = {"client_update": client_update, "end_task": end_task, "new_state": new_state, "aggregate": aggregate,
             "match": match}
    for k, v in given.items():
        if v is not None and not callable(v):
            raise UserError(f"{k}={v!r} is not a function; allowed: a function like {qualname(DEFAULTS[k])}")
    own = {k: v for k, v in given.items() if v is not None and v is not DEFAULTS[k]}
    if "match" in own and "client_update" in own and "aggregate" in own:
        raise UserError(f"match={qualname(match)} would never be called: only the library's client_update and aggregate "
                        f"call it; allowed: leave match out, and call it from your own rules")
    fns = {k: given[k] if given[k] is not None else DEFAULTS[k] for k in given}
    names = {k: qualname(v) for k, v in fns.items()}
    for k in ("client_update", "aggregate"):
        if fns[k] is DEFAULTS[k]:
            fns[k] = functools.partial(fns[k], match=fns["match"])
    return checked(fns, names), names, {k: short(v) for k, v in own.items()}


def run_name(cfg, own):
    """`cfg.name`, else the preset (or client+server) followed by the short names of the rules that
    are not the library's (own: {keyword: short name}): "fedavg-pcgrad" for run(…, aggregate=pcgrad)."""
    return cfg.name or "-".join([cfg.label, *(own[k] for k in DEFAULTS if k in own)])


# ----------------------------------------------------------------------------- checks

def versions(theta):
    """In-place write counters of θ's tensors (torch bumps a tensor's _version on every in-place op)."""
    return [v._version for v in theta.values()]


def untouched(theta, rule, fn, *args, **kw):
    """fn(*args, **kw), and a UserError naming `rule` if it changed θ in place."""
    before = versions(theta)
    out = fn(*args, **kw)
    if versions(theta) != before:
        raise UserError(f"{rule} changed θ in place; allowed: a rule that returns new tensors (θ is shared by every "
                        f"client of the round and by the server)")
    return out


def like(tensors, theta, what):
    """`tensors` has θ's names and shapes (and finite values)."""
    if not isinstance(tensors, dict) or set(tensors) != set(theta):
        keys = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise UserError(f"{what} has entries {keys}; allowed: θ's entries {sorted(theta)}")
    for n, v in tensors.items():
        if not torch.is_tensor(v) or v.shape != theta[n].shape:
            got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise UserError(f"{what}[{n!r}] is {got}; allowed: a tensor of θ's shape {tuple(theta[n].shape)}")
        if not torch.isfinite(v).all():
            raise UserError(f"{what}[{n!r}] is not finite (NaN/inf); allowed: finite values")


def checked_update(out, theta, name):
    """client_update's (Δ, info), checked."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) and "loss" in out[1]):
        raise UserError(f"client_update={name} returned {type(out).__name__}; allowed: (Δ {{name: tensor}}, "
                        f"info {{'loss': float, ...}})")
    like(out[0], theta, f"client_update={name}: Δ")
    return out


def checked_aggregate(out, theta, name):
    """aggregate's θ', checked (the step the loop logs is θ' − θ, measured)."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise UserError(f"aggregate={name} returned {type(out).__name__}; allowed: (θ' {{name: tensor}}, step)")
    like(out[0], theta, f"aggregate={name}: θ'")
    return out[0]


def checked_state(state, k, name):
    if not (isinstance(state, client.ClientState) and state.client_id == k and isinstance(state.rng, torch.Generator)):
        raise UserError(f"new_state={name} returned {state!r:.80} for client {k}; allowed: a client.ClientState with "
                        f"client_id={k} and its own torch.Generator as rng")
    return state


def checked(fns, names):
    """The rules with the checks around them. client_update, end_task and new_state keep their
    signatures and results; aggregate returns θ' alone (the loop measures the step as θ' − θ)."""
    def client_update(model, theta, *rest):
        out = untouched(theta, f"client_update={names['client_update']}", fns["client_update"], model, theta, *rest)
        return checked_update(out, theta, names["client_update"])

    def end_task(model, theta, *rest):
        untouched(theta, f"end_task={names['end_task']}", fns["end_task"], model, theta, *rest)

    def new_state(k, cfg):
        return checked_state(fns["new_state"](k, cfg), k, names["new_state"])

    def aggregate(theta, updates, weights, cfg, params=None, G=None):
        out = untouched(theta, f"aggregate={names['aggregate']}", fns["aggregate"], theta, updates, weights, cfg,
                        params=params, G=G)
        return checked_aggregate(out, theta, names["aggregate"])
    return {"client_update": client_update, "end_task": end_task, "new_state": new_state, "aggregate": aggregate,
            "match": fns["match"]}
