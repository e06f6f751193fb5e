"""Command lines and results files, shared by the two experiments (fcl_loop, flora_na).

- `parse_config(Config, argv)`: the CLI is generated from a `@dataclass Config`: one flag per
  field (`num_clients` -> `--num-clients`), typed like the field, its help text the one-line
  docstring written under the field. So `--help` documents every knob and nothing drifts.
- `check_fields(cfg, limits)`: every field has its declared type, every float is finite, every
  number lies in its interval (`"[1, 10000]"`, `"(0, inf)"`): a mistake is one `UserError` line.
- `main(fn)`: run `fn()`, turning a `UserError` into one line on stderr and exit status 2, a
  failed write (full disk, size limit) into one line and exit status 1, SIGTERM into SIGINT's path;
  a second signal while shutting down is ignored. `quiet_until_main()`: called by a command's
  module before its heavy imports, so a signal during them is one line too.
- `atomic_write(path, write)` / `write_json(path, obj)`: temp file in the same folder, fsync,
  rename, with SIGINT/SIGTERM held back until the rename: a reader never sees a half-written file,
  and a crash, a kill or a full disk leaves the previous file intact and no temp file behind.
- `check_writable(path)`: fail at start, not after an hour of training; an existing `path` must be
  a regular file (never a folder, FIFO or device).
- `run_info()`: library versions and the git commit, stored in every results file.
"""

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

from . import UserError, __version__


def field_docs(cls):
    """{field name: the string literal written right under it} from the class source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the flag and what is allowed) and exit status 2,
    not the whole usage."""

    def error(self, message):
        self.exit(2, f"error: {message}; allowed: see {self.prog} --help\n")


def parse_config(cls, argv=None, description=None, notes=None, prog=None):
    """Parse argv into an instance of the dataclass `cls` (defaults = the dataclass defaults).
    notes: {field: text} appended to a field's help (text computed from tables, e.g. presets)."""
    docs = field_docs(cls)
    p = OneLineParser(prog=prog, description=description or (cls.__doc__ or "").strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = {bool: _bool, int: int, float: float}.get(f.type, str)
        opt = dict(default=f.default, help=" ".join(filter(None, (docs.get(f.name), (notes or {}).get(f.name)))), type=kind)
        if kind is _bool:   # `--flag`, `--flag true` and `--flag false` all work
            opt.update(metavar="{true,false}", nargs="?", const=True)
        if f.default is None:
            opt["type"] = lambda s: None if s.lower() == "none" else s
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **opt)
    return cls(**vars(p.parse_args(argv)))  # argparse itself exits with status 2 on a bad flag


def _interval(text):
    """'[1, 10000]' / '(0, inf)' / '[0, 1)' -> (low, high, low closed, high closed)."""
    lo, hi = (float(v) for v in text[1:-1].split(","))
    return lo, hi, text[0] == "[", text[-1] == "]"


def check_fields(cfg, limits=None):
    """Raise a one-line UserError unless every field of the dataclass `cfg` has its declared type
    (bool, int, float (an int will do), str), every float is finite, no string holds a NUL (no
    path can), and every field named in `limits` ({name: interval text such as "[1, 10000]" or
    "(0, inf)"}) lies in its interval."""
    for f in dataclasses.fields(cfg):
        v, kind = getattr(cfg, f.name), f.type
        ok = (type(v) is bool) if kind is bool else (isinstance(v, (int, float)) and not isinstance(v, bool)) \
            if kind is float else (isinstance(v, int) and not isinstance(v, bool)) if kind is int else isinstance(v, kind)
        if not ok:
            raise UserError(f"{f.name}={v!r} is a {type(v).__name__}; allowed: a {kind.__name__}")
        if isinstance(v, str) and "\0" in v:
            raise UserError(f"{f.name}={v!r} contains a NUL character; allowed: text without NUL (no path holds one)")
        if kind is float and not math.isfinite(v):
            raise UserError(f"{f.name}={v} is not a finite number; allowed: a finite {kind.__name__}")
        if f.name in (limits or {}):
            lo, hi, lo_in, hi_in = _interval(limits[f.name])
            if not ((v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)):
                low = f"{lo:g} {'<=' if lo_in else '<'} " if lo > -math.inf else ""
                high = f" {'<=' if hi_in else '<'} {hi:g}" if hi < math.inf else ""
                raise UserError(f"{f.name}={v} is out of range; allowed: {low}{f.name}{high}")


