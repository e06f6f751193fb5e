"""From a variant to a verdict in one call: arms × seeds -> results, paired comparisons -> verdicts.

    from stamp_min.study import study, compare
    s = study({"stamp": dict(method="stamp"),
               "mine": dict(method="stamp", rules=dict(aggregate=my_rule))},
              seeds=range(10), base=Config(num_clients=5), workers=2)
    print(s.table())                         # every arm: what tuning picked, metrics with 95 % intervals
    c = compare(s, "mine", "stamp")          # per-seed differences, mean, 95 % interval, verdict
    plots.forest([c])

An arm is a name and a dict of Config fields (method, or client and server; any other field),
with optionally rules= (the keywords of fcl_loop.run), data= (a function cfg -> data.Dataset)
and tune= (this arm's grid, or False). Every run goes through pool.run_all: parallel (`workers`,
or `engine="ray"`), cached on disk, resumable.

 1. Tuning, arm by arm, on the validation split only (images held out of the training split),
    on `tune_seeds` (3 seeds, never confirmation seeds): every point of the grid (default: lr in
    0.025 … 0.4, log-spaced by 2) on every tuning seed; the best mean validation accuracy wins.
    A winner at the edge of a log-spaced grid extends it one step that way (at most twice); a
    winner still at an edge, or at the edge of another grid, is recorded and shown as such.
    Variants are tuned like the arms they are compared with, unless an arm says tune=False.
 2. Confirmation: every arm at its picked values on every seed of `seeds`, scored on test images.
    By default every seed draws its own test split (test_split="per_seed", data.resplit): seed s
    is a fresh draw of everything random (test images, scenario, initial model, batches), so the
    paired differences d_s are independent draws of "A − B on a new experiment", and their
    Student-t interval covers test-set sampling as well as training noise (with the dataset's fixed
    test split, test_split="fixed", it would treat that one test set as the whole population).

compare(s, a, b, metric, kind, delta): d_s = metric(a) − metric(b) on the seeds where both ran (the
others are its left_out, and printed); lower is better for forgetting, wall time and bytes: d_s =
metric(b) − metric(a). Interval and verdict: metrics.paired_interval and metrics.verdict (the rule).

    python -m stamp_min.study --help
"""

import importlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace

from . import UserError, pool
from .config import METHODS, Config
from .metrics import paired_interval, verdict
from .rules import DEFAULTS, qualname
from .tuning import LR_GRID, TUNE_SEEDS, describe, grid_of, tune_arms

LOWER_IS_BETTER = {"avg_forgetting", "wall_time_s", "comm_bytes", "buffer_bytes"}
FIELDS = {f.name for f in fields(Config)}
KEEP = ("name", "rules", "acc_matrix", "avg_accuracy", "avg_forgetting", "bwt", "current_task_accuracy", "comm_bytes",
        "buffer_bytes", "wall_time_s", "scenario", "error")
ROUND = ("task", "round", "loss", "step_norm", "mean_norm", "update_norms", "spatial_cos", "spatial_agreement",
         "temporal_cos", "temporal_agreement")


def slim(res):
    """What a study keeps of a run: summary, scenario, per-round sizes and cosines (all: in the cache)."""
    out = {k: res[k] for k in KEEP if k in res}
    if "rounds" in res:
        out["rounds"] = [{k: e.get(k) for k in ROUND} for e in res["rounds"]]
    return out


