"""What holds up: every claim of the two papers, and STAMP's open questions, as paired comparisons
over the study API (stamp_min/study.py) on the offline digits data.

    python bench/claims.py                  # the full run -> bench/results/claims.{json,md}, claims_forest.png
    python bench/claims.py --quick          # a smoke run (2 seeds, tiny budget, no tuning) -> runs/claims-quick/
    python bench/claims.py --report-only    # verdicts and claims.md again from bench/results/claims.json
    python bench/claims.py --workers 8 --engine ray --address HEAD:6379    # on a cluster (docs/claims.md)

FIXED IN ADVANCE, before any result of this version was seen
------------------------------------------------------------
The claims and the direction of each; the settings; the budget (BUDGET); the tuning (study.py:
every arm, variants included, tuned alike on the validation split, lr over 0.025 … 0.4 on the
3 tuning seeds 10000–10002, extended at a grid edge; every arm whose clients replay a buffer
tunes replay_share over 0, 0.25, 0.5 with it, so replay is the strongest of its two standard
forms, baselines.py); the 10 confirmation seeds 0–9, each with its own test split; δ = 0.01
unless a row says otherwise; and the verdict rule, stated once in stamp_min/metrics.py
(`verdict`): "better" is supported when the whole 95 % interval is above 0, contradicted when it
is below 0 or contains 0 inside ±δ; "same" is an equivalence test, supported inside ±δ and
contradicted only when the interval lies wholly outside ±δ. A claim of several comparisons is
supported when every part is, contradicted when any part is. No correction for multiplicity.

Where a claim comes from (the `source` column): paper: a claim of the papers (METHOD.md §1.7,
§2); reading: our reading of one (the paper names the idea, not the test); code: what the
authors' code does; open: a question of ours; stress: a property of GM under heterogeneity.
FLoRA-NA's experiment (F1) gives every aggregator flora_loop's default lr, untuned: the clients
train identically, only the server rule differs.
"""

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stamp_min import client, gradmatch, plots, pool  # noqa: E402
from stamp_min.cli import OneLineParser, run_info, write_json  # noqa: E402
from stamp_min.coreset import Buffer  # noqa: E402
from stamp_min.data import load_dataset, resplit  # noqa: E402
from stamp_min.fcl_loop import Config, build  # noqa: E402
from stamp_min.flora_loop import Config as FloraConfig  # noqa: E402
from stamp_min.metrics import combined, paired_interval, verdict  # noqa: E402
from stamp_min.server import aggregate  # noqa: E402
from stamp_min.study import compare, study  # noqa: E402
from stamp_min.tuning import LR_GRID, describe  # noqa: E402

DELTA = 0.01
SETTINGS = {"cpt 1": dict(classes_per_task=1), "cpt 2": dict(classes_per_task=2), "cpt 5": dict(classes_per_task=5),
            "Dirichlet α 0.1": dict(scenario="dirichlet", alpha=0.1), "Dirichlet α 1": dict(scenario="dirichlet", alpha=1.0),
            "short local training": dict(local_epochs=1, batch_size=64), "20 % noisy labels": dict()}
C1_SETTINGS = ("cpt 1", "cpt 2", "cpt 5", "Dirichlet α 0.1", "Dirichlet α 1")
BUDGET = dict(dataset="digits", num_clients=5, rounds_per_task=5, local_epochs=2, batch_size=16, buffer_per_class=10)
QUICK = dict(num_clients=2, num_tasks=2, rounds_per_task=1, local_epochs=1, ewc_fisher_samples=32)   # EWC: 32-image Fisher
BASELINES = ("fedavg", "fedprox", "ewc", "lwf", "replay", "agem")
SHARES = (0.0, 0.25, 0.5)                     # replay_share, tuned with lr for every arm whose clients replay
NOISE = 0.2                                   # share of training labels replaced by another class (Q2)
ACC, FORGET = "avg_accuracy", "avg_forgetting"
FLORA = ("flora_na", "fedit", "ffa", "fedsa", "flora", "fedex")      # F1: flora_loop's aggregators


# ----------------------------------------------------------------------------- variants (workbench rules)

def match_per_layer(updates, c=0.25, solver="exact", normalize=False, G=None, **kw):
    """Q1: GM of every parameter tensor on its own."""
    return {n: gradmatch.match(torch.stack([u[n] for u in updates]), c=c, solver=solver, normalize=normalize, **kw)
            for n in updates[0]}


THETA0 = {}


