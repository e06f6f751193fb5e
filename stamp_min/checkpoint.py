"""Checkpoints: everything a run needs to continue after a kill, saved after every round.

A checkpoint is one file, `<checkpoint_dir>/checkpoint.pt`, holding plain tensors, numbers,
strings, lists, tuples and dicts only:

    format      "stamp_min-checkpoint-v4"
    config      the run's Config as a dict (a resume must use the same experiment settings)
    rules       the qualified names of the run's six rules (a resume must run the same functions)
    progress    task t and round r to run next, the global model θ, the accuracy matrix, the
                per-round log, bytes communicated, seconds spent so far, and the server's state
                (server.state_dict: the server optimiser's moments, a server rule's own memory)
    clients     every ClientState (client.state_dict): seen class sets, coreset/replay buffer,
                baseline state, the client's random stream
    rng         the torch global (and CUDA) RNG states and the loop's generator (client sampling)

Local optimisers are created afresh for every local training (plain SGD, their momentum starts
at zero each round), so no client optimiser state persists between rounds and none is saved; the
server optimiser's moments are part of the server's state.

One writer per folder: `claim(cfg)`, held for the whole run, takes an exclusive lock on the folder
(flock; a second run on it is refused), removes the temp files of a write that a SIGKILL cut
short, and checks up front that the folder takes files and that a fresh run replaces no
checkpoint. Written atomically (cli.atomic_write: a temporary file in the same folder, fsync,
rename, with SIGINT/SIGTERM held back until the rename): a kill leaves either the previous
checkpoint or the new one; a full disk leaves the previous one.

Loading trusts nothing in the file: its size and every entry's size are bounded by what this run
can write before anything is unpacked (a compressed entry is refused), `torch.load(...,
weights_only=True)` runs no pickled code, and every field is checked against what a fresh run of
the same settings holds (checkpoint_fields.py) before any of it is used.
"""

import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from . import UserError
from .cli import atomic_write, check_writable
from .client import restore, state_dict
from .checkpoint_fields import check_client, check_progress, max_bytes, max_nodes
from .untrusted import Bad, plain, tensors_like

FORMAT = "stamp_min-checkpoint-v4"   # v2: every client has its own random stream; v3: the rules' names; v4: server state
FILE = "checkpoint.pt"
TEMPS = (f".{FILE}.*.tmp", ".probe-*")      # what atomic_write / check_writable leave if killed mid-write
# fields that may differ between the run that saved and the run that resumes
# (method: the checkpoint's config has the rule pair in force spelled out in client and server;
# tam_clones, like device, changes how, not what, is computed, and older checkpoints lack it)
FREE = ("out", "quiet", "plot", "resume", "overwrite", "checkpoint_dir", "device", "name", "method", "tam_clones")


def save(folder, config, progress, clients, generator, rules):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "config": config, "rules": rules, "progress": progress,
             "clients": [state_dict(c) for c in clients],
             "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    atomic_write(folder / FILE, lambda f: torch.save(state, f))


# ---------------------------------------------------------------------------------------------
# one writer per folder


@contextmanager
def claim(cfg):
    """Up front, before any training, and held while the block runs: cfg.checkpoint_dir is a
    folder (made if missing) no other run holds, with no temp file of an interrupted write left,
    that takes files; a run that does not resume replaces no checkpoint unless cfg.overwrite; a
    resume finds one. Does nothing without checkpoint_dir."""
    if not cfg.checkpoint_dir:
        yield
        return
    folder, field = Path(cfg.checkpoint_dir), f"checkpoint_dir={cfg.checkpoint_dir!r}"
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"{field} is a link to nothing (a dangling symlink); allowed: a folder, or a path where one "
                        f"can be made")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{field} is a file; allowed: a folder (made if missing)")
    if cfg.resume and not folder.is_dir():
        raise UserError(f"{field} holds no {FILE}; allowed: the folder of an earlier run's checkpoint")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{field} cannot be made ({e.strerror}); allowed: a folder path in a writable place") from None
    fd = lock(folder, field)
    try:
        stale = [p for pattern in TEMPS for p in folder.glob(pattern) if p.is_file()]
        for p in stale:                        # only a killed writer leaves these, and no writer is alive now
            p.unlink(missing_ok=True)
        if cfg.resume and not (folder / FILE).is_file():
            note = " (an interrupted first write was removed)" if stale else ""
            raise UserError(f"{field} holds no {FILE}{note}; allowed: the folder of an earlier run's checkpoint")
        if not cfg.resume and (folder / FILE).exists() and not cfg.overwrite:
            raise UserError(f"{field} already holds a checkpoint; allowed: --resume true to continue it, --overwrite "
                            f"true to start afresh over it, or another folder")
        check_writable(folder / FILE, "checkpoint_dir")
        yield
    finally:
        if fd is not None:
            os.close(fd)                       # releases the lock


def lock(folder, field):
    """An exclusive, non-blocking flock on the folder itself (no lock file is left behind); the
    open descriptor, or None where flock does not exist (there one writer is the user's duty)."""
    try:
        import fcntl
    except ImportError:                        # pragma: no cover (Windows)
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"{field} cannot be opened ({e.strerror}); allowed: a folder this user can read") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"{field} is in use by another run (it holds the folder's lock); allowed: wait until that "
                        f"run ends, or another folder") from None
    return fd


