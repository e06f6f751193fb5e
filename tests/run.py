"""The tests with both cores of a 2-core machine busy: pytest processes at once, each on its own share of the
test files, then the tests that start a Ray in one process alone.

    python tests/run.py                   # everything: the README's command and .ci/run's
    python tests/run.py -m "not slow"     # the development tier
    python tests/run.py --processes 3 -x  # how many processes (default 2); other options go to every pytest

`python -m pytest` runs the same tests one after another. Most tests are many small torch operations, for which
a second thread barely helps (2026-12-05: four tiny runs 4.0 s with 2 threads, 4.6 s with 1, on 75 % more CPU),
so one process keeps about one core busy. Two processes keep both: the whole suite took 957 s with 2 and 966 s
with 3 (2026-12-05's machine, idle). To run some files or tests, call pytest on them directly. The machines differ:
on 2026-12-06's (idle; "Intel Xeon Processor", 2 cores) the same suite took 566 s, the development tier 97 s.

Ray's node must start within 30 s (fixed in Ray); with other pytest processes busy beside it, it often did not
(2026-12-05: the Ray cluster test and the hostile simulations failed in 2 of 3 runs with them in parallel; the
Flower simulations failed with the others at nice 10, since nice does not reach across the sessions that
notebook kernels and Ray's processes start; the Ray cluster test failed with the others kept off one core, and
the Ray tests took 363 s instead of 193). So the tests marked `ray` (conftest.py: the ones that start Flower's
simulation engine, and the Ray cluster test) run last, in one process with the machine to themselves: first
every process runs its files with -m "not ray" (and your -m), then one runs -m "ray" (and your -m) over tests/.
Every Ray test is also slow, so a -m that says "not slow" skips that second step.

Tried and rejected (2026-12-06, idle machine): the loopback Flower deployment, which mostly waits on the processes
it starts, in a third process of its own beside the two: 628 s against 566 s. Its Flower processes (SuperLink,
SuperNodes, each job's apps, each importing torch) use more CPU than its own pytest process shows, and slowed both
others by about a minute; inside one of the two processes its waiting left the other the machine.

Why plain pytest processes and not pytest-xdist: under xdist's workers, every Flower simulation left Ray's
helper processes running and the module fixtures (one Ray, one notebook kernel) started once per worker; it
was slower than serial. Here each share is an ordinary pytest run with its own temporary folder and one torch
thread, so fixtures and kernels behave as under `python -m pytest`.

Shares are whole files, and the files of one group in GROUPS always share a process (one kernel per notebook,
shared by the notebook and exercise tests). They are dealt out longest first, each to the process with the
least work so far, by the times in TIMES (DEV_TIMES for -m "not slow"): seconds each file's tests but the Ray
ones took in this runner on the project's idle 2-core machine (2026-12-06, at 41fc96c). A file not in them, a new one, counts as
NEW_FILE seconds; every file runs, listed or not.
"""
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
GROUPS = (("test_notebooks.py", "test_exercises.py"),)                                # the notebooks' kernels
TIMES = {"notebooks": 158, "flower": 130, "claims": 110, "faults": 47, "workbench": 47, "beat_replay": 46,
         "checkpoint": 43, "run": 33, "study": 28, "exercises": 27, "gpu_check": 24, "fcl_loop": 23, "memory": 22,
         "gradmatch": 14, "clones": 14, "flora_na": 10, "stamp": 6, "models": 3, "hostile": 2, "plots": 2, "coreset": 1,
         "data": 1, "house": 1, "baselines": 1, "lora": 0, "docs": 0, "gpu": 0, "metrics": 0}
DEV_TIMES = {"faults": 26, "fcl_loop": 18, "memory": 18, "notebooks": 15, "gradmatch": 12, "beat_replay": 12,
             "claims": 12, "flora_na": 10, "study": 9, "clones": 8, "workbench": 7, "hostile": 2, "models": 2, "data": 2,
             "coreset": 2, "plots": 1, "baselines": 1, "house": 1, "exercises": 0, "stamp": 0, "lora": 0, "docs": 0,
             "flower": 0, "gpu": 0, "metrics": 0, "run": 0, "checkpoint": 0, "gpu_check": 0}
NEW_FILE = 10


