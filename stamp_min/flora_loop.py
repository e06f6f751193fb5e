"""Federated LoRA fine-tuning on one machine: the experiment behind every aggregator (METHOD §2.3).

    pre-train a small MLP (64 -> fc1 -> fc2 -> head) centrally on upright digits   (seconds)
    inject LoRA into its linear layers (lora.py), freeze everything else
    for round r = 0 .. R-1:                                            (Dirichlet label skew, METHOD §1.1)
        every client u: (A_u, B_u) = local SGD on its shifted digits, from the global factors
        server: aggregate_lora(aggregator, ...)                        (flora_na.py)
        log global test accuracy on the shifted test set, the aggregation residual
        ||T − (applied update)||² / ||T||² (summed over modules), bytes up/down and server time

The shift (rotated or inverted digits) makes the pre-trained model wrong, so fine-tuning matters.
Every aggregator sees the same seed: the same pre-trained model, client split, LoRA init, batches.

Residual: computed densely (these layers are small) from what the model actually receives,
the new B Â plus whatever was folded into W0, against T = Σ w_u B_u A_u of the clients' factors.
FedSA-LoRA has no global B: its residual is that of the clients' personal models averaged
(Σ w_u B_u Ā) and its accuracy is the w-weighted mean of the clients' personal models on the
global test set. FLoRA re-initialises the adapters every round (fresh A from the seeded
generator, the same on every client; B = 0).

Run it:  python -m stamp_min.flora_loop --help
"""

from .cli import quiet_until_main

if __name__ == "__main__":
    quiet_until_main()          # a signal while torch loads is one line, not a traceback

import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import UserError  # noqa: E402
from .cli import check_fields, check_writable, main, parse_config, run_info, write_json  # noqa: E402
from .data import load_dataset, resplit  # noqa: E402
from .flora_na import AGGREGATORS, SOLVERS, aggregate_lora, payload, target  # noqa: E402
from .metrics import correct  # noqa: E402
from .lora import fold_into_base, get_lora, inject_lora, lora_modules, lora_shapes, set_lora  # noqa: E402
from .scenarios import make_scenario  # noqa: E402

SHIFTS = ("rotate", "invert")
LIMITS = {"seed": "[0, 4294967295]", "num_clients": "[1, 10000]", "alpha": "[0.001, 1000000]", "angle": "[-360, 360]",
          "hidden": "[1, 65536]", "pretrain_epochs": "[0, 100000]", "rounds": "[1, 100000]", "local_epochs": "[1, 100000]",
          "batch_size": "[1, 1000000]", "lr": "(0, inf)", "rank": "[1, 4096]", "lora_alpha": "(0, inf)",
          "solver_steps": "[1, 1000000]"}     # field -> allowed interval (cli.check_fields); every float finite too


@dataclass
class Config:
    """Federated LoRA fine-tuning of a pre-trained digits MLP on shifted digits (FLoRA-NA and baselines)."""
    aggregator: str = "flora_na"
    """server rule: fedit | ffa | fedsa | flora | fedex | svd | flora_na"""
    seed: int = 0
    """seed of the pre-training, the client split, the LoRA init and the batches"""
    num_clients: int = 10
    """number of clients U"""
    alpha: float = 0.1
    """Dirichlet concentration of the label split; smaller = more skewed clients"""
    shift: str = "rotate"
    """the new task: rotate (digits turned by `angle`) | invert (255 − x)"""
    angle: float = 90.0
    """rotation in degrees for shift=rotate"""
    hidden: int = 128
    """width of the MLP's two hidden layers"""
    pretrain_epochs: int = 10
    """central pre-training epochs on the upright digits"""
    rounds: int = 20
    """communication rounds R of federated fine-tuning"""
    local_epochs: int = 5
    """local epochs per round"""
    batch_size: int = 16
    """local mini-batch size"""
    lr: float = 0.1
    """local SGD learning rate of the LoRA factors"""
    rank: int = 4
    """LoRA rank r"""
    lora_alpha: float = 8.0
    """LoRA scale numerator: the increment is (lora_alpha / rank) · B A"""
    targets: str = "fc1,fc2,head"
    """comma-separated name patterns of the linear layers that get LoRA"""
    solver: str = "adamw"
    """FLoRA-NA solver: adamw | als (alternating exact least squares)"""
    solver_steps: int = 200
    """FLoRA-NA AdamW steps per round"""
    per_module: bool = False
    """FLoRA-NA: one (p, q) per module instead of one shared by all modules"""
    test_split: str = "fixed"
    """fixed: digits' own test split | per_seed: train and test images split again with the seed (data.resplit)"""
    out: str = ""
    """results JSON path; empty = results/flora_<aggregator>_seed<seed>.json"""
    quiet: bool = False
    """print only the final summary"""

    def validate(self):
        check_fields(self, LIMITS)
        if self.aggregator not in AGGREGATORS:
            raise UserError(f"aggregator={self.aggregator!r} is unknown; allowed: {', '.join(AGGREGATORS)}")
        if self.solver not in SOLVERS:
            raise UserError(f"solver={self.solver!r} is unknown; allowed: {', '.join(SOLVERS)}")
        if self.test_split not in ("fixed", "per_seed"):
            raise UserError(f"test_split={self.test_split!r} is unknown; allowed: fixed, per_seed")
        if self.shift not in SHIFTS:
            raise UserError(f"shift={self.shift!r} is unknown; allowed: {', '.join(SHIFTS)}")

    @property
    def out_path(self):
        return Path(self.out or f"results/flora_{self.aggregator}_seed{self.seed}.json")


