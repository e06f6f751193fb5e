"""STAMP end to end: TAM (client.py), SAM (server.py), the baselines, and a smoke run of every method."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from stamp_min import baselines
from stamp_min.client import client_update, end_task, float_state, load_state, local_train, new_state, protonet_loss
from stamp_min.coreset import task_key
from stamp_min.fcl_loop import METHODS, Config, run
from stamp_min.models import Classifier
from stamp_min.server import aggregate, participants, weighted_mean


def linear_model(d_in=4, k=3, seed=0):
    """Softmax regression as a Classifier: features = the flattened (already normalised) input."""
    torch.manual_seed(seed)
    return Classifier(nn.Flatten(), d_in, k, mean=(0.0,), std=(1.0,), early_block="body")


def gd_reference(W, b, X, Y, lr, steps, k):
    """Full-batch gradient descent on softmax cross-entropy, gradients written out by hand:
    ∂L/∂logits = (softmax − onehot)/n, ∂L/∂W = that^T X, ∂L/∂b = column sums."""
    W, b = W.clone().double(), b.clone().double()
    X = X.flatten(1).double()
    onehot = torch.nn.functional.one_hot(Y, k).double()
    for _ in range(steps):
        P = torch.softmax(X @ W.T + b, dim=1)
        G = (P - onehot) / len(Y)
        W, b = W - lr * G.T @ X, b - lr * G.sum(0)
    return W, b


def gm_reference(d, c):
    """GM of METHOD §1.2 for n = 2 update vectors, with w* found by a fine grid on the 1-D simplex."""
    D = torch.stack(d).double()
    G = D @ D.T
    s = torch.sqrt(G.diagonal() + 1e-4).mean()
    Gh = G / s ** 2
    bvec = Gh.sum(1) / 2
    rho = c * torch.sqrt(bvec.mean() + 1e-4)
    a = torch.linspace(0, 1, 200001, dtype=torch.float64)
    W = torch.stack([a, 1 - a], 1)
    obj = W @ bvec + rho * torch.sqrt(((W @ Gh) * W).sum(1) + 1e-4)
    w = W[obj.argmin()]
    lam = rho / (torch.sqrt(w @ Gh @ w + 1e-4) + 1e-4)
    return (D.mean(0) + lam * (w @ D)) / (1 + c ** 2)


def tiny_cfg(**kw):
    base = dict(method="stamp_tam", local_epochs=2, batch_size=1000, lr=0.5, momentum=0.0, mixstyle=False,
                gm_c=0.25, eta_t=1.0, buffer_per_class=3, coreset_rule="nearest", protonet_weight=0.0)
    return replace(Config(), **{**base, **kw})


def two_task_client(cfg):
    """A linear model, a client that finished task (0, 1) and now trains on task (2,)."""
    g = torch.Generator().manual_seed(0)
    x_old, y_old = torch.randn(8, 1, 2, 2, generator=g), torch.tensor([0, 1] * 4)
    x_new, y_new = torch.randn(6, 1, 2, 2, generator=g), torch.tensor([2] * 6)
    model = linear_model()
    theta = float_state(model)
    state = new_state(0, cfg)
    state.seen.append(task_key((0, 1)))
    end_task(model, theta, state, x_old, y_old, (0, 1), cfg)
    return model, theta, state, x_new, y_new


@pytest.mark.parametrize("c", [0.25, 0.0])
def test_tam_with_one_previous_task_equals_a_hand_computation(c):
    cfg = tiny_cfg(gm_c=c, eta_t=1.5)
    model, theta, state, x, y = two_task_client(cfg)
    (_, xm, ym), = list(state.buffer)
    assert len(ym) == 6                                        # 3 per class kept
    delta, info = client_update(model, theta, state, x, y, (2,), cfg)
    W0, b0 = theta["head.weight"], theta["head.bias"]
    flat = lambda W, b: torch.cat([(W - W0.double()).flatten(), (b - b0.double())])
    d_old = flat(*gd_reference(W0, b0, xm, ym, cfg.lr, 2, 3))   # both start from θ
    d_cur = flat(*gd_reference(W0, b0, x, y, cfg.lr, 2, 3))
    expect = cfg.eta_t * (gm_reference([d_old, d_cur], c) if c > 0 else (d_old + d_cur) / 2)
    got = torch.cat([delta["head.weight"].flatten(), delta["head.bias"]]).double()
    assert torch.allclose(got, expect, atol=2e-5), (got - expect).abs().max()
    assert -1 <= info["temporal_cos"] <= 1


def test_tam_authors_variant_starts_old_clones_after_the_current_task():
    cfg = tiny_cfg(gm_c=0.0, clone_start="current", replay="full", eta_t=2.0)
    model, theta, state, x, y = two_task_client(cfg)
    (key, xf, yf), = [(k, *v) for k, v in state.extra["full"].items()]
    assert key == (0, 1) and len(yf) == 8                       # all old-task data, no coreset
    delta, _ = client_update(model, theta, state, x, y, (2,), cfg)
    W0, b0 = theta["head.weight"], theta["head.bias"]
    Wc, bc = gd_reference(W0, b0, x, y, cfg.lr, 2, 3)
    Wo, bo = gd_reference(Wc.float(), bc.float(), xf, yf, cfg.lr, 2, 3)
    expect_W = 2.0 * ((Wc - W0.double()) + (Wo - W0.double())) / 2
    assert torch.allclose(delta["head.weight"].double(), expect_W, atol=2e-5)


def test_task_zero_has_nothing_to_match():
    cfg = tiny_cfg(eta_t=1.5)
    model = linear_model()
    theta = float_state(model)
    x, y = torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 2] * 2)
    delta, _ = client_update(model, theta, new_state(0, cfg), x, y, (0, 1, 2), cfg)
    W, _ = gd_reference(theta["head.weight"], theta["head.bias"], x, y, cfg.lr, 2, 3)
    assert torch.allclose(delta["head.weight"].double(), 1.5 * (W - theta["head.weight"].double()), atol=1e-5)


def test_a_clients_update_depends_on_its_own_state_only():
    # every random draw (batch order, MixStyle) comes from ClientState.rng: client 1's update is the
    # same whether or not client 0 trained before it (what lets Flower run clients anywhere)
    cfg = tiny_cfg(method="stamp", batch_size=2, mixstyle=True)
    model = linear_model()
    theta = float_state(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 2, 2, generator=g), torch.tensor([0, 1] * 4)
    alone = client_update(model, theta, new_state(1, cfg), x, y, (0, 1), cfg)[0]
    client_update(model, theta, new_state(0, cfg), x, y, (0, 1), cfg)
    after_other = client_update(model, theta, new_state(1, cfg), x, y, (0, 1), cfg)[0]
    other_client = client_update(model, theta, new_state(0, cfg), x, y, (0, 1), cfg)[0]
    assert all(torch.equal(alone[n], after_other[n]) for n in alone)
    assert not torch.equal(alone["head.weight"], other_client["head.weight"])   # streams differ per client


def _updates(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(5, 4, generator=g), "b": torch.randn(3, generator=g)} for _ in range(n)]


def test_sam_with_identical_updates_is_fedavg_up_to_gms_closed_form_factor():
    theta = {"a": torch.zeros(5, 4), "b": torch.zeros(3)}
    u = _updates(1)[0]
    same = [u, {k: v.clone() for k, v in u.items()}, {k: v.clone() for k, v in u.items()}]
    for c in (0.0, 0.25, 0.5):
        cfg = replace(Config(), method="stamp", gm_c=c)
        sam, _ = aggregate(theta, same, [1, 2, 3], cfg)
        avg, _ = aggregate(theta, same, [1, 2, 3], replace(cfg, method="fedavg"))
        factor = (1 + c) / (1 + c * c)                           # GM of n equal vectors, METHOD §1.2
        for k in theta:
            assert torch.allclose(sam[k], factor * avg[k], rtol=1e-3, atol=1e-6)


def test_sam_with_c_zero_is_the_unweighted_mean_and_fedavg_weighs_by_samples():
    theta = {"a": torch.zeros(5, 4), "b": torch.zeros(3)}
    ups = _updates(3)
    sam, step = aggregate(theta, ups, [1, 1, 10], replace(Config(), method="stamp_sam", gm_c=0.0, eta_s=2.0))
    avg, _ = aggregate(theta, ups, [1, 1, 10], replace(Config(), method="fedavg"))
    for k in theta:
        assert torch.allclose(sam[k], 2.0 * sum(u[k] for u in ups) / 3, atol=1e-5)
        assert torch.allclose(avg[k], (ups[0][k] + ups[1][k] + 10 * ups[2][k]) / 12, atol=1e-6)


def test_participation_is_seeded_and_sized():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert participants(10, 0.3, g1) == participants(10, 0.3, g2)
    assert len(participants(10, 0.3, g1)) == 3 and len(participants(10, 0.01, g1)) == 1


def test_fedprox_penalty_is_zero_at_theta_with_gradient_mu_times_offset():
    model = linear_model()
    theta = float_state(model)
    loss = baselines.fedprox_loss(theta, mu=0.3)
    assert loss(model, None, None, None, None).item() == 0.0
    with torch.no_grad():
        model.head.weight.add_(1.0)
    loss(model, None, None, None, None).backward()
    assert torch.allclose(model.head.weight.grad, torch.full_like(model.head.weight, 0.3))


def test_ewc_penalty_is_zero_at_the_anchor_and_weighs_by_fisher():
    model = linear_model()
    extra = {}
    x, y = torch.randn(10, 1, 2, 2), torch.randint(0, 3, (10,))
    baselines.ewc_update_state(model, x, y, extra)
    # reference Fisher: per-sample squared gradients of the log-likelihood, averaged
    ref = torch.zeros_like(model.head.weight)
    for i in range(10):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        ref += model.head.weight.grad ** 2 / 10
    assert torch.allclose(extra["ewc_fisher"]["head.weight"], ref, atol=1e-7)
    pen = baselines.ewc_loss(extra, lam=5.0, device="cpu")
    assert pen(model, None, None, None, None).item() == 0.0
    with torch.no_grad():
        model.head.bias.add_(0.5)
    expect = 0.5 * 5.0 * (extra["ewc_fisher"]["head.bias"] * 0.25).sum()
    assert torch.allclose(pen(model, None, None, None, None), expect)


def test_lwf_loss_is_zero_when_the_model_is_the_old_model():
    model = linear_model()
    old = linear_model()
    old.load_state_dict(model.state_dict())
    x = torch.randn(5, 1, 2, 2)
    logits = model(x)
    assert abs(baselines.lwf_loss(old, {0, 1}, 1.0, 2.0)(model, None, logits, x, None).item()) < 1e-7
    assert baselines.lwf_loss(old, set(), 1.0, 2.0) is None


def test_agem_projection_never_disagrees_with_the_buffer_gradient():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        a, r = torch.randn(50, generator=g), torch.randn(50, generator=g)
        p = baselines.agem_project(a, r)
        assert torch.dot(p, r) >= -1e-5
        if torch.dot(a, r) >= 0:
            assert torch.equal(p, a)
        else:                                   # the closest such vector: remove the r component only
            assert torch.allclose(p + torch.dot(a, r) / torch.dot(r, r) * r, a, atol=1e-5)


def test_replay_trains_on_the_buffer_too():
    cfg = tiny_cfg(method="replay", batch_size=4)
    model, theta, state, x, y = two_task_client(cfg)
    bx, by = next((xm, ym) for _, xm, ym in state.buffer)
    assert sorted(by.tolist()) == [0, 0, 0, 1, 1, 1]
    rng = torch.Generator().set_state(state.rng.get_state())       # the draws client_update will make
    delta, _ = client_update(model, theta, state, x, y, (2,), cfg)
    load_state(model, theta)                                     # reference: plain SGD on task + buffer
    local_train(model, torch.cat([x, bx]), torch.cat([y, by]), cfg.local_epochs, cfg.batch_size, cfg.lr, rng)
    expect = float_state(model)
    for n in theta:
        assert torch.equal(delta[n], expect[n] - theta[n]), n


def test_protonet_loss_by_hand_and_at_any_class_count():
    z = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 1.0], [9.0, 9.0]])
    y = torch.tensor([0, 0, 1, 1, 2])                    # class 2 has one image: not used
    loss = protonet_loss(1.0)(None, z, None, None, y)
    p0, p1 = z[0], z[2]                                 # supports (first half of each class)
    q = torch.stack([z[1], z[3]])
    d = torch.cdist(q, torch.stack([p0, p1])) ** 2
    expect = torch.nn.functional.cross_entropy(-d, torch.tensor([0, 1]))
    assert torch.allclose(loss, expect)
    assert protonet_loss(1.0)(None, z[:2], None, None, y[:2]).item() == 0.0   # one class in the batch


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(method):
    res = run(Config(method=method, num_clients=2, num_tasks=2, rounds_per_task=1, local_epochs=1,
                     buffer_per_class=3, ewc_fisher_samples=32, quiet=True, protonet_weight=0.1 if method == "stamp" else 0.0))
    A = res["acc_matrix"]
    assert all(0 <= a <= 1 for a in (A[0][0], A[1][0], A[1][1]))
    r = res["rounds"][-1]
    assert -1 <= r["spatial_cos"] <= 1 and -1 <= r["spatial_agreement"] <= 1
    if method in ("stamp", "stamp_tam"):
        assert -1 <= r["temporal_cos"] <= 1 and res["buffer_bytes"] > 0
    else:
        assert math.isnan(r["temporal_cos"])


def bn_model(seed=0):
    """A tiny conv + BatchNorm Classifier: its state holds running statistics besides weights."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    return Classifier(body, 4 * 2 * 2, 3, mean=(0.0,), std=(1.0,), early_block="body.0")


