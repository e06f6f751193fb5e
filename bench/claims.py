"""What holds up: every claim of the two papers, and STAMP's open questions, measured with enough
seeds to tell, on the offline digits data.

    python bench/claims.py                  # the full run: 10 seeds -> bench/results/claims.{json,md}
    python bench/claims.py --quick --out-dir /tmp/claims   # 2 seeds, tiny budget: a smoke test (CI runs it)

THE VERDICT RULE, fixed before any result was looked at
-------------------------------------------------------
Every comparison is paired: arms A and B run on the same seeds, and seed s gives both the same
scenario, initial model and batch order. d_s = metric(A, s) − metric(B, s), signed so that d > 0
is what the claim says (for forgetting, lower is better: d_s = forgetting(B) − forgetting(A)).
Over n seeds: 95 % interval = mean(d) ± t(0.975, n − 1) · sd(d) / √n (Student t). δ is the
smallest effect worth reporting: 0.01 (one point of accuracy or of forgetting) unless a row says
otherwise.
  "better"  (A beats B)    supported:    the whole interval is above 0 (however small the gain)
                           contradicted: the whole interval is below 0, or it contains 0 and lies
                                         inside (−δ, δ) (no sign of a gain, and none as large as δ)
                           inconclusive: otherwise
  "same"    (A equals B)   supported:    the whole interval is inside (−δ, δ)
                           contradicted: the whole interval is above 0 or below 0
                           inconclusive: otherwise
  "exact"   (an identity)  supported if it holds in every run, contradicted otherwise.
A claim made of several comparisons (C1: every baseline, every setting) is supported when every
part is, contradicted when any part is, inconclusive otherwise. No correction for multiplicity:
with ~90 intervals at 95 %, a few that barely exclude 0 may do so by chance; the report says so.

Fixed in advance as well: the settings, seeds 0..9, the budget (bench/compare.py's), the lr grid,
and the direction of every claim. Learning rates are tuned per (setting, method) on a validation
split held out of the training images (seed 0, as bench/compare.py does); variants of a method
(another coreset rule, solver, buffer size, ...) use the method's tuned lr. η_t is tuned like a
learning rate for C8. FLoRA-NA's experiment (F1) uses its default lr for every aggregator: the
clients train identically, only the server rule differs.
"""

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stamp_min.cli import run_info, write_json  # noqa: E402
from stamp_min.metrics import t_quantile  # noqa: E402  (the one Student t quantile: also plots.interval)

DELTA = 0.01
SETTINGS = {"cpt 1": dict(classes_per_task=1), "cpt 2": dict(classes_per_task=2), "cpt 5": dict(classes_per_task=5),
            "Dirichlet α 0.1": dict(scenario="dirichlet", alpha=0.1), "Dirichlet α 1": dict(scenario="dirichlet", alpha=1.0),
            "short local training": dict(local_epochs=1, batch_size=64), "20 % noisy labels": dict()}
BUDGET = dict(dataset="digits", num_clients=5, rounds_per_task=5, local_epochs=2, batch_size=16, buffer_per_class=10)
QUICK = dict(num_clients=2, num_tasks=2, rounds_per_task=1, local_epochs=1)
BASELINES = ("fedavg", "fedprox", "ewc", "lwf", "replay", "agem")
NOISE = 0.2                                   # share of training labels replaced by another class (Q2)


# ----------------------------------------------------------------------------- statistics

def interval(d):
    """(mean, low, high) of the 95 % Student-t interval of the paired differences d."""
    n, m = len(d), statistics.mean(d)
    if n < 2:
        return m, -math.inf, math.inf
    half = t_quantile(0.975, n - 1) * statistics.stdev(d) / math.sqrt(n)
    return m, m - half, m + half


def verdict(low, high, kind="better", delta=DELTA):
    """The rule at the top of this file, for one comparison."""
    if kind == "better":
        if low > 0:
            return "supported"
        return "contradicted" if high < 0 or (-delta < low and high < delta) else "inconclusive"
    if kind == "same":
        if -delta < low and high < delta:
            return "supported"
        return "contradicted" if low > 0 or high < 0 else "inconclusive"
    raise ValueError(kind)


def combined(verdicts):
    """A claim of several comparisons: supported if all are, contradicted if any is."""
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    return "contradicted" if "contradicted" in verdicts else "inconclusive"