def shifted(x, cfg):
    """The new task's images: uint8 (N, 1, H, W) rotated by cfg.angle or inverted."""
    if cfg.shift == "invert":
        return 255 - x
    from torchvision.transforms.functional import rotate
    return rotate(x, cfg.angle)


def train(model, x, y, epochs, batch_size, lr, gen, clip=1.0):
    """Plain SGD on the parameters that require gradients, gradient norm clipped; returns the mean loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                raise UserError(f"lr={lr}: local training diverged (loss {loss.item()}); allowed: a smaller lr")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


class MLP(nn.Module):
    """uint8 digits (B, 1, 8, 8) -> standardised pixels (B, 64) -> fc1 -> fc2 -> head -> logits (B, 10)."""

    def __init__(self, ds, hidden):
        super().__init__()
        self.register_buffer("mean", torch.tensor(ds.mean[0]), persistent=False)
        self.register_buffer("std", torch.tensor(ds.std[0]), persistent=False)
        self.fc1 = nn.Linear(ds.in_channels * ds.image_size ** 2, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, ds.num_classes)

    def forward(self, x):
        x = (x.flatten(1).float() / 255 - self.mean) / self.std
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def pretrain(cfg, ds, gen):
    """The MLP trained centrally on the upright digits (Adam, batch 64)."""
    model = MLP(ds, cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(cfg.pretrain_epochs):
        for idx in torch.randperm(len(ds.y_train), generator=gen).split(64):
            loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def residuals(agg, client_lora, start_lora, w):
    """Dense, float64, summed over modules: ||T − applied||² / ||T||² (METHOD's residual) and the same
    over ||T − P||², the change the clients asked for this round (P = Σ w_u B_u A_u of their start).
    applied = B̂Â + what was folded into W0; FedSA: Σ w_u B_u Ā (its personal models averaged)."""
    rel, rel_update = 0.0, 0.0
    for n, (A, B) in agg.lora.items():
        As, Bs = (torch.stack([c[n][i] for c in client_lora]).double() for i in (0, 1))
        T = target(As, Bs, w)
        P = target(*(torch.stack([c[n][i] for c in start_lora]).double() for i in (0, 1)), w)
        if B is None:                                             # FedSA: B stays on the clients
            applied = torch.einsum("u,udr->dr", w, Bs) @ A.double()
        else:
            applied = B.double() @ A.double() + agg.base_delta.get(n, torch.zeros(())).double()
        err = (T - applied).pow(2).sum()
        rel += float(err / (T.pow(2).sum() + 1e-12))
        rel_update += float(err / ((T - P).pow(2).sum() + 1e-12))
    return rel, rel_update


def run(cfg):
    """Run one federated LoRA fine-tuning; returns the results as a dict (what the CLI writes).

    Runs on one intra-op thread (restored afterwards): the MLP is so small that a second thread only
    adds synchronisation, and when other processes share the cores it is 10-50x slower."""
    if not isinstance(cfg, Config):
        raise UserError(f"cfg={type(cfg).__name__} is not a flora_loop.Config; allowed: run(Config(...))")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg):
    cfg.validate()
    say = (lambda *a: None) if cfg.quiet else print
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ds = load_dataset("digits")
    ds = resplit(ds, cfg.seed) if cfg.test_split == "per_seed" else ds
    model = pretrain(cfg, ds, gen)
    x_train, x_test = shifted(ds.x_train, cfg), shifted(ds.x_test, cfg)
    n_test = len(ds.y_test)
    before = {"upright": correct(model, ds.x_test, ds.y_test) / n_test, "shifted": correct(model, x_test, ds.y_test) / n_test}
    say(f"pre-trained MLP: test accuracy {before['upright']:.3f} upright, {before['shifted']:.3f} on the "
        f"{cfg.shift} task before fine-tuning")

    scenario = make_scenario(ds, "dirichlet", cfg.num_clients, num_tasks=1, classes_per_task=ds.num_classes,
                             alpha=cfg.alpha, seed=cfg.seed)
    parts = [row[0].train_idx for row in scenario.tasks]                  # client u's training images
    w = torch.tensor([len(i) for i in parts], dtype=torch.float64)
    w = w / w.sum()
    inject_lora(model, [t.strip() for t in cfg.targets.split(",")], cfg.rank, cfg.lora_alpha, generator=gen)
    shapes = lora_shapes(model)
    up, down = payload(cfg.aggregator, shapes, cfg.num_clients)            # bytes per client per round
    client_B = [{n: B for n, (A, B) in get_lora(model).items()} for _ in parts]   # FedSA's local B
    if cfg.aggregator == "ffa":                                            # A frozen at its (shared) init
        for m in lora_modules(model).values():
            m.A.requires_grad_(False)
    say(f"{cfg.num_clients} clients (Dirichlet alpha={cfg.alpha}), sizes {[len(i) for i in parts]}; LoRA r={cfg.rank} "
        f"on {list(shapes)}; {cfg.aggregator}: {up} bytes up / {down} bytes down per client per round")

    log = {k: [] for k in ("accuracy", "residual", "residual_of_update", "bytes_up", "bytes_down", "server_time_s", "loss", "p", "q")}
    for r in range(cfg.rounds):
        glob = get_lora(model)                                             # (A_prev, B_prev) sent down
        client_lora, start_lora, losses = [], [], []
        for u, idx in enumerate(parts):
            begin = {n: (A, client_B[u][n]) for n, (A, _) in glob.items()} if cfg.aggregator == "fedsa" else glob
            set_lora(model, begin)
            losses.append(train(model, x_train[idx], ds.y_train[idx], cfg.local_epochs, cfg.batch_size, cfg.lr, gen))
            client_lora.append(get_lora(model))
            start_lora.append(begin)
        t0 = time.perf_counter()
        agg = aggregate_lora(cfg.aggregator, glob, client_lora, w, generator=gen, solver=cfg.solver,
                             per_module=cfg.per_module, steps=cfg.solver_steps)
        log["server_time_s"].append(time.perf_counter() - t0)
        rel, rel_update = residuals(agg, client_lora, start_lora, w)
        log["residual"].append(rel)
        log["residual_of_update"].append(rel_update)
        fold_into_base(model, agg.base_delta)
        if cfg.aggregator == "fedsa":
            client_B = agg.client_B
            accs = []
            for u in range(len(parts)):                                    # personal models (Ā, B_u)
                set_lora(model, {n: (A, client_B[u][n]) for n, (A, _) in agg.lora.items()})
                accs.append(correct(model, x_test, ds.y_test) / len(ds.y_test))
            acc = float(torch.tensor(accs, dtype=torch.float64) @ w)
        else:
            set_lora(model, agg.lora)
            acc = correct(model, x_test, ds.y_test) / len(ds.y_test)
        log["accuracy"].append(acc)
        log["loss"].append(sum(losses) / len(losses))
        log["bytes_up"].append(up * len(parts))
        log["bytes_down"].append(down * len(parts))
        log["p"].append(agg.info.get("p"))
        log["q"].append(agg.info.get("q"))
        say(f"round {r + 1}/{cfg.rounds} | loss {log['loss'][-1]:.3f} | acc {acc:.3f} | residual "
            f"{rel:.2e} (of the update {rel_update:.2e}) | server {log['server_time_s'][-1] * 1e3:.1f} ms")

    return {"config": asdict(cfg), "aggregator": cfg.aggregator, "before": before, **log,
            "final_accuracy": log["accuracy"][-1], "total_bytes_up": sum(log["bytes_up"]),
            "total_bytes_down": sum(log["bytes_down"]), "lora_shapes": {n: list(s) for n, s in shapes.items()},
            "client_sizes": [len(i) for i in parts], "wall_time_s": time.perf_counter() - start,
            "versions": run_info()}


def cli(argv=None):
    def go():
        cfg = parse_config(Config, argv, prog="python -m stamp_min.flora_loop")
        cfg.validate()
        out = cfg.out_path
        check_writable(out)
        res = run(cfg)
        print(f"{cfg.aggregator}: final accuracy {res['final_accuracy']:.4f} | mean residual "
              f"{sum(res['residual']) / len(res['residual']):.3e} | {res['total_bytes_up'] / 1e6:.2f} MB up, "
              f"{res['total_bytes_down'] / 1e6:.2f} MB down | server {sum(res['server_time_s']):.2f}s | "
              f"wall {res['wall_time_s']:.1f}s")
        write_json(out, res)
        print(f"wrote {out}")
    main(go)


if __name__ == "__main__":
    cli()
