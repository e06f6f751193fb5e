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