# ----------------------------------------------------------------------------- variants (workbench rules)

def match_per_layer(updates, c=0.25, solver="exact", normalize=False, G=None, **kw):
    """Q1: GM of every parameter tensor on its own."""
    import torch
    from stamp_min import gradmatch
    return {n: gradmatch.match(torch.stack([u[n] for u in updates]), c=c, solver=solver, normalize=normalize, **kw)
            for n in updates[0]}


def frozen_encoder_end_task(cfg):
    """Q3: the coreset chosen by the initial model θ_0's encoder instead of the end-of-task model's."""
    from stamp_min import client
    from stamp_min.fcl_loop import build
    theta0 = client.float_state(build(cfg)[2])

    def end_task(model, theta, state, x, y, classes, cfg):
        client.end_task(model, theta0, state, x, y, classes, cfg)
    return end_task


def noisy(ds, rate, seed):
    """A copy of `ds` with `rate` of its training labels replaced by another class (seeded)."""
    import torch
    g = torch.Generator().manual_seed(10_000 + seed)
    y = ds.y_train.clone()
    flip = torch.rand(len(y), generator=g) < rate
    y[flip] = (y[flip] + torch.randint(1, ds.num_classes, (int(flip.sum()),), generator=g)) % ds.num_classes
    return replace(ds, y_train=y)


# ----------------------------------------------------------------------------- one run

def one(job):
    """Run one arm on one seed (in a worker process, one thread); a dict of what the claims need."""
    import torch
    torch.set_num_threads(1)
    from stamp_min import UserError
    kind, kw = job
    if kind == "flora":
        from stamp_min.flora_loop import Config as FConfig, run as frun
        r = frun(FConfig(**kw, quiet=True))
        return {"final_accuracy": r["final_accuracy"], "residual": statistics.mean(r["residual"])}
    from stamp_min.data import load_dataset
    from stamp_min.fcl_loop import Config, run
    kw = dict(kw)
    variant, data = kw.pop("variant", None), kw.pop("data", None)
    cfg = Config(**kw, quiet=True, plot=False)
    rules = {}
    if variant == "per layer":
        rules = dict(match=match_per_layer)
    elif variant == "frozen encoder":
        rules = dict(end_task=frozen_encoder_end_task(cfg))
    ds = noisy(load_dataset("digits"), NOISE, cfg.seed) if data == "noisy" else None
    try:
        r = run(cfg, ds, **rules)
    except UserError as e:                        # diverged: counts as a failed run (never chosen in tuning)
        return {"error": str(e)}
    log = r["rounds"]
    return {"avg_accuracy": r["avg_accuracy"], "avg_forgetting": r["avg_forgetting"], "bwt": r["bwt"],
            "comm_bytes": r["comm_bytes"], "buffer_bytes": r["buffer_bytes"], "wall_time_s": r["wall_time_s"],
            "scenario": r["scenario"],
            "step_over_mean": [e["step_norm"] / e["mean_norm"] for e in log if e["mean_norm"] > 0],
            "step_over_updates": [e["step_norm"] / statistics.mean(e["update_norms"]) for e in log
                                  if statistics.mean(e["update_norms"]) > 0]}


# ----------------------------------------------------------------------------- arms and claims

def arm(setting, method, variant=None, **overrides):
    """One arm: a method in a setting with some overrides (hashable). C1's settings tune their own
    lr; every other arm uses its method's lr tuned at cpt 2 (with its own η_t)."""
    return (setting, method, variant, tuple(sorted(overrides.items())))


def tuning_key(a):
    setting, method, _, overrides = a
    eta = dict(overrides).get("eta_t", 1.0)
    return (setting if setting in C1_SETTINGS else "cpt 2", method, eta)


C1_SETTINGS = ("cpt 1", "cpt 2", "cpt 5", "Dirichlet α 0.1", "Dirichlet α 1")
STAMP = arm("cpt 2", "stamp")
ACC, FORGET = "avg_accuracy", "forgetting"


def part(label, a, b, metric=ACC, kind="better", delta=DELTA):
    return {"label": label, "a": a, "b": b, "metric": metric, "kind": kind, "delta": delta}


