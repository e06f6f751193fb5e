"""The baselines' conventions (baselines.py), each against a hand-computed reference on a softmax
regression, where every per-image gradient has a closed form: ∂(−log p_y)/∂W = (p − e_y) xᵀ,
∂/∂b = p − e_y. Two tasks, fixed tensors; no other library needed (bench/baselines_check.py
cross-checks against Avalanche when it is installed)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from stamp_min import UserError, baselines
from stamp_min.client import client_update, float_state, load_state, local_train
from stamp_min.fcl_loop import Config, run
from test_stamp import linear_model, tiny_cfg, two_task_client

K = 3


def per_image_grads(model, x, y):
    """(n, K, D) and (n, K): the closed-form per-image gradients of −log p(y|x) for W and b."""
    X = x.flatten(1).double()
    W, b = model.head.weight.detach().double(), model.head.bias.detach().double()
    E = torch.softmax(X @ W.T + b, dim=1) - F.one_hot(y, K).double()         # (n, K)
    return E[:, :, None] * X[:, None, :], E


def closed_form_fisher(model, x, y):
    gW, gb = per_image_grads(model, x, y)
    return {"head.weight": (gW ** 2).mean(0), "head.bias": (gb ** 2).mean(0)}


def class_sorted_task(n_per_class=(120, 100, 90), seed=0):
    """A task whose images arrive sorted by class (as make_scenario hands them), 310 images > 256."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    x = torch.randn(len(y), 1, 2, 2, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


def test_fisher_sees_every_image_of_a_class_sorted_task():
    model = linear_model()
    x, y = class_sorted_task()
    got = baselines.fisher_diagonal(model, x, y)
    ref = closed_form_fisher(model, x, y)
    for n in ref:
        assert torch.allclose(got[n].double(), ref[n], rtol=1e-5, atol=1e-8), n
    # what the old x[:256] saw is far from it: the test separates the two
    first = closed_form_fisher(model, x[:256], y[:256])
    assert (first["head.weight"] - ref["head.weight"]).abs().sum() / ref["head.weight"].abs().sum() > 0.05


