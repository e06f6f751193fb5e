"""Checkpoint and resume: a run killed at an arbitrary point and resumed ends exactly like an
uninterrupted run; bad checkpoints are one-line errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import assert_same_run

ARGS = ["--num-clients", "2", "--num-tasks", "3", "--rounds-per-task", "2", "--local-epochs", "1", "--ewc-fisher-samples", "32",
        "--buffer-per-class", "4", "--plot", "false"]


def cli(*args, **kw):
    return [sys.executable, "-m", "stamp_min.fcl_loop", *ARGS, *args]


@pytest.mark.parametrize("method", ["stamp", "ewc"])
def test_killed_and_resumed_equals_uninterrupted(method, tmp_path):
    ref, out, ck = tmp_path / "ref.json", tmp_path / "out.json", tmp_path / "ck"
    subprocess.run(cli("--method", method, "--out", str(ref)), check=True, capture_output=True, timeout=300)
    p = subprocess.Popen(cli("--method", method, "--out", str(out), "--checkpoint-dir", str(ck)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:       # wait until task 2 of 3 has begun ...
        try:
            if torch.load(ck / "checkpoint.pt", weights_only=True)["progress"]["t"] >= 1:
                break
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.02)
    time.sleep(random.Random(method).uniform(0.0, 0.2))        # ... then kill at an arbitrary instant
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    state = torch.load(ck / "checkpoint.pt", weights_only=True)  # the last checkpoint is intact
    assert state["progress"]["t"] < 3
    r = subprocess.run(cli("--method", method, "--out", str(out), "--checkpoint-dir", str(ck), "--resume", "true"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, b = json.loads(ref.read_text()), json.loads(out.read_text())
    assert_same_run(a, b)


def _resume_error(ck, *extra):
    r = subprocess.run(cli("--checkpoint-dir", str(ck), "--resume", "true", "--out", str(ck / "r.json"), *extra),
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr


def test_corrupt_foreign_and_unsafe_checkpoints_are_one_line_errors(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    code, err = _resume_error(ck)
    assert code == 2 and "holds no checkpoint.pt" in err and "Traceback" not in err
    (ck / "checkpoint.pt").write_bytes(os.urandom(300))
    code, err = _resume_error(ck)
    assert code == 2 and "cannot be read" in err and err.count("\n") == 1
    torch.save({"weights": torch.zeros(3)}, ck / "checkpoint.pt")
    code, err = _resume_error(ck)
    assert code == 2 and "not a stamp_min checkpoint" in err
    torch.save({"format": "x", "obj": subprocess.CompletedProcess([], 0)}, ck / "checkpoint.pt")  # needs code to unpickle
    code, err = _resume_error(ck)
    assert code == 2 and "cannot be read" in err and not (ck / "r.json").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    ck = tmp_path / "ck"
    subprocess.run(cli("--checkpoint-dir", str(ck), "--num-tasks", "1", "--out", str(tmp_path / "a.json")),
                   check=True, capture_output=True, timeout=300)
    code, err = _resume_error(ck, "--num-tasks", "1", "--lr", "0.3")
    assert code == 2 and "lr=0.3 differs" in err