def claims():
    """Every claim: id, the claim in the papers' words (METHOD.md), our setting, its comparisons."""
    c1 = [part(f"{s} · vs {b} · {'accuracy' if m == ACC else 'forgetting'}", arm(s, "stamp"), arm(s, b), m)
          for s in C1_SETTINGS for b in BASELINES for m in (ACC, FORGET)]
    buffers = (2, 5, 10, 20)
    flora = ("fedit", "ffa", "fedsa", "flora", "fedex")
    return [
        dict(id="C1", claim="STAMP beats FedAvg, FedProx, FL+EWC, FL+LwF and replay baselines on average accuracy "
             "and forgetting, at 2 and at 20 classes per task", setting="5 clients; 1, 2, 5 classes per task "
             "(permutation scenario) and Dirichlet label skew α 0.1 and 1; every baseline (replay, A-GEM: same buffer)",
             parts=c1),
        dict(id="C2a", claim="both TAM and SAM contribute (ablation): temporal matching is what fights forgetting",
             setting="forgetting of STAMP against STAMP without TAM (stamp_sam)",
             parts=[part(f"{s} · stamp vs stamp_sam · forgetting", arm(s, "stamp"), arm(s, "stamp_sam"), FORGET)
                    for s in ("cpt 2", "Dirichlet α 0.1")]),
        dict(id="C2b", claim="both TAM and SAM contribute (ablation): spatial matching is what helps under heterogeneity",
             setting="accuracy of STAMP against STAMP without SAM (stamp_tam); SAM alone against FedAvg",
             parts=[part(f"{s} · stamp vs stamp_tam", arm(s, "stamp"), arm(s, "stamp_tam")) for s in ("cpt 2", "Dirichlet α 0.1")]
             + [part("cpt 2 · stamp_sam vs fedavg", arm("cpt 2", "stamp_sam"), arm("cpt 2", "fedavg"))]),
        dict(id="C3a", claim="the prototypical coreset beats random and nearest-to-prototype selection at equal size",
             setting="STAMP at cpt 2, 10 images per class, three selection rules",
             parts=[part(f"herding vs {r}", STAMP, arm("cpt 2", "stamp", coreset_rule=r)) for r in ("random", "nearest")]),
        dict(id="C3b", claim="more buffer helps", setting="STAMP at cpt 2, 20 against 2 images per class",
             parts=[part("m = 20 vs m = 2", arm("cpt 2", "stamp", buffer_per_class=20), arm("cpt 2", "stamp", buffer_per_class=2))]),
        dict(id="C3c", claim="STAMP beats the replay baseline, at every buffer size", setting="cpt 2; STAMP and replay "
             "with the same buffer, m = 2, 5, 10, 20 images per class",
             parts=[part(f"m = {m} · stamp vs replay", arm("cpt 2", "stamp", **({} if m == 10 else {"buffer_per_class": m})),
                         arm("cpt 2", "replay", **({} if m == 10 else {"buffer_per_class": m}))) for m in buffers]),
        dict(id="C4", claim="MixStyle diversifies the small buffer when it is replayed (it helps at a fixed buffer size)",
             setting="STAMP at cpt 2, MixStyle on against off", parts=[part("on vs off", STAMP, arm("cpt 2", "stamp", mixstyle=False))]),
        dict(id="C5", claim="gradient normalisation is critical", setting="STAMP at cpt 2, every update rescaled to "
             "the mean norm before GM (gm_normalize) against not", parts=[part("on vs off", arm("cpt 2", "stamp", gm_normalize=True), STAMP)]),
        dict(id="C6", claim="the GM solver does not change the result: the authors' inexact solver (sgd) and adam "
             "give the exact solver's final accuracy", setting="STAMP at cpt 2 (client and server GM)",
             parts=[part(f"{sv} vs exact", arm("cpt 2", "stamp", gm_solver=sv), STAMP, kind="same") for sv in ("sgd", "adam")]),
        dict(id="C7", claim="communication per round equals FedAvg's, and client memory is bounded by the buffer",
             setting="every C1 run: comm bytes of STAMP = FedAvg's, same seed; buffer bytes <= m x classes seen x bytes per "
             "image + label, and = replay's", parts=[], kind="exact"),
        dict(id="C8", claim="the client step η_t = 2 of the authors' code beats η_t = 1", setting="STAMP at cpt 2, "
             "the lr tuned separately for each η_t; η_t itself tuned on the validation split like a learning rate",
             parts=[part("η_t = 2 vs 1", arm("cpt 2", "stamp", eta_t=2.0), STAMP)]),
        dict(id="Q1", claim="(open) GM solved per layer gives the same accuracy as GM over the whole model",
             setting="STAMP at cpt 2; `match=` per parameter tensor for TAM and SAM",
             parts=[part("per layer vs whole model", arm("cpt 2", "stamp", "per layer"), STAMP, kind="same")]),
        dict(id="Q2", claim="(open) matching stays useful when local training is short or labels are noisy",
             setting=f"cpt 2 with 1 local epoch of batch 64 (short), or {NOISE:.0%} of training labels flipped; "
             "STAMP against each ablation",
             parts=[part(f"{s} · stamp vs {b}", arm(s, "stamp"), arm(s, b)) for s in ("short local training", "20 % noisy labels")
                    for b in ("stamp_tam", "stamp_sam")]),
        dict(id="Q3", claim="(open) a coreset chosen by the current model beats one chosen by the frozen initial "
             "encoder (encoder drift)", setting="STAMP at cpt 2; herding with θ at the task's end against θ_0",
             parts=[part("current vs frozen θ_0", STAMP, arm("cpt 2", "stamp", "frozen encoder"))]),
        dict(id="S1a", claim="(stress) with one class per client per task, SAM's matched step is shorter than the "
             "plain mean of the client updates", setting="STAMP at cpt 1; d = 1 − mean over rounds of "
             "‖step‖/‖plain mean‖", parts=[part("1 − ‖step‖/‖d̄‖", arm("cpt 1", "stamp"), None, "shrink_vs_mean", delta=0.05)]),
        dict(id="S1b", claim="(stress) the server's step shrinks, relative to the clients' updates, as heterogeneity "
             "grows", setting="STAMP, cpt 1 against cpt 5; ‖step‖ / mean_k ‖Δ_k‖, mean over rounds (paired by seed "
             "only: the arms' scenarios differ, 10 tasks against 2)",
             parts=[part("cpt 1 vs cpt 5", arm("cpt 1", "stamp"), arm("cpt 5", "stamp"), "shrink_vs_updates", delta=0.05)]),
        dict(id="F1", claim="FLoRA-NA achieves state-of-the-art global performance (against FedIT, FFA-LoRA, "
             "FedSA-LoRA, FLoRA, FedEx-LoRA), with FedIT's payload", setting="python -m stamp_min.flora_loop "
             "defaults (10 clients, Dirichlet α 0.1, rotated digits, rank 4, 20 rounds); final global accuracy, and "
             "the mean residual of each run (FedIT's payload: exact bytes in docs/flora.md's comparison table, "
             "bench/flora_compare.py)",
             parts=[part(f"flora_na vs {f}", ("flora", "flora_na"), ("flora", f), "final_accuracy") for f in flora]
             + [part("residual below FedIT's", ("flora", "flora_na"), ("flora", "fedit"), "residual", delta=1e-4)]),
    ]


