"""tests/run.py, the suite's parallel runner: every test file runs exactly once, the files that share a Ray or
the notebooks' kernels share a process, the work is dealt out longest first, and the exit code is pytest's."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import run  # noqa: E402

FILES = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_every_file_runs_once_and_groups_stay_together(n):
    parts = run.shares(n)
    assert sorted(f for part in parts for f in part) == FILES and len(parts) <= n
    for group in run.GROUPS:
        assert sum(any(f in part for f in group) for part in parts) == 1, group
    assert set(run.TIMES) >= {f[5:-3] for f in FILES} - {"run"}      # every file has a measured time but this one


def test_longest_first_to_the_least_loaded_by_hand():
    files = ["test_flower.py", "test_hostile.py", "test_notebooks.py", "test_exercises.py", "test_a.py", "test_b.py",
             "test_c.py", "test_new.py"]
    times = {"flower": 6, "hostile": 1, "study": 0, "gpu": 0, "notebooks": 2, "exercises": 2, "a": 5, "b": 3, "c": 3}
    # units: the Ray group 7, the kernels' group 4, a 5, b 3, c 3, new 10 (not in times: NEW_FILE)
    # longest first, each to the least loaded: new -> P1 (10); Ray -> P2 (7); a -> P2 (12); kernels -> P1 (14);
    # b -> P2 (15); c -> P1 (17)
    assert run.NEW_FILE == 10
    with pytest.raises(SystemExit, match="test_study.py"):
        run.shares(2, files, times)                                   # a group names a file that is not there
    files += ["test_study.py", "test_gpu.py"]
    p1, p2 = run.shares(2, files, times)
    assert p1 == sorted(["test_new.py", "test_notebooks.py", "test_exercises.py", "test_c.py"])
    assert p2 == sorted(["test_flower.py", "test_hostile.py", "test_study.py", "test_gpu.py", "test_a.py", "test_b.py"])


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "tests/run.py" in line]
    assert ci == ["python tests/run.py -q"]
    assert ". .venv/bin/activate && python tests/run.py -q " in (ROOT / "README.md").read_text()


def test_the_runner_passes_options_and_returns_pytests_code():
    def runner(*args):
        return subprocess.run([sys.executable, str(ROOT / "tests" / "run.py"), *args], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
    p = runner("--processes", "0")
    assert p.returncode == 2 and "--processes takes a number from 1 to 8, not '0'" in p.stderr
    p = runner("tests/test_house.py")
    assert p.returncode == 2 and "call: python -m pytest tests/test_house.py" in p.stderr
    p = runner("-q", "-k", "test_every_library_file_is_at_most_300_lines or test_paired_interval_by_hand")
    assert p.returncode == 0, p.stdout[-2000:]
    assert re.findall(r"^1 passed", p.stdout, re.M) == ["1 passed"] * 2, p.stdout[-2000:]    # one in each process
    assert "2 processes done" in p.stdout and "exit codes 0 0 (all passed)" in p.stdout
    p = runner("-q", "-k", "no_test_is_called_this")                 # pytest's 5 everywhere: nothing collected
    assert p.returncode == 5 and "FAILED" in p.stdout