def test_tam_matches_weights_only_and_keeps_batchnorm_statistics_as_trained():
    cfg = tiny_cfg(eta_t=2.0, batch_size=4)
    g = torch.Generator().manual_seed(0)
    model = bn_model()
    theta = float_state(model)
    state = new_state(0, cfg)
    state.seen.append((0, 1))
    end_task(model, theta, state, torch.randn(8, 1, 2, 2, generator=g), torch.tensor([0, 1] * 4), (0, 1), cfg)
    x, y = torch.randn(6, 1, 2, 2, generator=g), torch.tensor([2] * 6)
    delta, _ = client_update(model, theta, state, x, y, (2,), cfg)
    # the current-task clone alone, replayed with the same generator: its statistics must be what we got
    from stamp_min.client import train_from
    d_cur, _ = train_from(model, theta, theta, x, y, cfg, new_state(0, cfg).rng)   # the client's fresh stream
    for name in ("body.1.running_mean", "body.1.running_var"):
        assert torch.equal(delta[name], d_cur[name])
    assert (theta["body.1.running_var"] + delta["body.1.running_var"]).min() > 0


def test_sam_averages_batchnorm_statistics_like_fedavg():
    theta = {"w": torch.zeros(3), "running_var": torch.ones(3)}
    ups = [{"w": torch.tensor([1.0, 0, 0]), "running_var": torch.tensor([-0.5, 0.1, 0.2])},
           {"w": torch.tensor([-1.0, 1, 0]), "running_var": torch.tensor([-0.1, 0.3, 0.0])}]
    new, step = aggregate(theta, ups, [1, 3], replace(Config(), method="stamp", eta_s=3.0), params=["w"])
    assert torch.allclose(step["running_var"], (ups[0]["running_var"] + 3 * ups[1]["running_var"]) / 4)
    assert not torch.allclose(step["w"], (ups[0]["w"] + 3 * ups[1]["w"]) / 4)   # the weights are matched


