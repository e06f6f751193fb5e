"""A client: its explicit state and its local training (METHOD §1.3).

One model object lives on the device and is shared by every client in turn: a client loads the
global weights θ into it, trains on its own data, and returns its update Δ = θ_after − θ (a dict
of tensors, the same keys as the model's state_dict, floating-point entries only). Whatever a
client must remember between rounds lives in its `ClientState`, kept on the CPU.

An update covers every floating-point entry of the state dict (weights and BatchNorm running
statistics); integer entries (BatchNorm's batch counter) are not part of an update.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ClientState:
    """What client k keeps between rounds (on the CPU)."""
    client_id: int
    seen: list = field(default_factory=list)    # class sets (tuples) of the tasks trained so far


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
    """Index tensors of a fresh random permutation of range(n), `batch_size` at a time."""
    perm = torch.randperm(n, generator=generator)
    return perm.split(batch_size)


def local_train(model, x, y, epochs, batch_size, lr, generator, momentum=0.0, weight_decay=0.0):
    """Plain SGD with cross-entropy on (x, y), in place on `model`. Returns the mean loss.

    x: (n, C, H, W) images (uint8 or float), y: (n,) labels; both may live on the CPU, batches
    are moved to the model's device.
    """
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for idx in batches(len(y), batch_size, generator):
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
    return total / max(count, 1)


def client_update(model, global_state, state, x, y, classes, cfg, generator):
    """One round of client k on its current task (data x, y of classes `classes`).

    Returns (update Δ: {name: tensor}, info: dict). FedAvg: Δ = local_train(θ) − θ.
    """
    load_state(model, global_state)
    loss = local_train(model, x, y, cfg.local_epochs, cfg.batch_size, cfg.lr, generator, cfg.momentum)
    after = float_state(model)
    if tuple(classes) not in state.seen:
        state.seen.append(tuple(classes))
    return {k: after[k] - global_state[k] for k in after}, {"loss": loss}