# ---------------------------------------------------------------------------------------------
# loading: bounded, then checked whole


def read(path, limit):
    """The file's contents, after checking (without unpacking) that it is a plain torch archive
    no larger than `limit`. Any problem: UserError."""
    size = path.stat().st_size
    cant = f"checkpoint {str(path)!r} cannot be read"
    if size > limit:
        raise UserError(f"{cant}: it is {size / 2**20:.0f} MiB, more than a checkpoint of this run can be "
                        f"({limit / 2**20:.0f} MiB); allowed: a file written by stamp_min --checkpoint-dir")
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
        if any(e.compress_type != zipfile.ZIP_STORED for e in entries) or sum(e.file_size for e in entries) > limit:
            raise ValueError("compressed or oversized entries")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, a bomb, or a pickle that would need code to load
        raise UserError(f"{cant} ({type(e).__name__}); allowed: a file written by stamp_min --checkpoint-dir") from None


def load(folder, config, generator, rules, clients, fresh, data=None):
    """(progress, clients) from `folder`, after checking it is ours, made with `config` and the
    functions named in `rules` ({keyword: qualified name}), and whole. clients: fresh ClientStates
    made by the run's own `new_state` (so a variant's buffer object survives), filled in place.
    fresh: the progress of a run at its start (what the saved progress must look like). data:
    the run's dataset (bounds the file's size and the buffers' shapes).

    Restores the torch global RNG and `generator` in place. Any problem is a UserError."""
    path = Path(folder) / FILE
    if not path.is_file():
        raise UserError(f"checkpoint_dir={str(folder)!r} holds no {FILE}; allowed: the folder of an earlier run's checkpoint")
    data_bytes = 0 if data is None else data.x_train.nbytes + data.y_train.nbytes
    limit = max_bytes(fresh, clients, data_bytes)
    state = read(path, limit)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {str(path)!r} is not a stamp_min checkpoint; allowed: a {FORMAT} file "
                        f"written by --checkpoint-dir")
    damaged = lambda e: UserError(f"checkpoint {str(path)!r} is damaged: {e} (what stamp_min --checkpoint-dir "  # noqa: E731
                                  f"writes; --overwrite true starts afresh)")
    try:
        budget = {"nodes": max_nodes(fresh, clients, config["rounds_per_task"], config["classes_per_task"]), "bytes": limit}
        plain(state, "the checkpoint", budget, finite=False)
        if set(state) != {"format", "config", "rules", "progress", "clients", "rng"}:
            raise Bad(f"it has the fields {sorted(map(str, state))}")
        if not (isinstance(state["config"], dict) and all(type(v) in (int, float, str, bool) for v in state["config"].values())
                and isinstance(state["rules"], dict) and all(type(v) is str for v in state["rules"].values())):
            raise Bad("its config or rules are not plain settings")
        lacks = sorted(n for n in config if n not in FREE and n not in state["config"])
        if lacks:
            raise Bad(f"its config lacks the settings {lacks[:4]}{' …' if len(lacks) > 4 else ''} (another version of "
                      f"stamp_min?)")
    except Bad as e:
        raise damaged(e) from None
    for name, value in config.items():
        if name not in FREE and state["config"].get(name) != value:
            raise UserError(f"{name}={value!r} differs from the checkpoint's {state['config'].get(name)!r}; "
                            f"allowed: resume with the settings of the run that saved it")
    for key, name in rules.items():
        if state["rules"].get(key) != name:
            raise UserError(f"{key}={name} differs from the checkpoint's {state['rules'].get(key)}; allowed: resume "
                            f"with the functions of the run that saved it")
    try:
        check_progress(state["progress"], fresh, config["rounds_per_task"])
        if not (isinstance(state["clients"], list) and len(state["clients"]) == len(clients)):
            raise Bad(f"it does not hold {len(clients)} client states")
        shape = tuple(data.x_train.shape[1:]) if data is not None else None
        C = data.num_classes if data is not None else 2**31
        for k, (d, c) in enumerate(zip(state["clients"], clients)):
            check_client(d, state_dict(c), k, fresh["theta"], C, shape)
        rng = state["rng"]
        if not (isinstance(rng, dict) and set(rng) == {"torch", "generator", "cuda"} and isinstance(rng["cuda"], list)):
            raise Bad("its random states are not torch's")
        tensors_like({"torch": rng["torch"], "generator": rng["generator"]},
                     {"torch": torch.get_rng_state(), "generator": generator.get_state()}, "rng")
    except Bad as e:
        raise damaged(e) from None
    try:
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        generator.set_state(state["rng"]["generator"])
        clients = [restore(c, d) for c, d in zip(clients, state["clients"])]
    except Exception as e:
        raise UserError(f"checkpoint {str(path)!r} holds states that cannot be restored ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); allowed: a file written by stamp_min --checkpoint-dir") from None
    return state["progress"], clients
