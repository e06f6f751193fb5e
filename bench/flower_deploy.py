"""Deployment check: a real Flower federation on this machine, every part its own process.

    python bench/flower_deploy.py            # about 1-2 min on 2 cores; needs requirements-flower.txt

Starts, on loopback:  1 SuperLink (flower-superlink --insecure, HTTP API on a free port)
                      2 SuperNodes (flower-supernode --node-config "partition-id=k num-partitions=2")
then submits, with `flwr run flower <connection> --stream` (the Flower App in flower/, settings
through --run-config), first a job with an unknown method, which must fail with the reason in
its log and leave the federation running, then a hostile job whose `out` points outside the
server's results folder ($STAMP_RESULTS_DIR), which must be refused with nothing written, then a
tiny STAMP job, which must finish with
sensible accuracy and with fcl_loop's accuracy matrix (same job, one thread). It stops every
process it started (their process groups, then any process that still has our FLWR_HOME). Exit 0: all good,
and its temporary folder is removed; 1: a check failed, the logs of every process are printed and the folder is
kept. The whole check is bounded by --timeout seconds.

This is what a real deployment runs, with the machines' addresses in place of 127.0.0.1 and TLS
in place of --insecure (see docs/flower.md, "Deploy for real" and "Who controls what").
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOB = {"method": "stamp", "num-clients": 2, "num-tasks": 2, "classes-per-task": 2, "rounds-per-task": 2,
       "local-epochs": 3, "batch-size": 16, "buffer-per-class": 5, "device": "cpu"}   # few rounds: each message costs
MIN_ACCURACY = 0.5      # digits, 2 tasks: chance is at most 0.25 per task; fcl_loop reaches 0.644 here


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours(home):
    """Processes whose environment has our FLWR_HOME (what Flower spawned, in any process group)."""
    mark, found = f"FLWR_HOME={home}".encode(), []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int(d.name) != os.getpid() and mark in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:
            pass
    return found


def in_process(job):
    """fcl_loop's accuracy matrix for the same job (one thread, as the SuperNodes run)."""
    import torch
    sys.path.insert(0, str(ROOT))
    from stamp_min.fcl_loop import run
    from stamp_min.flower_app import config_from
    torch.set_num_threads(1)
    return run(replace(config_from(job), quiet=True, plot=False))["acc_matrix"]


def same_matrix(flower, loop):
    """Equal accuracy matrices: same shape, same numbers (JSON null = NaN), to 1e-9."""
    nan = float("nan")
    a = [[nan if v is None else v for v in row] for row in flower]
    b = [[nan if v is None or v != v else v for v in row] for row in loop]
    return [len(r) for r in a] == [len(r) for r in b] and all(
        (x != x and y != y) or abs(x - y) < 1e-9 for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def toml_value(v):
    return f"'{v}'" if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=300, help="seconds for the whole check (default 300)")
    args = ap.parse_args()
    deadline = time.monotonic() + args.timeout
    tmp = Path(tempfile.mkdtemp(prefix="stamp_flower_"))
    home = tmp / "flwr-home"                           # our own FLWR_HOME: ~/.flwr is never touched
    home.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "OMP_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "STAMP_RESULTS_DIR": str(tmp / "results")}          # the operator's results folder (server side)
    link = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    procs, logs = {}, {}

    def start(name, cmd):
        if name in logs:
            logs[name].close()
        logs[name] = open(tmp / f"{name}.log", "w")
        procs[name] = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=logs[name], stderr=subprocess.STDOUT,
                                       start_new_session=True)   # own process group: stopped as a whole

    def submit(name, job):
        """`flwr run` of one job; retried while the SuperLink is still starting. Returns its log."""
        run_config = " ".join(f"{k}={toml_value(v)}" for k, v in job.items())
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not accept {name} within {args.timeout:.0f} s")
            dead = [n for n, p in procs.items() if n.startswith(("superlink", "supernode")) and p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} stopped")
            start(name, [BIN / "flwr", "run", str(ROOT / "flower"), "loopback", "--run-config", run_config, "--stream"])
            while procs[name].poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not finish within {args.timeout:.0f} s")
                time.sleep(1)
            text = (tmp / f"{name}.log").read_text()
            if "SuperLink is unavailable" not in text:
                return text
            time.sleep(2)

    def stop(signum, frame):                               # SIGTERM: clean up like any failure
        raise RuntimeError(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    out = tmp / "results" / "results.json"
    ok, why, left = False, "", []
    try:
        start("superlink", [BIN / "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                            "--database", str(tmp / "state.db")])
        for k in range(2):
            start(f"supernode{k}", [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                    "--host", "127.0.0.1", "--port", str(free_port()),
                                    "--node-config", f"partition-id={k} num-partitions=2"])
        # 1. bad input: the run fails with the reason in its log, and the federation stays up
        t0 = time.monotonic()
        bad = submit("bad-run", {**JOB, "method": "sgd", "out": "bad.json"})
        plain = re.sub(r"\x1b\[[0-9;]*m", "", bad)               # without the log's colour codes
        bad_ok = "stamp_min: method='sgd' is unknown" in plain and not (tmp / "results" / "bad.json").exists()
        line = next((ln.strip() for ln in plain.splitlines() if "stamp_min: method='sgd'" in ln), "(no such line)")
        print(f"bad input (method='sgd'): {'refused' if bad_ok else 'NOT refused clearly'} in "
              f"{time.monotonic() - t0:.0f} s; flwr run's log says: {line}")
        # 2. a job that asks for a path outside the server's results folder: refused, nothing written
        t0 = time.monotonic()
        escape = re.sub(r"\x1b\[[0-9;]*m", "", submit("escape-run", {**JOB, "out": "../escape.json"}))
        escape_ok = "stamp_min: out='../escape.json' is not a plain file name" in escape and not (tmp / "escape.json").exists()
        print(f"hostile job (out='../escape.json'): {'refused' if escape_ok else 'NOT refused'} in "
              f"{time.monotonic() - t0:.0f} s")
        # 3. the real job
        t0 = time.monotonic()
        submit("flwr-run", {**JOB, "out": out.name})
        if not out.exists():
            why = "the run ended without results"
        else:
            res = json.loads(out.read_text())
            acc = res["avg_accuracy"]
            ref = in_process(JOB)
            same = same_matrix(res["acc_matrix"], ref)
            ok = bad_ok and escape_ok and same and res["engine"] == "flower" and acc >= MIN_ACCURACY
            why = (f"run finished in {time.monotonic() - t0:.0f} s: average accuracy {acc:.3f} (needs >= {MIN_ACCURACY}); "
                   f"accuracy matrix {res['acc_matrix']}, {'equal to' if same else 'NOT equal to'} fcl_loop's {ref}")
    except RuntimeError as e:
        why = str(e)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # nothing interrupts the clean-up
        for sig in (signal.SIGTERM, signal.SIGKILL):       # stop everything we started, gently first
            for p in procs.values():
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(2 if sig == signal.SIGTERM else 0)
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        left = ours(home)
        for pid in left:                                   # anything that left our process groups
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for f in logs.values():
            f.close()
    print(("OK: " if ok else "FAILED: ") + why)
    print(f"processes started: {', '.join(procs)}; all stopped (stray processes killed: {len(left)})")
    if not ok:
        for name in procs:
            print(f"----- {name} log (last 40 lines)")
            print("\n".join((tmp / f"{name}.log").read_text().splitlines()[-40:]))
        print(f"every log, the state and the results are kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)             # logs, state, FLWR_HOME's environments: not needed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