def frozen_encoder_end_task(model, theta, state, x, y, classes, cfg):
    """Q3: the coreset chosen by the initial model θ_0's encoder instead of the end-of-task model's."""
    key = (cfg.seed, cfg.model, cfg.dataset)
    if key not in THETA0:
        with torch.random.fork_rng():                          # building θ_0 must not move the run's RNG
            THETA0[key] = client.float_state(build(replace(cfg, validation=False))[2])
    client.end_task(model, THETA0[key], state, x, y, classes, cfg)


def coreset_replay_state(k, cfg):
    """C2a, Q2: STAMP without TAM at equal memory: replay clients whose buffer is STAMP's coreset
    (cfg.coreset_rule, herding by default) instead of a random one."""
    state = client.new_state(k, cfg)
    state.buffer = Buffer(cfg.buffer_per_class, cfg.coreset_rule, seed=cfg.seed + k)
    return state


def scaled_mean(theta, updates, weights, cfg, params=None, G=None, scale=1.0):
    """Q2: FedAvg's step lengthened by `scale` (STAMP's mean ‖GM step‖/‖mean‖ in the same setting)."""
    new, step = aggregate(theta, updates, weights, replace(cfg, server="mean"))
    step = {n: scale * v if n in (params or step) else v for n, v in step.items()}
    return {n: theta[n] + step[n] for n in theta}, step


def noisy_digits(cfg):
    """Q2: the seed's own split of digits (data.resplit), then NOISE of its training labels replaced
    by another class; the arm keeps test_split="fixed" so the split is not drawn twice."""
    ds = resplit(load_dataset("digits"), cfg.seed)
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    y = ds.y_train.clone()
    flip = torch.rand(len(y), generator=g) < NOISE
    y[flip] = (y[flip] + torch.randint(1, ds.num_classes, (int(flip.sum()),), generator=g)) % ds.num_classes
    return replace(ds, y_train=y)


# ----------------------------------------------------------------------------- arms and claims

ARMS = {}


def arm(setting, method=None, variant=None, **over):
    """Register one arm (a method in a setting, a variant, overrides) and return its label."""
    label = " · ".join([method or variant, setting, *([variant] if method and variant else []),
                        *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(over.items()))])
    spec = {**SETTINGS[setting], **({"method": method} if method else {}), **over}
    if variant == "per layer":
        spec["rules"] = dict(match=match_per_layer)
    elif variant == "frozen encoder":
        spec["rules"] = dict(end_task=frozen_encoder_end_task)
    elif variant == "TAM → coreset replay":
        spec.update(client="replay", server="gm", rules=dict(new_state=coreset_replay_state))
    elif variant and variant.startswith("TAM + mean × "):
        spec.update(client="tam", server="mean", rules=dict(aggregate=partial(scaled_mean, scale=float(variant[13:]))))
    if setting == "20 % noisy labels":
        spec.update(data=noisy_digits, test_split="fixed")
    if method == "replay" or spec.get("client") == "replay":
        spec["tune"] = {"lr": list(LR_GRID), "replay_share": list(SHARES)}
    ARMS[label] = spec
    return label


def part(label, a, b, metric=ACC, kind="better", delta=DELTA):
    return {"label": label, "a": a, "b": b, "metric": metric, "kind": kind, "delta": delta}


