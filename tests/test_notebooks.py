"""Every notebook runs top to bottom in smoke mode (STAMP_SMOKE=1) on this Python; its printed text
follows its settings; it starts with the course's setup cell (every exercise checks itself in the notebook)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
sys.path.insert(0, str(HERE))
from setup_cell import CELL  # noqa: E402


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec that runs this very interpreter, so the notebooks see the installed stamp_min."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "stamp-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "stamp-test", "language": "python"}))
    return str(root)


def execute(nb, path, kernel, monkeypatch):
    from nbclient import NotebookClient
    monkeypatch.setenv("JUPYTER_PATH", kernel)
    monkeypatch.setenv("STAMP_SMOKE", "1")
    NotebookClient(nb, kernel_name="stamp-test", timeout=300,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def printed(nb):
    """Everything the executed cells showed: stream text, text/plain and text/markdown results."""
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", ""))
            for kind in ("text/plain", "text/markdown"):
                out.append(o.get("data", {}).get(kind, ""))
    return "\n".join(out)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, kernel, monkeypatch):
    import nbformat
    nb = nbformat.read(path, as_version=4)
    execute(nb, path, kernel, monkeypatch)


def variations():
    import nbformat
    for path in NOTEBOOKS:
        for i, v in enumerate(nbformat.read(path, as_version=4).metadata.get("stamp_min", {}).get("variations", [])):
            yield pytest.param(path, v, id=f"{path.stem[:2]}-{i}")


@pytest.mark.parametrize("path,variation", list(variations()))
def test_printed_text_follows_the_settings(path, variation, kernel, monkeypatch):
    """A notebook's metadata lists variations: a setting changed in the source (old → new, each found
    exactly once), the text that must then be printed and the text that must not (it would be stale).
    'cells': run only the first N cells (the ones that print what is checked)."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    if "cells" in variation:
        nb.cells = nb.cells[:variation["cells"]]
    for old, new in variation["replace"]:
        hits = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
        assert len(hits) == 1 and hits[0].source.count(old) == 1, f"{old!r} must appear exactly once in {path.name}"
        hits[0].source = hits[0].source.replace(old, new)
    text = printed(execute(nb, path, kernel, monkeypatch))
    for want in variation.get("expect", []):
        assert want in text, f"{path.name} with {variation['replace']}: {want!r} not printed"
    for stale in variation.get("forbid", []):
        assert stale not in text, f"{path.name} with {variation['replace']}: stale {stale!r} still printed"


def test_every_notebook_starts_with_the_setup_cell():
    import nbformat
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert first.source == CELL, f"{path.name}: run `python notebooks/setup_cell.py`"
        assert "parameters" in first.metadata.get("tags", [])
        src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "figure.dpi" not in src, f"{path.name}: the figure style is plots.use_style()'s, set in the setup cell"


def test_setup_cell_finds_a_fresh_clone_from_any_working_directory(tmp_path):
    """A copy of the repository that was never installed: the cell, run from another folder with the
    notebook's path as Jupyter gives it, imports that copy's stamp_min, not the installed one."""
    clone = tmp_path / "clone"
    shutil.copytree(HERE.parent / "stamp_min", clone / "stamp_min", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "notebooks").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = CELL + "\nimport stamp_min; print(stamp_min.__file__); print(DATA_ROOT)"
    env = {**os.environ, "JPY_SESSION_NAME": str(clone / "notebooks" / "01_x.ipynb"), "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(clone / "stamp_min" / "__init__.py"), str(clone / "data")]
    env.pop("JPY_SESSION_NAME")        # nothing to go by: one line that says what to do
    out = subprocess.run([sys.executable, "-c", CELL], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "stamp_min not found: open this notebook inside a clone" in out.stderr
