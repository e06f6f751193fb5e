"""Every exercise's check is tested like code (the answers: notebooks/solutions/key.py, the teachers' key).

In the notebook's own kernel, after its smoke run, the exercise's cell runs with its answer written in:
the reference answer and every other right answer (another type: a tensor for an int, a list for an array)
must print only "✔ …: right"; every typical wrong answer must print "✘ …: not yet — hint: …". Nothing may
raise and no stray value (True, False) may follow a check. A prediction is run with every choice: exactly
one is right, whatever this run measured; a missing or misspelt prediction gets a hint and runs nothing.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "notebooks" / "solutions"))
import key  # noqa: E402
from key import KEY, edited, exercise_cell, predicted  # noqa: E402

CASES = [pytest.param(key, (key, i), id=f"{key}-{i + 1}") for key, exercises in KEY.items() for i in range(len(exercises))]


def clean(out, what):
    assert not out.error, f"{what}: raised instead of a hint\n{out.error}"
    assert not out.results, f"{what}: a stray value after the check: {out.results}"


def says_right(out, what):
    clean(out, what)
    assert "✔" in out.text and "✘" not in out.text, f"{what}: should be right, printed:\n{out.text}"


def says_not_yet(out, what, hint="not yet — hint: "):
    clean(out, what)
    assert "✘" in out.text and hint in out.text, f"{what}: should be 'not yet' with a hint ({hint!r}), printed:\n{out.text}"


def test_the_key_covers_every_exercise():
    """Every cell a student completes (a `...` to replace) is an exercise of the key, and the reverse."""
    import nbformat
    for key, exercises in KEY.items():
        nb = nbformat.read(next((ROOT / "notebooks").glob(f"{key}_*.ipynb")), as_version=4)
        keyed = {exercise_cell(nb, e["cell"]) for e in exercises}
        open_cells = {i for i, c in enumerate(nb.cells)
                      if c.cell_type == "code" and ("= ..." in c.source or "return ..." in c.source)}
        assert keyed == open_cells, f"{key}: exercise cells {sorted(open_cells)}, key for {sorted(keyed)}"


def test_the_key_writes_the_solved_notebooks(tmp_path, capsys):
    """`python notebooks/solutions/key.py --out DIR` writes the notebooks with every code exercise answered
    and every prediction the full run's answer written in; an unknown notebook is one line, exit status 2."""
    import nbformat
    assert key.main(["--out", str(tmp_path)]) == 0
    for k, exercises in KEY.items():
        student = nbformat.read(next((ROOT / "notebooks").glob(f"{k}_*.ipynb")), as_version=4)
        nb = nbformat.read(next(tmp_path.glob(f"{k}_*.ipynb")), as_version=4)
        for e in exercises:
            source = nb.cells[exercise_cell(student, e["cell"])].source
            if e["kind"] == "code":
                assert all(new in source for new in e["answer"].values()), (k, e["cell"])
            elif e["answer"] is not None:
                assert predicted(e["placeholder"], e["answer"]) in source, (k, e["cell"])
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    capsys.readouterr()
    assert key.main(["--out", str(tmp_path), "12"]) == 2 and "notebook '12'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("notebook, case", CASES, indirect=["notebook"], scope="session")
def test_exercise(notebook, case):
    key, i = case
    e = KEY[key][i]
    assert not notebook.failure, f"the smoke run failed before the exercises:\n{notebook.failure}"
    source = notebook.nb.cells[exercise_cell(notebook.nb, e["cell"])].source
    if e["before"]:
        clean(notebook.run(e["before"]), e["before"])
    name = f"{notebook.path.name}, exercise {i + 1}"
    if e["kind"] == "code":
        says_right(notebook.run(edited(source, e["answer"])), f"{name}, the reference answer")
        for what, edits in e["right"].items():
            says_right(notebook.run(edited(source, edits)), f"{name}, right as {what}")
        for what, edits in e["wrong"].items():
            says_not_yet(notebook.run(edited(source, edits)), f"{name}, wrong: {what}")
        return
    says_not_yet(notebook.run(source), f"{name}, no prediction yet", "write your prediction first")
    says_not_yet(notebook.run(edited(source, {e["placeholder"]: predicted(e["placeholder"], "perhaps")})),
                 f"{name}, not a choice", "is not a choice")
    right = []
    for choice in e["choices"]:
        out = notebook.run(edited(source, {e["placeholder"]: predicted(e["placeholder"], choice)}))
        clean(out, f"{name}, prediction {choice!r}")
        if "✘" in out.text:
            says_not_yet(out, f"{name}, prediction {choice!r}")
        else:
            assert "✔" in out.text, f"{name}, prediction {choice!r}: no verdict printed:\n{out.text}"
            right.append(choice)
    assert len(right) == 1, f"{name}: {len(right)} of the choices {e['choices']} are right: {right}"


def test_a_check_takes_an_answer_in_another_type_and_never_raises(capsys):
    """course's checks, on their own: a tensor, a list of 0-d tensors or of one-element tensors is the same
    answer as a NumPy array; a placeholder, a dict, a wrong shape or code that raised is a hint."""
    import numpy as np
    import torch

    from stamp_min import course
    want = np.array([1.0, 2.0])
    for got in (torch.tensor([1.0, 2.0]), [torch.tensor(1.0), torch.tensor(2.0)], [torch.tensor([1.0]), torch.tensor([2.0])],
                [1, 2], (np.float32(1), 2.0)):
        assert course.check_close("x", got, want), got
    for got, hint in ((..., "replace the ..."), ([1, ...], "replace the ..."), ({"a": 1}, "expected numbers"),
                      ([1, 2, 3], "shape (3,), expected (2,)"), (course.attempt(lambda: 1 / 0), "ZeroDivisionError"),
                      ([1, course.attempt(lambda: [][1])], "IndexError")):
        capsys.readouterr()
        assert not course.check_close("x", got, want)
        assert hint in capsys.readouterr().out, got
    assert not course.check_close("x", 0.3, 0.25, reveal=False) and "0.25" not in capsys.readouterr().out
    assert course.choice(" tam", ("replay", "TAM")) == "TAM" and course.choice("true", (True, False)) is True
    assert course.choice(np.bool_(False), (True, False)) is False and course.choice(torch.tensor(3), range(5)) == 3
    assert course.choice(1, (True, False)) is None and course.choice(True, range(5)) is None
    assert course.prediction(..., ("higher", "lower")) is None and "write your prediction first" in capsys.readouterr().out
    assert course.prediction("up", ("higher", "lower")) is None and "'up' is not a choice" in capsys.readouterr().out


def test_a_check_shows_no_stray_value_in_a_notebook():
    """A cell that ends with a check shows its line and nothing under it: IPython calls _ipython_display_,
    which displays nothing; the result still reads as True or False in code."""
    from stamp_min import course
    ok = course.check("x", True)
    assert ok and not course.check("x", False) and ok._ipython_display_() is None and repr(ok) == "Checked(True)"