def claims(kappa):
    """Every claim: id, source, the claim in the papers' words (METHOD.md), our setting, its comparisons.
    kappa: {setting: STAMP's mean ‖GM step‖/‖mean‖ on the tuning seeds} for Q2's step-matched arm."""
    ARMS.clear()
    stamp = arm("cpt 2", "stamp")
    c1 = [part(f"{s} · vs {b} · {'accuracy' if m == ACC else 'forgetting'}", arm(s, "stamp"), arm(s, b), m)
          for s in C1_SETTINGS for b in BASELINES for m in (ACC, FORGET)]
    sizes = (2, 5, 10, 20)
    m_arm = lambda method, m: arm("cpt 2", method, **({} if m == 10 else {"buffer_per_class": m}))   # noqa: E731
    q2 = [part(f"{s} · stamp vs {v}", arm(s, "stamp"), arm(s, variant=v)) for s in ("short local training", "20 % noisy labels")
          for v in ("stamp_tam", "TAM → coreset replay", f"TAM + mean × {kappa[s]:.3f}")]
    for p in q2:                                                   # stamp_tam is a preset, not a variant
        if p["b"].startswith("stamp_tam"):
            ARMS.pop(p["b"])
            p["b"] = arm(p["b"].split(" · ")[1], "stamp_tam")
    return [
        dict(id="C1", source="paper", claim="STAMP beats FedAvg, FedProx, FL+EWC, FL+LwF and replay baselines on average "
             "accuracy and forgetting, at 2 and at 20 classes per task", setting="5 clients; 1, 2, 5 classes per task "
             "(permutation scenario) and Dirichlet label skew α 0.1 and 1; every baseline (replay, A-GEM: same buffer; "
             "replay in its stronger form, replay_share tuned)", parts=c1),
        dict(id="C2a", source="paper", claim="both TAM and SAM contribute (ablation): temporal matching is what fights "
             "forgetting", setting="forgetting of STAMP against STAMP without TAM at equal memory: the same server (SAM) "
             "and the same coreset, replayed instead of matched",
             parts=[part(f"{s} · stamp vs TAM → coreset replay · forgetting", arm(s, "stamp"),
                         arm(s, variant="TAM → coreset replay"), FORGET) for s in ("cpt 2", "Dirichlet α 0.1")]),
        dict(id="C2b", source="paper", claim="both TAM and SAM contribute (ablation): spatial matching is what helps under "
             "heterogeneity", setting="accuracy of STAMP against STAMP without SAM (stamp_tam); SAM alone against FedAvg",
             parts=[part(f"{s} · stamp vs stamp_tam", arm(s, "stamp"), arm(s, "stamp_tam")) for s in ("cpt 2", "Dirichlet α 0.1")]
             + [part("cpt 2 · stamp_sam vs fedavg", arm("cpt 2", "stamp_sam"), arm("cpt 2", "fedavg"))]),
        dict(id="C3a", source="paper", claim="the prototypical coreset beats random and nearest-to-prototype selection at "
             "equal size", setting="STAMP at cpt 2, 10 images per class, three selection rules",
             parts=[part(f"herding vs {r}", stamp, arm("cpt 2", "stamp", coreset_rule=r)) for r in ("random", "nearest")]),
        dict(id="C3b", source="paper", claim="more buffer helps", setting="STAMP at cpt 2, 20 against 2 images per class",
             parts=[part("m = 20 vs m = 2", m_arm("stamp", 20), m_arm("stamp", 2))]),
        dict(id="C3c", source="paper", claim="STAMP beats the replay baseline, at every buffer size", setting="cpt 2; STAMP "
             "and replay with the same buffer, m = 2, 5, 10, 20 images per class (replay_share tuned)",
             parts=[part(f"m = {m} · stamp vs replay", m_arm("stamp", m), m_arm("replay", m)) for m in sizes]),
        dict(id="C4", source="paper", claim="MixStyle diversifies the small buffer when it is replayed (it helps at a fixed "
             "buffer size)", setting="STAMP at cpt 2, MixStyle on against off",
             parts=[part("on vs off", stamp, arm("cpt 2", "stamp", mixstyle=False))]),
        dict(id="C5", source="reading", claim="gradient normalisation is critical (the paper's word; rescaling every update "
             "to the mean norm before GM is our reading of it)", setting="STAMP at cpt 2, gm_normalize on against off",
             parts=[part("on vs off", arm("cpt 2", "stamp", gm_normalize=True), stamp)]),
        dict(id="C6", source="reading", claim="the GM solver does not change the result: the authors' inexact solver (sgd) "
             "and adam give the exact solver's final accuracy (our question about the authors' solver)",
             setting="STAMP at cpt 2 (client and server GM); an equivalence test within ±δ",
             parts=[part(f"{sv} vs exact", arm("cpt 2", "stamp", gm_solver=sv), stamp, kind="same") for sv in ("sgd", "adam")]),
        dict(id="C7", source="paper", claim="communication per round equals FedAvg's, and client memory is bounded by the "
             "buffer", setting="every C1 run: comm bytes of STAMP = FedAvg's, same seed; buffer bytes <= m x classes seen x "
             "bytes per image + label, and = replay's", parts=[], kind="exact"),
        dict(id="C8", source="code", claim="the client step η_t = 2 of the authors' code beats η_t = 1", setting="STAMP at "
             "cpt 2, the lr tuned separately for each η_t", parts=[part("η_t = 2 vs 1", arm("cpt 2", "stamp", eta_t=2.0), stamp)]),
        dict(id="Q1", source="open", claim="GM solved per layer gives the same accuracy as GM over the whole model",
             setting="STAMP at cpt 2; `match=` per parameter tensor for TAM and SAM; an equivalence test within ±δ",
             parts=[part("per layer vs whole model", arm("cpt 2", "stamp", "per layer"), stamp, kind="same")]),
        dict(id="Q2", source="open", claim="matching stays useful when local training is short or labels are noisy",
             setting=f"cpt 2 with 1 local epoch of batch 64 (short), or {NOISE:.0%} of training labels flipped; STAMP "
             "against STAMP without SAM (stamp_tam), without TAM at equal memory (its coreset replayed), and against "
             "TAM with FedAvg's step lengthened by STAMP's mean step/mean ratio on the tuning seeds (× κ)", parts=q2),
        dict(id="Q3", source="open", claim="a coreset chosen by the current model beats one chosen by the frozen initial "
             "encoder (encoder drift)", setting="STAMP at cpt 2; herding with θ at the task's end against θ_0",
             parts=[part("current vs frozen θ_0", stamp, arm("cpt 2", "stamp", "frozen encoder"))]),
        dict(id="S1a", source="stress", claim="with one class per client per task, SAM's matched step is shorter than the "
             "plain mean of the client updates", setting="STAMP at cpt 1; d = 1 − mean over rounds of ‖step‖/‖plain mean‖",
             parts=[part("1 − ‖step‖/‖d̄‖", arm("cpt 1", "stamp"), None, "shrink_vs_mean", delta=0.05)]),
        dict(id="S1b", source="stress", claim="the server's step shrinks, relative to the clients' updates, as heterogeneity "
             "grows", setting="STAMP, cpt 1 against cpt 5; ‖step‖ / mean_k ‖Δ_k‖, mean over rounds (paired by seed only: "
             "the arms' scenarios differ, 10 tasks against 2)",
             parts=[part("cpt 1 vs cpt 5", arm("cpt 1", "stamp"), arm("cpt 5", "stamp"), "shrink_vs_updates", delta=0.05)]),
        dict(id="F1", source="paper", claim="FLoRA-NA achieves state-of-the-art global performance (against FedIT, FFA-LoRA, "
             "FedSA-LoRA, FLoRA, FedEx-LoRA), with FedIT's payload", setting="python -m stamp_min.flora_loop defaults "
             "(10 clients, Dirichlet α 0.1, rotated digits, rank 4, 20 rounds), each seed its own test split; final global "
             "accuracy, and the mean residual of each run (FedIT's payload: docs/flora.md, bench/flora_compare.py)",
             parts=[part(f"flora_na vs {f}", "flora_na", f, "final_accuracy", kind="better") for f in FLORA[1:]]
             + [part("residual below FedIT's", "flora_na", "fedit", "residual", delta=1e-4)]),
    ]


