"""The rules of a run: the six functions the loop calls, their names, and the checks on them.

    client_update(model, theta, state, x, y, classes, cfg) -> (Δ {name: tensor}, info {"loss": float, …})
    end_task(model, theta, state, x, y, classes, cfg)          at a task's end, θ = the final model
    new_state(k, cfg) -> client.ClientState                     client k before its first round
    aggregate(theta, updates, weights, cfg, params=None, G=None[, state=None][, infos=None]) -> (θ', step)
    new_server_state(cfg) -> server.ServerState                 the server before its first round
    match(updates, c=, solver=, normalize=, G=, **solver settings) -> the matched update

Rules with memory: a client keeps its own in its ClientState (`extra`, `buffer`; `state.server`
holds what the server broadcast this round); the server keeps its own in the ServerState that
`new_server_state` makes: an `aggregate` that names a `state` parameter gets it (and may change
`state.extra` and `state.broadcast`), one that names `infos` gets the clients' infos (client_update's
second result, numbers and tensors) in the updates' order. Both states are checkpointed. After
`aggregate`, the server optimiser (cfg.server_opt, server.py) takes the step.

The library's own (DEFAULTS) pick their behaviour from `cfg.client_rule` / `cfg.server_rule`;
its `client_update` (TAM) and `aggregate` (SAM) take one more argument, the `match` in use, which
`bind` fixes. A user's rule is any function with the signature above. A run records every
rule's qualified name (a lambda with its line, a functools.partial with what it fixes, a closure
with the numbers, strings and functions it holds), so a results file says what produced it and a
resume refuses other functions or other values.

What the rules `bind` returns check (the loop and the Flower apps call only those), so that a
variant's mistake is one clear line naming the rule and never a silent wrong result: every rule is
a function; a `match` that nothing would call is refused, and one that cannot take the library's
arguments too; a rule gets θ as a dict of its own, so replacing an entry is seen, and may not
change θ's tensors in place (θ is shared by every client of a round); Δ and θ' have θ's names,
shapes, dtypes and device and are finite, and so is what `match` returns; `new_state` returns client
k's ClientState with its own random stream, `new_server_state` a ServerState.
"""

import functools
import inspect
import re

import torch

from . import UserError, client, gradmatch, server

DEFAULTS = {"client_update": client.client_update, "end_task": client.end_task, "new_state": client.new_state,
            "aggregate": server.aggregate, "new_server_state": server.new_server_state, "match": gradmatch.match}
SHOWN = (int, float, str, bool, type(None))         # closure values a name shows (and functions, by their names)


def qualname(fn, depth=0):
    """"module.qualified_name" of a function; a lambda adds its line ("…<lambda>:12"); a partial
    shows what it fixes ("stamp_min.server.aggregate(match=mymodule.per_layer)"); a closure the
    numbers, strings and functions it holds ("mymodule.momentum.<locals>.rule[beta=0.9]"), so two
    runs of one rule with other values have other names. A closure's other values (a list, a tensor)
    are left out of its name; a partial shows their type."""
    show = lambda v: (qualname(v, depth + 1) if depth < 3 else "…") if callable(v) else (   # noqa: E731
        repr(v)[:40] if isinstance(v, SHOWN) else f"<{type(v).__name__}>")
    if isinstance(fn, functools.partial):
        fixed = [show(a) for a in fn.args] + [f"{k}={show(v)}" for k, v in fn.keywords.items()]
        return f"{qualname(fn.func, depth + 1)}({', '.join(fixed)})"
    name = f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    code = getattr(fn, "__code__", None)
    name = f"{name}:{code.co_firstlineno}" if "<lambda>" in name and code is not None else name
    cells = [(n, c) for n, c in zip(getattr(code, "co_freevars", ()), getattr(fn, "__closure__", None) or ())]
    held = []
    for n, c in cells:
        try:
            v = c.cell_contents
        except ValueError:                                                   # a cell not yet filled
            continue
        if callable(v) or isinstance(v, SHOWN):
            held.append(f"{n}={show(v)}")
    return f"{name}[{', '.join(held)}]" if held else name