def raw(r, metric):
    """The metric as reported (forgetting as forgetting, S1's ratios as ratios)."""
    if metric == FORGET:
        return r["avg_forgetting"]
    if metric == "shrink_vs_mean":
        return statistics.mean(r["step_over_mean"])
    if metric == "shrink_vs_updates":
        return statistics.mean(r["step_over_updates"])
    return r[metric]


def value(r, metric):
    """The number compared, oriented so that larger is what a claim says is better."""
    if metric == FORGET:
        return -r["avg_forgetting"]
    if metric == "residual":
        return -r["residual"]
    if metric == "shrink_vs_mean":
        return 1 - statistics.mean(r["step_over_mean"])
    if metric == "shrink_vs_updates":
        return -statistics.mean(r["step_over_updates"])
    return r[metric]


# ----------------------------------------------------------------------------- the run

def config(a, seed, quick, lr=None, validation=False):
    """The job of arm `a` on one seed."""
    if a[0] == "flora":
        kw = dict(aggregator=a[1], seed=seed)
        return ("flora", {**kw, **(dict(rounds=2, pretrain_epochs=1, local_epochs=1) if quick else {})})
    setting, method, variant, overrides = a
    kw = {**BUDGET, **SETTINGS[setting], **(QUICK if quick else {}), "method": method, **dict(overrides), "seed": seed,
          "validation": validation, "variant": variant, "data": "noisy" if setting == "20 % noisy labels" else None}
    if lr is not None:
        kw["lr"] = lr
    return ("fcl", kw)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 seeds, tiny budget, one lr: a smoke test")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (default 10; --quick: 2)")
    p.add_argument("--grid", default=None, help="learning rates tried per method (default 0.03,0.1,0.2; --quick: 0.1)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out-dir", default="bench/results", help="where claims.json and claims.md go")
    p.add_argument("--report-only", action="store_true",
                   help="no runs: recompute the verdicts and claims.md from the runs stored in OUT_DIR/claims.json")
    a = p.parse_args()
    if a.report_only:
        return rewrite(Path(a.out_dir))
    seeds = list(range(a.seeds or (2 if a.quick else 10)))
    grid = [float(g) for g in (a.grid or ("0.1" if a.quick else "0.03,0.1,0.2")).split(",")]
    start = time.perf_counter()
    table = claims()
    arms = sorted({x for c in table for pt in c["parts"] for x in (pt["a"], pt["b"]) if x is not None}
                  | {arm(s, m) for s in C1_SETTINGS for m in ("stamp", "fedavg", "replay")}, key=str)   # C7's runs
    fcl = [x for x in arms if x[0] != "flora"]
    keys = sorted({tuning_key(x) for x in fcl} | {("cpt 2", "stamp", 2.0)}, key=str)
    with ProcessPoolExecutor(a.workers) as pool:
        # 1. tuning on the validation split (seed 0); a single-value grid needs no run
        val = {}
        if len(grid) > 1:
            jobs = {(k, lr): pool.submit(one, config(arm(k[0], k[1], eta_t=k[2]), 0, a.quick, lr, validation=True))
                    for k in keys for lr in grid}
            val = {key: f.result() for key, f in jobs.items()}
        score = lambda r: r.get("avg_accuracy", -1.0)                                   # noqa: E731
        best = {k: max(grid, key=lambda lr: score(val[k, lr])) if val else grid[0] for k in keys}
        print(f"tuned {len(keys)} (setting, method, η_t) on the validation split in {time.perf_counter() - start:.0f} s",
              flush=True)
        # 2. every arm on every seed
        jobs = {(x, s): pool.submit(one, config(x, s, a.quick, None if x[0] == "flora" else best[tuning_key(x)]))
                for x in arms for s in seeds}
        res, done = {}, 0
        for key, f in jobs.items():
            res[key] = f.result()
            done += 1
            if done % 50 == 0:
                print(f"  {done}/{len(jobs)} runs, {time.perf_counter() - start:.0f} s", flush=True)
    wall = time.perf_counter() - start
    raw = {"wall_time_s": wall, "quick": a.quick, "seeds": seeds, "grid": grid, "budget": {**BUDGET, **(QUICK if a.quick else {})},
           "command": "python bench/claims.py" + (" --quick" if a.quick else ""), "versions": run_info(),
           "best": [[list(k), lr] for k, lr in best.items()], "validation": [[list(k), lr, r] for (k, lr), r in val.items()],
           "runs": [[list(x), s, r] for (x, s), r in res.items()]}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "claims.json", {"raw": raw})         # the runs first: a reporting bug never costs the runs
    rewrite(out)


