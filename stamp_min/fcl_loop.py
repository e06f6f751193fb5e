"""The federated continual loop, the rules it runs, the CLI and the results file.

    for task t = 0 .. T-1:                        (each client k trains on its own task t, METHOD §1.1)
        for round r = 0 .. R-1:
            every participating client k: Δ_k = client_update(θ, its task-t data)   (client.py: TAM)
            θ ← aggregate(θ, {Δ_k}, {n_k}), then the server optimiser               (server.py: SAM)
            log current-task accuracy, the conflict between updates, the step's size
        every client that trained task t: end_task (refresh its coreset / baseline state)
        A[t, j] = accuracy of θ on task j of every client, pooled, for j <= t      (metrics.py)

The rules are arguments. `run(cfg, client_update=…, end_task=…, new_state=…, aggregate=…,
new_server_state=…, match=…)` runs the loop with any of them replaced, for that run only; the defaults are the
library's own (client.py, server.py, gradmatch.match), which pick the client and server rule
named by `cfg` (config.py: `--method` presets, `--client`, `--server`). `match` is the GM operator
that the library's TAM and SAM call. A variant is a function, e.g. a server rule:

    def my_aggregate(theta, updates, weights, cfg, params=None, G=None):
        ...
        return new_theta, step
    run(Config(method="stamp", name="mine"), aggregate=my_aggregate)

Run it:  python -m stamp_min.fcl_loop --help
"""

from .cli import quiet_until_main

if __name__ == "__main__":
    quiet_until_main()          # a signal while torch loads is one line, not a traceback

import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402

import torch  # noqa: E402

from . import UserError, checkpoint, client, gradmatch, server  # noqa: E402
from .cli import check_replaces, check_writable, main, parse_config, run_info, write_json  # noqa: E402
from .client import float_state, load_state, memory_bytes, param_names  # noqa: E402
from .config import CHOICES, METHODS, NOTES, PRESETS, Config  # noqa: F401,E402  (public names of the loop)
from .coreset import task_key  # noqa: E402
from .data import load_dataset, resplit, to_device_if_small, validation_split  # noqa: E402
from .metrics import current_task_accuracy, summary, task_accuracy, tensor_bytes  # noqa: E402
from .models import build_model  # noqa: E402
from .scenarios import make_scenario  # noqa: E402
from .rules import DEFAULTS, bind, qualname, run_name  # noqa: E402
from .server import participants, server_step  # noqa: E402
from .untrusted import check_dataset  # noqa: E402

def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def ratio(entry):
    """||server step|| / ||plain mean of the updates|| of a round's log entry (NaN if the mean is 0)."""
    return entry["step_norm"] / entry["mean_norm"] if entry["mean_norm"] > 0 else float("nan")


def device_of(cfg):
    """The torch device of a run: cuda if asked for, or if available with device='auto'."""
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")


def build(cfg, dataset=None):
    """(dataset, scenario, model holding θ_0, on the CPU) of an experiment, from the settings and
    the seed alone: fcl_loop and every Flower app build the same. dataset: as in `run`."""
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size)
    if cfg.test_split == "per_seed":
        ds = resplit(ds, cfg.seed)    # a fresh test split for this seed (study.py: intervals cover test sampling)
    if cfg.validation:
        ds = validation_split(ds)     # tune on held-out training images; the test split is never seen
    scenario = make_scenario(ds, cfg.scenario, cfg.num_clients, cfg.num_tasks or None, cfg.classes_per_task,
                             cfg.alpha, cfg.share_samples, seed=cfg.seed)
    torch.manual_seed(cfg.seed)                                   # θ_0
    model = build_model(cfg.model, ds.num_classes, ds.in_channels, ds.image_size, ds.mean, ds.std)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return ds, scenario, model