def short(fn):
    """A short, file-name-safe name: "pcgrad"; "aggregate-per_layer" for partial(aggregate, match=per_layer)."""
    if isinstance(fn, functools.partial):
        return "-".join([short(fn.func)] + [short(v) for v in (*fn.args, *fn.keywords.values()) if callable(v)])
    return re.sub(r"\W+", "_", getattr(fn, "__name__", type(fn).__name__)).strip("_") or "rule"


def uses_match(k, cfg):
    """Whether the library's rule `k` (client_update or aggregate) calls match under cfg's rules."""
    return cfg is None or (cfg.client_rule == "tam" if k == "client_update" else cfg.server_rule == "gm")


def check_match(match, name):
    """match can take what the library's TAM and SAM pass it."""
    try:
        inspect.signature(match).bind([{}], c=0.25, solver="exact", normalize=False, G=None, **gradmatch.SERVER)
    except TypeError as e:
        raise UserError(f"match={name} cannot be called as match(updates, c=, solver=, normalize=, G=, steps=, momentum=) "
                        f"({e}); allowed: def match(updates, c=0.25, solver='exact', normalize=False, G=None, **settings)")
    except ValueError:                                                       # no signature to read (a builtin)
        pass


def bind(client_update=None, end_task=None, new_state=None, aggregate=None, match=None, new_server_state=None, *,
         cfg=None, calls=("client_update", "aggregate")):
    """(the rules to call {keyword: function}, their qualified names {keyword: str}, the short names
    of the rules that are not the library's {keyword: str}). A rule not given is the library's.
    The rules to call are the given ones wrapped in the checks below (`checked`): what the loop and
    the Flower apps call, so no caller repeats a check. cfg (resolved): the run's settings, to tell
    whether anything calls a given `match`; calls: the rules this process runs that could (the
    Flower server runs aggregate only, a Flower client client_update only)."""
    given = {"client_update": client_update, "end_task": end_task, "new_state": new_state, "aggregate": aggregate,
             "new_server_state": new_server_state, "match": match}
    for k, v in given.items():
        if v is not None and not callable(v):
            raise UserError(f"{k}={v!r} is not a function; allowed: a function like {qualname(DEFAULTS[k])}")
    own = {k: v for k, v in given.items() if v is not None and v is not DEFAULTS[k]}
    if "match" in own:
        if not [k for k in calls if k not in own and uses_match(k, cfg)]:
            rules = f" (client rule {cfg.client_rule}, server rule {cfg.server_rule})" if cfg is not None else ""
            raise UserError(f"match={qualname(match)} would never be called: only the library's client_update with "
                            f"client rule tam and aggregate with server rule gm call it{rules}; allowed: leave match "
                            f"out, or call it from your own rules")
        check_match(match, qualname(match))
    fns = {k: given[k] if given[k] is not None else DEFAULTS[k] for k in given}
    names = {k: qualname(v) for k, v in fns.items()}
    return checked(fns, names), names, {k: short(v) for k, v in own.items()}


def run_name(cfg, own):
    """`cfg.name`, else the preset (or client+server) followed by the short names of the rules that
    are not the library's (own: {keyword: short name}): "fedavg-pcgrad" for run(…, aggregate=pcgrad)."""
    return cfg.name or "-".join([cfg.label, *(own[k] for k in DEFAULTS if k in own)])


# ----------------------------------------------------------------------------- checks

def versions(theta):
    """In-place write counters of θ's tensors (torch bumps a tensor's _version on every in-place op)."""
    return [v._version for v in theta.values()]


