"""What every field of a checkpoint must hold, checked against a fresh run of the same settings.

A checkpoint (checkpoint.py) comes from a file anyone could have written. Before any of it is
used, each field is checked here against what the resuming run itself holds at its start:

    progress    fcl_loop.run's `st`, field by field (PROGRESS): task t and round r within the run,
                θ with the model's names, shapes and dtypes and finite values, the accuracy matrix
                float64 with exactly the finished tasks measured, one log entry and one accuracy
                per round done, counters that are non-negative numbers
    clients     every client.state_dict: its own id, class ids in range, a buffer of the dataset's
                images and labels, baseline state that is plain finite data (θ-named dicts shaped
                like θ), its random stream's state

A new field of the progress (e.g. a server optimiser's state) is checked without a change here if
it keeps its fresh structure ({name: tensor} like θ, or plain data of one kind); if it grows or has
a range, it gets one entry in PROGRESS.
"""

import json
import math

import torch

from .untrusted import Bad, number, plain, tensors_like


def max_nodes(fresh, clients, R, cpt):
    """The most containers and values a checkpoint of this run can hold, with room to spare: per
    round a log entry (its numbers and one per client), per client and task its class lists (cpt
    classes each) and buffer or replay entries, per client up to three θ-like dicts. A pickle that
    shares one list a million times is refused here."""
    T, K, n = len(fresh["acc"]), len(clients), len(fresh["theta"])
    return 4 * (T * R * (40 + 2 * K) + K * (T * (3 * cpt + 15) + 3 * n + 20) + n) + 10_000


def max_bytes(fresh, clients, data_bytes):
    """The most a checkpoint of this run can hold, with room to spare: θ and per client up to three
    copies of it (EWC's Fisher and anchor, LwF's old model), per client a coreset and old-task
    data up to the training set, the log and the random states."""
    theta = sum(v.numel() * v.element_size() for v in fresh["theta"].values())
    return 2 * (theta * (5 + 3 * len(clients)) + 2 * data_bytes * len(clients)) + 64 * 2**20   # 3 more θ: the server


def check_acc(v, f, p, R):
    T = len(f["acc"])
    if not (torch.is_tensor(v) and v.dtype == torch.float64 and tuple(v.shape) == (T, T)):
        got = f"{str(v.dtype)[6:]} {tuple(v.shape)}" if torch.is_tensor(v) else type(v).__name__
        raise Bad(f"acc is {got}; allowed: a float64 ({T}, {T}) accuracy matrix")
    done = torch.tril(torch.ones(T, T, dtype=torch.bool)) & (torch.arange(T) < p["t"])[:, None]   # A[i, j], j <= i < t
    if not bool((v[done] >= 0).all() & (v[done] <= 1).all()) or not bool(v[~done].isnan().all()):
        raise Bad(f"acc is not an accuracy matrix of {p['t']} finished tasks; allowed: values in [0, 1] where measured, "
                  f"NaN elsewhere")


def check_round_acc(v, f, p, R):
    T = len(f["acc"])
    want = [R if j < p["t"] else p["r"] if j == p["t"] else 0 for j in range(T)]
    if not (isinstance(v, list) and [len(a) if isinstance(a, list) else None for a in v] == want):
        raise Bad(f"round_acc does not hold one accuracy per round done; allowed: {want} entries per task")
    for j, a in enumerate(v):
        for x in a:
            number(x, f"round_acc[{j}]", 0, 1)


def check_log(v, f, p, R):
    if not (isinstance(v, list) and len(v) == p["t"] * R + p["r"] and all(isinstance(e, dict) for e in v)):
        raise Bad(f"log does not hold one entry per round done; allowed: {p['t'] * R + p['r']} dicts")
    for i, e in enumerate(v):
        if e.get("task") != i // R or e.get("round") != i % R:
            raise Bad(f"log[{i}] is not the entry of task {i // R} round {i % R}; allowed: the rounds in order")
        try:
            json.dumps(e)                      # the log goes into the results file as it is
        except (TypeError, ValueError):
            raise Bad(f"log[{i}] holds something a results file cannot (e.g. a tensor); allowed: numbers, strings, "
                      f"lists") from None


def check_server(v, f, p, R):
    """The server's state (server.state_dict): the optimiser's moments named, shaped and typed like θ's
    entries, a broadcast of finite tensors and a rule's own plain data, both with names, the steps taken."""
    if not (isinstance(v, dict) and set(v) == set(f["server"])):
        raise Bad(f"server is not a server state; allowed: the fields {sorted(f['server'])}")
    number(v["rounds"], "server.rounds", 0, p["t"] * R + p["r"], int)
    if not (isinstance(v["opt"], dict) and set(v["opt"]) <= {"m", "v"}):
        raise Bad("server.opt is not an optimiser's moments; allowed: m and v")
    for k, m in v["opt"].items():
        if not (isinstance(m, dict) and set(m) <= set(f["theta"])):
            raise Bad(f"server.opt[{k!r}] is not named like θ; allowed: a dict of θ's entries")
        tensors_like(m, {n: f["theta"][n] for n in m}, f"server.opt[{k!r}]")
    for what in ("extra", "broadcast"):
        if not (isinstance(v[what], dict) and all(isinstance(n, str) for n in v[what])):
            raise Bad(f"server.{what} is not a dict with names; allowed: what a server rule keeps")
        plain(v[what], f"server.{what}")
    if not all(torch.is_tensor(x) and x.is_floating_point() for x in v["broadcast"].values()):
        raise Bad("server.broadcast holds other things than float tensors; allowed: {name: tensor}")


