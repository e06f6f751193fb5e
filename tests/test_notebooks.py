"""The course as a whole. Every notebook runs top to bottom in smoke mode (STAMP_SMOKE=1), and a check prints
its line and no stray value; its printed text follows its settings (variations, re-run in the same kernel);
the outline's two labs run in the outline's order; every notebook starts with the setup cell, which finds a
fresh clone from any folder and on Colab clones the course from the address its host set, or says in one
line why it cannot; the README, the outline, the notebooks and notebooks/timings.txt agree on what they all
state. (The exercises' checks: tests/test_exercises.py.)"""

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "notebooks"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "solutions"))
import nbkernel  # noqa: E402
import timings  # noqa: E402
from key import KEY, edited, exercise_cell, predicted  # noqa: E402
from setup_cell import CELL  # noqa: E402

NOTEBOOKS = nbkernel.NOTEBOOKS                   # '01' -> notebooks/01_gradient_conflict.ipynb, …


def is_exercise(source):
    return "= ..." in source or "return ..." in source


@pytest.mark.slow
@pytest.mark.parametrize("notebook", list(NOTEBOOKS), indirect=True)
def test_notebook_runs_in_smoke_mode(notebook):
    assert not notebook.failure, notebook.failure
    for cell, out in zip(notebook.nb.cells, notebook.outputs):
        if out is None:
            continue
        if "course.check" in cell.source or "course.prediction" in cell.source:
            assert not out.results, f"{notebook.path.name}: a stray {out.results} after a check in\n{cell.source[:300]}"
        if is_exercise(cell.source):        # nobody answered it: it says what to do, and nothing more
            assert "not yet — hint:" in out.text and "✔" not in out.text, f"{notebook.path.name}:\n{cell.source[:300]}"


def variations():
    for key, path in NOTEBOOKS.items():
        for i, v in enumerate(nbformat.read(path, as_version=4).metadata.get("stamp_min", {}).get("variations", [])):
            yield pytest.param(key, v, id=f"{key}-{i}")


@pytest.mark.slow
@pytest.mark.parametrize("notebook, variation", list(variations()), indirect=["notebook"], scope="session")
def test_printed_text_follows_the_settings(notebook, variation):
    """A notebook's metadata lists variations: a setting changed in the source (old → new, each found exactly
    once), the text that must then be printed and the text that must not (it would be stale). 'cells': only
    the first N cells matter. In the notebook's kernel, the cells from the first changed one on run again
    (the cells before it ran in the smoke run; the exercises' tests leave their own variables only)."""
    assert not notebook.failure, notebook.failure
    cells = notebook.nb.cells[:variation.get("cells", len(notebook.nb.cells))]
    sources = [c.source if c.cell_type == "code" else None for c in cells]
    changed = []
    for old, new in variation["replace"]:
        hits = [i for i, s in enumerate(sources) if s is not None and old in s]
        assert len(hits) == 1 and sources[hits[0]].count(old) == 1, f"{old!r} must appear exactly once in {notebook.path.name}"
        sources[hits[0]] = sources[hits[0]].replace(old, new)
        changed.append(hits[0])
    text = ""
    for i in range(min(changed), len(sources)):
        if sources[i] is not None:
            out = notebook.run(sources[i])
            assert not out.error, f"{notebook.path.name} with {variation['replace']}, cell {i}:\n{out.error}"
            text += out.text
    for want in variation.get("expect", []):
        assert want in text, f"{notebook.path.name} with {variation['replace']}: {want!r} not printed"
    for stale in variation.get("forbid", []):
        assert stale not in text, f"{notebook.path.name} with {variation['replace']}: stale {stale!r} still printed"


# The outline's labs (notebooks/README.md, "Two 90-minute labs"): the words it plans them with, and the cells
# they mean: a notebook's sections 1 … last (None: all of it), then the exercises named (by a piece of their cell).
LABS = {"Lab 1": {"01 sections 1–2 and its exercise 2": ("01", 2, ["PREDICT_SMALL = ..."]),
                  "02 sections 1–4 in 35 min with exercise 1": ("02", 4, ["def worst_ip(g):"])},
        "Lab 2": {"04 sections 1–5 and exercise 2 in 35 min": ("04", 5, ["TINY_BUFFER = 2"]),
                  "06 sections 1–4 in 35 min, then its exercise 3": ("06", 4, ["ETA = 2.0"])}}


def lab_cells(nb, last, exercises):
    """Code cell indices: the notebook up to the end of section `last` (all of it for None), then the exercises."""
    end = len(nb.cells)
    if last is not None:
        end = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                   and re.search(rf"^## ({last + 1} ·|Try it)", c.source, re.M))
    return [i for i in range(end) if nb.cells[i].cell_type == "code"] + [exercise_cell(nb, a) for a in exercises]