# ----------------------------------------------------------------------------- metrics of a run

def ratios(r, over):
    """Per round ‖step‖/‖plain mean‖ (over="mean") or ‖step‖/mean_k ‖Δ_k‖ (over="updates")."""
    out = []
    for e in r["rounds"]:
        base = e["mean_norm"] if over == "mean" else statistics.mean(e["update_norms"])
        if base and base > 0:
            out.append(e["step_norm"] / base)
    return out


def value(r, metric):
    """The number compared, oriented so that larger is what a claim says is better."""
    return {FORGET: lambda: -r[FORGET], "residual": lambda: -statistics.mean(r["residual"]),
            "shrink_vs_mean": lambda: 1 - statistics.mean(ratios(r, "mean")),
            "shrink_vs_updates": lambda: -statistics.mean(ratios(r, "updates"))}.get(metric, lambda: r[metric])()


def reported(r, metric):
    """The metric as reported (forgetting as forgetting, S1's ratios as ratios)."""
    return {"residual": lambda: statistics.mean(r["residual"]), "shrink_vs_mean": lambda: statistics.mean(ratios(r, "mean")),
            "shrink_vs_updates": lambda: statistics.mean(ratios(r, "updates"))}.get(metric, lambda: r[metric])()


# ----------------------------------------------------------------------------- the runs

def kappas(picks):
    """κ per Q2 setting: STAMP's mean ‖GM step‖/‖plain mean‖ over the rounds of its tuning runs."""
    return {s: statistics.mean(x for r in picks[arm(s, "stamp")]["runs"] if "error" not in r for x in ratios(r, "mean"))
            for s in ("short local training", "20 % noisy labels")}