def test_stratified_sample_shares_by_largest_remainder_and_is_seeded():
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    # quotas 5·5/10 = 2.5, 1.5, 1.0 -> floors 2, 1, 1; the spare image goes to the larger remainder,
    # a tie between classes 0 and 1 broken towards class 0 -> 3, 1, 1
    idx = baselines.stratified_sample(y, 5, torch.Generator().manual_seed(0))
    assert torch.bincount(y[idx], minlength=3).tolist() == [3, 1, 1]
    assert len(set(idx.tolist())) == 5
    again = baselines.stratified_sample(y, 5, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    x, yy = class_sorted_task()
    idx = baselines.stratified_sample(yy, 31, torch.Generator().manual_seed(1))
    assert torch.bincount(yy[idx], minlength=3).tolist() == [12, 10, 9]


def test_capped_fisher_is_the_fisher_of_the_stratified_sample():
    model = linear_model()
    x, y = class_sorted_task()
    got = baselines.fisher_diagonal(model, x, y, max_samples=50, generator=torch.Generator().manual_seed(3))
    idx = baselines.stratified_sample(y, 50, torch.Generator().manual_seed(3))
    ref = closed_form_fisher(model, x[idx], y[idx])
    for n in ref:
        assert torch.allclose(got[n].double(), ref[n], rtol=1e-5, atol=1e-8), n


def two_tasks_of_ewc(mode):
    """EWC's state after two tasks of a softmax regression whose weights move between them, the
    weights w at which the penalty is then evaluated, and the two tasks' (Fisher, anchor)."""
    model = linear_model()
    g = torch.Generator().manual_seed(0)
    tasks = [(torch.randn(7, 1, 2, 2, generator=g), torch.tensor([0, 1, 0, 1, 0, 1, 1])),
             (torch.randn(6, 1, 2, 2, generator=g), torch.tensor([2, 2, 0, 2, 1, 2]))]
    extra, pairs = {}, []
    for x, y in tasks:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        pairs.append((closed_form_fisher(model, x, y), {n: p.detach().double().clone() for n, p in model.named_parameters()}))
        baselines.ewc_update_state(model, x, y, extra, mode)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model, extra, pairs


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_ewc_penalty_by_hand_after_two_tasks(mode):
    lam = 4.0
    model, extra, ((F1, a1), (F2, a2)) = two_tasks_of_ewc(mode)
    w = {n: p.detach().double() for n, p in model.named_parameters()}
    if mode == "online":       # (λ/2) Σ (F1 + F2)(w − w*_2)²: summed Fisher, the latest anchor
        ref = 0.5 * lam * sum(((F1[n] + F2[n]) * (w[n] - a2[n]) ** 2).sum() for n in w)
    else:                      # (λ/2) Σ_j Σ F_j (w − w*_j)²: one penalty per task
        ref = 0.5 * lam * sum((Fj[n] * (w[n] - aj[n]) ** 2).sum() for Fj, aj in ((F1, a1), (F2, a2)) for n in w)
    got = baselines.ewc_loss(extra, lam, "cpu")(model, None, None, None, None)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    other = two_tasks_of_ewc("separate" if mode == "online" else "online")[1]
    assert baselines.ewc_loss(other, lam, "cpu")(model, None, None, None, None).item() != pytest.approx(ref.item(), rel=1e-3)


def test_ewc_modes_agree_after_one_task_and_there_is_no_penalty_before():
    assert baselines.ewc_loss({}, 1.0, "cpu") is None
    model = linear_model()
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    on, sep = {}, {}
    baselines.ewc_update_state(model, x, y, on, "online")
    baselines.ewc_update_state(model, x, y, sep, "separate")
    with torch.no_grad():
        model.head.bias.add_(1.0)
    assert baselines.ewc_loss(on, 2.0, "cpu")(model, None, None, None, None).item() == \
        baselines.ewc_loss(sep, 2.0, "cpu")(model, None, None, None, None).item()


@pytest.mark.parametrize("t2", [True, False])
def test_lwf_weight_with_and_without_t_squared(t2):
    old, model = linear_model(seed=1), linear_model(seed=2)
    x = torch.randn(4, 1, 2, 2)
    logits = model(x)
    T, alpha, cols = 3.0, 0.7, [0, 2]
    with torch.no_grad():
        q = torch.softmax(old(x)[:, cols] / T, dim=1)
    p = torch.softmax(logits[:, cols] / T, dim=1)
    kl = (q * (q.log() - p.log())).sum(1).mean()
    got = baselines.lwf_loss(old, {0, 2}, alpha, T, t2=t2)(model, None, logits, x, None)
    assert torch.allclose(got, alpha * (T * T if t2 else 1.0) * kl, atol=1e-6)


def test_agem_reference_batch_has_the_asked_size():
    """With a reference batch as large as the buffer, g_ref is the whole-buffer gradient (closed form)."""
    model = linear_model()
    g = torch.Generator().manual_seed(0)
    bx, by = torch.randn(9, 1, 2, 2, generator=g), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0])
    x, y = torch.randn(4, 1, 2, 2, generator=g), torch.tensor([2] * 4)
    F.cross_entropy(model(x), y).backward()
    flat = lambda gw, gb: torch.cat([gw.flatten(), gb])                       # noqa: E731  (W then b: parameter order)
    gW, gb = per_image_grads(model, x, y)
    g_cur = flat(gW.mean(0), gb.mean(0))
    rW, rb = per_image_grads(model, bx, by)
    g_ref = flat(rW.mean(0), rb.mean(0))
    assert torch.dot(g_cur, g_ref) < 0
    baselines.agem_hook(bx, by, 9, torch.Generator().manual_seed(1))(model)
    got = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    assert torch.allclose(got, baselines.agem_project(g_cur, g_ref), atol=1e-6)
    # a reference batch of 3 images: the projection is against those 3 (drawn by the generator)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    gen = torch.Generator().manual_seed(2)
    idx = torch.randperm(9, generator=torch.Generator().set_state(gen.get_state()))[:3]
    baselines.agem_hook(bx, by, 3, gen)(model)
    rW, rb = per_image_grads(model, bx[idx], by[idx])
    got = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    assert torch.allclose(got, baselines.agem_project(g_cur, flat(rW.mean(0), rb.mean(0))), atol=1e-6)