def answered(key, nb, i):
    """Cell i with the key's answer written in (a prediction: the first choice, as a group might guess)."""
    source = nb.cells[i].source
    for e in KEY[key]:
        if exercise_cell(nb, e["cell"]) == i:
            if e["kind"] == "code":
                return e["before"], edited(source, e["answer"])
            return e["before"], edited(source, {e["placeholder"]: predicted(e["placeholder"], e["choices"][0])})
    return "", source


@pytest.mark.slow
@pytest.mark.parametrize("lab", list(LABS))
def test_the_outlines_labs_run_in_its_order(lab):
    """Each lab's cells, as the outline plans them, in fresh kernels: nothing it skips is needed."""
    outline = (HERE / "README.md").read_text()
    section = outline[outline.index(f"**{lab}"):]
    section = section[:section.index("\n\n")]
    def run_part(key, last, exercises):           # one notebook's part of the lab; the error, if any
        kernel = nbkernel.Kernel(NOTEBOOKS[key])
        try:
            for i in lab_cells(kernel.nb, last, exercises):
                before, source = answered(key, kernel.nb, i)
                for code in filter(None, (before, source)):
                    out = kernel.run(code)
                    if out.error:
                        return f"{lab}, notebook {key}, cell {i}:\n{source[:300]}\n{out.error}"
        finally:
            kernel.shutdown()

    for words in LABS[lab]:
        assert words in section, f"the outline's {lab} no longer says {words!r}: update LABS"
    with ThreadPoolExecutor(max_workers=2) as pool:                # its two notebooks at once, on the two cores
        errors = list(pool.map(lambda part: run_part(*part), LABS[lab].values()))
    assert not any(errors), "\n".join(filter(None, errors))


def test_every_notebook_starts_with_the_setup_cell():
    for path in NOTEBOOKS.values():
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert first.source == CELL, f"{path.name}: run `python notebooks/setup_cell.py`"
        assert "parameters" in first.metadata.get("tags", [])
        src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "figure.dpi" not in src, f"{path.name}: the figure style is plots.use_style()'s, set in the setup cell"


def run_cell(code, cwd, env, ipython=False):
    """Run code in a fresh interpreter (as IPython would show it, when ipython: a notebook's one-line errors)."""
    env = {k: v for k, v in {**os.environ, "MPLBACKEND": "Agg", **env}.items() if k != "JPY_SESSION_NAME" and v is not None}
    cmd = [sys.executable, "-m", "IPython", "--colors=NoColor", "--no-banner", "-c", code] if ipython else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_setup_cell_finds_a_fresh_clone_from_any_working_directory(tmp_path):
    """A copy of the repository that was never installed: the cell, run from another folder with the
    notebook's path as Jupyter gives it, imports that copy's stamp_min, not the installed one."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "stamp_min", clone / "stamp_min", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "notebooks").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = CELL + "\nimport stamp_min; print(stamp_min.__file__); print(DATA_ROOT)"
    out = run_cell(code, elsewhere, {"JPY_SESSION_NAME": None})
    assert out.returncode != 0 and "stamp_min not found: open this notebook inside a clone" in out.stderr   # nothing to go by
    env = {**os.environ, "JPY_SESSION_NAME": str(clone / "notebooks" / "01_x.ipynb"), "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(clone / "stamp_min" / "__init__.py"), str(clone / "data")]


def bare_repository(tmp_path):
    """A local bare git repository holding this working tree's stamp_min/, as a host's would."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "stamp_min", src / "stamp_min", ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=course", "-c", "user.email=course@example.org", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "the course"]):
        subprocess.run(git + cmd, cwd=src, check=True, capture_output=True)
    bare = tmp_path / "course.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(bare)], check=True, capture_output=True)
    return bare


def fake_colab(tmp_path):
    """A folder with an empty google.colab package: the cell then believes it runs on Colab."""
    pkg = tmp_path / "fake" / "google" / "colab"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    return str(tmp_path / "fake")