def run_all(a, budget, seeds):
    """Every arm through study() (tuning, then the confirmation seeds), then F1's runs; both cached."""
    start = time.perf_counter()
    base = replace(Config(), **budget)
    kw = dict(seeds=seeds, base=base, workers=a.workers, engine=a.engine, address=a.address, cache=a.cache,
              **({"tune": False} if a.quick else {}))
    # phase 1: every arm but Q2's step-matched ones (which need κ, measured on the tuning seeds)
    claims({s: 1.0 for s in ("short local training", "20 % noisy labels")})
    for spec in ARMS.values() if a.quick else ():
        spec.pop("tune", None)                                     # --quick: nothing is tuned
    first = study({k: v for k, v in ARMS.items() if "TAM + mean ×" not in k}, **kw)
    kappa = kappas(first.picks) if not a.quick else {s: 1.0 for s in ("short local training", "20 % noisy labels")}
    claims(kappa)
    for spec in ARMS.values() if a.quick else ():
        spec.pop("tune", None)
    s = study(dict(ARMS), **kw)                                    # phase 2: phase 1's runs come from the cache
    fkw = dict(rounds=2, pretrain_epochs=1, local_epochs=1) if a.quick else {}
    jobs = [pool.Job(FloraConfig(aggregator=f, seed=x, quiet=True, test_split="per_seed", **fkw)) for f in FLORA for x in seeds]
    print(f"F1: {len(jobs)} runs of python -m stamp_min.flora_loop", flush=True)
    res = pool.run_all(jobs, a.workers, a.cache, a.engine, a.address)
    runs = {k: dict(v) for k, v in s.runs.items()}
    for j, r in zip(jobs, res):
        runs.setdefault(j.cfg.aggregator, {})[j.cfg.seed] = {k: r[k] for k in ("final_accuracy", "residual", "error") if k in r}
    return {"wall_time_s": time.perf_counter() - start, "quick": a.quick, "seeds": seeds, "tune_seeds": s.tune_seeds,
            "budget": budget, "kappa": kappa, "command": "python bench/claims.py" + (" --quick" if a.quick else ""),
            "versions": run_info(), "workers": a.workers, "engine": a.engine,
            "picks": {k: {f: v[f] for f in ("values", "tuned", "at_edge", "grid", "scores")} for k, v in s.picks.items()},
            "arms": {k: {f: v for f, v in spec.items() if f not in ("rules", "data", "tune")} for k, spec in ARMS.items()},
            "runs": {k: {str(x): r for x, r in v.items()} for k, v in runs.items()}}


# ----------------------------------------------------------------------------- verdicts

def evaluate(raw):
    """Every part's paired differences, interval and verdict; every claim's verdict; the extras."""
    runs = {k: {int(x): r for x, r in v.items()} for k, v in raw["runs"].items()}
    seeds, out = raw["seeds"], {"claims": []}
    ok = lambda label, x: label is None or "error" not in runs[label][x]              # noqa: E731
    for c in claims(raw["kappa"]):
        parts = []
        for pt in c["parts"]:
            good = [x for x in seeds if ok(pt["a"], x) and ok(pt["b"], x)]
            d = [value(runs[pt["a"]][x], pt["metric"]) - (value(runs[pt["b"]][x], pt["metric"]) if pt["b"] else 0.0)
                 for x in good]
            mean, low, high = paired_interval(d) if d else (math.nan, -math.inf, math.inf)
            avg = lambda label: statistics.mean(reported(runs[label][x], pt["metric"]) for x in good) if label and good else None  # noqa: E731
            parts.append({**pt, "n": len(d), "failed_seeds": [x for x in seeds if x not in good], "differences": d,
                          "mean": mean, "low": low, "high": high, "a_mean": avg(pt["a"]), "b_mean": avg(pt["b"]),
                          "verdict": verdict(low, high, pt["kind"], pt["delta"]) if d else "inconclusive"})
        if c.get("kind") == "exact":
            parts = exact_checks(runs, seeds)
        out["claims"].append({**{k: c[k] for k in ("id", "source", "claim", "setting")}, "parts": parts,
                              "verdict": combined(x["verdict"] for x in parts), "n": min((x["n"] for x in parts), default=0)})
    rs = [x for s in seeds for x in ratios(runs[arm("cpt 1", "stamp")][s], "mean")]
    c = Config().gm_c
    out["s1"] = {"min": min(rs, default=math.nan), "max": max(rs, default=math.nan), "c": c,
                 "bound_low": (1 - c) / (1 + c * c), "bound_high": (1 + c) / (1 + c * c)}
    for s in ("cpt 1", "cpt 5"):          # S1b split: ‖step‖/mean‖Δ_k‖ = (‖step‖/‖d̄‖) · (‖d̄‖/mean‖Δ_k‖)
        pairs = [(m, u) for x in seeds for m, u in zip(ratios(runs[arm(s, "stamp")][x], "mean"),
                                                        ratios(runs[arm(s, "stamp")][x], "updates"))]
        out["s1"][s] = {"step_over_mean": statistics.mean(m for m, _ in pairs),
                        "mean_over_updates": statistics.mean(u / m for m, u in pairs)}
    methods = ("stamp", "stamp_tam", "stamp_sam") + BASELINES
    out["c1_table"] = {s: {m: {k: [runs[arm(s, m)][x][k] for x in seeds if "error" not in runs[arm(s, m)][x]]
                               for k in (ACC, FORGET, "bwt", "wall_time_s")}
                           for m in methods if arm(s, m) in runs} for s in C1_SETTINGS}
    return out


