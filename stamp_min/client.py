"""A client: explicit state, local training, and temporal gradient matching (TAM, METHOD §1.3).

One model object lives on the device and is shared by every client in turn: a client loads the
global weights θ into it, trains on its own data, and returns its update Δ = θ_k − θ (a dict of
tensors, floating-point state entries only: weights and BatchNorm statistics). Whatever a
client must remember between rounds lives in its `ClientState`, on the CPU.

TAM, round r of task t on client k (METHOD §1.3):

    Δ_cur = local_train(θ, current-task data) − θ
    Δ_j   = local_train(start, coreset M_j, MixStyle on) − θ        for each previous task j
    θ_k   = θ + η_t · GM(Δ_0, …, Δ_{t−1}, Δ_cur)                  (client GM settings)

start = θ by default [reading]; `clone_start="current"` starts from θ + Δ_cur and `replay="full"` replays all
old-task data, as the authors' code does [code]. For task 0 there is nothing to match: the update is η_t·Δ_cur
(GM of one vector would only rescale it by (1+c)/(1+c²)). Old-task clones train one after another
(`clone_updates`) or together (`tam_clones="batched"`, clones.py). The coreset is refreshed at each task's end
(`end_task`) from the final global model. Old tasks are keyed by their class set (a recurring task is current).
"""

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import UserError, baselines, gradmatch
from .clones import train_clones
from .coreset import Buffer, task_key
from .metrics import tensor_bytes
from .mixstyle import MixStyle, mixstyle

CLIENT_RULES = ("sgd", "fedprox", "ewc", "lwf", "replay", "replay_kcenter", "agem", "tam")   # cfg.client_rule (config.py)
REPLAY_BUFFERS = {"replay": "random", "replay_kcenter": "k_center", "agem": "random"}   # rules that keep a buffer: its selector


@dataclass
class ClientState:
    """What client k keeps between rounds (on the CPU)."""
    client_id: int
    seen: list = field(default_factory=list)    # class sets (sorted tuples) of the tasks trained so far
    buffer: Buffer = None                       # coreset / replay buffer, for the methods that have one
    extra: dict = field(default_factory=dict)   # baseline state: EWC Fisher + anchor, LwF old model, full replay data
    rng: torch.Generator = None                 # the client's own random stream: batch order, MixStyle, A-GEM draws
    server: dict = field(default_factory=dict)  # what the server sent with θ this round (ServerState.broadcast; not saved)


def client_seed(seed, k):      # client k's random stream: distinct for every (seed, k) with k < 1,000,003
    return seed * 1_000_003 + k


def buffer_rule(cfg):
    """How a client rule fills its buffer: TAM's coreset rule, REPLAY_BUFFERS' for ER / A-GEM, None: no buffer."""
    if cfg.client_rule == "tam":
        return cfg.coreset_rule
    return REPLAY_BUFFERS.get(cfg.client_rule)


def new_state(k, cfg):
    """Client k's state before its first round: its buffer (if its rule keeps one) and random stream."""
    rule = buffer_rule(cfg)
    return ClientState(k, buffer=None if rule is None else Buffer(cfg.buffer_per_class, rule, seed=cfg.seed + k),
                       rng=torch.Generator().manual_seed(client_seed(cfg.seed, k)))


def state_dict(state):
    """A ClientState as plain tensors, numbers, strings, lists and dicts (for checkpoints and Flower)."""
    return {"client_id": state.client_id, "seen": [list(k) for k in state.seen],
            "buffer": None if state.buffer is None else state.buffer.state_dict(), "extra": state.extra,
            "rng": state.rng.get_state()}


def restore(state, d):
    """Fill `state`, made by the run's `new_state` (so a variant's buffer object is kept), with what
    `state_dict` saved: the same client, seen tasks, buffer contents, baseline state, random stream."""
    if int(d["client_id"]) != state.client_id:
        raise ValueError(f"saved state of client {d['client_id']} restored into client {state.client_id}")
    state.seen = [tuple(k) for k in d["seen"]]
    if d["buffer"] is not None:
        if state.buffer is None:
            state.buffer = Buffer(d["buffer"]["m_per_class"], d["buffer"]["rule"], d["buffer"]["seed"])
        state.buffer.load_state_dict(d["buffer"])
    state.extra = d["extra"]
    state.rng = state.rng or torch.Generator()
    state.rng.set_state(d["rng"])
    return state


def param_names(model):
    """Names of the trainable parameters: what GM matches (the rest of an update is BatchNorm
    statistics, which are averaged, never matched or scaled)."""
    return [n for n, _ in model.named_parameters()]


def memory_bytes(state):
    """Bytes a client keeps between rounds: its buffer's images and labels, and every tensor in
    `state.extra` (full replay data, EWC's Fisher and anchor, LwF's old model, a variant's own)."""
    return (state.buffer.nbytes if state.buffer is not None else 0) + tensor_bytes(state.extra)


