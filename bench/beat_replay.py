"""Can matching beat replay? A pre-registered search for a STAMP variant that beats tuned replay
(issue 25), over the study API (stamp_min/study.py) on the offline digits data.

    python bench/beat_replay.py --workers 2     # the full run -> bench/results/beat_replay.{json,md}, beat_replay_forest.png
    python bench/beat_replay.py --quick         # a smoke run (2 seeds, tiny budget, no tuning) -> runs/beat-replay-quick/
    python bench/beat_replay.py --report-only   # comparisons, decisions and the .md again from OUT_DIR/beat_replay.json
    python bench/beat_replay.py --time          # one timed run of every arm: the full run's time on this machine

PRE-REGISTERED: everything below was fixed in this file, and committed, before any confirmation run.
------------------------------------------------------------------------------------------------
Why: the claims bench (bench/claims.py, C3c) found plain replay with the same buffer ahead of STAMP
in accuracy at 1 and 2 classes per task and under Dirichlet skew. Leads (notebook 09, 3 seeds,
untuned) pointed at variants that might close the gap; this bench tests them on fresh seeds.

Candidates (CANDIDATES, V1 … V7): each a variant that could plausibly beat replay, with the one-line
reason kept beside it. V1–V5 and V7 are matching variants; V6 is not (a memory control: replay
with another buffer of the same bytes). Reference: replay (method replay). STAMP itself runs too,
as a reading aid; it is no candidate and is not part of the decision.

Settings: cpt 2, cpt 1, Dirichlet α 0.1, literally claims.SETTINGS (where replay is below its
ceiling); budget: claims.BUDGET (5 clients, 5 rounds × 2 epochs per task, batch 16, m = 10 images
per class). Metric: average accuracy decides; average forgetting and wall time are reported.

Tuning: every arm, replay included, in every setting, by study() on the validation split with the
study API's tuning seeds (tuning.TUNE_SEEDS, 10000–10002): lr over tuning.LR_GRID (0.025 … 0.4,
extended at an edge); every arm whose clients replay a buffer (replay, V3, V4, V6) tunes replay_share
over claims.SHARES with it (as the claims bench does); the arms with a server optimiser tune its
server_lr over a 3-point grid; V5 tunes η_t. Each arm's grid is its `tune` entry below.

Confirmation seeds: 20–29, each with its own test split. They are fresh: the claims bench uses
0–9, notebook 09's leads used 0–2, and no run of this file has used them before this commit.

Memory and communication: every arm's clients send θ's bytes up and down each round (as replay's)
and keep m images per class seen (as replay's); the report checks both on every seed. The server
optimisers keep model-sized moments on the server (FedAvgM: one copy of the trainable weights,
FedAdam: two): their bytes are stated in the report.

DECISION RULE. In each setting, compare(s, candidate, "replay", metric="avg_accuracy",
kind="better", delta=0.01): the paired differences over the confirmation seeds, their 95 %
Student-t interval and the library's verdict (stamp_min/metrics.py). A candidate BEATS REPLAY when
(1) its interval lies wholly above 0 ("supported") in at least one setting, with every confirmation
seed paired there (no failed run on either side), and (2) its interval lies wholly below 0 in no
setting. Otherwise: "mixed" (above 0 somewhere, below 0 elsewhere), "worse" (below 0 somewhere,
above nowhere) or "not shown". The 95 % reading decides, as in the claims bench. As a secondary
reading, the same rule on Bonferroni-adjusted intervals (level 1 − 0.05/21: 7 candidates × 3
settings) shows how many wins survive multiplicity; it does not decide.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims  # noqa: E402  (its SETTINGS, BUDGET, QUICK, SHARES, DELTA: the claims bench's, literally)
from stamp_min import baselines, client, fcl_loop, gradmatch, plots  # noqa: E402
from stamp_min.cli import OneLineParser, run_info, write_json  # noqa: E402
from stamp_min.coreset import Buffer, select_k_center, task_key  # noqa: E402
from stamp_min.fcl_loop import Config, build  # noqa: E402
from stamp_min.metrics import paired_interval  # noqa: E402
from stamp_min.rules import qualname  # noqa: E402
from stamp_min.study import Study, arm_config, compare, study  # noqa: E402
from stamp_min.tuning import LR_GRID, TUNE_SEEDS, describe, ratio  # noqa: E402

SETTINGS = {s: claims.SETTINGS[s] for s in ("cpt 2", "cpt 1", "Dirichlet α 0.1")}
BUDGET, QUICK, SHARES, DELTA = claims.BUDGET, claims.QUICK, list(claims.SHARES), claims.DELTA
SEEDS, QUICK_SEEDS = list(range(20, 30)), [20, 21]
ALPHA = 0.05                                   # 1 − the level of every interval that decides
ACC, FORGET, WALL = "avg_accuracy", "avg_forgetting", "wall_time_s"
LR = list(LR_GRID)
MOMENTUM_LR = [0.25, 0.5, 1.0]                 # FedAvgM's server_lr (β = 0.9): steps add up to η/(1 − β) × one
ADAM_LR = [0.005, 0.01, 0.02]                  # FedAdam's server_lr: each weight moves by about η a round
ETA_T = [1.0, 2.0, 4.0]


# ----------------------------------------------------------------------------- the candidates' rules

def tam_variant(model, theta, state, x, y, classes, cfg, replay_current=False, full_length=False):
    """TAM (client.tam_update, METHOD §1.3) from the library's pieces, with two optional changes:

        Δ_cur = local_train(θ, current task [+ the coreset, if replay_current]) − θ
        Δ_j   = the old-task clones on the coreset M_j (client.clone_updates), j < t
        d     = GM(Δ_0, …, Δ_{t−1}, Δ_cur)                    (client GM settings)
        Δ_k   = η_t · d                   or, if full_length,  η_t · (‖Δ_cur‖ / ‖d‖) · d

    replay_current mixes the old tasks' coreset into the current task's batches as replay does
    (cfg.replay_share: 0 pools them with the task's images, s > 0 gives every batch its share,
    baselines.replay_per_batch). With both False this is the library's TAM, bit for bit
    (tests/test_beat_replay.py). Norms over the trainable weights; BatchNorm statistics come from
    Δ_cur as they are, as in TAM."""
    key = task_key(classes)
    if key not in state.seen:
        state.seen.append(key)
    old = client.old_tasks(state, cfg, key)                          # [(key_j, x_j, y_j)]: the coreset
    hooks = {}
    if replay_current and old:
        bx, by = torch.cat([xm for _, xm, _ in old]), torch.cat([ym for _, _, ym in old])
        if cfg.replay_share > 0:
            hooks["memory"] = (bx, by, baselines.replay_per_batch(cfg.batch_size, cfg.replay_share))
        else:
            x, y = torch.cat([x, bx.to(x.device)]), torch.cat([y, by.to(y.device)])
    d_cur, loss = client.train_from(model, theta, theta, x, y, cfg, state.rng, **hooks)
    params = client.param_names(model)
    if not old:                                                      # task 0: nothing to match
        return {**d_cur, **{n: cfg.eta_t * d_cur[n] for n in params}}, {"loss": loss}
    start = theta if cfg.clone_start == "global" else {n: theta[n] + d_cur[n] for n in theta}
    deltas = [d for d, _ in client.clone_updates(model, start, theta, old, cfg, state.rng)] + [d_cur]
    deltas = [{n: d[n] for n in params} for d in deltas]             # Δ_0 … Δ_{t−1}, Δ_cur
    G = gradmatch.gram(deltas)                                       # (t+1, t+1)
    d = gradmatch.match(deltas, c=cfg.gm_c, solver=cfg.gm_solver, normalize=cfg.gm_normalize, G=G, **gradmatch.CLIENT)
    scale = cfg.eta_t
    if full_length:
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in d.values()))
        scale *= math.sqrt(max(float(G[-1, -1]), 0.0)) / norm if norm > 0 else 1.0
    info = {"loss": loss, "temporal_cos": gradmatch.mean_pairwise_cosine(G),
            "temporal_agreement": gradmatch.agreement(deltas, d)}
    return {**d_cur, **{n: scale * d[n] for n in params}}, info


# V6's selector, greedy k-center, moved unchanged into the library after the run as coreset.select_k_center (the
# `replay_kcenter` preset's buffer; as run: git show 84121d8:bench/beat_replay.py)
k_center = select_k_center


def k_center_state(k, cfg):
    """Client k as the library makes it, with a buffer that selects by k_center: m per class, as replay's."""
    state = client.new_state(k, cfg)
    state.buffer = Buffer(cfg.buffer_per_class, k_center, seed=cfg.seed + k)
    return state