# How each field of a run's progress (fcl_loop.run: `st`) is checked: fn(value, fresh progress,
# saved progress (fields above already checked), rounds per task R). A field not listed must have
# exactly its fresh value's structure (tensors_like for {name: tensor}, else the same kind of plain
# data): a new field needs an entry here only if it grows or has a range.
PROGRESS = {
    "t": lambda v, f, p, R: number(v, "t", 0, len(f["acc"]), int),
    "r": lambda v, f, p, R: number(v, "r", 0, R - 1 if p["t"] < len(f["acc"]) else 0, int),
    "theta": lambda v, f, p, R: tensors_like(v, f["theta"], "θ"),
    "acc": check_acc,
    "round_acc": check_round_acc,
    "log": check_log,
    "comm": lambda v, f, p, R: number(v, "comm", 0, math.inf, int),
    "server": check_server,
    "elapsed": lambda v, f, p, R: number(v, "elapsed", 0, math.inf),
}


def like_fresh(v, f, name):
    if isinstance(f, dict) and f and all(torch.is_tensor(x) for x in f.values()):
        return tensors_like(v, f, name)
    if type(v) is not type(f) or (isinstance(f, dict) and set(v) != set(f)):
        raise Bad(f"{name} is a {type(v).__name__}; allowed: what a fresh run holds ({type(f).__name__})")
    return plain(v, name)


def check_progress(saved, fresh, R):
    if not isinstance(saved, dict) or set(saved) != set(fresh):
        raise Bad(f"progress has fields {sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__}; "
                  f"allowed: {sorted(fresh)}")
    for name in fresh:
        PROGRESS.get(name, lambda v, f, p, R: like_fresh(v, f[name], name))(saved[name], fresh, saved, R)


def check_client(d, fresh, k, theta, num_classes, image_shape):
    """Client k's saved state (client.state_dict) against a fresh one: the kinds of every field,
    classes in range, buffer images of the dataset's shape, finite baseline state (dicts named
    like θ shaped like θ)."""
    who = f"clients[{k}]"
    if not isinstance(d, dict) or set(d) != set(fresh):
        raise Bad(f"{who} is not a client state; allowed: the fields {sorted(fresh)}")
    if d["client_id"] != k or type(d["client_id"]) is not int:
        raise Bad(f"{who} belongs to client {d['client_id']!r:.20}; allowed: client {k}")
    def classes(v, what):                                   # a task's class ids
        if not isinstance(v, list):
            raise Bad(f"{what} is a {type(v).__name__}; allowed: a list of class ids")
        for c in v:
            number(c, what, 0, num_classes - 1, int)
    if not isinstance(d["seen"], list):
        raise Bad(f"{who}.seen is a {type(d['seen']).__name__}; allowed: a list of class lists")
    for s in d["seen"]:
        classes(s, f"{who}.seen class")
    tensors_like({"rng": d["rng"]}, {"rng": fresh["rng"]}, who)
    if (d["buffer"] is None) != (fresh["buffer"] is None):
        raise Bad(f"{who}.buffer is {'missing' if d['buffer'] is None else 'there'}; allowed: as in a fresh run")
    if d["buffer"] is not None:
        b = d["buffer"]
        if not (isinstance(b, dict) and set(b) == set(fresh["buffer"]) and type(b["rule"]) is str
                and all(isinstance(b[n], list) and len(b[n]) == len(b["keys"]) for n in ("keys", "x", "y"))):
            raise Bad(f"{who}.buffer is not a buffer; allowed: keys, x, y lists of one length, m_per_class, rule, seed")
        number(b["m_per_class"], f"{who}.buffer.m_per_class", 1, 10**6, int)
        number(b["seed"], f"{who}.buffer.seed", -2**63, 2**63 - 1, int)
        for key, x, y in zip(b["keys"], b["x"], b["y"]):
            classes(key, f"{who}.buffer class")
            if not (torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == torch.uint8 and y.dtype == torch.int64
                    and x.dim() == 4 and tuple(x.shape[1:]) == (image_shape or tuple(x.shape[1:])) and y.shape == (len(x),)
                    and (len(y) == 0 or (int(y.min()) >= 0 and int(y.max()) < num_classes))):
                raise Bad(f"{who}.buffer holds images or labels unlike the dataset's; allowed: uint8 (n, "
                          f"{', '.join(map(str, image_shape))}) images, int64 labels in 0..{num_classes - 1}")
    if not isinstance(d["extra"], dict) or not all(isinstance(n, str) for n in d["extra"]):
        raise Bad(f"{who}.extra is not a dict with names; allowed: the baseline state of a run")
    plain(d["extra"], f"{who}.extra")
    for n, v in d["extra"].items():                         # EWC's Fisher and anchor, LwF's old model: like θ
        if isinstance(v, dict) and v and all(isinstance(m, str) and m in theta for m in v):
            tensors_like(v, {m: theta[m] for m in v}, f"{who}.extra[{n!r}]")
