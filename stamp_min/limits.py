"""The operators' side of a Flower job: how much work a job may cause, and what it may read.

A job's run config chooses the experiment; the operators of the server and of each SuperNode
choose how much one job may ask of their machines. Every costly value is checked against the
operator's limits before anything is built (`check`), and a value over one is refused in one line
that names the run-config key, its value and the limit:

    limit                  default  bounds
    max-reply-timeout      3600     reply-timeout, seconds a client may stay silent (also: finite, > 0)
    max-clients-x-tasks    1000     num-clients × tasks (num-tasks, or the dataset's classes // classes-per-task)
    max-rounds             1000     tasks × rounds-per-task
    max-local-epochs       20       local-epochs
    max-image-size         64       image-size
    max-gm-c               10       gm-c, GM's radius
    max-batch-size         1024     batch-size
    max-buffer-per-class   100      buffer-per-class

and the server's policy for a client reply that fails its checks (replies.py):

    bad-replies            stop     stop: the run stops; drop: the round goes on without that reply

Where they are set: the server's in `make_server_app(limits={...})`, else in the environment
variable STAMP_LIMITS of the ServerApp's process ("max-rounds=200 bad-replies=drop"); a
SuperNode's in its node config (`--node-config "max-local-epochs=50"`). A limit of the wrong
kind is the operator's mistake, refused in one line too.

What a job reads (the ServerApp's log, which `flwr run --stream` shows, and the reasons of failed
clients) never holds an operator's path: `private(text, places)` replaces every spelling of each
folder (as given, absolute, resolved) with a name such as "<the server's data folder>".
"""

import math
import os
import re
from pathlib import Path

from . import UserError
from .cli import check_writable

DEFAULTS = {"max-reply-timeout": 3600.0, "max-clients-x-tasks": 1000, "max-rounds": 1000, "max-local-epochs": 20,
            "max-image-size": 64, "max-gm-c": 10.0, "max-batch-size": 1024, "max-buffer-per-class": 100,
            "bad-replies": "stop"}
POLICIES = ("stop", "drop")
CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}         # imagefolder: known once its folder is read


def operator_limits(given=None, where="STAMP_LIMITS"):
    """The limits in force: DEFAULTS changed by `given` ({name: value}, or a text "name=value ...";
    None: the environment variable STAMP_LIMITS). Keys of a node config that are not limits
    (partition-id, data-root, ...) are ignored; an unknown max-* key or a bad value is refused."""
    if given is None:
        given = os.environ.get("STAMP_LIMITS", "")
    if isinstance(given, str):
        pairs = [p.split("=", 1) for p in given.split()]
        if any(len(p) != 2 for p in pairs):
            raise UserError(f"{where}={given!r} is not name=value pairs; allowed: e.g. 'max-rounds=200 bad-replies=drop'")
        given = dict(pairs)
    out = dict(DEFAULTS)
    for key, value in given.items():
        if key not in DEFAULTS:
            if key.startswith("max-") or where == "STAMP_LIMITS":
                raise UserError(f"{where}: {key} is no limit; allowed: {', '.join(DEFAULTS)}")
            continue
        if key == "bad-replies":
            if value not in POLICIES:
                raise UserError(f"{where}: bad-replies={value!r}; allowed: {', '.join(POLICIES)}")
            out[key] = value
            continue
        kind = type(DEFAULTS[key])
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number > 0 and (kind is float or number.is_integer())):
            raise UserError(f"{where}: {key}={value!r}; allowed: a positive finite {kind.__name__}")
        out[key] = kind(number)
    return out


def check(cfg, extra, limits, num_classes=None):
    """Refuse a job whose settings exceed `limits` (one UserError line, before anything is built).
    cfg: its Config; extra: its Flower-only settings (reply_timeout); num_classes: the dataset's
    (default: CLASSES; for an imagefolder the products are checked once it is read)."""
    timeout = extra["reply_timeout"]
    if not (math.isfinite(timeout) and 0 < timeout <= limits["max-reply-timeout"]):
        raise UserError(f"reply-timeout={timeout} is out of range; allowed: 0 < reply-timeout <= "
                        f"{limits['max-reply-timeout']:g} seconds (the operator's max-reply-timeout)")
    for key, name in (("max-local-epochs", "local_epochs"), ("max-image-size", "image_size"), ("max-gm-c", "gm_c"),
                      ("max-batch-size", "batch_size"), ("max-buffer-per-class", "buffer_per_class")):
        over(name, getattr(cfg, name), limits, key)
    classes = num_classes or CLASSES.get(cfg.dataset)
    if cfg.num_tasks or classes:
        T = cfg.num_tasks or max(1, classes // cfg.classes_per_task)
        over("num_clients", cfg.num_clients, limits, "max-clients-x-tasks", T, f" with {T} tasks")
        over("rounds_per_task", cfg.rounds_per_task, limits, "max-rounds", T, f" with {T} tasks")


def over(name, value, limits, key, times=1, why=""):
    if value * times > limits[key]:
        most = limits[key] / times
        raise UserError(f"run config {name.replace('_', '-')}={value}{why} is over the operator's limit {key}="
                        f"{limits[key]:g}; allowed: {name.replace('_', '-')} <= {most:g}")


def private(text, places):
    """`text` with every spelling of each folder in `places` ({path: name to show}) replaced by its
    name: the absolute and resolved forms anywhere they stand as a path, the form as given where it
    is quoted, follows '=' or is followed by '/' (so the word "data" in a sentence stays)."""
    for path, name in places.items():
        if not path:
            continue
        spellings = {os.path.abspath(path), os.path.realpath(path)}
        for s in sorted(spellings, key=len, reverse=True):
            text = re.sub(rf"(?<![\w.~-]){re.escape(s)}(?![\w.~-])", name, text)
        given = re.escape(str(path).rstrip("/") or "/")
        text = re.sub(rf"(?<=['\"=]){given}(?=['\"/\s,;)]|$)|(?<![\w.~/-]){given}(?=/)", name, text)
    return text


# ---------------------------------------------------------------------------------------------
# where a job's results go: a bare file name in the operator's results folder

FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,119}\.json")      # a job's `out`: a bare file name


def check_out(out):
    """A job's `out` is empty or a bare *.json file name; a refusal names no server folder."""
    if out and not FILE.fullmatch(out):
        raise UserError(f"out={out!r} is not a plain file name; allowed: a name like 'stamp.json' (letters, digits, "
                        f"_.+=-; no folders): the server keeps results in its operator's results folder")


def results_path(folder, out, default, overwrite=False):
    """Where the server writes a job's results: `out` (a bare *.json name, no folders) or `default`,
    inside the operator's results `folder`. An existing file is kept unless the operator allows
    overwriting. Every refusal is one line that names no server folder."""
    check_out(out)
    path = Path(folder) / (out or default)
    model = path.with_name(path.stem + "_model.pt")
    if not overwrite and (path.exists() or model.exists()):
        raise UserError(f"out={path.name!r} exists in the server's results folder; allowed: another name (the operator "
                        f"may allow overwriting: STAMP_OVERWRITE=1)")
    for p in (path, model):
        try:
            check_writable(p)
        except UserError:
            raise UserError(f"out={path.name!r} cannot be written in the server's results folder ({p.name} is no regular "
                            f"file, or the folder takes no file); allowed: another name (or ask the operator)") from None
    return path
