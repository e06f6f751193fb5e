"""Every notebook runs top to bottom in smoke mode (STAMP_SMOKE=1) on this Python."""

import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, kernel, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("JUPYTER_PATH", kernel)
    monkeypatch.setenv("STAMP_SMOKE", "1")
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'SMOKE = os.environ.get("STAMP_SMOKE") == "1"' in first.source
    assert "parameters" in first.metadata.get("tags", [])
    NotebookClient(nb, kernel_name="stamp-test", timeout=300,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
