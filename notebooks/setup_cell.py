"""The setup cell every course notebook starts with, in one place.

Edit CELL, then run

    python notebooks/setup_cell.py

to copy it into every notebook; tests/test_notebooks.py fails while a notebook's first code cell differs.
The cell finds the package beside the notebook (a fresh clone needs no `pip install -e .`), in any working
directory; on Colab it clones the course from REPO_URL and installs only what Colab lacks (Colab's own
torch stays). Whoever hosts the course sets that address once, and gets the links to share:

    python notebooks/setup_cell.py --repo-url https://github.com/OWNER/NAME.git [--branch main]

(the environment variable STAMP_REPO_URL, where set, overrides it: e.g. for a private mirror).
"""

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CELL = r'''# Setup — run this cell first. It finds stamp_min beside this notebook (a fresh clone needs no install,
# any working directory), or on Google Colab clones the course and adds only what Colab lacks (its torch stays).
import importlib.util, os, subprocess, sys
from pathlib import Path

SMOKE = os.environ.get("STAMP_SMOKE") == "1"    # the test suite runs every notebook small; leave this alone
REPO_URL = os.environ.get("STAMP_REPO_URL") or ""   # the course's address, set once: notebooks/README.md, "Hosting"

class SetupError(Exception):                    # one line in the notebook, no traceback
    def _render_traceback_(self):
        return [f"SetupError: {self}"]

def _find_root():
    hints = [os.environ.get("JPY_SESSION_NAME"), globals().get("__vsc_ipynb_file__"), os.getcwd()]
    for start in [Path(h).resolve() for h in hints if h]:
        for p in (start, *start.parents):
            if (p / "stamp_min" / "course.py").is_file():
                return p

def _run(what, cmd):                            # a failed command: its own last words, and what to do
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if out.returncode:
        said = (out.stderr.strip() or out.stdout.strip() or f"exit status {out.returncode}").splitlines()
        reason = next((l for l in said if l.startswith(("fatal:", "error:", "ERROR:"))), said[-1]).strip().rstrip(".")
        raise SetupError(f"{what} failed: {reason}. " + (
            "Fix: check the address, and that the repository is public (notebooks/README.md, 'Hosting')"
            if cmd[0] == "git" else "Fix: run the cell again; if it fails again, Runtime → Restart session"))

ROOT = _find_root()
if ROOT is None and "google.colab" in sys.modules:
    if not REPO_URL:
        raise SetupError("this course's address is not set: whoever hosts it runs "
                         "`python notebooks/setup_cell.py --repo-url URL` once (notebooks/README.md, 'Hosting')")
    ROOT = Path.cwd() / "stamp_min"               # /content/stamp_min on Colab
    if not (ROOT / "stamp_min" / "course.py").is_file():
        _run(f"git clone {REPO_URL}", ["git", "clone", "-q", "--depth", "1", REPO_URL, str(ROOT)])
    missing = [pkg for mod, pkg in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"),
               ("torchvision", "torchvision")) if importlib.util.find_spec(mod) is None]
    if missing:
        _run(f"pip install {' '.join(missing)}", [sys.executable, "-m", "pip", "install", "-q", *missing])
if ROOT is None:
    raise SetupError("stamp_min not found: open this notebook inside a clone of the course "
                     "(or on Colab, from the links in notebooks/README.md)")
sys.path.insert(0, str(ROOT))                   # this clone's stamp_min comes first
from stamp_min import course, plots
plots.use_style()                               # the course's figure style (stamp_min/plots.py)
DATA_ROOT = course.DATA_ROOT                    # <repository>/data, wherever the notebook runs from'''


def install(paths=None):
    """Make CELL the first code cell of every notebook (tagged 'parameters'). Returns the changed paths."""
    import nbformat
    paths = paths or sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
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


URL = re.compile(r"(https?|ssh|git|file)://[^\s\"'\\]+|git@[\w.-]+:[^\s\"'\\]+")
LINE = re.compile(r'^(REPO_URL = os\.environ\.get\("STAMP_REPO_URL"\) or )"[^"\n]*"', re.M)


def set_repo_url(url):
    """Write `url` into CELL's REPO_URL line (in this file) and copy the cell into every notebook."""
    global CELL
    if not URL.fullmatch(url):
        raise ValueError(f"--repo-url {url!r}: allowed a git address without quotes or spaces, "
                         "e.g. https://github.com/OWNER/NAME.git or git@github.com:OWNER/NAME.git")
    text = Path(__file__).read_text()
    assert len(LINE.findall(text)) == 1, "setup_cell.py: the REPO_URL line was edited by hand; restore it"
    Path(__file__).write_text(LINE.sub(lambda m: f'{m.group(1)}"{url}"', text))
    CELL = LINE.sub(lambda m: f'{m.group(1)}"{url}"', CELL)
    return install()


def colab_links(url, branch="main"):
    """The Colab address of every notebook, for a course hosted on GitHub (else an empty list)."""
    m = re.fullmatch(r"(?:https://github\.com/|git@github\.com:)([\w.-]+)/([\w.-]+?)(?:\.git)?/?", url)
    if not m:
        return []
    return [f"https://colab.research.google.com/github/{m[1]}/{m[2]}/blob/{branch}/notebooks/{p.name}"
            for p in sorted(HERE.glob("[0-9][0-9]_*.ipynb"))]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Copy the setup cell into every notebook; with --repo-url, first "
                                 "set the course's address (for Colab) and print the links to share.")
    ap.add_argument("--repo-url", help="the git address students clone on Colab, e.g. https://github.com/OWNER/NAME.git")
    ap.add_argument("--branch", default="main", help="the branch the Colab links open (default: main)")
    args = ap.parse_args(argv)
    try:
        changed = set_repo_url(args.repo_url) if args.repo_url else install()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in changed:
        print(f"updated {p.name}")
    if args.repo_url:
        links = colab_links(args.repo_url, args.branch)
        print("Colab links to share (commit and push first):" if links else
              "not a GitHub address: Colab opens notebooks from GitHub; students open them there by hand")
        for link in links:
            print(" ", link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