def key(x):
    """An arm back from JSON lists into the hashable tuple."""
    return tuple(x[:3]) + (tuple(tuple(o) for o in x[3]),) if x[0] != "flora" else tuple(x)


def rewrite(out):
    """Verdicts, claims.json and claims.md from the raw runs stored in out/claims.json."""
    raw = json.loads((out / "claims.json").read_text())["raw"]
    res = {(key(x), s): r for x, s, r in raw["runs"]}
    best = {tuple(k): lr for k, lr in raw["best"]}
    val = {(tuple(k), lr): r for k, lr, r in raw["validation"]}
    report = evaluate(claims(), res, raw["seeds"], best, val, raw["grid"])
    report.update({k: raw[k] for k in ("wall_time_s", "quick", "seeds", "grid", "budget", "command", "versions")})
    write_json(out / "claims.json", {**report, "raw": raw})
    (out / "claims.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'claims.json'} and {out / 'claims.md'} (runs took {raw['wall_time_s'] / 60:.1f} min)")


# ----------------------------------------------------------------------------- verdicts and the report

def name(a):
    if a[0] == "flora":
        return a[1]
    setting, method, variant, overrides = a
    extra = [variant] if variant else []
    extra += [f"{k}={v}" for k, v in overrides]
    return f"{method} ({setting}{', ' if extra else ''}{', '.join(extra)})"


