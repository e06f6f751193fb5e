"""TAM's old-task clones trained together, in one batched step each (`tam_clones="batched"`).

TAM (METHOD §1.3) trains, every round, one clone of the model per old task j: from the same
start weights, on the coreset M_j, with MixStyle on. `client.clone_updates` does it the plain
way, one clone after another: the teaching version, and the default (`tam_clones="loop"`). The
clones never interact, so they can run as one: every weight, momentum buffer and BatchNorm
statistic gets a leading clone dimension t, and `torch.func.vmap` runs the model once per clone
along it (`functional_call` swaps clone j's slice in for the module's own tensors):

    weights  W  (t, *shape)          batch  xb (t, B, C, H, W), yb (t, B)
    losses   ℓ = vmap(loss)(W, buffers, xb, yb, MixStyle draws)         (t,)
    Σ_j ℓ_j .backward()      ∂(Σ ℓ)/∂W_j = ∂ℓ_j/∂W_j: clone j's weights touch only ℓ_j
    torch.optim.SGD(W).step  elementwise, so t independent SGDs; a fresh optimiser per round
                             starts every clone's momentum buffer at its first gradient, like the loop

One forward, one backward and one optimiser step per batch for all t clones: on a GPU, t small
coreset batches become one large one (on a CPU it is no faster). Why it equals the loop up to
float rounding (in float64 the two agree to ~1e-11 relative, tests/test_clones.py):

- BatchNorm: the running mean/var and num_batches_tracked are stacked too and given to vmap
  with the clone dimension, so nn.BatchNorm2d's own in-place update (momentum, unbiased variance)
  lands in clone j's slice. A naive vmap that shares one set of buffers cannot update them
  in place (an error), and one with `torch.func.replace_all_batch_norm_modules_` runs but keeps
  no running statistics at all: tests/test_clones.py.
- Random draws: the loop draws from the client's generator, clone after clone: each epoch one
  permutation (client.batches, passed in as `batches`), each batch MixStyle's coin, permutation
  and λ (MixStyle.draw). They depend on sizes only, never on data, so `plan` draws them all up
  front in the loop's order, and step s of clone j uses exactly the loop's draws.
- MixStyle: the same hook on `model.early_block`; each clone mixes with its own draws, and a clone
  whose coin said no passes its features unchanged (torch.where).

Coresets of different sizes (a task with fewer images) give different batch shapes and numbers of
steps, so the clones are grouped by coreset size and each group is one batched run: the usual case
(every coreset m·cpt images) is a single group, the worst case is the loop's speed. Not batched
(client.clone_updates keeps the loop): the ProtoNet loss, whose per-class split has data-dependent
shapes vmap cannot trace. Refused (Config.validate): swin_t, whose stochastic depth draws random
numbers inside the model, from torch's global stream, which no batched run can reproduce; vmap
runs with randomness="error", so any other random layer stops with an error, never silently differs.
"""

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from . import UserError


def plan(sizes, cfg, generator, batches, mix=None):
    """Every random draw the loop makes, in its order: for each clone (coreset of n images), each
    epoch, `batches(n, cfg.batch_size, generator)`, and for each batch MixStyle's draws (if `mix`).
    Returns per clone a list of steps (idx (B,), drawn: None or (perm (B,), λ (B,)))."""
    plans = []
    for n in sizes:
        steps = []
        for _ in range(cfg.local_epochs):
            for idx in batches(n, cfg.batch_size, generator):
                steps.append((idx, None if mix is None else mix.draw(len(idx))))
        plans.append(steps)
    return plans


def train_clones(model, start, theta, tasks, cfg, generator, batches, mix=None):
    """Train one clone per (x, y) in `tasks`, each from `start`, together; returns [(Δ_j, mean loss_j)]
    in the order of `tasks`: what client.train_from returns for each clone in the loop.

    start, theta: {name: tensor} float state entries (weights, BatchNorm statistics) on the model's
    device; Δ_j = clone j's final float state − θ. x: (n_j, C, H, W), y: (n_j,). generator: the
    client's stream; batches: client.batches; mix: the loop's MixStyle (drawing from `generator`)
    or None. The shared model is used for its code only: its weights are left as they are, its
    integer buffers (num_batches_tracked) advance by the clones' steps, as in the loop."""
    plans = plan([len(y) for _, y in tasks], cfg, generator, batches, mix)
    groups = {}                                             # coreset size -> indices of its clones
    for j, (_, y) in enumerate(tasks):
        groups.setdefault(len(y), []).append(j)
    out = [None] * len(tasks)
    for js in groups.values():
        results = _train_group(model, start, theta, [tasks[j] for j in js], [plans[j] for j in js], cfg, mix)
        for j, res in zip(js, results):
            out[j] = res
    for j, (delta, loss) in enumerate(out):
        if not math.isfinite(loss) or not all(torch.isfinite(d).all() for d in delta.values()):
            raise UserError(f"lr={cfg.lr}: local training of {cfg.label} (client rule {cfg.client_rule}) diverged "
                            f"(NaN/inf); allowed: a smaller lr or a weaker regulariser")
    return out


