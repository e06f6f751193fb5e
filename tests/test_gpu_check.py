"""bench/gpu_check.py, the one command for a lent GPU, smoke-run in its dry mode on the CPU:
it writes report.md and report.json into the folder it is given, names the device as the CPU in a
dry run, and records every part's status (about 20-40 s on 2 cores)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's; on a GPU run bench/gpu_check.py itself")
def test_gpu_check_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(out), "--dry"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "device: start" in r.stdout and "done in" in r.stdout          # progress lines
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert report["mode"] == "dry" and report["results_folder"] is None
    assert "CPU" in report["device"]["name"] and "dry run" in report["device"]["name"]
    assert report["device"]["cuda_available"] is False
    assert md.startswith("# GPU check: CPU") and "dry run" in md.splitlines()[0]
    status = {name: part["status"] for name, part in report["parts"].items()}
    assert status["device"] == status["tests"] == status["scale_fp32"] == "ok", status
    assert status["scale_bf16"] == status["notebook"] == "skipped", status
    assert status["probe"] in ("ok", "not available"), status
    tests = report["parts"]["tests"]["tests"]
    assert tests and all(t["outcome"] == "skipped" for t in tests)       # collected, and they skip without CUDA
    assert "skipped" in report["parts"]["tests"]["summary"]
    scale = report["parts"]["scale_fp32"]["result"]
    assert scale["measures"]["loop_images_per_s"] > 0 and scale["measures"]["clone_s_per_round_old_tasks"] > 0
    for name in report["parts"]:
        assert f"| {name} | {status[name]} |" in md
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["report.md", "report.json", "device.log", "tests.log", "gpu_tests.xml", "scale_fp32.log", "scale_fp32.json"]
        + (["probe.log", "clones_probe.json"] if status["probe"] == "ok" else []))