def round_log(t, r, ids, infos, weights, G, p_updates, p_step, client_seconds, aggregate_seconds):
    """A round's entry in the results' "rounds" (current_task_acc and seconds are added after the
    evaluation). infos: the clients' `client_update` infos; G, p_updates, p_step: the Gram matrix,
    updates and server step over the trainable weights (norms too are over those)."""
    n = len(p_updates)
    return {"task": t, "round": r, "clients": ids, "loss": mean(i["loss"] for i in infos),
            "train_images": sum(weights), "client_seconds": client_seconds,
            "gm_client_seconds": sum(i.get("gm_seconds", 0.0) for i in infos), "aggregate_seconds": aggregate_seconds,
            "clone_client_seconds": sum(i.get("clone_seconds", 0.0) for i in infos),   # TAM's old-task clones
            # conflict: between client updates, and between each update and the server step
            "spatial_cos": gradmatch.mean_pairwise_cosine(G), "spatial_agreement": gradmatch.agreement(p_updates, p_step),
            # between a client's task updates, and between each and its matched update (TAM)
            "temporal_cos": mean(i["temporal_cos"] for i in infos if "temporal_cos" in i),
            "temporal_agreement": mean(i["temporal_agreement"] for i in infos if "temporal_agreement" in i),
            # sizes: ||server step||, ||plain mean (1/n) Σ_k Δ_k|| = sqrt(1ᵀG1)/n, every ||Δ_k|| = sqrt(G_kk)
            "step_norm": sum(float(v.double().square().sum()) for v in p_step.values()) ** 0.5,
            "mean_norm": float(G.sum().clamp_min(0).sqrt()) / n, "update_norms": G.diagonal().sqrt().tolist()}


def results(cfg, scenario, acc, round_acc, log, comm, buffer_bytes, wall_time_s, peak_gpu_memory_bytes=None, *,
            name=None, rules=None, server_state=None):
    """The results dict (what the CLI writes to JSON). name: the run's name (default `cfg.label`);
    rules: {keyword: qualified name} of the functions that ran (default: the library's); buffer_rule: how the
    library's client state picks its buffer (client.buffer_rule; a `new_state` of yours may choose otherwise);
    server_state: the ServerState at the end (recorded as server.summary: what it holds, not the tensors)."""
    return {"name": name or cfg.label, "rules": rules or {k: qualname(v) for k, v in DEFAULTS.items()},
            "config": asdict(cfg), "acc_matrix": acc.tolist(), **summary(acc),
            "current_task_accuracy": current_task_accuracy(round_acc), "comm_bytes": comm,
            "buffer_bytes": buffer_bytes, "buffer_rule": client.buffer_rule(cfg), "wall_time_s": wall_time_s,
            "peak_gpu_memory_bytes": peak_gpu_memory_bytes,
            "rounds": log, "scenario": [[list(task.classes) for task in row] for row in scenario.tasks],
            "server_state": None if server_state is None else server.summary(server_state), "versions": run_info()}


def run(cfg, dataset=None, *, client_update=client.client_update, end_task=client.end_task,
        new_state=client.new_state, aggregate=server.aggregate, new_server_state=server.new_server_state,
        match=gradmatch.match):
    """Run one experiment; returns the results as a dict (what the CLI writes to JSON).

    dataset: a `data.Dataset` already in memory (e.g. generated data), instead of `cfg.dataset`.
    The rules, each replaceable for this run (defaults: the library's; signatures: rules.py):
    client_update, end_task, new_state, aggregate, new_server_state (the server's memory: rules.py),
    and match, the GM operator that the library's client_update (TAM) and aggregate (SAM) call; a
    rule of yours that wants it calls it itself.
    Every rule is called with the model holding θ and must not change θ in place.
    Checked before anything is built: cfg is a valid Config, the dataset's arrays agree, the rules
    are functions, and the checkpoint folder (if any) is free for this run, which holds it."""
    if not isinstance(cfg, Config):
        raise UserError(f"cfg={type(cfg).__name__} is not a Config; allowed: run(Config(...)), Config from stamp_min.fcl_loop")
    cfg.validate()
    if dataset is not None:
        check_dataset(dataset)
    cfg = cfg.resolved()                                                  # the rule pair in force, spelled out
    fns, names, own = bind(client_update, end_task, new_state, aggregate, match, new_server_state, cfg=cfg)
    with checkpoint.claim(cfg):                                  # one writer per checkpoint folder, for the whole run
        return loop(cfg, dataset, fns, names, run_name(cfg, own))


def diverged(cfg, t, r, what, rule=None):
    """One line for training that diverged in task t round r (what: "client 0's local training
    diverged (NaN/inf)"), with what can be told of the cause. θ came checked (finite) and so did
    the data, so with η_s > 1 after a server step it is η_s; a client rule of the user's (rule: its
    name) is named; otherwise the line says what was checked."""
    where = f"{what} in task {t + 1} round {r + 1}"
    if rule is not None:
        return UserError(f"client_update={rule}: {where}, from a finite θ on checked data; allowed: a rule whose "
                         f"training stays finite (a smaller lr, a weaker loss term)")
    if cfg.server_rule == "gm" and cfg.eta_s > 1 and (t, r) != (0, 0):
        return UserError(f"eta_s={cfg.eta_s}: {where}, from θ after server steps scaled by eta_s > 1; allowed: eta_s <= 1, "
                         f"or a smaller lr")
    return UserError(f"lr={cfg.lr}: {where}, from a finite θ on checked data (finite statistics, labels in range); "
                     f"allowed: a smaller lr or a weaker regulariser")