def exact_checks(runs, seeds):
    """C7, exactly: STAMP's bytes sent = FedAvg's; its buffer <= m·(classes each client saw)·(image + label
    bytes) and = replay's (same m, same classes)."""
    ds = load_dataset("digits")
    per_image = ds.x_train[0].numel() * ds.x_train.element_size() + 8          # uint8 image + int64 label
    checks = {"communication = FedAvg's": [], "buffer <= m x classes seen x bytes": [], "buffer = replay's": []}
    for s in C1_SETTINGS:
        for x in seeds:
            st, fa, rp = (runs[arm(s, m)][x] for m in ("stamp", "fedavg", "replay"))
            if any("error" in r for r in (st, fa, rp)):
                continue
            bound = sum(len({c for task in row for c in task}) for row in st["scenario"]) * BUDGET["buffer_per_class"] * per_image
            checks["communication = FedAvg's"].append(st["comm_bytes"] == fa["comm_bytes"])
            checks["buffer <= m x classes seen x bytes"].append(0 < st["buffer_bytes"] <= bound)
            checks["buffer = replay's"].append(st["buffer_bytes"] == rp["buffer_bytes"])
    return [{"label": k, "kind": "exact", "n": len(v), "holds": sum(v), "verdict": "supported" if v and all(v) else
             "contradicted" if v else "inconclusive"} for k, v in checks.items()]


def changes(old, new):
    """Claims and parts whose verdict differs from the previous results file's."""
    before = {c["id"]: c for c in old.get("claims", [])}
    out = []
    for c in new["claims"]:
        if c["id"] in before and before[c["id"]]["verdict"] != c["verdict"]:
            out.append(f"{c['id']}: {before[c['id']]['verdict']} → {c['verdict']}")
        parts = {p["label"]: p for p in before.get(c["id"], {}).get("parts", [])}
        for p in c["parts"]:
            q = parts.get(p["label"])
            if q and q["verdict"] != p["verdict"] and p["kind"] != "exact":
                out.append(f"{c['id']} · {p['label']}: {q['verdict']} {fmt(q)} → {p['verdict']} {fmt(p)}")
    return out


# ----------------------------------------------------------------------------- the report

def fmt(x):
    if x["kind"] == "exact":
        return f"holds in {x['holds']} of {x['n']} runs"
    digits = 4 if x["delta"] < 1e-3 else 3
    return f"{x['mean']:+.{digits}f} [{x['low']:+.{digits}f}, {x['high']:+.{digits}f}]"


