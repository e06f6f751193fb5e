"""bench/claims.py over the study API: a smoke run writes every claim with a verdict computed by the
library's rule (metrics.verdict, tested by hand in test_study.py), the report can be recomputed from
the stored runs, and --quick never writes over the committed results."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import claims  # noqa: E402
from stamp_min.metrics import combined, verdict  # noqa: E402

IDS = ["C1", "C2a", "C2b", "C3a", "C3b", "C3c", "C4", "C5", "C6", "C7", "C8", "Q1", "Q2", "Q3", "S1a", "S1b", "F1"]


def test_quick_run_writes_every_claim_with_a_computed_verdict(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "claims.py"), "--quick", "--out-dir", str(tmp_path),
           "--cache", str(tmp_path / "cache")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "claims.json").read_text())
    assert [c["id"] for c in rep["claims"]] == IDS
    assert {c["source"] for c in rep["claims"]} <= {"paper", "reading", "code", "open", "stress"}
    for c in rep["claims"]:
        assert c["verdict"] == combined([x["verdict"] for x in c["parts"]])
        for x in c["parts"]:
            if x["kind"] != "exact":
                assert x["n"] == 2 and x["verdict"] == verdict(x["low"], x["high"], x["kind"], x["delta"])
    assert next(c for c in rep["claims"] if c["id"] == "C7")["verdict"] == "supported"    # exact counts hold
    c2a = next(c for c in rep["claims"] if c["id"] == "C2a")                              # the ablation keeps memory
    assert all("coreset replay" in p["b"] for p in c2a["parts"])
    md = (tmp_path / "claims.md").read_text()
    assert "QUICK smoke run, not a result" in md and md.count("| **") == len(IDS)
    assert (tmp_path / "claims_forest.png").stat().st_size > 0 and (tmp_path / "claims_forest_c1.png").stat().st_size > 0
    # the verdicts can be recomputed from the stored runs alone, with the same outcome
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "claims.py"), "--report-only", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "claims.md").read_text() == md


def test_quick_never_writes_over_the_committed_results_and_bad_flags_are_one_line():
    before = (ROOT / "bench" / "results" / "claims.md").read_bytes()
    for args, says in ((["--quick", "--out-dir", "bench/results"], "never writes over the committed results"),
                       (["--workers", "0"], "--workers 0 is out of range"),
                       (["--seeds", "1", "--quick"], "--seeds 1 is out of range")):
        p = subprocess.run([sys.executable, str(ROOT / "bench" / "claims.py"), *args],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 2 and says in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
    assert (ROOT / "bench" / "results" / "claims.md").read_bytes() == before


def test_every_arm_of_every_claim_is_registered_with_its_tuning():
    table = claims.claims({"short local training": 1.1, "20 % noisy labels": 1.2})
    labels = {x for c in table if c["id"] != "F1" for p in c["parts"] for x in (p["a"], p["b"]) if x}
    assert labels <= set(claims.ARMS)
    replaying = [k for k, v in claims.ARMS.items() if v.get("method") == "replay" or v.get("client") == "replay"]
    assert replaying and all(claims.ARMS[k]["tune"]["replay_share"] == list(claims.SHARES) for k in replaying)
    assert "TAM + mean × 1.100 · short local training" in claims.ARMS


def _rows(text, start):
    """The rows of the first markdown table after the line that starts with `start`, as lists of cells."""
    lines = text[text.index(start):].splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith("|"))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_the_docs_state_the_committed_run():
    """docs/claims.md's table, the README's headline table and docs/stamp.md's two tables say what the
    committed bench/results/claims.json says: every verdict, effect and mean ± sd, recomputed here."""
    import statistics
    rep = json.loads((ROOT / "bench" / "results" / "claims.json").read_text())
    sign = lambda x: f"{x:+.3f}".replace("-", "−")                                  # noqa: E731
    rows = {r[0]: r for r in _rows((ROOT / "docs" / "claims.md").read_text(), "| id | source |")}
    assert list(rows) == IDS
    for c in rep["claims"]:
        _, source, _, effect, verdict_cell = rows[c["id"]]
        assert (source, verdict_cell) == (c["source"], f"**{c['verdict']}**"), c["id"]
        if len(c["parts"]) == 1:
            p = c["parts"][0]
            assert effect == f"{sign(p['mean'])} [{sign(p['low'])}, {sign(p['high'])}]", c["id"]
        else:
            counts = {v: sum(p["verdict"] == v for p in c["parts"]) for v in ("supported", "contradicted", "inconclusive")}
            said = effect.split(": ")[1].split(", ")
            assert effect.startswith(f"{len(c['parts'])} comparisons: "), c["id"]
            assert {s.split()[1]: int(s.split()[0]) for s in said} == {v: k for v, k in counts.items() if k}, c["id"]

    pm = lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"         # noqa: E731
    table = rep["c1_table"]
    readme = _rows((ROOT / "README.md").read_text(), "**STAMP against the baselines**")
    assert len(readme) == 5
    for method, acc, forget in readme:
        v = table["cpt 2"][method.split()[0]]
        assert (acc, forget) == (pm(v["avg_accuracy"]), pm(v["avg_forgetting"])), method
    stamp_md = (ROOT / "docs" / "stamp.md").read_text()
    for setting, head in (("cpt 2", "**2 classes/task, 5 tasks**"), ("cpt 5", "**5 classes/task, 2 tasks**")):
        got = _rows(stamp_md, head)
        assert [r[0] for r in got] == list(table[setting]), setting
        for method, picked, acc, forget, bwt, _ in got:
            v = table[setting][method]
            values = rep["picks"][f"{method} · {setting}"]["values"]
            assert picked == ", ".join(f"{k} {x:g}" for k, x in values.items()), (setting, method)
            assert (acc, forget, bwt) == (pm(v["avg_accuracy"]), pm(v["avg_forgetting"]), pm(v["bwt"])), (setting, method)


def test_the_docs_state_the_committed_search():
    """docs/claims.md's V table and the README's paragraph say what bench/results/beat_replay.json says: every
    candidate − replay interval recomputed here from the runs themselves (paired by seed, metrics.paired_interval),
    every decision by the pre-registered rule (beat_replay.decide) on those intervals."""
    import beat_replay
    from stamp_min.metrics import paired_interval
    rep = json.loads((ROOT / "bench" / "results" / "beat_replay.json").read_text())
    runs, seeds = rep["study"]["runs"], [str(x) for x in rep["study"]["seeds"]]
    assert not rep["quick"] and len(seeds) == 10
    sign = lambda x: f"{x:+.3f}".replace("-", "−")                                  # noqa: E731
    cell = lambda m, lo, hi: f"{sign(m)} [{sign(lo)}, {sign(hi)}]"                 # noqa: E731
    rows = _rows((ROOT / "docs" / "claims.md").read_text(), "| row | candidate | cpt 2 |")
    assert [r[0] for r in rows] == list(beat_replay.CANDIDATES)
    said = {}
    for cid, _, *cells, decision in rows:
        parts = []
        for setting, got in zip(beat_replay.SETTINGS, cells):
            a, b = runs[f"{cid} · {setting}"], runs[f"replay · {setting}"]
            paired = [x for x in seeds if "error" not in a[x] and "error" not in b[x]]
            d = [a[x]["avg_accuracy"] - b[x]["avg_accuracy"] for x in paired]
            m, lo, hi = paired_interval(d, 0.95)
            assert got == cell(m, lo, hi), (cid, setting)
            parts.append({"low": lo, "high": hi, "n": len(paired)})
            said[cid, setting] = got
        assert decision == f"**{beat_replay.decide(parts, len(seeds))}**", cid
        assert rep["evaluation"]["decisions"][cid]["primary"] == beat_replay.decide(parts, len(seeds))
    readme = " ".join((ROOT / "README.md").read_text().split())
    for cid, setting in (("V6", "cpt 2"), ("V6", "cpt 1"), ("V4", "cpt 2")):
        assert said[cid, setting].replace("−", "-") in readme.replace("−", "-"), (cid, setting)


def test_replay_share_bench_counts_the_pooled_buffer_as_the_library_keeps_it(tmp_path):
    """bench/replay_share.py's pooled share b/(b + n) per task: b counted against the buffer the library's
    replay clients actually hold (client.new_state's Buffer, filled task by task), n the task's images."""
    import replay_share
    from dataclasses import replace
    from stamp_min import client
    from stamp_min.fcl_loop import Config, build
    cfg = replace(Config(), **claims.BUDGET, **claims.SETTINGS["Dirichlet α 0.1"], method="replay", seed=3)
    ds, scenario, model = build(cfg)
    want = []
    states = [client.new_state(k, cfg) for k in range(scenario.num_clients)]
    for t in range(scenario.num_tasks):
        shares = []
        for k, row in enumerate(scenario.tasks):
            kept = sum(len(y) for _, _, y in states[k].buffer)
            shares.append(kept / (kept + len(row[t].train_idx)))
            x = ds.x_train[row[t].train_idx].float() / 255
            states[k].buffer.add_task(model, x, ds.y_train[row[t].train_idx], row[t].classes)
        want.append(sum(shares) / len(shares))
    got = replay_share.pooled_shares(cfg)
    assert got[0] == 0 and max(abs(a - b) for a, b in zip(got, want)) < 1e-12 and got[-1] > 0.3
    assert replay_share.main(["--no-train", "--out", str(tmp_path / "r.md")]) == 0
    assert "| cpt 5 | 0.00, " in (tmp_path / "r.md").read_text()


def test_replay_share_bench_says_its_mistakes_before_any_work(tmp_path, capsys):
    import pytest
    import replay_share
    with pytest.raises(SystemExit) as e:
        replay_share.main(["--help"])                           # argparse formats help with '%'
    assert e.value.code == 0 and "--no-train" in capsys.readouterr().out
    for argv, text in ((["--shares", "0", "0.95"], "--shares 0.95 / --lrs 0.1: replay_share=0.95 is out of range"),
                       (["--lrs", "0"], "--shares 0 / --lrs 0: lr=0"), (["--settings", "nope"], "'nope' is unknown"),
                       (["--out", str(tmp_path / "no" / "r.md")], "cannot be written")):
        with pytest.raises(SystemExit) as e:
            replay_share.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and text in err and "Traceback" not in err, (argv, err)
    committed = replay_share.RESULTS.read_text()
    assert replay_share.main(["--no-train"]) == 0 and replay_share.RESULTS.read_text() == committed
    assert "wrote" not in capsys.readouterr().out