def evaluate(table, res, seeds, best, val, grid):
    """Every part's paired differences, interval and verdict; every claim's verdict; the extras."""
    out = {"claims": [], "tuned_lr": {f"{k[0]} | {k[1]} | η_t {k[2]}": lr for k, lr in best.items()}}
    for c in table:
        parts = []
        for pt in c["parts"]:
            ok = [s for s in seeds if "error" not in res[pt["a"], s] and (pt["b"] is None or "error" not in res[pt["b"], s])]
            d = [value(res[pt["a"], s], pt["metric"]) - (value(res[pt["b"], s], pt["metric"]) if pt["b"] else 0.0) for s in ok]
            mean, low, high = interval(d) if d else (math.nan, -math.inf, math.inf)
            parts.append({"label": pt["label"], "a": name(pt["a"]), "b": name(pt["b"]) if pt["b"] else None,
                          "metric": pt["metric"], "kind": pt["kind"], "delta": pt["delta"], "n": len(d),
                          "failed_seeds": [s for s in seeds if s not in ok], "differences": d, "mean": mean,
                          "low": low, "high": high, "verdict": verdict(low, high, pt["kind"], pt["delta"]) if d else "inconclusive",
                          "a_mean": statistics.mean(raw(res[pt["a"], s], pt["metric"]) for s in ok) if ok else math.nan,
                          "b_mean": statistics.mean(raw(res[pt["b"], s], pt["metric"]) for s in ok) if ok and pt["b"] else None})
        entry = {k: c[k] for k in ("id", "claim", "setting")}
        if c.get("kind") == "exact":
            parts = exact_checks(res, seeds)
        entry.update(parts=parts, verdict=combined([x["verdict"] for x in parts]), n=min((x["n"] for x in parts), default=0))
        out["claims"].append(entry)
    # C8: which η_t the validation split picks, and STAMP's rank among the cpt-2 methods at each η_t
    if val:
        score = {eta: max(val[("cpt 2", "stamp", eta), lr].get("avg_accuracy", -1) for lr in grid) for eta in (1.0, 2.0)}
        out["eta_t_tuned"] = max(score, key=score.get)
        out["eta_t_validation"] = score
    acc = lambda a: statistics.mean(res[a, s]["avg_accuracy"] for s in seeds if "error" not in res[a, s])   # noqa: E731
    others = {b: acc(arm("cpt 2", b)) for b in BASELINES}
    out["stamp_rank_cpt2"] = {f"η_t = {eta:g}": 1 + sum(v > acc(arm("cpt 2", "stamp", **({} if eta == 1 else {"eta_t": eta})))
                                                         for v in others.values()) for eta in (1.0, 2.0)}
    out["stamp_rank_of"] = 1 + len(BASELINES)
    # S1: the observed range of ‖step‖/‖d̄‖ against GM's bounds (METHOD §1.2, up to the 1e-4 stabilisers)
    ratios = [x for s in seeds for x in res[arm("cpt 1", "stamp"), s].get("step_over_mean", [])]
    c = 0.25
    out["s1"] = {"min": min(ratios, default=math.nan), "max": max(ratios, default=math.nan), "c": c,
                 "bound_low": (1 - c) / (1 + c * c), "bound_high": (1 + c) / (1 + c * c)}
    for s in ("cpt 1", "cpt 5"):          # S1b split: ‖step‖/mean‖Δ_k‖ = (‖step‖/‖d̄‖) · (‖d̄‖/mean‖Δ_k‖)
        runs = [res[arm(s, "stamp"), x] for x in seeds if "error" not in res[arm(s, "stamp"), x]]
        pairs = [(a, b) for r in runs for a, b in zip(r["step_over_mean"], r["step_over_updates"])]
        out["s1"][s] = {"step_over_mean": statistics.mean(a for a, _ in pairs),
                        "mean_over_updates": statistics.mean(b / a for a, b in pairs)}
    # every C1 arm as a table (mean ± sd over seeds): the comparison in docs/stamp.md
    methods = ("stamp", "stamp_tam", "stamp_sam") + BASELINES
    out["c1_table"] = {s: {m: {k: [res[arm(s, m), x][k] for x in seeds if "error" not in res[arm(s, m), x]]
                               for k in ("avg_accuracy", "avg_forgetting", "bwt", "wall_time_s")}
                           for m in methods if (arm(s, m), seeds[0]) in res} for s in C1_SETTINGS}
    return out


