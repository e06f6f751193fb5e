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

Written atomically: torch.save to a temporary file in the same folder, fsync, rename. A kill at
any instant leaves either the previous checkpoint or the new one, never half a file. Loading
uses `torch.load(..., weights_only=True)`: no pickled code is ever executed.
"""

import os
import tempfile
from pathlib import Path

import torch

from . import UserError
from .client import restore, state_dict

FORMAT = "stamp_min-checkpoint-v3"   # v2: every client has its own random stream; v3: the rules' names
FILE = "checkpoint.pt"
# fields that may differ between the run that saved and the run that resumes
# (method: the checkpoint's config has the rule pair in force spelled out in client and server;
# tam_clones, like device, changes how, not what, is computed, and older checkpoints lack it)
FREE = ("out", "quiet", "plot", "resume", "checkpoint_dir", "device", "name", "method", "tam_clones")


def save(folder, config, progress, clients, generator, rules):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "config": config, "rules": rules, "progress": progress,
             "clients": [state_dict(c) for c in clients],
             "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(folder, config, generator, rules, clients):
    """(progress, clients) from `folder`, after checking it is ours and made with `config` and the
    functions named in `rules` ({keyword: qualified name}). clients: fresh ClientStates made by
    the run's own `new_state` (so a variant's buffer object survives), filled in place.

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
    for name, value in config.items():
        if name not in FREE and state["config"].get(name) != value:
            raise UserError(f"{name}={value!r} differs from the checkpoint's {state['config'].get(name)!r}; "
                            f"allowed: resume with the settings of the run that saved it")
    for key, name in rules.items():
        if state["rules"].get(key) != name:
            raise UserError(f"{key}={name} differs from the checkpoint's {state['rules'].get(key)}; allowed: resume "
                            f"with the functions of the run that saved it")
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"].get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    generator.set_state(state["rng"]["generator"])
    try:
        if len(state["clients"]) != len(clients):
            raise ValueError(f"{len(state['clients'])} clients saved, {len(clients)} in the run")
        clients = [restore(c, d) for c, d in zip(clients, state["clients"])]
    except Exception as e:
        raise UserError(f"checkpoint {str(path)!r} holds client states that cannot be restored ({type(e).__name__}: "
                        f"{e}); allowed: a file written by stamp_min --checkpoint-dir") from None
    return state["progress"], clients
