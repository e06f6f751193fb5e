"""The setup cell every course notebook starts with, in one place.

Edit CELL (or REPO_URL in it: the one place that names the course's repository, for Colab), then run

    python notebooks/setup_cell.py

to copy it into every notebook; tests/test_notebooks.py fails while a notebook's first code cell differs.
The cell finds the package beside the notebook (a fresh clone needs no `pip install -e .`), in any working
directory; on Colab it clones the repository and installs only what Colab lacks (Colab's own torch stays).
"""

CELL = r'''# Setup — run this cell first. It finds stamp_min beside this notebook (a fresh clone needs no install,
# any working directory), or on Google Colab clones the course and adds only what Colab lacks (its torch stays).
import importlib.util, os, subprocess, sys
from pathlib import Path

SMOKE = os.environ.get("STAMP_SMOKE") == "1"    # the test suite runs every notebook small; leave this alone
REPO_URL = "https://github.com/stamp-min/stamp_min.git"   # the course's repository (notebooks/setup_cell.py)

def _find_root():
    hints = [os.environ.get("JPY_SESSION_NAME"), globals().get("__vsc_ipynb_file__"), os.getcwd()]
    for start in [Path(h).resolve() for h in hints if h]:
        for p in (start, *start.parents):
            if (p / "stamp_min" / "course.py").is_file():
                return p

ROOT = _find_root()
if ROOT is None and "google.colab" in sys.modules:
    ROOT = Path("/content/stamp_min")
    if not ROOT.exists():
        subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, str(ROOT)], check=True)
    missing = [pkg for mod, pkg in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"),
               ("torchvision", "torchvision")) if importlib.util.find_spec(mod) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
if ROOT is None:
    raise RuntimeError(f"stamp_min not found: open this notebook inside a clone of {REPO_URL}, or on Colab")
sys.path.insert(0, str(ROOT))                   # this clone's stamp_min comes first
from stamp_min import course, plots
plots.use_style()                               # the course's figure style (stamp_min/plots.py)
DATA_ROOT = course.DATA_ROOT                    # <repository>/data, wherever the notebook runs from'''


def install(paths=None):
    """Make CELL the first code cell of every notebook (tagged 'parameters'). Returns the changed paths."""
    from pathlib import Path

    import nbformat
    paths = paths or sorted(Path(__file__).resolve().parent.glob("[0-9][0-9]_*.ipynb"))
    changed = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        if first.source != CELL or "parameters" not in first.metadata.get("tags", []):
            first.source = CELL
            first.metadata["tags"] = sorted(set(first.metadata.get("tags", [])) | {"parameters"})
            nbformat.write(nb, path)
            changed.append(path)
    return changed


if __name__ == "__main__":
    for p in install():
        print(f"updated {p.name}")