def markdown(rep):
    seeds, lines = rep["seeds"], []
    lines += [f"# What holds up: the papers' claims, measured ({'QUICK smoke run, not a result' if rep['quick'] else 'full run'})",
              "", f"`{rep['command']}`: {len(seeds)} paired confirmation seeds (each with its own test split), "
              f"{rep['wall_time_s'] / 60:.1f} min on this machine ({rep['workers']} workers, one thread each). Budget: "
              f"{rep['budget']}. Every arm tuned alike on the validation split (tuning seeds {rep['tune_seeds']}, lr "
              f"over {list(LR_GRID)} extended at an edge; arms whose clients replay also replay_share over {list(SHARES)}).",
              "", "Effect = mean paired difference A − B over seeds, signed so that > 0 is what the claim says "
              "(forgetting: B − A), with its 95 % Student-t interval. Verdict rule (stamp_min/metrics.py, `verdict`): "
              "*better* claims are supported when the interval is above 0, contradicted when it is below 0 or contains 0 "
              "inside ±δ; *same* claims are an equivalence test: supported inside ±δ, contradicted only when the interval "
              "lies wholly outside ±δ; δ = 0.01 unless stated. A claim of several comparisons is supported only if every "
              "one is. Source: paper = a claim of the papers; reading = our reading of one; code = the authors' code; "
              "open = our question; stress = a property of GM.", "",
              "| id | source | claim | our setting | effect [95 % CI] | seeds | verdict |", "|---|---|---|---|---|---|---|"]
    for c in rep["claims"]:
        if len(c["parts"]) == 1:
            x = c["parts"][0]
            effect = fmt(x) + ("" if x["kind"] == "exact" or x["b_mean"] is None else
                               f" (A {x['a_mean']:.3f}, B {x['b_mean']:.3f})")
        else:
            counts = {v: sum(p["verdict"] == v for p in c["parts"]) for v in ("supported", "contradicted", "inconclusive")}
            effect = f"{len(c['parts'])} comparisons: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        lines.append(f"| {c['id']} | {c['source']} | {c['claim']} | {c['setting']} | {effect} | {c['n']} | **{c['verdict']}** |")
    for c in rep["claims"]:
        if len(c["parts"]) > 1:
            lines += ["", f"**{c['id']}**, every comparison (A, B: the metric's mean over seeds, as reported)", "",
                      "| comparison | A | B | effect [95 % CI] | seeds | verdict |", "|---|---|---|---|---|---|"]
            for p in c["parts"]:
                ab = ("", "") if p["kind"] == "exact" else (f"{p['a_mean']:.3f}", "" if p["b_mean"] is None else f"{p['b_mean']:.3f}")
                lines.append(f"| {p['label']} | {ab[0]} | {ab[1]} | {fmt(p)} | {p['n']} | {p['verdict']} |")
    s1 = rep["s1"]
    lines += ["", f"**S1**: over every round of STAMP at cpt 1, ‖step‖/‖plain mean‖ ranged {s1['min']:.3f} .. {s1['max']:.3f}; "
              f"GM keeps it within [(1 − c)/(1 + c²), (1 + c)/(1 + c²)] = [{s1['bound_low']:.3f}, {s1['bound_high']:.3f}] "
              f"at c = {s1['c']} (METHOD §1.2). S1b splits into GM's factor ‖step‖/‖d̄‖ ({s1['cpt 1']['step_over_mean']:.3f} "
              f"at cpt 1, {s1['cpt 5']['step_over_mean']:.3f} at cpt 5) and the mean's own length against the updates, "
              f"‖d̄‖/mean‖Δ_k‖ ({s1['cpt 1']['mean_over_updates']:.3f} and {s1['cpt 5']['mean_over_updates']:.3f}).",
              "", "**Q2's κ** (STAMP's mean ‖GM step‖/‖plain mean‖ on the tuning seeds, the factor of the step-matched arm): "
              + ", ".join(f"{s} {k:.3f}" for s, k in rep["kappa"].items()) + "."]
    close = [f"{c['id']} {p['label']} [{p['low']:+.3f}, {p['high']:+.3f}]" for c in rep["claims"] for p in c["parts"]
             if p["kind"] == "better" and p["verdict"] != "inconclusive" and p["delta"] == DELTA
             and min(abs(p["low"]), abs(p["high"])) < 0.005 and p["low"] * p["high"] > 0]
    lines += ["", f"**Multiplicity**: {sum(len(c['parts']) for c in rep['claims'])} comparisons, each at 95 %, no correction: "
              "if nothing were real, about 1 in 20 intervals would still exclude 0. The verdicts whose interval only just "
              "clears 0 are the first to doubt: " + ("; ".join(close) or "none") + "."]
    if rep.get("changes") is not None:
        lines += ["", "**Changed since the previous results file** (the reasons: docs/claims.md):", ""]
        lines += [f"- {x}" for x in rep["changes"]] or ["- none"]
    lines += ["", "**What tuning picked** (validation split, tuning seeds; \"grid edge\": the pick sits at the end of its "
              "grid after the extensions):", "", "| arm | picked |", "|---|---|"]
    lines += [f"| {k} | {describe(v)} |" for k, v in rep["picks"].items()]
    lines += ["", f"**Every C1 arm** (mean ± sd over {len(seeds)} seeds):", ""]
    for s, methods in rep["c1_table"].items():
        lines += [f"*{s}*", "", "| method | picked | avg accuracy | forgetting | BWT | wall s |", "|---|---|---|---|---|---|"]
        for m, v in methods.items():
            pm = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else (f"{xs[0]:.3f}" if xs else "–")  # noqa: E731
            pick = describe(rep["picks"][arm(s, m)]).removeprefix("tuned: ")
            failed = len(seeds) - len(v[ACC])
            lines.append(f"| {m} | {pick} | {pm(v[ACC])}{f' ({failed} seeds failed)' if failed else ''} | {pm(v[FORGET])} | "
                         f"{pm(v['bwt'])} | {statistics.mean(v['wall_time_s']):.1f} |" if v[ACC] else f"| {m} | {pick} | failed on every seed | | | |")
        lines.append("")
    return "\n".join(lines) + "\n"


