"""tests/run.py, the parallel runner of the development tier: every test file runs exactly once, the notebook and
exercise tests share a process, the files that start Ray run alone after the others, the work is dealt out
longest first, and the exit code is pytest's."""

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
    assert sorted([f for part in parts for f in part] + list(run.RAY)) == FILES and len(parts) <= n
    for group in run.GROUPS:
        assert sum(any(f in part for f in group) for part in parts) == 1, group
    dealt = {f[5:-3] for f in FILES if f not in run.RAY} - {"run"}   # every file dealt out has a measured time
    assert set(run.TIMES) == set(run.DEV_TIMES) == dealt                  # but this one, and no time is for nothing


def test_longest_first_to_the_least_loaded_by_hand():
    files = ["test_flower.py", "test_hostile.py", "test_notebooks.py", "test_a.py", "test_b.py", "test_c.py", "test_new.py"]
    times = {"flower": 6, "hostile": 1, "notebooks": 2, "exercises": 2, "a": 5, "b": 3, "c": 3}
    with pytest.raises(SystemExit, match="test_exercises.py"):
        run.shares(2, files, times)                                   # a group names a file that is not there
    files.append("test_exercises.py")
    # the Ray files run later; units: the kernels' group 4, a 5, b 3, c 3, new 10 (not in times: NEW_FILE)
    # longest first, each to the least loaded: new -> P1 (10); a -> P2 (5); kernels -> P2 (9); b -> P2 (12); c -> P1 (13)
    assert run.NEW_FILE == 10
    assert run.shares(2, files, times) == [["test_c.py", "test_new.py"],
                                           ["test_a.py", "test_b.py", "test_exercises.py", "test_notebooks.py"]]


def test_the_readme_test_commands_are_the_ones_ci_and_the_runner_use():
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci == ["python -m pytest -q"]
    readme = (ROOT / "README.md").read_text()
    assert ". .venv/bin/activate && python -m pytest -q " in readme
    assert '. .venv/bin/activate && python tests/run.py -q -m "not slow"' in readme


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
    # test_house's in one of the 2 processes (the other has none: pytest's 5), then test_study's with Ray's files
    assert re.findall(r"^1 passed", p.stdout, re.M) == ["1 passed"] * 2, p.stdout[-2000:]
    assert re.search(r"exit codes (0 5|5 0) 0 \(all passed\)", p.stdout), p.stdout[-2000:]
    assert p.stdout.index("then alone") < p.stdout.rindex("1 passed")          # the Ray files ran last
    p = runner("-q", "-k", "no_test_is_called_this")                 # pytest's 5 everywhere: nothing collected
    assert p.returncode == 5 and "FAILED" in p.stdout