def test_setup_cell_clones_the_course_on_colab(tmp_path):
    """On Colab, with no clone beside the notebook, the cell clones the course from the address its host set
    (STAMP_REPO_URL here: a local bare repository) into the working folder, and imports the clone's package."""
    bare, content = bare_repository(tmp_path), tmp_path / "content"
    content.mkdir()
    code = "import google.colab\n" + CELL + "\nimport stamp_min; print(stamp_min.__file__)"
    env = {"PYTHONPATH": fake_colab(tmp_path), "STAMP_REPO_URL": bare.as_uri()}
    out = run_cell(code, content, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(content / "stamp_min" / "stamp_min" / "__init__.py")
    assert run_cell(code, content, env).returncode == 0        # run again: the clone is there, nothing to clone


@pytest.mark.parametrize("url, says", [("", "this course's address is not set"),
                                       ("file:///nowhere/course.git", "does not appear to be a git repository")])
def test_on_colab_a_failed_clone_is_one_line(tmp_path, url, says):
    """No address, or an address git cannot clone: one line in the notebook (IPython shows no traceback),
    with git's own reason and the fix."""
    code = "import google.colab\n" + CELL
    out = run_cell(code, tmp_path, {"PYTHONPATH": fake_colab(tmp_path), "STAMP_REPO_URL": url}, ipython=True)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("SetupError: ") and says in lines[0], lines
    assert "notebooks/README.md" in lines[0]


def test_setting_the_course_address_writes_it_once_and_prints_the_colab_links(tmp_path):
    """`python notebooks/setup_cell.py --repo-url URL` on a copy of the notebooks: every notebook's setup cell
    then clones that address, and the Colab links name it; a bad address is one line, exit status 2."""
    copy = tmp_path / "notebooks"
    copy.mkdir()
    for p in [HERE / "setup_cell.py", *NOTEBOOKS.values()]:
        shutil.copy(p, copy)
    url = "https://github.com/someone/stamp-course.git"
    out = subprocess.run([sys.executable, str(copy / "setup_cell.py"), "--repo-url", url], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "https://colab.research.google.com/github/someone/stamp-course/blob/main/notebooks/01_gradient_conflict.ipynb" in out.stdout
    for p in sorted(copy.glob("[0-9][0-9]_*.ipynb")):
        first = next(c for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code")
        assert f'REPO_URL = os.environ.get("STAMP_REPO_URL") or "{url}"' in first.source, p.name
    bad = subprocess.run([sys.executable, str(copy / "setup_cell.py"), "--repo-url", 'x"; import os'],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--repo-url" in bad.stderr


def test_times_agree_everywhere():
    """notebooks/timings.txt is the measurement; each notebook's first cell, the outline's table and the
    README's course list state the same time (and the notebook the same date)."""
    measured = timings.read()
    assert set(measured) == {p.name for p in NOTEBOOKS.values()}, "timings.txt: one line per notebook"
    for name, where in timings.stated().items():
        wall, date = measured[name]
        assert where.get("intro") == timings.fmt(wall) and where.get("intro date") == date, (name, where, wall, date)
        assert where.get("outline") == timings.fmt(wall), (name, where, wall)
        assert where.get("README", timings.fmt(wall)) == timings.fmt(wall), (name, where, wall)


def outputs(path):
    """The text a notebook's committed outputs show."""
    nb = nbformat.read(path, as_version=4)
    return "\n".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") + o.get("data", {}).get("text/plain", "")
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_readme_outline_and_notebooks_state_the_same_results():
    """What the README's course list and the outline say about a notebook's runs is what its committed full
    run printed: 06's methods and seeds, 09's variants; and ± means one thing, said where it first appears."""
    readme, outline = (ROOT / "README.md").read_text(), (HERE / "README.md").read_text()
    six = outputs(NOTEBOOKS["06"])
    methods = len(re.findall(r"^\w+ +average accuracy \d", six, re.M))
    seeds = int(re.search(r"Over (\d+) seeds the best", six).group(1))
    words = {9: "nine", 10: "ten", 3: "3"}
    assert f"all {words.get(methods, methods)} methods" in readme and f"survive {seeds} seeds" in readme
    nine = nbformat.read(NOTEBOOKS["09"], as_version=4)
    variants = re.search(r"VARIANTS = \[(.*?)\]", "\n".join(c.source for c in nine.cells), re.S).group(1).count('"') // 2
    assert f"{['no', 'one', 'two', 'three', 'four', 'five'][variants]} variants" in readme
    first = next(k for k, p in NOTEBOOKS.items() if "±" in outputs(p))
    intro = "\n".join(c.source for c in nbformat.read(NOTEBOOKS[first], as_version=4).cells if c.cell_type == "markdown")
    assert "How to read ±" in intro and "half-width of its 95 %" in intro, f"notebook {first} shows ± first: say what it means"
    assert "a ± b is a mean a over seeds and b the half-width of its 95 % interval" in " ".join(outline.split())
    for key, path in NOTEBOOKS.items():
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert not re.search(r"±[^\n]*(np\.std|\.std\(|sd\b)", code), f"{key}: ± with a standard deviation"
