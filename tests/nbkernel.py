"""One live Jupyter kernel per course notebook, shared by the notebook tests, the exercise tests and the
variations: a notebook runs top to bottom once in smoke mode (STAMP_SMOKE=1), and everything else
re-runs cells in the kernel it left behind instead of starting a kernel of its own.

    nb = executed("03")           # the kernel after a smoke run of notebooks/03_*.ipynb (errors: nb.failure)
    out = nb.run(source)          # run a cell's (changed) source there: out.text, out.error, out.results

Two notebooks run at a time (each notebook asks torch for one thread), on the two cores the suite has.
"""

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = {p.name[:2]: p for p in sorted(HERE.glob("[0-9][0-9]_*.ipynb"))}
TIMEOUT = 300                      # seconds a cell may take in smoke mode


@dataclass
class Output:
    text: str = ""                 # stream text, text/plain and text/markdown of every output, in order
    error: str = ""                # 'NameError: …' and its traceback, when the code raised
    results: list = field(default_factory=list)   # text/plain of execute_result outputs (a cell's last value)


class Kernel:
    """A kernel running this interpreter in notebooks/, in smoke mode, with the repository first on
    sys.path (the setup cell finds it beside the notebook anyway)."""

    def __init__(self, path):
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager
        self.path = Path(path)
        self.nb = nbformat.read(self.path, as_version=4)
        spec = Path(tempfile.mkdtemp(prefix="stamp-kernel-")) / "stamp-test"
        spec.mkdir()
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "stamp-test", "language": "python"}))
        env = {**os.environ, "STAMP_SMOKE": "1", "JPY_SESSION_NAME": str(self.path),
               "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        env.pop("MPLBACKEND", None)                 # the kernel's own inline backend, as in Jupyter
        self.km = KernelManager(kernel_name="stamp-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))
        self.km.start_kernel(cwd=str(self.path.parent), env=env, stderr=subprocess.DEVNULL)   # its log: TCP warnings
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.failure = ""                           # the first error of the top-to-bottom run
        self.outputs = []                           # one Output per cell of that run (None for markdown)

    def run(self, code, timeout=TIMEOUT):
        out = Output()

        def hook(msg):
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.text += content["text"]
            elif kind in ("execute_result", "display_data"):
                data = content.get("data", {})
                text = data.get("text/markdown", data.get("text/plain", "")) if "image/png" not in data else ""
                out.text += text + ("\n" if text else "")
                if kind == "execute_result":
                    out.results.append(data.get("text/plain", ""))
            elif kind == "error":
                out.error = f"{content['ename']}: {content['evalue']}\n" + "\n".join(content["traceback"])
        self.kc.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False)
        return out

    def run_all(self):
        for i, cell in enumerate(self.nb.cells):
            if cell.cell_type != "code":
                self.outputs.append(None)
                continue
            out = self.run(cell.source)
            self.outputs.append(out)
            if out.error:
                self.failure = f"{self.path.name}, cell {i}:\n{cell.source[:300]}\n{out.error}"
                return

    def shutdown(self):
        try:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=True)
        except Exception:                          # noqa: BLE001 - best effort at exit
            pass


_pool = ThreadPoolExecutor(max_workers=2)
_futures = {}
_lock = threading.Lock()


def _start(key):
    k = Kernel(NOTEBOOKS[key])
    k.run_all()
    return k


def executed(key):
    """The kernel of notebook `key` ('01' … '10') after its smoke run. The next notebook starts at the same
    time, so that it runs while this one is tested (one ahead: at most three kernels, ~1 GB each, live)."""
    keys = list(NOTEBOOKS)
    with _lock:
        for k in keys[keys.index(key):keys.index(key) + 2]:
            if k not in _futures:
                _futures[k] = _pool.submit(_start, k)
        future = _futures[key]
    return future.result()


def release(key):
    """Stop notebook `key`'s kernel (its tests are done); a later executed(key) runs it again."""
    with _lock:
        future = _futures.pop(key, None)
    if future is not None and future.exception() is None:
        future.result().shutdown()


@atexit.register
def _shutdown():
    _pool.shutdown(wait=True, cancel_futures=True)
    for key in list(_futures):
        release(key)
