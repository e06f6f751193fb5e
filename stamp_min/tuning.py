"""Tuning, arm by arm, on the validation split: grids, their edges, and what was picked (study.py).

Every arm of a study is tuned the same way before it is confirmed:

    grid      {field: [values]}, e.g. the default {"lr": LR_GRID} (log-spaced by a factor 2); several
              fields are tuned together over the product of their values
    score     the mean validation accuracy of a point over the tuning seeds (images held out of
              the training split: the test split is never seen); a run that failed (diverged)
              scores −inf, so a point with a failure is never picked
    pick      the best point; on ties the first in grid order
    edges     a pick at the low or high end of a log-spaced grid extends that grid one step
              that way (value / ratio or value · ratio) and the new points are run; at most
              MAX_STEPS steps per side. A pick still at an edge, or at the edge of a grid that
              is not log-spaced (e.g. replay_share 0 … 0.5), is recorded in "at_edge" and
              shown, unless the value is the field's own bound (config.LIMITS: replay_share 0
              cannot go lower).
"""

import itertools
import json
import math
from dataclasses import fields

from . import UserError
from .cli import _interval
from .config import LIMITS, Config

LR_GRID = (0.025, 0.05, 0.1, 0.2, 0.4)
TUNE_SEEDS = (10_000, 10_001, 10_002)      # never confirmation seeds (study checks)
MAX_STEPS = 2                              # grid extensions per side
FIELDS = {f.name for f in fields(Config)}


def grid_of(tune):
    """{field: sorted values} from tune = True (lr over LR_GRID), False/None (nothing) or a dict."""
    if tune is False or tune is None:
        return {}
    grid = {"lr": LR_GRID} if tune is True else tune
    if not isinstance(grid, dict) or not all(isinstance(v, (list, tuple)) and v for v in grid.values()):
        raise UserError(f"tune={tune!r}; allowed: True, False, or {{field: [values, …]}}")
    unknown = sorted(set(grid) - FIELDS)
    if unknown:
        raise UserError(f"tune: {', '.join(unknown)} is no Config field; allowed: e.g. lr, replay_share, eta_t")
    return {k: sorted(v) if all(isinstance(x, (int, float)) for x in v) else list(v) for k, v in grid.items()}


def ratio(values):
    """The common ratio of a positive log-spaced grid (None if it is not one)."""
    if len(values) < 2 or not all(isinstance(v, (int, float)) and v > 0 for v in values):
        return None
    r = values[1] / values[0]
    return r if r > 1 and all(math.isclose(b / a, r, rel_tol=1e-6) for a, b in zip(values, values[1:])) else None


def at_bound(f, value):
    """Is `value` the field's own lower or upper bound (config.LIMITS)?"""
    if f not in LIMITS:
        return False
    lo, hi, lo_in, hi_in = _interval(LIMITS[f])
    return (lo_in and value == lo) or (hi_in and value == hi)


def describe(pick):
    """"tuned: lr 0.1" / "tuned: lr 0.4 (grid edge: lr)" / "not tuned (…)"."""
    values = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in pick["values"].items())
    if not pick["tuned"]:
        return f"not tuned ({values})" if values else "not tuned"
    edge = f" (grid edge: {', '.join(pick['at_edge'])})" if pick["at_edge"] else ""
    return f"tuned: {values}{edge}"


def tune_arms(grids, tune_seeds, metric, job, run, say=print):
    """{arm: pick} for every arm (see the module docstring). grids: {arm: {field: [values]}} ({} =
    not tuned); job(arm, point, seed) -> a validation-split pool.Job; run(list of (label, Job)) ->
    their results, in order (every arm's points go in one batch, so they run in parallel).
    A pick: {"values": the best point, "tuned", "at_edge": its fields at a grid edge, "grid": the
    final grid, "scores": [[point, mean score]], "runs": the best point's results on the tuning seeds}."""
    key = lambda p: json.dumps(p, sort_keys=True)                                   # noqa: E731
    scores, runs, steps, best = ({n: {} for n in grids} for _ in range(4))
    while True:
        points = {n: [dict(zip(g, v)) for v in itertools.product(*g.values())] for n, g in grids.items() if g}
        batch = [((n, key(p)), job(n, p, t)) for n, ps in points.items() for p in ps for t in tune_seeds
                 if key(p) not in scores[n]]
        if not batch:
            break
        for ((n, p), _), res in zip(batch, run(batch)):
            scores[n].setdefault(p, []).append(-math.inf if "error" in res else res[metric])
            runs[n].setdefault(p, []).append(res)
        for n, ps in points.items():
            best[n] = max(ps, key=lambda p: sum(scores[n][key(p)]))         # max: the first on ties
            for f, values in grids[n].items():
                i, r = values.index(best[n][f]), ratio(values)
                side = "low" if i == 0 else "high" if i == len(values) - 1 else None
                if r and side and steps[n].get((f, side), 0) < MAX_STEPS:
                    steps[n][(f, side)] = steps[n].get((f, side), 0) + 1
                    values.insert(0, values[0] / r) if side == "low" else values.append(values[-1] * r)
    picks = {}
    for n, g in grids.items():
        values = best[n]
        edge = [f for f, v in values.items()
                if len(g[f]) > 1 and g[f].index(v) in (0, len(g[f]) - 1) and not at_bound(f, v)]
        picks[n] = {"values": values, "tuned": bool(g), "at_edge": edge, "grid": g, "runs": runs[n].get(key(values), []),
                    "scores": [[json.loads(p), sum(v) / len(v)] for p, v in scores[n].items()]}
        if g and sum(scores[n][key(values)]) == -math.inf:
            why = next((r["error"] for r in picks[n]["runs"] if "error" in r), "?")
            raise UserError(f"arm {n!r}: every grid point failed on the validation split on some tuning seed (one "
                            f"said: {why}); allowed: a grid of smaller values if it diverged, e.g. "
                            f"tune={{'lr': [0.001, 0.003, 0.01, 0.03, 0.1]}}, else what the error says")
        if edge:
            say(f"study: arm {n!r}: {describe(picks[n])}")
    return picks