# ----------------------------------------------------------------------------- what is compared

REFERENCE = "replay"
REFERENCES = {"replay": dict(spec=dict(method="replay"), tune=dict(lr=LR, replay_share=SHARES)),
              "stamp": dict(spec=dict(method="stamp"), tune=dict(lr=LR))}       # stamp: a reading aid only
CANDIDATES = {
    "V1": dict(name="stamp + FedAvgM", matching=True, server_moments=1,
               spec=dict(method="stamp", server_opt="momentum", server_momentum=0.9),
               tune=dict(lr=LR, server_lr=MOMENTUM_LR),
               why="STAMP's matched step is short; server momentum adds up the steps that agree from round to round "
                   "(notebook 09's lead: 0.959 against STAMP's 0.900 on 3 seeds)"),
    "V2": dict(name="stamp + FedAdam", matching=True, server_moments=2,
               spec=dict(method="stamp", server_opt="adam", server_momentum=0.9),
               tune=dict(lr=LR, server_lr=ADAM_LR),
               why="a per-weight step lets the weights that GM's short step barely moves move as far as the others"),
    "V3": dict(name="TAM + replay clients, GM server", matching=True, server_moments=0,
               spec=dict(client="tam", server="gm", rules=dict(client_update=partial(tam_variant, replay_current=True))),
               tune=dict(lr=LR, replay_share=SHARES),
               why="the current task trains on the coreset mixed in, as replay does, and the clones still match the "
                   "old tasks (notebook 09's lead: 0.940)"),
    "V4": dict(name="replay clients + GM server + FedAvgM", matching=True, server_moments=1,
               spec=dict(client="replay", server="gm", server_opt="momentum", server_momentum=0.9),
               tune=dict(lr=LR, replay_share=SHARES, server_lr=MOMENTUM_LR),
               why="replay's own clients, with STAMP's spatial matching and momentum on the server (the lead closest "
                   "to replay: 0.974 against 0.976)"),
    "V5": dict(name="stamp, η_t tuned", matching=True, server_moments=0,
               spec=dict(method="stamp"), tune=dict(lr=LR, eta_t=ETA_T),
               why="a longer client step undoes the shrinking of TAM's matched update (the claims bench's validation "
                   "split preferred η_t = 2, C8)"),
    "V6": dict(name="replay, k-center buffer (memory control)", matching=False, server_moments=0,
               spec=dict(method="replay", rules=dict(new_state=k_center_state)),
               tune=dict(lr=LR, replay_share=SHARES),
               why="not a matching variant: replay with other images in the same bytes (m per class covering the "
                   "class), to show how far a different memory alone moves replay"),
    "V7": dict(name="stamp, matched step at full length", matching=True, server_moments=0,
               spec=dict(method="stamp", rules=dict(client_update=partial(tam_variant, full_length=True))),
               tune=dict(lr=LR),
               why="GM keeps a direction that serves every task but makes TAM's update shorter than the current "
                   "task's own; rescaling it to ‖Δ_cur‖ each round keeps that direction at replay's pace, which a "
                   "constant η_t cannot do"),
}
FAMILY = len(CANDIDATES) * len(SETTINGS)       # the comparisons that decide: Bonferroni's count
ADJUSTED = 1 - ALPHA / FAMILY                  # the secondary reading's level
OUTCOMES = {"beats replay": "above 0 in at least one setting (every seed paired), below 0 in none",
            "mixed": "above 0 in some setting, below 0 in another", "worse": "below 0 in some setting, above 0 in none",
            "not shown": "above 0 in no setting (with every seed paired), below 0 in none"}