@dataclass
class Study:
    """Runs of several arms on the same seeds, and what tuning picked for each arm."""
    arms: list                                      # arm names, in the order given
    seeds: list                                     # confirmation seeds
    tune_seeds: list
    base: dict                                      # the base Config, as a dict
    picks: dict = field(default_factory=dict)       # arm -> {"values", "tuned", "at_edge", "scores", "config"}
    runs: dict = field(default_factory=dict)        # arm -> {seed: slim results (or {"error": ...})}

    def result(self, arm, seed):
        return self.runs[arm][seed]

    def values(self, arm, metric="avg_accuracy"):
        """The metric of `arm` on every seed (None where the run failed); metric: a results key or a
        function results -> number."""
        get = metric if callable(metric) else (lambda r: r.get(metric))
        return [None if "error" in self.runs[arm][s] else get(self.runs[arm][s]) for s in self.seeds]

    def table(self, metrics=("avg_accuracy", "avg_forgetting")):
        """Markdown: one row per arm, what tuning picked, every metric as mean [95 % interval] over seeds."""
        head = "| arm | settings | " + " | ".join(metrics) + " | seeds |"
        lines = [head, "|" + "---|" * (3 + len(metrics))]
        for arm in self.arms:
            cells = []
            for m in metrics:
                v = [x for x in self.values(arm, m) if x is not None]
                mean, low, high = paired_interval(v) if v else (math.nan, math.nan, math.nan)
                cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]" if len(v) > 1 else (f"{mean:.3f}" if v else "–"))
            ok = sum("error" not in self.runs[arm][s] for s in self.seeds)
            lines.append(f"| {arm} | {describe(self.picks[arm])} | " + " | ".join(cells) + f" | {ok}/{len(self.seeds)} |")
        note = ("test split drawn afresh for every seed" if self.base.get("test_split") == "per_seed"
                else "one fixed test split: the intervals cover seed-to-seed variation only")
        tuned = any(p.get("tuned") for p in self.picks.values()) and f"tuned on the validation split, seeds {self.tune_seeds}"
        return "\n".join(lines) + f"\n\nmean [95 % interval] over seeds; {note}; {tuned or 'nothing tuned'}."

    _repr_markdown_ = table

    def save(self, path):
        from .cli import write_json
        write_json(path, asdict(self))

    @staticmethod
    def load(path):
        d = json.loads(open(path).read())
        d["runs"] = {a: {int(s): r for s, r in runs.items()} for a, runs in d["runs"].items()}
        return Study(**d)


def arm_config(name, spec, base):
    """(Config, rules, data function, grid) of one arm; every mistake is one line naming the arm."""
    if not isinstance(spec, dict):
        raise UserError(f"arm {name!r} is {type(spec).__name__}; allowed: a dict of Config fields (+ rules, data, tune)")
    unknown = sorted(set(spec) - FIELDS - {"rules", "data", "tune"})
    if unknown:
        raise UserError(f"arm {name!r}: {', '.join(unknown)} unknown; allowed: Config fields, rules, data, tune")
    rules = dict(spec.get("rules") or {})
    bad = sorted(set(rules) - set(DEFAULTS))
    if bad:
        raise UserError(f"arm {name!r}: rules {', '.join(bad)} unknown; allowed: {', '.join(DEFAULTS)}")
    if "method" not in spec and not ("client" in spec and "server" in spec):
        raise UserError(f"arm {name!r} names no rules; allowed: method=… (one of {', '.join(METHODS)}), or client=… and "
                        f"server=…")
    own = {k: v for k, v in spec.items() if k in FIELDS}
    cfg = replace(base, **{"method": "" if "method" not in spec else spec["method"], "client": "", "server": "", **own})
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"arm {name!r}: {e}") from None
    return cfg, rules, spec.get("data"), spec.get("tune", True)