def _stop(signum, frame):
    """SIGINT/SIGTERM: stop the way Ctrl-C does (KeyboardInterrupt); a second signal while shutting
    down is ignored, so it cannot interrupt the cleanup or print a traceback."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


_sigterm = _stop                                    # the name older code and tests use


def _before_main(signum, frame):
    sys.stderr.write("interrupted before the run started; nothing was written\n")
    os._exit(130)


def quiet_until_main():
    """Called by a command's module (`python -m stamp_min.fcl_loop`) before it imports torch: a
    SIGINT/SIGTERM during those seconds is one line and exit status 130, not a traceback out of
    an import. `main` replaces these handlers with its own."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _before_main)


def main(fn):
    """Run fn(); a UserError becomes `error: <message>` on stderr and exit status 2, a failed
    write (a full disk, a file-size limit, a folder that vanished) `error: ...` and exit status 1.
    SIGINT and SIGTERM stop the run like Ctrl-C: the write in progress finishes (see atomic_write)
    and the last checkpoint stays resumable; exit status 130; a second signal is ignored."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # over a file-size limit: an OSError, not a silent kill
    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    stopped = False
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror or e}; the previous file is intact", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        stopped = True                              # shutting down: further signals stay ignored
        print("interrupted; any checkpoint written so far is complete (continue with --resume true)", file=sys.stderr)
        sys.exit(130)
    finally:
        for s, h in old.items():                    # for a caller in the same process (tests, notebooks)
            if not stopped:
                signal.signal(s, signal.default_int_handler if h is _before_main and s == signal.SIGINT
                              else signal.SIG_DFL if h is _before_main else h)


def check_writable(path, field="out"):
    """Make sure `path` can be written: absent or a regular file (a write would replace a FIFO,
    a device or a folder), in a folder that exists or can be made and accepts a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{field}={str(path)!r} is a folder; allowed: a file path")
    if path.exists() and not path.is_file():
        raise UserError(f"{field}={str(path)!r} is not a regular file (a FIFO, a device, a socket); allowed: a new "
                        f"path or a regular file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".probe-"):
            pass
    except OSError as e:
        raise UserError(f"{field}={str(path)!r} cannot be written ({e.strerror}); allowed: a path in a writable folder") from None


def check_replaces(path, config, rules, free=()):
    """A results file already at `path` is replaced only if it holds the results of the same run: the
    same settings (but the `free` ones, which change how, not what, is computed) and the same rules.
    Otherwise one line (the caller skips this with --overwrite true). Any other file is replaced."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_bytes()) if path.stat().st_size < 2**28 else None
    except (OSError, ValueError):
        old = None
    theirs = old.get("config") if isinstance(old, dict) else None
    if not isinstance(theirs, dict):                   # not a results file: replaced, as any regular file
        return
    mine = {k: v for k, v in config.items() if k not in free}
    differ = [k for k in mine if theirs.get(k) != mine[k]] + (["rules"] if old.get("rules") != rules else [])
    if differ:
        raise UserError(f"out={str(path)!r} holds another run's results ({', '.join(differ[:4])} differ); allowed: "
                        f"another --out or --name, or --overwrite true to replace it")


def _clean(obj):
    """JSON has no NaN: NaN/inf become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class deferred_signals:
    """Hold SIGINT and SIGTERM back inside the block; they act after it. So a kill during a write
    lets the write finish instead of leaving it half done. (Python runs signal handlers in the main
    thread whichever thread the OS picked, so swapping the handlers is enough; off the main thread
    handlers cannot be changed, and nothing is held.)"""

    def __enter__(self):
        self.caught, self.old = [], {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, lambda n, _: self.caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        for n in self.caught[:1]:                  # now act on the first signal as it would have acted
            h = self.old[n]
            if callable(h):
                h(n, None)
            elif h != signal.SIG_IGN:
                signal.raise_signal(n)


def atomic_write(path, write):
    """Call write(f) on a binary file that becomes `path` only when complete: a temp file in the
    same folder, fsync, rename. SIGINT/SIGTERM wait until the rename; on any failure (a full
    disk: OSError) the temp file is removed and the previous `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with deferred_signals():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)              # mkstemp makes 0600; a results file is as readable as any other
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError) and not e.filename:      # a full disk: say which file could not be written
                raise OSError(e.errno, e.strerror, str(path)) from None
            raise


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(_clean(obj), indent=1).encode()))


def git_commit():
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_info():
    import numpy
    import torch
    import torchvision
    return {"stamp_min": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__, "git_commit": git_commit()}
