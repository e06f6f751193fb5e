"""Command lines and results files, shared by the two experiments (fcl_loop, flora_na).

- `parse_config(Config, argv)`: the CLI is generated from a `@dataclass Config`: one flag per
  field (`num_clients` -> `--num-clients`), typed like the field, its help text the one-line
  docstring written under the field. So `--help` documents every knob and nothing drifts.
- `main(fn)`: run `fn()`, turning a `UserError` into one line on stderr and exit status 2.
- `write_json(path, obj)`: atomic (temp file in the same folder + rename): a reader never sees a
  half-written file, and a crash leaves the previous file intact.
- `check_writable(path)`: fail at start, not after an hour of training.
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
import subprocess
import sys
import tempfile
import textwrap
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


def main(fn):
    """Run fn(); a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def check_writable(path, field="out"):
    """Make sure `path` can be written (its folder exists or can be made, and accepts a file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".probe-"):
            pass
    except OSError as e:
        raise UserError(f"{field}={str(path)!r} cannot be written ({e.strerror}); allowed: a path in a writable folder") from None
    if path.is_dir():
        raise UserError(f"{field}={str(path)!r} is a folder; allowed: a file path")


def _clean(obj):
    """JSON has no NaN: NaN/inf become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)                  # mkstemp makes 0600; a results file is as readable as any other
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
