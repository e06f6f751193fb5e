"""tests/run.py, the parallel runner: every test file runs exactly once, the notebook and exercise tests share a
process, the tests that start a Ray run alone after the others, the work is dealt out longest first, and the exit
code is pytest's."""

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
    assert set(run.TIMES) == set(run.DEV_TIMES) == {f[5:-3] for f in FILES}    # every file has a measured time,
                                                                                # and no time is for nothing


def test_longest_first_to_the_least_loaded_by_hand():
    files = ["test_notebooks.py", "test_a.py", "test_b.py", "test_c.py", "test_new.py"]
    times = {"notebooks": 2, "exercises": 2, "a": 5, "b": 3, "c": 3}
    with pytest.raises(SystemExit, match="test_exercises.py"):
        run.shares(2, files, times)                                   # a group names a file that is not there
    files.append("test_exercises.py")
    # units: the kernels' group 4, a 5, b 3, c 3, new 10 (not in times: NEW_FILE)
    # longest first, each to the least loaded: new -> P1 (10); a -> P2 (5); kernels -> P2 (9); b -> P2 (12); c -> P1 (13)
    assert run.NEW_FILE == 10
    assert run.shares(2, files, times) == [["test_c.py", "test_new.py"],
                                           ["test_a.py", "test_b.py", "test_exercises.py", "test_notebooks.py"]]


def test_the_readme_test_commands_are_the_ones_ci_and_the_runner_use():
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python") and "test" in line]
    assert ci == ["python tests/run.py -q"]
    readme = (ROOT / "README.md").read_text()
    assert ". .venv/bin/activate && python tests/run.py -q " in readme
    assert '. .venv/bin/activate && python tests/run.py -q -m "not slow"' in readme


def test_the_options_of_each_step_and_the_exit_code_by_hand():
    first, ray = run.plan(["-q", "-x"])
    assert [o for _, o in first] == [["-m", "not ray", "-q", "-x"]] * 2 and ray == ["-m", "ray", "-q", "-x"]
    first, ray = run.plan(["-m", "gpu", "-q", "-m", "not slow"], n=3)          # pytest takes the last -m; so do we
    assert [o for _, o in first] == [["-m", "(not slow) and not ray", "-q"]] * 3 and ray is None   # Ray tests are slow
    assert [f for f, _ in first] == run.shares(3, times=run.DEV_TIMES)
    assert run.plan(["-m", "gpu"])[1] == ["-m", "(gpu) and ray"]
    assert run.outcome([0, 5, 0]) == 0 and run.outcome([5, 5, 5]) == 5 and run.outcome([0, 1, 5]) == 1
    assert run.outcome([2, 1, 0]) == 2


def test_the_runner_passes_options_and_returns_pytests_code():
    def runner(*args):
        return subprocess.run([sys.executable, str(ROOT / "tests" / "run.py"), *args], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
    p = runner("--processes", "0")
    assert p.returncode == 2 and "--processes takes a number from 1 to 8, not '0'" in p.stderr
    p = runner("tests/test_house.py")
    assert p.returncode == 2 and "call: python -m pytest tests/test_house.py" in p.stderr
    # collected only: test_house's and test_study's in the processes at once, test_flower's simulations (they
    # start a Ray) alone after them, test_flower's tests without Ray with the others; pytest's 0 everywhere
    pytest.importorskip("flwr", reason="Flower is optional: pip install -r requirements-flower.txt")
    p = runner("--collect-only", "-q", "-k", "simulation_equals_the_loop or at_most_300_lines or paired_interval_by_hand "
               "or test_a_job_cannot_choose")
    assert p.returncode == 0 and re.search(r"exit codes 0 0 0 \(all passed\)", p.stdout), p.stdout[-2000:]
    before, after = p.stdout.split("then alone, the tests that start a Ray")
    assert "::test_every_library_file_is_at_most_300_lines" in before and "::test_paired_interval_by_hand" in before
    assert "test_flower_simulation_equals_the_loop[" not in before
    assert "test_a_job_cannot_choose_a_server_path" in before
    assert after.count("test_flower_simulation_equals_the_loop[") == 4 and "::test_every_library_file" not in after
