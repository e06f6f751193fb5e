"""bench/beat_replay.py, the pre-registered search for a variant that beats replay: its client rule
against the library's TAM and replay (bit for bit, and a closed form at c = 0), the winner's preset
(replay_kcenter) against the searched arm bit for bit, the decision rule on made-up intervals, what was fixed in
advance, and a --quick run end to end."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import beat_replay as bench  # noqa: E402
import claims  # noqa: E402
from stamp_min import client  # noqa: E402
from stamp_min.fcl_loop import Config, build  # noqa: E402
from stamp_min.metrics import verdict  # noqa: E402
from stamp_min.tuning import LR_GRID, TUNE_SEEDS  # noqa: E402


# ----------------------------------------------------------------------------- the client rule

def second_task(**over):
    """(model, θ, cfg, a fresh client-0 state that finished task 0 with its coreset, task 1's data)."""
    cfg = replace(Config(num_clients=2, num_tasks=2, local_epochs=1, method="stamp", seed=3), **over)
    ds, sc, model = build(cfg)
    theta = client.float_state(model)
    t0, t1 = sc.tasks[0][0], sc.tasks[0][1]

    def fresh():
        state = client.new_state(0, cfg)
        x0, y0 = ds.x_train[t0.train_idx], ds.y_train[t0.train_idx]
        client.end_task(model, theta, state, x0, y0, t0.classes, cfg)              # herding: no random draw
        state.seen.append(tuple(sorted(int(c) for c in t0.classes)))
        return state
    return model, theta, cfg, fresh, (ds.x_train[t1.train_idx], ds.y_train[t1.train_idx], t1.classes)


def flat(update, names):
    return torch.cat([update[n].flatten().double() for n in names])


def test_tam_variant_without_changes_is_the_librarys_tam_bit_for_bit():
    model, theta, cfg, fresh, (x, y, classes) = second_task()
    want, _ = client.client_update(model, theta, fresh(), x, y, classes, cfg)
    got, info = bench.tam_variant(model, theta, fresh(), x, y, classes, cfg)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert -1 <= info["temporal_cos"] <= 1


def test_tam_with_replay_at_c0_is_the_mean_of_the_clone_and_replays_update():
    """With c = 0 GM is the plain mean, so the update is η_t·(Δ_old + Δ_replay)/2, where Δ_replay is what
    the library's replay client (same coreset in its buffer, same random stream) returns, and Δ_old the
    library's clone on the coreset, trained next from the same stream."""
    model, theta, cfg, fresh, (x, y, classes) = second_task(gm_c=0.0, eta_t=2.0, mixstyle=False)
    for share in (0.0, 0.5):
        cfg_s = replace(cfg, replay_share=share)
        state = fresh()
        d_replay, _ = client.client_update(model, theta, state, x, y, classes, replace(cfg_s, method="replay"))
        (d_old, _), = client.clone_updates(model, theta, theta, client.old_tasks(state, cfg_s, ()), cfg_s, state.rng)
        got, _ = bench.tam_variant(model, theta, fresh(), x, y, classes, cfg_s, replay_current=True)
        for n in theta:
            torch.testing.assert_close(got[n], 2.0 * (d_old[n] + d_replay[n]) / 2, rtol=1e-5, atol=1e-7)


def test_full_length_keeps_tams_direction_at_the_current_updates_length():
    model, theta, cfg, fresh, (x, y, classes) = second_task()
    names = client.param_names(model)
    tam, _ = client.client_update(model, theta, fresh(), x, y, classes, cfg)
    d_cur, _ = client.train_from(model, theta, theta, x, y, cfg, fresh().rng)        # the stream's first draws
    got, _ = bench.tam_variant(model, theta, fresh(), x, y, classes, cfg, full_length=True)
    g, t, c = flat(got, names), flat(tam, names), flat(d_cur, names)
    assert math.isclose(g.norm(), c.norm(), rel_tol=1e-5)
    assert math.isclose(float(g @ t) / float(g.norm() * t.norm()), 1.0, rel_tol=1e-6)


def test_the_replay_kcenter_preset_is_the_searched_v6_bit_for_bit():
    """V6 won the search (bench/results/beat_replay.md), so it became the library's preset `replay_kcenter`: a
    run of it gives, bit for bit, what the bench's V6 arm gives (replay with `new_state=k_center_state`), also
    where a client holds fewer images of a class than m (Dirichlet skew, m = 30); its buffer survives a client
    state's round trip (checkpoints, Flower) by the selector's name."""
    from stamp_min.coreset import embed, select_k_center
    from stamp_min.fcl_loop import run
    cfg = Config(num_clients=3, num_tasks=2, rounds_per_task=1, local_epochs=1, scenario="dirichlet", alpha=0.1,
                 buffer_per_class=30, quiet=True, plot=False, seed=5)
    preset = run(replace(cfg, method="replay_kcenter"))
    v6 = run(replace(cfg, method="replay"), new_state=bench.k_center_state)
    random_buffer = run(replace(cfg, method="replay"))
    same = lambda a, b: repr(a["acc_matrix"]) == repr(b["acc_matrix"])          # noqa: E731  (nan: a task with no test image)
    assert same(preset, v6) and [r["loss"] for r in preset["rounds"]] == [r["loss"] for r in v6["rounds"]]
    assert preset["buffer_bytes"] == v6["buffer_bytes"] > 0 and preset["name"] == "replay_kcenter"
    assert (preset["buffer_rule"], random_buffer["buffer_rule"]) == ("k_center", "random")    # what the results record
    assert not same(preset, random_buffer)                                    # the buffer is another one
    kc = replace(cfg, method="replay_kcenter")
    ds, sc, model = build(kc)
    task = sc.tasks[0][0]
    state = client.new_state(0, kc)
    x, y = ds.x_train[task.train_idx], ds.y_train[task.train_idx]
    client.end_task(model, client.float_state(model), state, x, y, task.classes, kc)
    z, keys = embed(model, x), [int(c) for c in sorted(task.classes)]          # what add_task selects on
    want = torch.cat([(y == c).nonzero().squeeze(1)[select_k_center(z[y == c], 30)] for c in keys if (y == c).any()])
    (_, bx, by), = state.buffer
    assert torch.equal(bx, x[want]) and torch.equal(by, y[want])
    saved = client.state_dict(state)
    assert saved["buffer"]["rule"] == "k_center" and state.buffer.select is select_k_center
    back = client.restore(client.new_state(0, kc), saved)
    assert [(k, a.tolist(), b.tolist()) for k, a, b in back.buffer] == [(k, a.tolist(), b.tolist()) for k, a, b in state.buffer]


# ----------------------------------------------------------------------------- the decision rule

def part(low, high, n=10):
    return {"low": low, "high": high, "n": n}


@pytest.mark.parametrize("parts, outcome", [
    ([part(0.002, 0.03), part(-0.02, 0.01), part(-0.001, 0.02)], "beats replay"),    # supported once, lost nowhere
    ([part(0.002, 0.03), part(0.01, 0.05), part(0.02, 0.03)], "beats replay"),
    ([part(0.002, 0.03), part(-0.05, -0.01), part(-0.01, 0.01)], "mixed"),           # a win and a loss
    ([part(-0.03, -0.001), part(-0.02, 0.01), part(-0.01, 0.01)], "worse"),
    ([part(-0.005, 0.005), part(-0.02, 0.01), part(-0.001, 0.03)], "not shown"),     # inside ±δ is no loss here
    ([part(0.002, 0.03, n=9), part(-0.02, 0.01), part(-0.01, 0.02)], "not shown"),   # a failed seed: no win there
    ([part(0.0, 0.03), part(-0.02, 0.0), part(-0.01, 0.02)], "not shown"),           # touching 0 is neither
])
def test_decision_rule_on_made_up_intervals(parts, outcome):
    assert bench.decide(parts, seeds=10) == outcome
    wins = [p for p in parts if verdict(p["low"], p["high"], "better", bench.DELTA) == "supported" and p["n"] == 10]
    assert (outcome in ("beats replay", "mixed")) == bool(wins)       # a win is the library's "supported"


def test_what_was_fixed_in_advance():
    assert bench.SETTINGS == {s: claims.SETTINGS[s] for s in ("cpt 2", "cpt 1", "Dirichlet α 0.1")}
    assert bench.BUDGET is claims.BUDGET and bench.SHARES == list(claims.SHARES)
    assert bench.SEEDS == list(range(20, 30)) and not set(bench.SEEDS) & (set(range(10)) | set(TUNE_SEEDS))
    assert len(bench.CANDIDATES) >= 6 and [c["matching"] for c in bench.CANDIDATES.values()].count(False) == 1
    assert bench.FAMILY == 21 and math.isclose(bench.ADJUSTED, 1 - 0.05 / 21)
    for name, a in {**bench.REFERENCES, **bench.CANDIDATES}.items():
        assert a["tune"]["lr"] == list(LR_GRID), name                                 # every arm tunes lr
        replays = a["spec"].get("method") == "replay" or a["spec"].get("client") == "replay" or \
            a["spec"].get("rules", {}).get("client_update") == bench.CANDIDATES["V3"]["spec"]["rules"]["client_update"]
        assert (a["tune"].get("replay_share") == bench.SHARES) == replays, name      # and replay_share iff it replays
        assert ("server_lr" in a["tune"]) == ("server_opt" in a["spec"]), name
    least, most = bench.run_count()
    assert least == 1575 and most >= least and bench.run_count(quick=True) == (54, 54)


# ----------------------------------------------------------------------------- the command

def test_quick_run_end_to_end(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "beat_replay.py"), "--quick", "--workers", "2",
           "--out-dir", str(tmp_path), "--cache", str(tmp_path / "cache")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "54 runs" in p.stdout
    rep = json.loads((tmp_path / "beat_replay.json").read_text())
    ev = rep["evaluation"]
    assert rep["quick"] and rep["study"]["seeds"] == bench.QUICK_SEEDS
    assert [(x["arm"], x["setting"]) for x in ev["parts"]] == [(a, s) for a in ["stamp", *bench.CANDIDATES]
                                                                for s in bench.SETTINGS]
    for x in ev["parts"]:
        assert x["n"] == 2 and x["verdict"] == verdict(x["low"], x["high"], "better", bench.DELTA)
        assert x["adjusted_low"] <= x["low"] and x["high"] <= x["adjusted_high"]      # the adjusted interval is wider
        assert x["client_memory_equal"] and x["communication_equal"]
    for cid, d in ev["decisions"].items():
        mine = [x for x in ev["parts"] if x["arm"] == cid]
        assert d["primary"] == bench.decide(mine, 2) and d["adjusted"] in bench.OUTCOMES
    assert rep["preregistration"]["rule"] == bench.RULE
    md = (tmp_path / "beat_replay.md").read_text()
    assert "QUICK smoke run, not a result" in md and md.count("| **") == len(bench.CANDIDATES)
    assert (tmp_path / "beat_replay_forest.png").stat().st_size > 0
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "beat_replay.py"), "--report-only", "--out-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "beat_replay.md").read_text() == md


def test_quick_never_writes_over_the_committed_results_and_bad_flags_are_one_line(tmp_path):
    script, committed = str(ROOT / "bench" / "beat_replay.py"), ROOT / "bench" / "results"
    before = {f.name: f.read_bytes() for f in committed.glob("beat_replay*")}
    for args, says in ((["--quick", "--out-dir", "bench/results"], "never writes over the committed results"),
                       (["--workers", "0"], "--workers 0"),
                       (["--report-only", "--out-dir", str(tmp_path)], "does not exist")):
        p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 2 and says in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
    assert {f.name: f.read_bytes() for f in committed.glob("beat_replay*")} == before


def test_time_estimate_runs_every_arm_once(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "beat_replay.py"), "--time", "--quick"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    timed = [line.split(" · ")[0] for line in p.stdout.splitlines() if " · cpt 2 " in line]
    assert timed == [*bench.REFERENCES, *bench.CANDIDATES]
    assert f"estimate: {bench.run_count(quick=True)[0]} runs" in p.stdout
    assert not any(tmp_path.iterdir())                                   # a timing writes nothing