def test_replay_share_sizes_and_draws():
    assert [baselines.replay_per_batch(16, s) for s in (0.0, 0.2, 0.5, 0.75)] == [0, 4, 16, 48]
    draws = baselines.replay_draws(5, 3, torch.Generator().manual_seed(0))
    seq = torch.cat([next(draws) for _ in range(10)])                         # 30 draws = 6 passes of 5
    for i in range(0, 30, 5):
        assert sorted(seq[i:i + 5].tolist()) == [0, 1, 2, 3, 4]               # each pass sees every image once


def test_every_batch_holds_its_share_of_buffer_images():
    seen = []
    x, y = torch.randn(20, 1, 2, 2), torch.full((20,), 2)
    xm, ym = torch.randn(6, 1, 2, 2), torch.tensor([0, 1] * 3)
    record = lambda model, z, logits, xb, yb: (seen.append(yb.clone()), z.sum() * 0)[1]   # noqa: E731
    local_train(linear_model(), x, y, 1, 4, 0.1, torch.Generator().manual_seed(0), extra_losses=[record],
                memory=(xm, ym, 4))
    assert len(seen) == 5
    assert all((b[:4] == 2).all() and (b[4:] != 2).all() and len(b) == 8 for b in seen)


def test_one_replay_step_equals_gradient_descent_on_task_and_buffer_by_hand():
    """One batch holding the whole task and, with m = buffer size, the whole buffer: one SGD step
    equals one gradient-descent step on the union, written out by hand."""
    from test_stamp import gd_reference
    model = linear_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 2, 2, generator=g), torch.tensor([2] * 6)
    xm, ym = torch.randn(4, 1, 2, 2, generator=g), torch.tensor([0, 1, 0, 1])
    W, b = gd_reference(model.head.weight.detach(), model.head.bias.detach(), torch.cat([x, xm]),
                        torch.cat([y, ym]), 0.5, 1, K)
    local_train(model, x, y, 1, 6, 0.5, torch.Generator().manual_seed(0), memory=(xm, ym, 4))
    assert torch.allclose(model.head.weight.double(), W, atol=1e-6)
    assert torch.allclose(model.head.bias.double(), b, atol=1e-6)


def test_client_update_with_a_replay_share_joins_the_buffer_to_every_batch():
    cfg = tiny_cfg(method="replay", batch_size=2, replay_share=0.5)
    model, theta, state, x, y = two_task_client(cfg)
    bx = torch.cat([xm for _, xm, _ in state.buffer])
    by = torch.cat([ym for _, _, ym in state.buffer])
    rng = torch.Generator().set_state(state.rng.get_state())
    delta, _ = client_update(model, theta, state, x, y, (2,), cfg)
    load_state(model, theta)                                       # reference: the same draws, by hand
    local_train(model, x, y, cfg.local_epochs, 2, cfg.lr, rng, memory=(bx, by, 2))
    expect = float_state(model)
    for n in theta:
        assert torch.equal(delta[n], expect[n] - theta[n]), n


def test_the_conventions_are_settings_with_checked_values():
    for bad in (dict(replay_share=0.95), dict(replay_share=-0.1), dict(ewc_mode="per-task"),
                dict(agem_ref_size=-1), dict(ewc_fisher_samples=-5), dict(lwf_t2="yes")):
        with pytest.raises(UserError):
            replace(Config(), **bad).validate()


@pytest.mark.parametrize("setting", [dict(method="ewc", ewc_mode="separate", ewc_fisher_samples=20),
                                     dict(method="lwf", lwf_t2=False), dict(method="agem", agem_ref_size=7),
                                     dict(method="replay", replay_share=0.5)])
def test_every_convention_runs_through_the_loop(setting):
    from conftest import toy_dataset
    res = run(Config(num_clients=2, num_tasks=2, rounds_per_task=1, local_epochs=1, buffer_per_class=3, quiet=True,
                     plot=False, **setting), toy_dataset())
    assert 0 <= res["avg_accuracy"] <= 1 and all(res["config"][k] == v for k, v in setting.items())