def shares(n, files=None, times=TIMES):
    """n lists of test files for the processes at once: together every tests/test_*.py (or `files`), each once; a
    group's files in one list."""
    files = sorted(files or (p.name for p in TESTS.glob("test_*.py")))
    stale = [f for g in GROUPS for f in g if f not in files]
    if stale:
        raise SystemExit(f"tests/run.py: GROUPS names {', '.join(stale)}, which tests/ does not have: update GROUPS")
    units = [list(g) for g in GROUPS] + [[f] for f in files if not any(f in g for g in GROUPS)]
    cost = lambda unit: sum(times.get(f[5:-3], NEW_FILE) for f in unit)        # noqa: E731
    out, load = [[] for _ in range(n)], [0] * n
    for unit in sorted(units, key=cost, reverse=True):                          # longest first ...
        i = load.index(min(load))                                               # ... to the least loaded
        out[i] += unit
        load[i] += cost(unit)
    return [sorted(s) for s in out if s]


def plan(args, n=2):
    """What runs: [(files, pytest options)] for the n processes at once, then the options of the Ray step over tests/,
    or None where the -m leaves out slow tests (every Ray test is slow). Your last -m (pytest takes the last) joins
    ours: -m "(yours) and not ray", then -m "(yours) and ray"."""
    marks = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-m"]
    rest = [a for i, a in enumerate(args) if a != "-m" and (i == 0 or args[i - 1] != "-m")]
    mine = f"({marks[-1]}) and " if marks else ""
    dev = "not slow" in mine
    return [(files, ["-m", mine + "not ray", *rest]) for files in shares(n, times=DEV_TIMES if dev else TIMES)], (
        None if dev else ["-m", mine + "ray", *rest])


def outcome(codes):
    """The exit code of them all: the first failure's, else 0; pytest's 5 ("no tests collected") counts only when
    every process had it (a -m or -k may select only another process's tests)."""
    ran = [c for c in codes if c != 5] or [5]
    return next((c for c in ran if c != 0), 0)


def main(args):
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    n = 2
    if "--processes" in args:
        i = args.index("--processes")
        value = args[i + 1] if i + 1 < len(args) else ""
        if not value.isdigit() or not 1 <= int(value) <= 8:
            print(f"tests/run.py: --processes takes a number from 1 to 8, not {value!r}", file=sys.stderr)
            return 2
        n, args = int(value), args[:i] + args[i + 2:]
    paths = [a for a in args if not a.startswith("-") and Path(a).exists()]
    if paths:
        print(f"tests/run.py runs every test file; to run {' '.join(paths)}, call: python -m pytest {' '.join(args)}",
              file=sys.stderr)
        return 2
    first, ray = plan(args, n)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")     # one torch thread a process
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="stamp-tests-") as tmp:
        def pytest(i, options, paths, log):
            return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--basetemp={tmp}/base{i}",
                                     *options, *map(str, paths)], cwd=TESTS.parent, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        logs = [None] + [open(Path(tmp) / f"process{i}.txt", "w+") for i in range(1, len(first))]
        print(f"tests/run.py: {len(first)} pytest processes at once ({shlex.join(first[0][1])})"
              + (f", then one alone ({shlex.join(ray)})" if ray else "") + f"; process 1 ({', '.join(first[0][0])}) "
              "prints below, the others when they are done", flush=True)
        procs, codes = [pytest(i, options, [TESTS / f for f in files], logs[i])
                        for i, (files, options) in enumerate(first)], []
        try:
            codes = [p.wait() for p in procs]
            mid = time.time()
            took = f"{mid - start:.0f} s for the processes at once"
            for i, log in enumerate(logs[1:], 1):
                log.seek(0)
                print(f"\n--- process {i + 1} ({', '.join(first[i][0])}) ---\n" + log.read(), flush=True)
            if ray:
                print(f"\n--- then alone, the tests that start a Ray ({shlex.join(ray)}) ---", flush=True)
                procs.append(pytest(len(first), ray, [TESTS], None))
                codes.append(procs[-1].wait())
                took += f", then {time.time() - mid:.0f} s for the Ray step"
        except KeyboardInterrupt:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                p.wait()
            print("tests/run.py: interrupted", file=sys.stderr)
            return 130
        finally:
            for log in logs[1:]:
                log.close()
    code = outcome(codes)
    print(f"tests/run.py: done in {time.time() - start:.0f} s ({took}); exit codes {' '.join(map(str, codes))} "
          f"({'all passed' if code == 0 else 'FAILED'})")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
