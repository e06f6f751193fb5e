"""Run the course notebooks in full, one after another, and write what was measured wherever it is stated.

    python notebooks/timings.py            # all of them (about a quarter of an hour on an idle 2-core CPU)
    python notebooks/timings.py 04 06      # some of them: the others keep their last measurement

Each notebook is executed in place (its committed outputs become this run's, so they match its source), in
a fresh kernel running this interpreter, from notebooks/, without STAMP_SMOKE; the wall time includes the
kernel's start. Before and after each notebook the 1-minute load average is recorded: where other work
runs on the machine, the times are longer, and the log says so. Then it writes notebooks/timings.txt and the
time stated in each notebook's first cell, in the outline's table (notebooks/README.md) and in README.md's
course list (tests/test_notebooks.py checks that they agree).
"""

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOG = HERE / "timings.txt"
OUTLINE, README = HERE / "README.md", HERE.parent / "README.md"
INTRO = re.compile(r"about\s+([0-9.]+ (?:s|min))\s+on a 2-core CPU\s+\(measured ([0-9-]+): notebooks/timings\.txt\)")   # line breaks allowed
HEADER = """# Full runs of the course notebooks, one after another, each executed in place in a fresh kernel
# (python notebooks/timings.py). wall: seconds, kernel start included; load: the machine's 1-minute load
# average before -> after the notebook (the notebook itself adds about 1; above ~1.3 on these 2 cores,
# other work shared them and the times are longer than on an idle machine).
# notebook | wall s | measured | load before -> after | machine
"""


def fmt(seconds):
    """How a run time is written in the course: '11 s' under 55 s, else minutes: '1 min', '2.5 min'."""
    return f"{seconds:.0f} s" if seconds < 55 else f"{seconds / 60:.1f}".removesuffix(".0") + " min"


def read():
    """{notebook file name: (wall seconds, date)} from notebooks/timings.txt."""
    rows = {}
    for line in entries():
        name, wall, date, *_ = [part.strip() for part in line.split("|")]
        rows[name] = (float(wall), date)
    return rows


def entries():
    """The log's lines, one per notebook (lines in another format, from before this script, are dropped)."""
    if not LOG.is_file():
        return []
    return [line for line in LOG.read_text().splitlines() if not line.startswith("#") and line.count("|") >= 4]


def stated():
    """Every time the course states for a notebook: {file name: {where: text}}, from the notebook's first
    cell, the outline's table and README.md's course list."""
    import nbformat
    out = {}
    for path in sorted(HERE.glob("[0-9][0-9]_*.ipynb")):
        found = out.setdefault(path.name, {})
        m = INTRO.search(nbformat.read(path, as_version=4).cells[0].source)
        if m:
            found["intro"], found["intro date"] = m.group(1), m.group(2)
        row = re.search(rf"^\| {path.name[:2]} \|.*?\| ([0-9.]+ (?:s|min))[^|]*\| [^|]*\| [^|]*\|$", OUTLINE.read_text(), re.M)
        if row:
            found["outline"] = row.group(1)
        line = re.search(rf"^\d+\. \[`{path.stem}`\].*\(~([0-9.]+ (?:s|min))", README.read_text(), re.M)
        if line:
            found["README"] = line.group(1)
    return out


def write_stated(rows):
    """Put the measured times into the notebooks' first cells, the outline and the README."""
    import nbformat
    outline, readme = OUTLINE.read_text(), README.read_text()
    for name, (wall, date) in rows.items():
        path = HERE / name
        nb = nbformat.read(path, as_version=4)
        new = INTRO.sub(f"about {fmt(wall)} on a 2-core CPU (measured {date}: notebooks/timings.txt)", nb.cells[0].source)
        if new != nb.cells[0].source:
            nb.cells[0].source = new
            nbformat.write(nb, path)
        outline = re.sub(rf"^(\| {name[:2]} \|.*?\| )[0-9.]+ (?:s|min)([^|]*\| [^|]*\| [^|]*\|)$",
                         lambda m: m.group(1) + fmt(wall) + m.group(2), outline, flags=re.M)
        readme = re.sub(rf"^(\d+\. \[`{Path(name).stem}`\].*\(~)[0-9.]+ (?:s|min)", lambda m: m.group(1) + fmt(wall),
                        readme, flags=re.M)
    OUTLINE.write_text(outline)
    README.write_text(readme)


def use_this_interpreter():
    """A Jupyter kernel that runs this very Python (its packages, not whatever 'python3' means elsewhere):
    its spec goes into a temporary folder on JUPYTER_PATH. Returns the kernel's name."""
    folder = Path(tempfile.mkdtemp(prefix="stamp-kernel-")) / "kernels" / "stamp-course"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "stamp-course", "language": "python"}))
    os.environ["JUPYTER_PATH"] = str(folder.parent.parent)
    return "stamp-course"


def execute(path, kernel_name):
    """Run one notebook in place; returns its wall seconds, kernel start included."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    kernelspec = nb.metadata.get("kernelspec")
    start = time.perf_counter()
    NotebookClient(nb, kernel_name=kernel_name, timeout=1800, record_timing=False,
                   resources={"metadata": {"path": str(HERE)}}).execute()
    wall = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)             # no timestamps in the committed file
    if kernelspec:
        nb.metadata["kernelspec"] = kernelspec          # opens with the reader's usual Python kernel
    nbformat.write(nb, path)
    return wall


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run the notebooks in full, one after another (in place), and write "
                                             "their measured times to notebooks/timings.txt and the texts that state them.")
    ap.add_argument("notebooks", nargs="*", help="which ones (01 … 11; default: all)")
    args = ap.parse_args(argv)
    paths = {p.name[:2]: p for p in sorted(HERE.glob("[0-9][0-9]_*.ipynb"))}
    unknown = [k for k in args.notebooks if k not in paths]
    if unknown:
        print(f"error: notebook {unknown[0]!r}: allowed {', '.join(paths)}", file=sys.stderr)
        return 2
    os.environ.pop("STAMP_SMOKE", None)
    kernel = use_this_interpreter()
    import torch
    machine = f"{os.cpu_count()} cores, torch {torch.__version__}, " + \
        (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
    rows = read()
    lines = {line.split("|")[0].strip(): line for line in entries()}
    for key in args.notebooks or list(paths):
        path = paths[key]
        before = os.getloadavg()[0]
        wall = execute(path, kernel)
        after = os.getloadavg()[0]
        date = datetime.date.today().isoformat()
        rows[path.name] = (wall, date)
        lines[path.name] = f"{path.name} | {wall:.1f} | {date} | {before:.2f} -> {after:.2f} | {machine}"
        print(lines[path.name], flush=True)
        LOG.write_text(HEADER + "\n".join(lines[n] for n in sorted(lines)) + "\n")   # after every notebook
    write_stated(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