def untouched(theta, rule, call):
    """call(a dict of θ's own) and a UserError naming `rule` if it replaced an entry of that dict or
    changed a tensor of θ in place: θ is shared by every client of a round and by the server."""
    view, before = dict(theta), versions(theta)
    out = call(view)
    if view.keys() != theta.keys() or any(view[n] is not v for n, v in theta.items()):
        raise UserError(f"{rule} replaced entries of θ (theta[name] = … or theta.update(…)); allowed: a rule that "
                        f"returns new tensors and leaves θ as it came")
    if versions(theta) != before:
        raise UserError(f"{rule} changed θ in place; allowed: a rule that returns new tensors (θ is shared by every "
                        f"client of the round and by the server)")
    return out


def like(tensors, theta, what):
    """`tensors` has θ's names, shapes, dtypes and device, and finite values."""
    if not isinstance(tensors, dict) or set(tensors) != set(theta):
        keys = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise UserError(f"{what} has entries {keys}; allowed: θ's entries {sorted(theta)}")
    for n, v in tensors.items():
        if not torch.is_tensor(v) or v.shape != theta[n].shape:
            got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise UserError(f"{what}[{n!r}] is {got}; allowed: a tensor of θ's shape {tuple(theta[n].shape)}")
        if v.dtype != theta[n].dtype or v.device != theta[n].device:
            raise UserError(f"{what}[{n!r}] is {str(v.dtype)[6:]} on {v.device}; allowed: θ's {str(theta[n].dtype)[6:]} on "
                            f"{theta[n].device} (convert with .to(theta[name]))")
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


def keywords(fn, *names):
    """The names among `names` that fn takes as keywords (a **kwargs takes them all)."""
    try:
        ps = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(n for n in names if n in ps or any(p.kind is p.VAR_KEYWORD for p in ps.values()))


def checked(fns, names):
    """The rules with the checks around them. client_update, end_task, new_state, new_server_state
    and match keep their signatures and results; aggregate takes `state` and `infos` (passed on if the
    rule names them) and returns θ' alone (the loop measures the step as θ' − θ)."""
    def match(updates, **kw):
        out = fns["match"](updates, **kw)
        if isinstance(updates, list) and updates and isinstance(updates[0], dict):
            like(out, updates[0], f"match={names['match']}: the matched update")
        return out
    own_match = fns["match"] is not DEFAULTS["match"]
    match_in = match if own_match else fns["match"]
    cu = functools.partial(fns["client_update"], match=match_in) if fns["client_update"] is DEFAULTS["client_update"] \
        else fns["client_update"]
    ag = functools.partial(fns["aggregate"], match=match_in) if fns["aggregate"] is DEFAULTS["aggregate"] else fns["aggregate"]
    extra = keywords(fns["aggregate"], "state", "infos")

    def client_update(model, theta, *rest):
        out = untouched(theta, f"client_update={names['client_update']}", lambda th: cu(model, th, *rest))
        return checked_update(out, theta, names["client_update"])

    def end_task(model, theta, *rest):
        untouched(theta, f"end_task={names['end_task']}", lambda th: fns["end_task"](model, th, *rest))

    def new_state(k, cfg):
        return checked_state(fns["new_state"](k, cfg), k, names["new_state"])

    def new_server_state(cfg):
        s = fns["new_server_state"](cfg)
        if not isinstance(s, server.ServerState):
            raise UserError(f"new_server_state={names['new_server_state']} returned {s!r:.60}; allowed: a "
                            f"server.ServerState (e.g. server.ServerState(extra={{...}}))")
        return s

    def aggregate(theta, updates, weights, cfg, params=None, G=None, state=None, infos=None):
        kw = {k: v for k, v in (("state", state), ("infos", infos)) if k in extra}
        out = untouched(theta, f"aggregate={names['aggregate']}",
                        lambda th: ag(th, updates, weights, cfg, params=params, G=G, **kw))
        return checked_aggregate(out, theta, names["aggregate"])
    return {"client_update": client_update, "end_task": end_task, "new_state": new_state, "aggregate": aggregate,
            "new_server_state": new_server_state, "match": match_in}