def client_failure(e, cfg, t, r, k, rule=None):
    """What to raise for client k's UserError e in task t round r (here and on Flower): the library's
    own divergence line explained by `diverged`, any other error as it is."""
    return diverged(cfg, t, r, f"client {k}'s local training diverged (NaN/inf)", rule) if " diverged" in str(e) else e


def loop(cfg, dataset, fns, names, name):
    """The loop of `run`, with its settings, data and rules checked (fns: rules.bind's)."""
    client_update, end_task, new_state, aggregate = (fns[k] for k in ("client_update", "end_task", "new_state", "aggregate"))
    own_update = names["client_update"] != qualname(DEFAULTS["client_update"])
    say = (lambda *a: None) if cfg.quiet else print
    start = time.perf_counter()
    device = device_of(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)  # client sampling (each client has its own: ClientState.rng)
    ds, scenario, model = build(cfg, dataset)
    model = model.to(device)
    T, K, R = scenario.num_tasks, scenario.num_clients, cfg.rounds_per_task
    say(f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test images, {ds.num_classes} classes; "
        f"{cfg.scenario} scenario, {K} clients x {T} tasks (class ids, training images):")
    say(scenario.table())

    if device.type == "cuda":
        ds = to_device_if_small(ds, device)
        torch.cuda.reset_peak_memory_stats(device)
    # everything that changes from round to round, in one place, so that it can be checkpointed
    st = {"t": 0, "r": 0, "theta": float_state(model), "acc": torch.full((T, T), float("nan"), dtype=torch.float64),
          "round_acc": [[] for _ in range(T)], "log": [], "comm": 0, "elapsed": 0.0}
    clients = [new_state(k, cfg) for k in range(K)]
    sstate = fns["new_server_state"](cfg)                   # the server's memory (server.py), checkpointed with st
    if cfg.resume:
        st, clients = checkpoint.load(cfg.checkpoint_dir, asdict(cfg), gen, names, clients,
                                      fresh={**st, "server": server.state_dict(sstate)}, data=ds)
        server.restore(sstate, st.pop("server"), device)
        st["theta"] = {n: v.to(device) for n, v in st["theta"].items()}
        say(f"resumed from {cfg.checkpoint_dir} at task {st['t'] + 1} round {st['r'] + 1}")
    model_bytes = tensor_bytes(st["theta"])
    params = param_names(model)
    say(f"model {cfg.model}: {sum(v.numel() for v in st['theta'].values()):,} numbers ({model_bytes / 1e6:.2f} MB); "
        f"{name}: client rule {cfg.client_rule}, server rule {cfg.server_rule}; device {device}")

    while st["t"] < T:
        t, r, theta = st["t"], st["r"], st["theta"]
        t0 = time.perf_counter()
        ids = participants(K, cfg.participation, gen)
        updates, weights, infos = [], [], []
        for k in ids:
            task = scenario.tasks[k][t]
            x, y = ds.x_train[task.train_idx], ds.y_train[task.train_idx]
            load_state(model, theta)                        # every rule is called with the model holding θ
            clients[k].server = sstate.broadcast            # what the server sends with θ (a rule's, e.g. SCAFFOLD's c)
            try:
                delta, info = client_update(model, theta, clients[k], x, y, task.classes, cfg)
            except UserError as e:                          # the library's own divergence line: say more
                raise client_failure(e, cfg, t, r, k, names["client_update"] if own_update else None) from None
            if task_key(task.classes) not in clients[k].seen:   # the loop records it, whatever the rule does
                clients[k].seen.append(task_key(task.classes))
            updates.append(delta)
            weights.append(len(y))
            infos.append(info)
        t1 = time.perf_counter()
        p_updates = [{n: u[n] for n in params} for u in updates]
        G = gradmatch.gram(p_updates)                       # (K, K) over the weights: diagnostics, and SAM's G
        new = aggregate(theta, updates, weights, cfg, params=params, G=G, state=sstate, infos=infos)  # θ' (checked)
        new = server_step(theta, new, sstate, cfg, params)      # the server optimiser (sgd, lr 1: θ' itself)
        p_step = {n: new[n] - theta[n] for n in params}         # the step taken, measured
        theta = new
        t2 = time.perf_counter()
        st["theta"], st["comm"] = theta, st["comm"] + 2 * model_bytes * len(ids)   # θ down, Δ up, per participant
        load_state(model, theta)
        cur = task_accuracy(model, ds, scenario, t)
        st["round_acc"][t].append(cur)
        st["log"].append(round_log(t, r, ids, infos, weights, G, p_updates, p_step, t1 - t0, t2 - t1))
        st["log"][-1].update(current_task_acc=cur, seconds=time.perf_counter() - t0)
        say(f"task {t + 1}/{T} round {r + 1}/{R} | loss {st['log'][-1]['loss']:.3f} | current-task acc {cur:.3f} "
            f"| spatial cos {st['log'][-1]['spatial_cos']:+.2f} | step/mean {ratio(st['log'][-1]):.2f} | {st['log'][-1]['seconds']:.2f}s")
        st["r"] += 1
        if st["r"] == R:                                    # end of task t: clients that trained it
            for k in range(K):
                task = scenario.tasks[k][t]
                if task_key(task.classes) not in clients[k].seen:
                    continue                                # never drawn during task t (participation < 1)
                load_state(model, theta)
                end_task(model, theta, clients[k], ds.x_train[task.train_idx], ds.y_train[task.train_idx], task.classes, cfg)
            load_state(model, theta)                        # whatever a rule left in the model: evaluate θ
            for j in range(t + 1):
                st["acc"][t, j] = task_accuracy(model, ds, scenario, j)
            say(f"after task {t + 1}: accuracy on tasks 1..{t + 1} = " + " ".join(f"{a:.3f}" for a in st["acc"][t, :t + 1].tolist()))
            st["t"], st["r"] = t + 1, 0
        if cfg.checkpoint_dir:
            checkpoint.save(cfg.checkpoint_dir, asdict(cfg),
                            {**st, "server": server.state_dict(sstate), "elapsed": st["elapsed"] + time.perf_counter() - start},
                            clients, gen, names)

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return results(cfg, scenario, st["acc"], st["round_acc"], st["log"], st["comm"],
                   sum(memory_bytes(c) for c in clients), st["elapsed"] + time.perf_counter() - start, peak,
                   name=name, rules=names, server_state=sstate)