def float_state(model):
    """The model's floating-point state entries, detached clones: {name: tensor}."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def load_state(model, state):
    """Copy `state` ({name: tensor}, a subset of the state dict) into the model in place."""
    own = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def batches(n, batch_size, generator):
    """Index tensors of a fresh random permutation of range(n), `batch_size` at a time. A last
    batch of one image joins the batch before it (BatchNorm cannot normalise a single image)."""
    parts = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def local_train(model, x, y, epochs, batch_size, lr, generator, momentum=0.0, extra_losses=(), after_backward=None,
                amp=False, memory=None):
    """SGD with cross-entropy on (x, y), in place on `model`. Returns the mean loss.

    extra_losses: functions (model, z, logits, xb, yb) -> scalar added to the loss (baselines,
    ProtoNet); after_backward(model) may edit the gradients before the step (A-GEM).
    memory: (xm, ym, m): every batch is joined by m images of (xm, ym) (replay_share, baselines.py).
    x: (n, C, H, W) images, y: (n,) labels; batches are moved to the model's device (through
    pinned memory when the data live on the CPU and the model on a GPU). amp: bf16 autocast.
    """
    device = next(model.parameters()).device
    pin = device.type == "cuda" and x.device.type == "cpu"
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    draws = baselines.replay_draws(len(memory[1]), memory[2], generator) if memory is not None else None
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for idx in batches(len(y), batch_size, generator):
            xb, yb = x[idx], y[idx]
            if draws is not None:                   # (B + m, C, H, W): the batch, then m buffer images
                j = next(draws)
                xb, yb = torch.cat([xb, memory[0][j].to(xb.device)]), torch.cat([yb, memory[1][j].to(yb.device)])
            if pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                z = model.features(xb)                  # (B, D)
                logits = model.head(z)                  # (B, num_classes)
                loss = F.cross_entropy(logits.float(), yb)
                for extra in extra_losses:
                    loss = loss + extra(model, z, logits, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            opt.step()
            total, count = total + loss.item() * len(yb), count + len(yb)
    return total / max(count, 1)


def protonet_loss(weight):
    """ProtoNet loss [code], for any number of classes per batch: each class with >= 2 images is
    split in half, support prototypes p_c, and every query is classified by softmax(−||z_q − p_c||²)
    over those classes. Classes with one image and batches with < 2 such classes add nothing."""
    def extra(model, z, logits, xb, yb):
        protos, queries, targets = [], [], []
        for c in yb.unique():
            zc = z[yb == c]
            if len(zc) < 2:
                continue
            half = len(zc) // 2
            protos.append(zc[:half].mean(0))
            queries.append(zc[half:])
            targets.append(torch.full((len(zc) - half,), len(protos) - 1, device=z.device))
        if len(protos) < 2:
            return z.sum() * 0.0
        dist = torch.cdist(torch.cat(queries), torch.stack(protos)) ** 2   # (Q, classes)
        return weight * F.cross_entropy(-dist, torch.cat(targets))
    return extra


def train_from(model, start, theta, x, y, cfg, generator, **hooks):
    """Load `start`, train on (x, y); return (θ_after − θ, mean loss)."""
    load_state(model, start)
    loss = local_train(model, x, y, cfg.local_epochs, cfg.batch_size, cfg.lr, generator, cfg.momentum,
                       amp=cfg.amp == "bf16", **hooks)
    after = float_state(model)
    delta = {n: after[n] - theta[n] for n in theta}
    if not math.isfinite(loss) or not all(torch.isfinite(d).all() for d in delta.values()):
        raise UserError(f"lr={cfg.lr}: local training of {cfg.label} (client rule {cfg.client_rule}) diverged (NaN/inf); "
                        f"allowed: a smaller lr or a weaker regulariser")
    return delta, loss


def old_tasks(state, cfg, current):
    """(x, y) of every previous task but the current one: the coreset, or all data (replay='full')."""
    memory = state.extra.get("full", {}).items() if cfg.replay == "full" else ((k, (x, y)) for k, x, y in state.buffer)
    return [(k, x, y) for k, (x, y) in memory if k != current]


def clone_updates(model, start, theta, old, cfg, generator, extras=()):
    """TAM's old-task clones: [(Δ_j, loss_j)] for each (key, x, y) in `old`, each trained from `start`
    on its coreset with MixStyle: one after another (the teaching version), or all together when
    cfg.tam_clones == "batched" (clones.py: the same draws, the same updates up to float rounding;
    not with extra losses, which keep the loop)."""
    style = lambda: MixStyle(p=0.5, alpha=0.1, generator=generator)     # noqa: E731  (METHOD §1.5)
    if cfg.tam_clones == "batched" and not extras:
        mix = style() if cfg.mixstyle else None
        return train_clones(model, start, theta, [(xm, ym) for _, xm, ym in old], cfg, generator, batches, mix)
    out = []
    for _, xm, ym in old:
        with mixstyle(model, style()) if cfg.mixstyle else nullcontext():
            out.append(train_from(model, start, theta, xm, ym, cfg, generator, extra_losses=extras))
    return out


def tam_update(model, theta, state, x, y, key, cfg, generator, extras, match=gradmatch.match):
    """TAM (METHOD §1.3): θ_k − θ = η_t · GM(Δ_0, …, Δ_{t−1}, Δ_cur) on the trainable parameters.

    key: the current task's class set; every other stored task is an old task j with its own
    clone Δ_j. BatchNorm statistics are taken from Δ_cur as they are (not matched, not scaled).
    match: the GM operator (gradmatch.match's signature). Returns (update {name: tensor}, info)."""
    d_cur, loss = train_from(model, theta, theta, x, y, cfg, generator, extra_losses=extras)
    old = old_tasks(state, cfg, key)
    params = param_names(model)
    if not old:
        return {**d_cur, **{n: cfg.eta_t * d_cur[n] for n in params}}, {"loss": loss}
    start = theta if cfg.clone_start == "global" else {n: theta[n] + d_cur[n] for n in theta}
    t_clones = time.perf_counter()                                        # clone_seconds: timing only
    deltas = [d for d, _ in clone_updates(model, start, theta, old, cfg, generator, extras)]
    deltas.append(d_cur)                                                  # Δ_0 … Δ_{t−1}, Δ_cur
    deltas = [{n: d[n] for n in params} for d in deltas]                   # trainable parameters only
    t0 = time.perf_counter()
    G = gradmatch.gram(deltas)                                            # (t+1, t+1)
    matched = match(deltas, c=cfg.gm_c, solver=cfg.gm_solver, normalize=cfg.gm_normalize, G=G, **gradmatch.CLIENT)
    info = {"loss": loss, "gm_seconds": time.perf_counter() - t0, "temporal_cos": gradmatch.mean_pairwise_cosine(G),
            "temporal_agreement": gradmatch.agreement(deltas, matched), "clone_seconds": t0 - t_clones}
    return {**d_cur, **{n: cfg.eta_t * matched[n] for n in params}}, info


def client_update(model, theta, state, x, y, classes, cfg, match=gradmatch.match):
    """One round of client k on its current task (data x, y of classes `classes`), by the client
    rule `cfg.client_rule`. Every random draw (batch order, MixStyle, A-GEM's memory batch) comes
    from the client's own `state.rng`, so a client's update depends on its own state only,
    wherever it runs (fcl_loop or Flower). match: the GM operator TAM uses.

    Returns (update Δ = θ_k − θ: {name: tensor}, info: dict with at least "loss").
    A variant is a function with this signature (without `match`), passed to `fcl_loop.run`.
    """
    key, generator = task_key(classes), state.rng
    if key not in state.seen:
        state.seen.append(key)
    device = next(model.parameters()).device
    extras = [protonet_loss(cfg.protonet_weight)] if cfg.protonet_weight > 0 else []
    rule, hooks = cfg.client_rule, {}
    if rule == "tam":
        return tam_update(model, theta, state, x, y, key, cfg, generator, extras, match)
    if rule == "fedprox":
        extras.append(baselines.fedprox_loss(theta, cfg.mu))
    elif rule == "ewc":
        penalty = baselines.ewc_loss(state.extra, cfg.ewc_lambda, device)
        extras += [penalty] if penalty is not None else []
    elif rule == "lwf" and "lwf_old" in state.extra:
        old_model = copy.deepcopy(model)
        load_state(old_model, {n: v.to(device) for n, v in state.extra["lwf_old"].items()})
        old_classes = {c for k in state.seen if k != key for c in k}
        distil = baselines.lwf_loss(old_model.eval(), old_classes, cfg.lwf_alpha, cfg.lwf_temperature, cfg.lwf_t2)
        extras += [distil] if distil is not None else []
    elif rule in REPLAY_BUFFERS and len(state.buffer):
        bx = torch.cat([xm for _, xm, _ in state.buffer])                    # the buffer lives on the CPU
        by = torch.cat([ym for _, _, ym in state.buffer])
        if rule == "agem":
            hooks["after_backward"] = baselines.agem_hook(bx, by, cfg.agem_ref_size or cfg.batch_size, generator)
        elif cfg.replay_share > 0:                                           # a share of every batch
            hooks["memory"] = (bx, by, baselines.replay_per_batch(cfg.batch_size, cfg.replay_share))
        else:                                                                # one pool: task + buffer
            x, y = torch.cat([x, bx.to(x.device)]), torch.cat([y, by.to(y.device)])
    delta, loss = train_from(model, theta, theta, x, y, cfg, generator, extra_losses=extras, **hooks)
    return delta, {"loss": loss}


def end_task(model, theta, state, x, y, classes, cfg):
    """End of a task, with the final global model θ: refresh the client's memory (coreset, replay
    buffer, EWC's Fisher, LwF's old model, by the client rule). Same signature for a variant."""
    load_state(model, theta)
    key, rule = task_key(classes), cfg.client_rule
    full = rule == "tam" and cfg.replay == "full"
    if state.buffer is not None and not full:
        state.buffer.add_task(model, x, y, classes)
    if full:
        state.extra.setdefault("full", {})[key] = (x.cpu().clone(), y.cpu().clone())
    if rule == "ewc":
        baselines.ewc_update_state(model, x, y, state.extra, cfg.ewc_mode, cfg.ewc_fisher_samples, state.rng)
    if rule == "lwf":
        state.extra["lwf_old"] = {n: v.cpu().clone() for n, v in theta.items()}
