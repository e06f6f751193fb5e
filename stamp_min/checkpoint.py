"""Checkpoints: everything a run needs to continue after a kill, saved after every round.

A checkpoint is one file, `<checkpoint_dir>/checkpoint.pt`, holding plain tensors, numbers,
strings, lists, tuples and dicts only:

    format      "stamp_min-checkpoint-v3"
    config      the run's Config as a dict (a resume must use the same experiment settings)
    rules       the qualified names of the run's five rules (a resume must run the same functions)
    progress    task t and round r to run next, the global model θ, the accuracy matrix, the
                per-round log, bytes communicated, seconds spent so far
    clients     every ClientState (client.state_dict): seen class sets, coreset/replay buffer,
                baseline state, the client's random stream
    rng         the torch global (and CUDA) RNG states and the loop's generator (client sampling)

Local optimisers are created afresh for every local training (plain SGD, their momentum starts
at zero each round), so no optimiser state persists between rounds and none is saved.

Written atomically (cli.atomic_write: a temporary file in the same folder, fsync, rename, with
SIGINT/SIGTERM held back until the rename): a kill at any instant leaves either the previous
checkpoint or the new one, never half a file nor a stray temp file; a full disk leaves the previous one. Loading
uses `torch.load(..., weights_only=True)`: no pickled code is ever executed.
"""

from pathlib import Path

import torch

from . import UserError
from .cli import atomic_write
from .client import restore, state_dict

FORMAT = "stamp_min-checkpoint-v3"   # v2: every client has its own random stream; v3: the rules' names
FILE = "checkpoint.pt"
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


def same_shape(saved, fresh):
    """Does the saved progress have the structure of a fresh one (keys, θ's names, shapes and dtypes,
    the accuracy matrix's shape, task and round in range)? A crafted file with the right format
    string fails here, not somewhere inside the loop."""
    theta, acc = saved.get("theta"), saved.get("acc")
    T = fresh["acc"].shape[0]
    return (set(saved) == set(fresh) and isinstance(theta, dict) and set(theta) == set(fresh["theta"])
            and all(torch.is_tensor(theta[n]) and theta[n].shape == v.shape and theta[n].dtype == v.dtype
                    for n, v in fresh["theta"].items())
            and torch.is_tensor(acc) and acc.shape == fresh["acc"].shape and isinstance(saved["log"], list)
            and type(saved["t"]) is int and type(saved["r"]) is int and 0 <= saved["t"] <= T and saved["r"] >= 0
            and isinstance(saved["round_acc"], list) and len(saved["round_acc"]) == T)


def load(folder, config, generator, rules, clients, fresh):
    """(progress, clients) from `folder`, after checking it is ours and made with `config` and the
    functions named in `rules` ({keyword: qualified name}). clients: fresh ClientStates made by
    the run's own `new_state` (so a variant's buffer object survives), filled in place. fresh: the
    progress of a run at its start (what the saved progress must look like).

    Restores the torch global RNG and `generator` in place. Any problem is a UserError."""
    path = Path(folder) / FILE
    if not path.is_file():
        raise UserError(f"checkpoint_dir={str(folder)!r} holds no {FILE}; allowed: the folder of an earlier run's checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle that would need code to load
        raise UserError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}); allowed: a file written "
                        f"by stamp_min --checkpoint-dir") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {str(path)!r} is not a stamp_min checkpoint; allowed: a {FORMAT} file "
                        f"written by --checkpoint-dir")
    damaged = UserError(f"checkpoint {str(path)!r} is damaged (its contents do not have a checkpoint's structure); "
                        f"allowed: a file written by stamp_min --checkpoint-dir, or --overwrite true to start afresh")
    if not (isinstance(state.get("config"), dict) and isinstance(state.get("rules"), dict)
            and isinstance(state.get("progress"), dict) and isinstance(state.get("clients"), list)
            and isinstance(state.get("rng"), dict) and same_shape(state["progress"], fresh)):
        raise damaged
    for name, value in config.items():
        if name not in FREE and state["config"].get(name) != value:
            raise UserError(f"{name}={value!r} differs from the checkpoint's {state['config'].get(name)!r}; "
                            f"allowed: resume with the settings of the run that saved it")
    for key, name in rules.items():
        if state["rules"].get(key) != name:
            raise UserError(f"{key}={name} differs from the checkpoint's {state['rules'].get(key)}; allowed: resume "
                            f"with the functions of the run that saved it")
    try:
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        generator.set_state(state["rng"]["generator"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise damaged from None
    try:
        if len(state["clients"]) != len(clients):
            raise ValueError(f"{len(state['clients'])} clients saved, {len(clients)} in the run")
        clients = [restore(c, d) for c, d in zip(clients, state["clients"])]
    except Exception as e:
        raise UserError(f"checkpoint {str(path)!r} holds client states that cannot be restored ({type(e).__name__}: "
                        f"{e}); allowed: a file written by stamp_min --checkpoint-dir") from None
    return state["progress"], clients