def report(res):
    """The accuracy matrix and the summary metrics as text (also of results read back from JSON, where
    the matrix's empty upper triangle, NaN, is null)."""
    A = res["acc_matrix"]
    lines = ["accuracy matrix A[t, j] (row: after task t, column: task j):"]
    lines += ["  " + " ".join("  .  " if a is None or a != a else f"{a:.3f}" for a in row) for row in A]
    lines.append(f"average accuracy {res['avg_accuracy']:.4f} | forgetting {res['avg_forgetting']:.4f} | "
                 f"BWT {res['bwt']:.4f} | comm {res['comm_bytes'] / 1e6:.1f} MB | buffers {res['buffer_bytes'] / 1e3:.1f} kB "
                 f"| wall {res['wall_time_s']:.1f}s")
    lines.append("current-task accuracy (best over each task's rounds; not a forgetting measure): "
                 + " ".join(f"{a:.3f}" for a in res["current_task_accuracy"]))
    return "\n".join(lines)


def cli(argv=None):
    cfg = parse_config(Config, argv, notes=NOTES, prog="python -m stamp_min.fcl_loop")
    cfg.validate()
    out = cfg.out_path
    png = out.with_name(out.stem + "_acc.png")
    check_writable(out)                                 # every path up front, not after training
    if not cfg.overwrite:                               # another run's results are never replaced silently
        check_replaces(out, asdict(cfg.resolved()), {k: qualname(v) for k, v in DEFAULTS.items()}, checkpoint.FREE)
    if cfg.plot:
        check_writable(png, "out (its _acc.png picture)")
    res = run(cfg)
    print(report(res))
    write_json(out, res)
    print(f"wrote {out}")
    if cfg.plot:
        from . import plots
        plots.save(plots.accuracy_matrix(res["acc_matrix"], title=f"{res['name']} on {cfg.dataset}"), png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main(cli)
