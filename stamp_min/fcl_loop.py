"""The federated continual loop, its `Config`, the CLI and the results file.

    for task t = 0 .. T-1:                        (each client k trains on its own task t, METHOD §1.1)
        for round r = 0 .. R-1:
            every participating client k: Δ_k = client_update(θ, its task-t data)   (client.py: TAM)
            θ ← aggregate(θ, {Δ_k}, {n_k})                                          (server.py: SAM)
            log current-task accuracy and the conflict between updates
        every client: end_task (refresh its coreset / baseline state)             (client.py)
        A[t, j] = accuracy of θ on task j of every client, pooled, for j <= t      (metrics.py)

Methods: fedavg fedprox ewc lwf replay agem (baselines.py, FedAvg server); stamp = TAM + SAM;
stamp_tam = TAM with a FedAvg server; stamp_sam = plain clients with the SAM server.

Run it:  python -m stamp_min.fcl_loop --help
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import UserError, checkpoint, gradmatch
from .cli import check_writable, main, parse_config, run_info, write_json
from .client import client_update, end_task, float_state, load_state, memory_bytes, new_state, param_names
from .coreset import SELECTORS, task_key
from .data import SCENARIOS, load_dataset, make_scenario, to_device_if_small, validation_split
from .metrics import current_task_accuracy, summary, task_accuracy, tensor_bytes
from .models import MODELS, build_model
from .server import aggregate, participants

METHODS = ("fedavg", "fedprox", "ewc", "lwf", "replay", "agem", "stamp", "stamp_tam", "stamp_sam")
CHOICES = {"scenario": SCENARIOS, "model": MODELS, "method": METHODS, "coreset_rule": tuple(SELECTORS), "gm_solver": gradmatch.SOLVERS,
           "clone_start": ("global", "current"), "replay": ("coreset", "full"), "amp": ("off", "bf16")}


@dataclass
class Config:
    """Heterogeneous federated continual learning on one machine (STAMP and baselines)."""
    dataset: str = "digits"
    """digits (offline, bundled with scikit-learn) | cifar10 | cifar100 | imagefolder"""
    data_root: str = "data"
    """folder of the dataset files (for imagefolder: the folder of class folders, or of train/ and val/)"""
    download: bool = False
    """download cifar10/cifar100 into data_root if missing (needs internet)"""
    image_size: int = 32
    """images are resized to this size (imagefolder only)"""
    scenario: str = "permutation"
    """permutation: each client its own random class order (heterogeneous) | dirichlet: shared order, label skew"""
    num_clients: int = 5
    """number of clients K"""
    num_tasks: int = 0
    """number of tasks T per client; 0 = as many as the classes allow (num_classes // classes_per_task)"""
    classes_per_task: int = 2
    """classes in each task (cpt); 2 = highly heterogeneous"""
    alpha: float = 0.5
    """Dirichlet concentration of the label split (scenario=dirichlet); smaller = more skewed"""
    share_samples: bool = False
    """give every client holding a class all its images (the authors' code) instead of a disjoint share"""
    model: str = "cnn"
    """backbone: cnn (2 conv layers) | resnet18 | swin_t"""
    method: str = "fedavg"
    """federated continual method"""
    rounds_per_task: int = 5
    """communication rounds R per task"""
    local_epochs: int = 2
    """local epochs per round on the current task"""
    batch_size: int = 16
    """local mini-batch size"""
    lr: float = 0.1
    """local SGD learning rate"""
    momentum: float = 0.0
    """local SGD momentum"""
    participation: float = 1.0
    """fraction of clients taking part in each round (at least one), drawn with the seed"""
    buffer_per_class: int = 10
    """coreset / replay buffer: images kept per class (stamp, stamp_tam, replay, agem)"""
    coreset_rule: str = "prototypical"
    """how STAMP's coreset picks images: prototypical (herding) | random | nearest"""
    mixstyle: bool = True
    """MixStyle on while replaying the coreset in TAM"""
    gm_c: float = 0.25
    """GM searching radius c (0 = plain mean)"""
    gm_solver: str = "exact"
    """GM simplex solver: exact | sgd (the authors') | adam"""
    gm_normalize: bool = False
    """rescale every update to the mean norm before GM"""
    eta_t: float = 1.0
    """client step η_t on the matched task update (the authors' code: 2)"""
    eta_s: float = 1.0
    """server step η_s on the matched client update"""
    clone_start: str = "global"
    """old-task updates in TAM start from the received model (global) or after current-task training (current, the authors' code)"""
    replay: str = "coreset"
    """TAM replays the coreset, or all old-task data (full, the authors' code)"""
    protonet_weight: float = 0.0
    """weight of the optional ProtoNet loss in local training (0 = off)"""
    mu: float = 0.01
    """FedProx proximal weight μ"""
    ewc_lambda: float = 10.0
    """EWC penalty weight λ"""
    lwf_alpha: float = 1.0
    """LwF distillation weight"""
    lwf_temperature: float = 2.0
    """LwF distillation temperature"""
    validation: bool = False
    """evaluate on a validation split held out of the training images instead of the test split (for tuning)"""
    checkpoint_dir: str = ""
    """save everything needed to continue into this folder after every round (empty = no checkpoints)"""
    resume: bool = False
    """continue the run saved in checkpoint_dir (same settings required)"""
    amp: str = "off"
    """mixed precision for local training: off | bf16 (autocast; meant for GPUs)"""
    channels_last: bool = False
    """channels-last memory format for convolutional models (GPU speed-up)"""
    seed: int = 0
    """seed of the scenario, the initial model, the batches and the client sampling"""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda"""
    out: str = ""
    """results JSON path; empty = results/<dataset>_<method>_seed<seed>.json; the PNG goes beside it"""
    plot: bool = True
    """write the accuracy-matrix PNG next to the JSON"""
    quiet: bool = False
    """print only the final summary"""

    def validate(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name}={getattr(self, name)!r} is unknown; allowed: {', '.join(allowed)}")
        for name in ("num_clients", "classes_per_task", "rounds_per_task", "local_epochs", "batch_size",
                     "buffer_per_class"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be positive; allowed: >= 1")
        if self.num_tasks < 0:
            raise UserError(f"num_tasks={self.num_tasks} must be >= 0; allowed: 0 (as many as the classes allow) or more")
        for name in ("lr", "eta_t", "eta_s"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name}={getattr(self, name)} must be positive; allowed: > 0")
        if not self.lwf_temperature > 0:
            raise UserError(f"lwf_temperature={self.lwf_temperature} must be positive; allowed: > 0")
        for name in ("gm_c", "mu", "ewc_lambda", "lwf_alpha", "protonet_weight", "momentum"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name}={getattr(self, name)} must be non-negative; allowed: >= 0")
        if not 0 < self.participation <= 1:
            raise UserError(f"participation={self.participation}; allowed: 0 < participation <= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device={self.device!r} is unknown; allowed: auto, cpu, cuda")
        if self.resume and not self.checkpoint_dir:
            raise UserError("resume=True needs checkpoint_dir; allowed: --checkpoint-dir DIR --resume true")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("device='cuda' but CUDA is not available here; allowed: auto, cpu")

    @property
    def out_path(self):
        return Path(self.out or f"results/{self.dataset}_{self.method}_seed{self.seed}.json")


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def device_of(cfg):
    """The torch device of a run: cuda if asked for, or if available with device='auto'."""
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")


def build(cfg, dataset=None):
    """(dataset, scenario, model holding θ_0, on the CPU) of an experiment, from the settings and
    the seed alone: fcl_loop and every Flower app build the same. dataset: as in `run`."""
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size)
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
    updates and server step over the trainable weights."""
    return {"task": t, "round": r, "clients": ids, "loss": mean(i["loss"] for i in infos),
            "train_images": sum(weights), "client_seconds": client_seconds,
            "gm_client_seconds": sum(i.get("gm_seconds", 0.0) for i in infos), "aggregate_seconds": aggregate_seconds,
            # conflict: between client updates, and between each update and the server step
            "spatial_cos": gradmatch.mean_pairwise_cosine(G), "spatial_agreement": gradmatch.agreement(p_updates, p_step),
            # between a client's task updates, and between each and its matched update (TAM)
            "temporal_cos": mean(i["temporal_cos"] for i in infos if "temporal_cos" in i),
            "temporal_agreement": mean(i["temporal_agreement"] for i in infos if "temporal_agreement" in i)}


def results(cfg, scenario, acc, round_acc, log, comm, buffer_bytes, wall_time_s, peak_gpu_memory_bytes=None):
    """The results dict (what the CLI writes to JSON)."""
    return {"config": asdict(cfg), "acc_matrix": acc.tolist(), **summary(acc),
            "current_task_accuracy": current_task_accuracy(round_acc), "comm_bytes": comm,
            "buffer_bytes": buffer_bytes, "wall_time_s": wall_time_s, "peak_gpu_memory_bytes": peak_gpu_memory_bytes,
            "rounds": log, "scenario": [[list(task.classes) for task in row] for row in scenario.tasks],
            "versions": run_info()}


def run(cfg, dataset=None):
    """Run one experiment; returns the results as a dict (what the CLI writes to JSON).

    dataset: a `data.Dataset` already in memory (e.g. generated data), instead of `cfg.dataset`."""
    cfg.validate()
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
    if cfg.resume:
        st, clients = checkpoint.load(cfg.checkpoint_dir, asdict(cfg), gen)
        st["theta"] = {n: v.to(device) for n, v in st["theta"].items()}
        say(f"resumed from {cfg.checkpoint_dir} at task {st['t'] + 1} round {st['r'] + 1}")
    model_bytes = tensor_bytes(st["theta"])
    params = param_names(model)
    say(f"model {cfg.model}: {sum(v.numel() for v in st['theta'].values()):,} numbers ({model_bytes / 1e6:.2f} MB); "
        f"method {cfg.method}; device {device}")

    while st["t"] < T:
        t, r, theta = st["t"], st["r"], st["theta"]
        t0 = time.perf_counter()
        ids = participants(K, cfg.participation, gen)
        updates, weights, infos = [], [], []
        for k in ids:
            task = scenario.tasks[k][t]
            x, y = ds.x_train[task.train_idx], ds.y_train[task.train_idx]
            delta, info = client_update(model, theta, clients[k], x, y, task.classes, cfg)
            updates.append(delta)
            weights.append(len(y))
            infos.append(info)
        t1 = time.perf_counter()
        p_updates = [{n: u[n] for n in params} for u in updates]
        G = gradmatch.gram(p_updates)                       # (K, K) over the weights: diagnostics, and SAM's G
        theta, step = aggregate(theta, updates, weights, cfg, params=params, G=G)
        t2 = time.perf_counter()
        st["theta"], st["comm"] = theta, st["comm"] + 2 * model_bytes * len(ids)   # θ down, Δ up, per participant
        load_state(model, theta)
        cur = task_accuracy(model, ds, scenario, t)
        st["round_acc"][t].append(cur)
        st["log"].append(round_log(t, r, ids, infos, weights, G, p_updates, {n: step[n] for n in params}, t1 - t0, t2 - t1))
        st["log"][-1].update(current_task_acc=cur, seconds=time.perf_counter() - t0)
        say(f"task {t + 1}/{T} round {r + 1}/{R} | loss {st['log'][-1]['loss']:.3f} | current-task acc {cur:.3f} "
            f"| spatial cos {st['log'][-1]['spatial_cos']:+.2f} | {st['log'][-1]['seconds']:.2f}s")
        st["r"] += 1
        if st["r"] == R:                                    # end of task t: clients that trained it
            for k in range(K):
                task = scenario.tasks[k][t]
                if task_key(task.classes) not in clients[k].seen:
                    continue                                # never drawn during task t (participation < 1)
                end_task(model, theta, clients[k], ds.x_train[task.train_idx], ds.y_train[task.train_idx], task.classes, cfg)
            for j in range(t + 1):
                st["acc"][t, j] = task_accuracy(model, ds, scenario, j)
            say(f"after task {t + 1}: accuracy on tasks 1..{t + 1} = " + " ".join(f"{a:.3f}" for a in st["acc"][t, :t + 1].tolist()))
            st["t"], st["r"] = t + 1, 0
        if cfg.checkpoint_dir:
            checkpoint.save(cfg.checkpoint_dir, asdict(cfg),
                            {**st, "elapsed": st["elapsed"] + time.perf_counter() - start}, clients, gen)

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return results(cfg, scenario, st["acc"], st["round_acc"], st["log"], st["comm"],
                   sum(memory_bytes(c) for c in clients), st["elapsed"] + time.perf_counter() - start, peak)


def report(res):
    """The accuracy matrix and the summary metrics as text."""
    A = res["acc_matrix"]
    lines = ["accuracy matrix A[t, j] (row: after task t, column: task j):"]
    lines += ["  " + " ".join("  .  " if a != a else f"{a:.3f}" for a in row) for row in A]
    lines.append(f"average accuracy {res['avg_accuracy']:.4f} | forgetting {res['avg_forgetting']:.4f} | "
                 f"BWT {res['bwt']:.4f} | comm {res['comm_bytes'] / 1e6:.1f} MB | buffers {res['buffer_bytes'] / 1e3:.1f} kB "
                 f"| wall {res['wall_time_s']:.1f}s")
    lines.append("current-task accuracy (best over each task's rounds; not a forgetting measure): "
                 + " ".join(f"{a:.3f}" for a in res["current_task_accuracy"]))
    return "\n".join(lines)


def cli(argv=None):
    cfg = parse_config(Config, argv)
    cfg.validate()
    out = cfg.out_path
    check_writable(out)
    res = run(cfg)
    print(report(res))
    write_json(out, res)
    print(f"wrote {out}")
    if cfg.plot:
        from . import plots
        png = out.with_name(out.stem + "_acc.png")
        plots.save(plots.accuracy_matrix(res["acc_matrix"], title=f"{cfg.method} on {cfg.dataset}"), png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main(cli)