RULE = ("per setting, compare(s, candidate, 'replay', metric='avg_accuracy', kind='better', delta=0.01) with its 95 % "
        "interval; a candidate beats replay when its interval lies wholly above 0 in at least one setting (every "
        "confirmation seed paired) and wholly below 0 in none. The 95 % reading decides; the same rule on "
        f"Bonferroni-adjusted intervals (level 1 − 0.05/{FAMILY}) is shown as a secondary reading.")


def label(arm, setting):
    return f"{arm} · {setting}"


def arms(quick=False, settings=None):
    """{label: study arm} for every candidate and reference in every setting (or those of `settings`). When
    quick: no tuning, every field at the middle of its grid (lr 0.1, replay_share 0.25, server_lr 0.5 / 0.01, η_t 2)."""
    out = {}
    for arm, a in {**REFERENCES, **CANDIDATES}.items():
        own = {k: v[len(v) // 2] for k, v in a["tune"].items()} if quick else {"tune": a["tune"]}
        for setting in settings or SETTINGS:
            out[label(arm, setting)] = {**SETTINGS[setting], **a["spec"], **own}
    return out


def arm_runs(a, quick=False):
    """(runs, runs if every log-spaced grid were extended twice) of one arm in one setting, tuning included."""
    if quick:
        return len(QUICK_SEEDS), len(QUICK_SEEDS)
    least = math.prod(len(v) for v in a["tune"].values()) * len(TUNE_SEEDS)
    most = math.prod(len(v) + 2 * bool(ratio(sorted(v))) for v in a["tune"].values()) * len(TUNE_SEEDS)
    return least + len(SEEDS), most + len(SEEDS)


def run_count(quick=False):
    """(runs without grid extensions, runs if every log-spaced grid were extended twice), tuning included."""
    counts = [arm_runs(a, quick) for a in {**REFERENCES, **CANDIDATES}.values()]
    return sum(c[0] for c in counts) * len(SETTINGS), sum(c[1] for c in counts) * len(SETTINGS)


def time_runs(quick=False, setting="cpt 2", seed=99, workers=2):
    """Seconds of one run of every arm in `setting` (full budget; quick: the tiny one), one after another with
    one thread, on seed 99 (neither a confirmation nor a tuning seed), every field at the middle of its grid;
    no metric is printed or kept. Returns ({arm: seconds}, (core-hours, core-hours with every grid extended)):
    the full run's estimate, each arm's seconds × its runs, the same in every setting."""
    base = replace(Config(), **{**BUDGET, **(QUICK if quick else {})}, quiet=True, plot=False, test_split="per_seed")
    middle, threads, seconds = arms(quick=True, settings=[setting]), torch.get_num_threads(), {}
    torch.set_num_threads(1)
    try:
        fcl_loop.run(replace(base, num_tasks=1, rounds_per_task=1, local_epochs=1, seed=seed))   # imports, warm-up
        for arm in {**REFERENCES, **CANDIDATES}:
            cfg, rules, _, _ = arm_config(label(arm, setting), middle[label(arm, setting)], base)
            start = time.perf_counter()
            fcl_loop.run(replace(cfg, seed=seed), **rules)
            seconds[arm] = time.perf_counter() - start
            print(f"{label(arm, setting):16s} {seconds[arm]:6.1f} s", flush=True)
    finally:
        torch.set_num_threads(threads)
    arms_ = {**REFERENCES, **CANDIDATES}
    hours = [sum(seconds[k] * arm_runs(a, quick)[i] for k, a in arms_.items()) * len(SETTINGS) / 3600 for i in (0, 1)]
    runs = run_count(quick)
    print(f"estimate: {runs[0]} runs, {hours[0]:.1f} core-hours ({runs[1]} runs, {hours[1]:.1f} core-hours if every grid "
          f"is extended twice): {hours[0] / workers:.1f}–{hours[1] / workers:.1f} h with {workers} workers, at this "
          f"machine's load (1-min average now {os.getloadavg()[0]:.2f})")
    return seconds, hours


# ----------------------------------------------------------------------------- the decision

def decide(parts, seeds):
    """The rule (module docstring) on one candidate's comparisons, one per setting: dicts with "low",
    "high" and "n" (seeds paired). Returns one of OUTCOMES."""
    won = any(p["low"] > 0 and p["n"] == seeds for p in parts)
    lost = any(p["high"] < 0 for p in parts)
    return "mixed" if won and lost else "beats replay" if won else "worse" if lost else "not shown"


def weight_bytes(base):
    """Bytes of one copy of the model's trainable weights (what a server moment costs)."""
    return sum(p.numel() * p.element_size() for p in build(replace(base, seed=0))[2].parameters())


def mean_of(s, arm, get):
    xs = [get(r) for r in (s.result(arm, x) for x in s.seeds) if "error" not in r]
    xs = [v for v in xs if v is not None and not math.isnan(v)]
    return statistics.mean(xs) if xs else math.nan


def evaluate(s, base):
    """Every candidate against replay in every setting (accuracy: 95 % and adjusted; forgetting; wall
    time, bytes, step sizes), and every candidate's decision under both readings."""
    wb, parts = weight_bytes(base), []
    settings = [x for x in SETTINGS if label(REFERENCE, x) in s.runs]          # all, unless a smoke run chose
    upd = lambda r: statistics.mean(statistics.mean(e["update_norms"]) for e in r["rounds"])   # noqa: E731
    step = lambda r: statistics.mean(e["step_norm"] for e in r["rounds"])                        # noqa: E731
    for arm in ["stamp", *CANDIDATES]:
        for setting in settings:
            a, b = label(arm, setting), label(REFERENCE, setting)
            acc, fg = compare(s, a, b, ACC, "better", DELTA), compare(s, a, b, FORGET, "better", DELTA)
            _, lo, hi = paired_interval(acc.differences, ADJUSTED) if acc.differences else (0, -math.inf, math.inf)
            same = lambda k: all(s.result(a, x)[k] == s.result(b, x)[k] for x in acc.seeds)       # noqa: E731
            parts.append({"arm": arm, "setting": setting, "candidate": arm in CANDIDATES, "a": a, "b": b,
                          **{k: v for k, v in asdict(acc).items() if k not in ("a", "b", "left_out")}, "n": len(acc.seeds),
                          "failed_seeds": acc.left_out,
                          "adjusted_low": lo, "adjusted_high": hi,
                          "forgetting": {k: getattr(fg, k) for k in ("mean", "low", "high", "verdict", "a_mean", "b_mean")},
                          "wall_ratio": mean_of(s, a, lambda r: r[WALL]) / mean_of(s, b, lambda r: r[WALL]),
                          "client_memory_equal": same("buffer_bytes"), "communication_equal": same("comm_bytes"),
                          "server_state_bytes": CANDIDATES.get(arm, {}).get("server_moments", 0) * wb,
                          "update_norm_ratio": mean_of(s, a, upd) / mean_of(s, b, upd),
                          "step_norm_ratio": mean_of(s, a, step) / mean_of(s, b, step)})
    decisions = {}
    for cid in CANDIDATES:
        mine = [p for p in parts if p["arm"] == cid]
        adj = [{"low": p["adjusted_low"], "high": p["adjusted_high"], "n": p["n"]} for p in mine]
        decisions[cid] = {"primary": decide(mine, len(s.seeds)), "adjusted": decide(adj, len(s.seeds))}
    return {"parts": parts, "decisions": decisions, "weight_bytes": wb}


# ----------------------------------------------------------------------------- the report

def preregistration():
    """What was fixed in advance, as data (the JSON and notebook 11 print it from here)."""
    def plain(a):                              # an arm's settings and rules, as text
        return {"fields": {k: v for k, v in a["spec"].items() if k != "rules"}, "tune": a["tune"],
                "rules": {k: qualname(f) for k, f in a["spec"].get("rules", {}).items()}}
    return {"candidates": {k: {f: v for f, v in c.items() if f not in ("spec", "tune")} | plain(c)
                           for k, c in CANDIDATES.items()},
            "references": {k: plain(v) for k, v in REFERENCES.items()}, "settings": SETTINGS,
            "budget": BUDGET, "seeds": SEEDS, "tune_seeds": list(TUNE_SEEDS), "delta": DELTA, "level": 1 - ALPHA,
            "adjusted_level": ADJUSTED, "family": FAMILY, "rule": RULE, "outcomes": OUTCOMES}


def iv(lo, hi, m=None):
    return (f"{m:+.3f} " if m is not None else "") + f"[{lo:+.3f}, {hi:+.3f}]"


def confirmation_minutes(rep):
    """Minutes of one core that the confirmation runs took, each its own wall time (cached ones included)."""
    return sum(r[WALL] for runs in rep["study"]["runs"].values() for r in runs.values() if WALL in r) / 60


def markdown(rep):
    ev = rep["evaluation"]
    name = lambda arm: f"{arm} {CANDIDATES[arm]['name']}" if arm in CANDIDATES else f"{arm} (reference, no candidate)"  # noqa: E731
    picks = rep["study"]["picks"]
    lines = [f"# Can matching beat replay? ({'QUICK smoke run, not a result' if rep['quick'] else 'full run'})", "",
             f"`{rep['command']}`: {len(rep['study']['seeds'])} paired confirmation seeds {rep['study']['seeds']} (each with "
             f"its own test split); {rep['wall_time_s'] / 60:.1f} min for the process that wrote this report ({rep['workers']} "
             f"worker{'s' if rep['workers'] > 1 else ''} at a time; the runs it found in its cache not counted), the "
             f"confirmation runs' own times summing to {confirmation_minutes(rep):.1f} min of one core. Budget: {rep['budget']}. "
             f"Rule (fixed before the run): {RULE}"
             + (" Quick: no tuning, every arm at the middle of each of its grids." if rep["quick"] else ""), "",
             "| candidate | setting | picked (replay's: under the table) | accuracy (A) | replay (same seeds) | A − replay [95 %] (> 0: A "
             f"better) | verdict (±δ = {DELTA:g}) | [adjusted, {ADJUSTED:.2%}] | forgetting, replay − A [95 %] (> 0: A forgets less) "
             "| wall × replay | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in ev["parts"]:
        fg = p["forgetting"]
        lines.append(f"| {name(p['arm'])} | {p['setting']} | {describe(picks[p['a']])} | {p['a_mean']:.3f} | "
                     f"{p['b_mean']:.3f} | {iv(p['low'], p['high'], p['mean'])} | {p['verdict']} | "
                     f"{iv(p['adjusted_low'], p['adjusted_high'])} | {iv(fg['low'], fg['high'], fg['mean'])} | "
                     f"{p['wall_ratio']:.2f} | {p['n']}/{len(rep['study']['seeds'])} |")
    settings = list(dict.fromkeys(p["setting"] for p in ev["parts"]))
    lines += ["", "Replay's picks (the reference, tuned alike): " + "; ".join(
        f"{x}: {describe(picks[label(REFERENCE, x)])}" for x in settings) + "."]
    lines += ["", f"**Decisions** (95 % decides; adjusted: level {ADJUSTED:.4f}, {FAMILY} comparisons):", "",
              "| candidate | matching variant | decision (95 %) | adjusted reading | server memory |", "|---|---|---|---|---|"]
    for cid, d in ev["decisions"].items():
        c = CANDIDATES[cid]
        lines.append(f"| {name(cid)} | {'yes' if c['matching'] else 'no (memory control)'} | **{d['primary']}** | "
                     f"{d['adjusted']} | {c['server_moments'] * ev['weight_bytes']} bytes |")
    off = [f"{name(p['arm'])} · {p['setting']}" for p in ev["parts"]
           if not (p["client_memory_equal"] and p["communication_equal"])]
    lines += ["", "Client memory and communication equal to replay's on every paired seed: "
              + ("yes, in every comparison." if not off else "NOT in " + "; ".join(off) + "."),
              f"The server moments cost {ev['weight_bytes']} bytes per copy of the trainable weights."]
    return "\n".join(lines) + "\n"


def study_of(raw):
    """The Study inside a report (seeds as ints again, as JSON left them strings)."""
    return Study(**{**raw["study"], "runs": {a: {int(x): r for x, r in v.items()} for a, v in raw["study"]["runs"].items()}})


def write_report(out, raw, base, show=True):
    """Evaluate, then write beat_replay.json (the runs, picks, comparisons, decisions), .md and the forest plot
    into the folder `out`; show: print the markdown."""
    raw["evaluation"] = evaluate(study_of(raw), base)
    write_json(out / "beat_replay.json", raw)
    (out / "beat_replay.md").write_text(markdown(raw))
    rows = [{**p, "label": f"{p['arm']} {CANDIDATES[p['arm']]['name']} · {p['setting']}"}
            for p in raw["evaluation"]["parts"] if p["candidate"]]
    plots.save(plots.forest(rows, title="each candidate against tuned replay: average accuracy, 95 % interval",
                            xlabel="A − replay, average accuracy (> 0: the candidate is better)"), out / "beat_replay_forest.png")
    if show:
        print(markdown(raw))
        print(f"wrote {out / 'beat_replay.json'}, {out / 'beat_replay.md'}, {out / 'beat_replay_forest.png'}")
    return raw


def run(quick=False, workers=2, cache="runs/beat-replay-cache", engine="local", address=None, quiet=False,
        settings=None):
    """The pre-registered study: (raw report dict without the evaluation, base Config). settings: a subset
    of SETTINGS, for a smoke run only (notebook 11 in CI)."""
    base = replace(Config(), **{**BUDGET, **(QUICK if quick else {})})
    start = time.perf_counter()
    s = study(arms(quick, settings), QUICK_SEEDS if quick else SEEDS, base, tune=not quick, workers=workers,
              engine=engine, address=address, cache=cache, quiet=quiet)
    return {"quick": quick, "command": "python bench/beat_replay.py" + (" --quick" if quick else ""),
            "preregistration": preregistration(), "budget": {**BUDGET, **(QUICK if quick else {})}, "workers": workers,
            "wall_time_s": time.perf_counter() - start, "versions": run_info(), "study": asdict(s)}, base


def main(argv=None):
    least, most = run_count()
    p = OneLineParser(prog="python bench/beat_replay.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog=f"The full run: {least} runs ({most} if every log-spaced grid is extended twice), "
                             f"{len(CANDIDATES) + len(REFERENCES)} arms × {len(SETTINGS)} settings, tuning included; "
                             f"--quick: {run_count(True)[0]} tiny runs. --time estimates its time on this machine.")
    claims.run_options(p, "beat-replay", "comparisons, decisions and beat_replay.md")
    p.add_argument("--time", action="store_true", help="no study: one run of every arm at cpt 2 (seed 99, the middle of "
                   "its grids), timed, and the full run's estimated time from them (with --quick: the tiny budget)")
    a = p.parse_args(argv)
    out = claims.out_dir(p, a, "beat-replay")                # --workers checked there
    if a.report_only:
        path = out / "beat_replay.json"
        if not path.is_file():
            p.error(f"--report-only: {path} does not exist: give the --out-dir of a finished run")
        raw = json.loads(path.read_text())
        return write_report(out, raw, replace(Config(), **{**BUDGET, **(QUICK if raw["quick"] else {})}))
    if a.time:
        return time_runs(a.quick, workers=a.workers)
    n = run_count(a.quick)
    print(f"beat_replay: {len(CANDIDATES)} candidates + {len(REFERENCES)} references × {len(SETTINGS)} settings, "
          f"{n[0]}{f'–{n[1]}' if n[1] != n[0] else ''} runs on {a.workers} worker(s); cache {a.cache}", flush=True)
    raw, base = run(a.quick, a.workers, a.cache, a.engine, a.address)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, raw, base)


if __name__ == "__main__":
    import beat_replay                          # this file as a module: its rules' names do not depend on how it ran
    from stamp_min.cli import main as guarded
    guarded(beat_replay.main)
