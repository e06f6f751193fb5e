"""bench/claims.py: the statistics and the verdict rule against hand-computed cases, and a smoke run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import claims  # noqa: E402


def test_t_quantile_is_the_tables():
    assert claims.t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-6)     # Student t table, df = 9
    assert claims.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)


def test_interval_by_hand():
    d = [0.02, 0.05, -0.01, 0.03, 0.04, 0.00, 0.06, 0.01, 0.02, 0.03]
    # mean 0.025; squared deviations sum to 4250e-6, so sd = sqrt(4250e-6 / 9) = 0.0217307;
    # half width = 2.262157 * 0.0217307 / sqrt(10) = 0.0155451
    mean, low, high = claims.interval(d)
    assert mean == pytest.approx(0.025)
    assert low == pytest.approx(0.025 - 0.0155451, abs=1e-6) and high == pytest.approx(0.025 + 0.0155451, abs=1e-6)
    assert claims.verdict(low, high, "better") == "supported"
    assert claims.verdict(low, high, "same") == "contradicted"          # a real difference, larger than 0
    assert claims.interval([0.3]) == (0.3, float("-inf"), float("inf"))  # one seed tells nothing


@pytest.mark.parametrize("low, high, kind, expected", [
    (0.001, 0.02, "better", "supported"),
    (-0.02, -0.001, "better", "contradicted"),
    (-0.005, 0.008, "better", "contradicted"),      # inside ±δ: any gain is below one point
    (-0.02, 0.03, "better", "inconclusive"),
    (0.002, 0.008, "better", "supported"),          # above 0 comes first
    (-0.005, 0.008, "same", "supported"),
    (0.002, 0.008, "same", "supported"),            # inside ±δ comes first
    (0.002, 0.03, "same", "contradicted"),
    (-0.03, -0.02, "same", "contradicted"),
    (-0.02, 0.03, "same", "inconclusive")])
def test_the_verdict_rule(low, high, kind, expected):
    assert claims.verdict(low, high, kind, delta=0.01) == expected


def test_a_claim_of_several_parts():
    assert claims.combined(["supported", "supported"]) == "supported"
    assert claims.combined(["supported", "inconclusive"]) == "inconclusive"
    assert claims.combined(["supported", "contradicted", "inconclusive"]) == "contradicted"


def test_quick_run_writes_every_claim_with_a_computed_verdict(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "claims.py"), "--quick", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "claims.json").read_text())
    ids = [c["id"] for c in rep["claims"]]
    assert ids == ["C1", "C2a", "C2b", "C3a", "C3b", "C3c", "C4", "C5", "C6", "C7", "C8", "Q1", "Q2", "Q3", "S1a", "S1b", "F1"]
    for c in rep["claims"]:
        assert c["verdict"] == claims.combined([x["verdict"] for x in c["parts"]])
        for x in c["parts"]:
            if x["kind"] != "exact":
                assert x["n"] == 2 and x["verdict"] == claims.verdict(x["low"], x["high"], x["kind"], x["delta"])
    assert next(c for c in rep["claims"] if c["id"] == "C7")["verdict"] == "supported"    # exact counts hold
    md = (tmp_path / "claims.md").read_text()
    assert "QUICK smoke run, not a result" in md and md.count("| **") == len(ids)
    # the verdicts can be recomputed from the stored runs alone, with the same outcome
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "claims.py"), "--report-only", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "claims.md").read_text() == md