def rewrite(out, raw):
    """Verdicts, claims.json, claims.md and the forest plots from the raw runs."""
    path = out / "claims.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    report = evaluate(raw)
    report.update({k: raw[k] for k in ("wall_time_s", "quick", "seeds", "tune_seeds", "budget", "command", "versions",
                                       "kappa", "picks", "workers")})
    report["changes"] = changes(old, report) if old and not raw["quick"] else None
    write_json(path, {**report, "raw": raw})
    (out / "claims.md").write_text(markdown(report))
    rows = [{**p, "label": f"{c['id']} · {p['label']}"} for c in report["claims"] if c["id"] not in ("C1", "C7")
            for p in c["parts"] if p["metric"] in (ACC, FORGET, "final_accuracy")]
    plots.save(plots.forest(rows, title="the claims on accuracy and forgetting but C1 (S1, F1's residual: claims.md)",
                            xlabel="paired difference, oriented so that > 0 is what the claim says"), out / "claims_forest.png")
    c1 = [{**p, "label": p["label"]} for c in report["claims"] if c["id"] == "C1" for p in c["parts"]]
    plots.save(plots.forest(c1, title="C1: STAMP against every baseline", xlabel="paired difference (> 0: STAMP better)"),
               out / "claims_forest_c1.png")
    print(markdown(report))
    print(f"wrote {path}, {out / 'claims.md'} and the forest plots (runs took {raw['wall_time_s'] / 60:.1f} min)")


def run_options(p, name, report):
    """The options of every bench over the study API (this one, beat_replay.py): how it runs, its cache
    (runs/NAME-cache), where its report goes (`report`: what --report-only rewrites)."""
    p.add_argument("--quick", action="store_true", help="2 seeds, tiny budget, no tuning: a smoke test")
    p.add_argument("--workers", type=int, default=2, help="runs at a time on this machine (one thread each)")
    p.add_argument("--engine", default="local", help="local | ray")
    p.add_argument("--address", default=None, help="Ray cluster address (engine ray)")
    p.add_argument("--cache", default=f"runs/{name}-cache", help="finished runs (an interrupted run continues from here)")
    p.add_argument("--out-dir", default=None, help=f"where the report goes (default bench/results; --quick: runs/{name}-quick)")
    p.add_argument("--report-only", action="store_true", help=f"no runs: {report} again from OUT_DIR's json")


def out_dir(p, a, name):
    """OUT_DIR of run_options: bench/results, or runs/NAME-quick for --quick, which never writes there.
    The options are checked first (--workers: 1 to 1024)."""
    if not 1 <= a.workers <= 1024:
        p.error(f"--workers {a.workers} is out of range: 1 to 1024 runs at a time")
    committed = Path(__file__).resolve().parent / "results"
    out = Path(a.out_dir) if a.out_dir else Path(f"runs/{name}-quick") if a.quick else committed
    if a.quick and out.resolve() == committed:
        p.error("--quick never writes over the committed results (bench/results); allowed: another --out-dir")
    return out


def main():
    p = OneLineParser(prog="python bench/claims.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_options(p, "claims", "verdicts and claims.md")
    p.add_argument("--seeds", type=int, default=None, help="confirmation seeds 0..S-1 (default 10; --quick: 2)")
    a = p.parse_args()
    if a.seeds is not None and not 2 <= a.seeds <= 1000:
        p.error(f"--seeds {a.seeds} is out of range: 2 to 1000 (a paired interval needs 2 seeds at least)")
    out = out_dir(p, a, "claims")
    if a.report_only:
        return rewrite(out, json.loads((out / "claims.json").read_text())["raw"])
    seeds = list(range(a.seeds or (2 if a.quick else 10)))
    raw = run_all(a, {**BUDGET, **(QUICK if a.quick else {})}, seeds)
    out.mkdir(parents=True, exist_ok=True)
    rewrite(out, raw)


if __name__ == "__main__":
    main()