def _train_group(model, start, theta, tasks, plans, cfg, mix):
    """t clones whose coresets have the same size n, so the same batch sizes, step for step."""
    device = next(model.parameters()).device
    t, steps = len(tasks), len(plans[0])
    own = model.state_dict()                                # shares storage with the model

    def stack(v):                                           # (*shape) -> (t, *shape), t copies
        return v.detach().to(device).unsqueeze(0).repeat(t, *[1] * v.dim()).contiguous()

    params = {n: stack(start[n]).requires_grad_() for n, _ in model.named_parameters()}
    buffers = {n: stack(start[n] if n in start else own[n]) for n, _ in model.named_buffers() if n in own}
    counters = {n: b[0].clone() for n, b in buffers.items() if not b.is_floating_point()}
    xs = torch.stack([x for x, _ in tasks]).to(device)      # (t, n, C, H, W)
    ys = torch.stack([y for _, y in tasks]).to(device)      # (t, n)
    rows = torch.arange(t, device=device)[:, None]          # (t, 1)
    idx = [torch.stack([p[s][0] for p in plans]).to(device) for s in range(steps)]   # steps × (t, B)
    opt = torch.optim.SGD(params.values(), lr=cfg.lr, momentum=cfg.momentum)
    amp = cfg.amp == "bf16"
    held = {}                                               # this step's MixStyle draws, for the hook

    def loss_of(p, b, xb, yb, *draws):                      # ONE clone: xb (B, C, H, W), yb (B,)
        held["draws"] = draws or None                       # () or (perm (B,), λ (B,), on ())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = functional_call(model, (p, b), (xb,))  # (B, num_classes)
            return F.cross_entropy(logits.float(), yb)

    def hook(module, inputs, z):                            # after model.early_block, per clone
        if held["draws"] is None or not module.training:
            return z
        perm, lam, on = held["draws"]
        nhwc = model.early_layout == "nhwc"
        z = z.permute(0, 3, 1, 2) if nhwc else z            # (B, C, H, W)
        z = torch.where(on, mix.mix(z, perm, lam), z)       # a clone whose coin said no: unchanged
        return z.permute(0, 2, 3, 1) if nhwc else z

    batched = vmap(loss_of)                                 # (t, ...) inputs -> (t,) losses
    handle = model.get_submodule(model.early_block).register_forward_hook(hook) if mix is not None else None
    model.train()
    total = torch.zeros(t, dtype=torch.float64, device=device)   # Σ loss·B per clone, as the loop sums
    try:
        for s in range(steps):
            B, drawn, draws = idx[s].size(1), [p[s][1] for p in plans], ()
            if any(d is not None for d in drawn):
                perm = torch.stack([torch.arange(B) if d is None else d[0] for d in drawn])   # (t, B)
                lam = torch.stack([torch.ones(B) if d is None else d[1].float() for d in drawn])
                on = torch.tensor([d is not None for d in drawn])                            # (t,)
                draws = (perm.to(device), lam.to(device), on.to(device))
            losses = batched(params, buffers, xs[rows, idx[s]], ys[rows, idx[s]], *draws)     # (t,)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            total += losses.detach().double() * B
    finally:
        if handle is not None:
            handle.remove()
    with torch.no_grad():
        for n, c in counters.items():                       # the loop's shared model counts every step
            own[n] += (buffers[n] - c).sum()
    count = max(len(tasks[0][1]) * cfg.local_epochs, 1)    # images seen per clone
    after = {**params, **buffers}
    return [({n: after[n][j].detach() - theta[n] for n in theta}, total[j].item() / count) for j in range(t)]