def exact_checks(res, seeds):
    """C7, exactly: STAMP's bytes sent = FedAvg's; its buffer <= m·(classes each client saw)·(image + label
    bytes) and = replay's (same m, same classes)."""
    from stamp_min.data import load_dataset
    ds = load_dataset("digits")
    per_image = ds.x_train[0].numel() * ds.x_train.element_size() + 8          # uint8 image + int64 label
    checks = {"communication = FedAvg's": [], "buffer <= m x classes seen x bytes": [], "buffer = replay's": []}
    for s in C1_SETTINGS:
        for seed in seeds:
            st, fa, rp = (res[arm(s, m), seed] for m in ("stamp", "fedavg", "replay"))
            if any("error" in r for r in (st, fa, rp)):
                continue
            m = BUDGET["buffer_per_class"]
            bound = sum(len({c for task in row for c in task}) for row in st["scenario"]) * m * per_image
            checks["communication = FedAvg's"].append(st["comm_bytes"] == fa["comm_bytes"])
            checks["buffer <= m x classes seen x bytes"].append(0 < st["buffer_bytes"] <= bound)
            checks["buffer = replay's"].append(st["buffer_bytes"] == rp["buffer_bytes"])
    return [{"label": k, "kind": "exact", "n": len(v), "holds": sum(v), "verdict": "supported" if v and all(v) else
             "contradicted" if v else "inconclusive"} for k, v in checks.items()]


def fmt_effect(x):
    if x["kind"] == "exact":
        return f"holds in {x['holds']} of {x['n']} runs"
    digits = 4 if x["delta"] < 1e-3 else 3
    return f"{x['mean']:+.{digits}f} [{x['low']:+.{digits}f}, {x['high']:+.{digits}f}]"