def test_batches_never_end_with_a_single_image():
    from stamp_min.client import batches
    for n in (1, 2, 17, 33, 40):
        parts = batches(n, 16, torch.Generator().manual_seed(0))
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
        assert n == 1 or all(len(p) > 1 for p in parts)


def test_lwf_loss_equals_the_hand_computed_distillation():
    old, model = linear_model(seed=1), linear_model(seed=2)
    x = torch.randn(4, 1, 2, 2)
    logits = model(x)
    T, alpha, cols = 2.0, 0.7, [0, 2]
    with torch.no_grad():
        q = torch.softmax(old(x)[:, cols] / T, dim=1)                   # teacher
    p = torch.softmax(logits[:, cols] / T, dim=1)                      # student
    kl = (q * (q.log() - p.log())).sum(1).mean()                       # KL(q || p), batch mean
    got = baselines.lwf_loss(old, {0, 2}, alpha, T)(model, None, logits, x, None)
    assert torch.allclose(got, alpha * T * T * kl, atol=1e-6)


def test_agem_hook_writes_back_a_gradient_that_agrees_with_the_buffer():
    model = linear_model()
    g = torch.Generator().manual_seed(0)
    bx, by = torch.randn(5, 1, 2, 2, generator=g), torch.tensor([0, 0, 1, 1, 0])
    x, y = torch.randn(5, 1, 2, 2, generator=g), torch.tensor([2] * 5)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    g_old = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = linear_model()
    ref.load_state_dict(model.state_dict())
    torch.nn.functional.cross_entropy(ref(bx), by).backward()         # the buffer gradient, independently
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert torch.dot(g_old, g_ref) < 0                                 # the case A-GEM exists for
    hook = baselines.agem_hook(bx, by, batch_size=5, generator=torch.Generator().manual_seed(0))
    hook(model)
    g_new = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(g_new, baselines.agem_project(g_old, g_ref), atol=1e-6)
    assert torch.dot(g_new, g_ref) >= -1e-6


def test_agreement_is_the_mean_cosine():
    from stamp_min.gradmatch import agreement
    ups = _updates(4, seed=3)
    step = {"a": torch.randn(5, 4), "b": torch.randn(3)}
    flat = lambda d: torch.cat([d["a"].flatten(), d["b"]])
    ref = sum(torch.nn.functional.cosine_similarity(flat(u), flat(step), dim=0) for u in ups) / 4
    assert agreement(ups, step) == pytest.approx(ref.item(), abs=1e-6)