def study(arms, seeds=range(10), base=None, *, tune=True, tune_seeds=TUNE_SEEDS, tune_metric="avg_accuracy",
          test_split="per_seed", workers=1, engine="local", address=None, resources=None, cache="runs/study",
          quiet=False):
    """Tune every arm, then run it on every seed: a Study (see the module docstring).

    arms: {name: {Config fields…, rules=…, data=…, tune=…}}; seeds: confirmation seeds;
    base: the Config every arm starts from (default Config()); tune: True (lr over LR_GRID),
    False, or {field: [values]} for every arm (an arm's own tune= wins); workers / engine /
    address / resources / cache: pool.run_all's. quiet: no progress lines."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    seeds, tune_seeds = [int(s) for s in seeds], [int(s) for s in tune_seeds]
    if not arms or not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"arms={list(arms)} seeds={seeds}; allowed: at least one arm and distinct seeds")
    if set(seeds) & set(tune_seeds):
        raise UserError(f"seeds {sorted(set(seeds) & set(tune_seeds))} are tuning seeds too; allowed: seeds never used to tune")
    base = replace(base or Config(), quiet=True, plot=False, out="", test_split=test_split)
    if base.checkpoint_dir or base.resume:
        raise UserError("a study resumes from its cache, not from checkpoints; allowed: checkpoint_dir='' and resume=False")
    specs = {name: arm_config(name, spec, base) for name, spec in arms.items()}
    grids = {name: grid_of(s[3] if isinstance(s[3], dict) or s[3] is False else tune) for name, s in specs.items()}
    s = Study(list(arms), seeds, tune_seeds, asdict(base))

    def jobs(name, values, seed, validation):
        cfg, rules, data, _ = specs[name]
        return pool.Job(replace(cfg, **values, seed=seed, validation=validation), rules, data)

    def run(batch, what):
        say(f"study: {what}, {len(batch)} runs")
        return pool.run_all([j for _, j in batch], workers, cache, engine, address, resources, say)

    # 1. tuning (tuning.py), every arm's grid in one batch
    s.picks = tune_arms(grids, tune_seeds, tune_metric, lambda n, p, t: jobs(n, p, t, True),
                        lambda batch: run(batch, "tuning on the validation split"), say)
    for n, pick in s.picks.items():
        pick["rules"] = {k: qualname(f) for k, f in specs[n][1].items()}
        pick["values"] = pick["values"] or {"lr": specs[n][0].lr}          # not tuned: the Config's lr
        pick["runs"] = [slim(r) for r in pick["runs"]]                      # the pick on the tuning seeds
    # 2. confirmation: every arm at its picks on every seed, on the test split
    batch = [((n, seed), jobs(n, s.picks[n]["values"], seed, False)) for n in specs for seed in seeds]
    for (n, seed), res in zip([k for k, _ in batch], run(batch, f"{len(specs)} arms × {len(seeds)} seeds")):
        s.runs.setdefault(n, {})[seed] = slim(res)
    return s


@dataclass
class Comparison:
    """A paired comparison of two arms over the seeds both ran."""
    a: str
    b: str
    metric: str
    kind: str
    delta: float
    seeds: list
    differences: list
    mean: float
    low: float
    high: float
    verdict: str
    a_mean: float
    b_mean: float
    left_out: list = field(default_factory=list)     # seeds where a run of a or b failed: not in the pairs

    def __str__(self):
        return (f"{self.a} vs {self.b}, {self.metric}: {self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}] over "
                f"{len(self.seeds)} seeds ({self.kind}, δ {self.delta:g}): {self.verdict}"
                + (f" (left out, a run failed: seeds {', '.join(map(str, self.left_out))})" if self.left_out else ""))


def compare(s, a, b, metric="avg_accuracy", kind="better", delta=0.01):
    """Arm a against arm b of study s on the seeds both ran: the Comparison (see the module docstring)."""
    for arm in (a, b):
        if arm not in s.runs:
            raise UserError(f"arm {arm!r} is not in the study; allowed: {', '.join(s.arms)}")
    va, vb = s.values(a, metric), s.values(b, metric)
    both = [(seed, x, y) for seed, x, y in zip(s.seeds, va, vb) if x is not None and y is not None]
    sign = -1 if metric in LOWER_IS_BETTER else 1
    d = [sign * (x - y) for _, x, y in both]
    mean, low, high = paired_interval(d) if d else (math.nan, -math.inf, math.inf)
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    avg = lambda xs: sum(xs) / len(xs) if xs else math.nan              # noqa: E731
    return Comparison(a, b, name, kind, delta, [x[0] for x in both], d, mean, low, high,
                      verdict(low, high, kind, delta) if d else "inconclusive",
                      avg([x[1] for x in both]), avg([x[2] for x in both]), sorted(set(s.seeds) - {x[0] for x in both}))


# ----------------------------------------------------------------------------- the command line

def function(text):
    """"module:function" -> the function (the current folder is importable)."""
    mod, _, fn = text.partition(":")
    try:
        sys.path.insert(0, "")
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"{text!r} cannot be imported ({e}); allowed: module:function") from None


def parse_arm(token):
    """"stamp" (a preset) | "replay+gm" (client+server) | "label=field=value,rule=module:function,…"."""
    if "=" not in token:
        client, plus, server = token.partition("+")
        return token, (dict(client=client, server=server) if plus else dict(method=token))
    label, _, rest = token.partition("=")
    spec, kinds = {"rules": {}}, {f.name: f.type for f in fields(Config)}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k in DEFAULTS:
            spec["rules"][k] = function(v)
        elif k in kinds:
            spec[k] = {bool: lambda s: s.lower() in ("1", "true", "yes", "on"), int: int, float: float}.get(kinds[k], str)(v)
        else:
            raise UserError(f"arm {label!r}: {k!r} unknown; allowed: Config fields and rules ({', '.join(DEFAULTS)})")
    return label, spec


def cli(argv=None):
    from pathlib import Path

    from . import plots
    from .cli import OneLineParser, parse_config, write_json
    p = OneLineParser(prog="python -m stamp_min.study", description="Arms × seeds, tuned per arm on the validation "
                      "split, compared pairwise with 95 %% intervals and verdicts (stamp_min/study.py). Every other flag "
                      "(see python -m stamp_min.fcl_loop --help) sets the base Config; --client X --server Y adds the arm X+Y.")
    p.add_argument("--arms", nargs="+", default=[], help='"stamp" (a preset), "replay+gm" (client+server), or '
                   '"mine=method=stamp,aggregate=mymodule:myrule,gm_c=0.5" (fields and rules as module:function)')
    p.add_argument("--compare", nargs="*", default=None, help='"A>B" (A beats B) or "A=B" (equal within ±delta); '
                   "default: every arm against the first")
    p.add_argument("--metric", default="avg_accuracy", help="avg_accuracy | avg_forgetting | bwt | wall_time_s | …")
    p.add_argument("--delta", type=float, default=0.01, help="smallest effect worth reporting (metrics.verdict)")
    p.add_argument("--seeds", type=int, default=10, help="confirmation seeds 0..N-1")
    p.add_argument("--tune", nargs="*", default=["lr=" + ",".join(map(str, LR_GRID))],
                   help="FIELD=v1,v2,… grids tuned for every arm; --tune with nothing: no tuning")
    p.add_argument("--workers", type=int, default=1, help="runs at a time on this machine (one thread each)")
    p.add_argument("--engine", default="local", help="local | ray (--address of a running cluster)")
    p.add_argument("--address", default=None, help="Ray cluster address, e.g. 10.0.0.5:6379 (engine ray)")
    p.add_argument("--cache", default="runs/study", help="folder of finished runs (a rerun computes only what is missing)")
    p.add_argument("--out", default="results/study.json", help="the study, comparisons included; the forest plot beside it")
    a, rest = p.parse_known_args(argv)
    base = parse_config(Config, rest, prog="python -m stamp_min.study")
    arms = dict(parse_arm(t) for t in a.arms)
    if base.client and base.server:
        arms[f"{base.client}+{base.server}"] = dict(client=base.client, server=base.server)
    if len(arms) < 1 or a.seeds < 2:
        raise UserError(f"arms={list(arms)} seeds={a.seeds}; allowed: --arms A [B …] and --seeds >= 2")
    grid = {k: [float(x) for x in v.split(",")] for k, _, v in (t.partition("=") for t in a.tune)}
    base = replace(base, client="", server="")
    s = study(arms, range(a.seeds), base, tune=grid or False, workers=a.workers, engine=a.engine, address=a.address,
              cache=a.cache)
    pairs = [(x, y, "same" if op == "=" else "better") for x, op, y in
             ((c.partition(">") if ">" in c else c.partition("=")) for c in a.compare)] if a.compare is not None \
        else [(x, s.arms[0], "better") for x in s.arms[1:]]
    comparisons = [compare(s, x, y, a.metric, kind, a.delta) for x, y, kind in pairs]
    print(s.table())
    print("\n".join(map(str, comparisons)))
    write_json(a.out, {**asdict(s), "comparisons": [asdict(c) for c in comparisons]})
    print(f"wrote {a.out}")
    if comparisons:
        png = Path(a.out).with_suffix(".png")
        plots.save(plots.forest(comparisons), png)
        print(f"wrote {png}")


if __name__ == "__main__":
    from .cli import main
    main(cli)