def markdown(rep):
    seeds, lines = rep["seeds"], []
    lines += [f"# What holds up: the papers' claims, measured ({'QUICK smoke run, not a result' if rep['quick'] else 'full run'})", "",
              f"`{rep['command']}`: {len(seeds)} paired seeds, {rep['wall_time_s'] / 60:.1f} min on this machine "
              f"(2 worker processes, one thread each). Budget: {rep['budget']}; lr grid {rep['grid']}.", "",
              "Effect = mean paired difference A − B over seeds, signed so that > 0 is what the claim says "
              "(forgetting: B − A), with its 95 % Student-t interval. Verdict rule (top of bench/claims.py): "
              "*better* claims are supported when the interval is above 0, contradicted when it is below 0 "
              "or inside ±δ; *same* claims are supported inside ±δ, contradicted when the interval excludes 0; "
              "δ = 0.01 unless stated. A claim of several comparisons is supported only if every one is.", "",
              "| id | claim | our setting | effect [95 % CI] | seeds | verdict |", "|---|---|---|---|---|---|"]
    for c in rep["claims"]:
        if len(c["parts"]) == 1:
            x = c["parts"][0]
            effect = fmt_effect(x) + ("" if x["kind"] == "exact" or x["b_mean"] is None else
                                      f" (A {x['a_mean']:.3f}, B {x['b_mean']:.3f})")
        else:
            counts = {v: sum(p["verdict"] == v for p in c["parts"]) for v in ("supported", "contradicted", "inconclusive")}
            effect = f"{len(c['parts'])} comparisons: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        lines.append(f"| {c['id']} | {c['claim']} | {c['setting']} | {effect} | {c['n']} | **{c['verdict']}** |")
    for c in rep["claims"]:
        if len(c["parts"]) > 1:
            lines += ["", f"**{c['id']}**, every comparison (A, B: the metric's mean over seeds, as reported)", "",
                      "| comparison | A | B | effect [95 % CI] | seeds | verdict |",
                      "|---|---|---|---|---|---|"]
            for p in c["parts"]:
                ab = ("", "") if p["kind"] == "exact" else (f"{p['a_mean']:.3f}", "" if p["b_mean"] is None else f"{p['b_mean']:.3f}")
                lines.append(f"| {p['label']} | {ab[0]} | {ab[1]} | {fmt_effect(p)} | {p['n']} | {p['verdict']} |")
    s1 = rep["s1"]
    lines += ["", f"**S1**: over every round of STAMP at cpt 1, ‖step‖/‖plain mean‖ ranged {s1['min']:.3f} .. {s1['max']:.3f}; "
              f"GM keeps it within [(1 − c)/(1 + c²), (1 + c)/(1 + c²)] = [{s1['bound_low']:.3f}, {s1['bound_high']:.3f}] "
              f"at c = {s1['c']} (METHOD §1.2: the matched direction lies within c‖d̄‖ of d̄, then is divided by 1 + c²), "
              "so SAM cannot shrink the step to zero relative to the mean. S1b splits into GM's factor ‖step‖/‖d̄‖ "
              f"({s1['cpt 1']['step_over_mean']:.3f} at cpt 1, {s1['cpt 5']['step_over_mean']:.3f} at cpt 5) and the "
              f"mean's own length against the updates, ‖d̄‖/mean‖Δ_k‖ ({s1['cpt 1']['mean_over_updates']:.3f} and "
              f"{s1['cpt 5']['mean_over_updates']:.3f}): the clients' updates cancel more at cpt 1."]
    lines += ["", f"**Multiplicity**: {sum(len(c['parts']) for c in rep['claims'])} comparisons, each at 95 %, no "
              "correction: if nothing were real, about 1 in 20 intervals would still exclude 0. The verdicts whose "
              "interval only just clears 0 are the first to doubt: "
              + "; ".join(f"{c['id']} {p['label']} [{p['low']:+.3f}, {p['high']:+.3f}]" for c in rep["claims"]
                          for p in c["parts"] if p["kind"] != "exact" and p["verdict"] != "inconclusive" and p["delta"] == DELTA
                          and min(abs(p["low"]), abs(p["high"])) < 0.005 and p["low"] * p["high"] > 0) + "."]
    if "eta_t_tuned" in rep:
        lines += ["", f"**C8**: tuned like a learning rate on the validation split, η_t = {rep['eta_t_tuned']:g} wins "
                  f"(best validation accuracy {', '.join(f'η_t {k:g}: {v:.3f}' for k, v in rep['eta_t_validation'].items())})."]
    lines += ["", f"STAMP's rank by mean test accuracy among itself and the {len(BASELINES)} baselines at cpt 2: "
              + ", ".join(f"{k}: {v} of {rep['stamp_rank_of']}" for k, v in rep["stamp_rank_cpt2"].items()) + "."]
    lines += ["", f"**Every C1 arm** (mean ± sd over {len(seeds)} seeds; lr tuned per setting and method):", ""]
    for s, methods in rep["c1_table"].items():
        lines += [f"*{s}*", "", "| method | lr | avg accuracy | forgetting | BWT | wall s |", "|---|---|---|---|---|---|"]
        for m, v in methods.items():
            pm = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else (f"{xs[0]:.3f}" if xs else "–")  # noqa: E731
            lr = rep["tuned_lr"].get(f"{s} | {m} | η_t 1.0", rep["tuned_lr"].get(f"cpt 2 | {m} | η_t 1.0"))
            if not v["avg_accuracy"]:
                lines.append(f"| {m} | {lr:g} | diverged on every seed | | | |")
                continue
            failed = len(seeds) - len(v["avg_accuracy"])
            lines.append(f"| {m} | {lr:g} | {pm(v['avg_accuracy'])}{f' ({failed} seeds diverged)' if failed else ''} | "
                         f"{pm(v['avg_forgetting'])} | {pm(v['bwt'])} | {statistics.mean(v['wall_time_s']):.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
