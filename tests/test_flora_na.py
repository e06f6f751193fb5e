"""Federated LoRA aggregation and FLoRA-NA (stamp_min/flora_na.py) against closed forms, the dense
matrices, torch.linalg.svd (Eckart–Young), and a smoke run of the CLI."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from stamp_min import flora_na as F
from stamp_min.flora_loop import train
from stamp_min.lora import fold_into_base, get_lora, inject_lora, set_lora

f64 = torch.float64


def clients(U=5, d=12, k=9, r=3, seed=0, spread=1.0):
    """Heterogeneous clients started from (A0, B0): A_u = A0 + ΔA_u, B_u = B0 + ΔB_u (float64)."""
    g = torch.Generator().manual_seed(seed)
    A0, B0 = torch.randn(r, k, generator=g, dtype=f64), torch.randn(d, r, generator=g, dtype=f64)
    As = A0 + spread * torch.randn(U, r, k, generator=g, dtype=f64)
    Bs = B0 + spread * torch.randn(U, d, r, generator=g, dtype=f64)
    w = torch.rand(U, generator=g, dtype=f64) + 0.1
    return As, Bs, w / w.sum(), A0, B0


def dense_rel(As, Bs, w, A_hat, B_hat):
    T = F.target(As, Bs, w)
    return float((T - B_hat @ A_hat).pow(2).sum() / T.pow(2).sum())


def eckart_young(As, Bs, w, r):
    S = torch.linalg.svdvals(F.target(As, Bs, w))
    return float(S[r:].pow(2).sum() / S.pow(2).sum())


def test_cross_term_identity():
    As, Bs, w, *_ = clients()
    Abar, Bbar = torch.einsum("u,urk->rk", w, As), torch.einsum("u,udr->dr", w, Bs)
    torch.testing.assert_close(F.target(As, Bs, w) - Bbar @ Abar, F.cross_term(As, Bs, w), rtol=0, atol=1e-12)


def test_gram_trick_objective_and_residual_equal_the_dense_ones():
    As, Bs, w, A0, B0 = clients()
    g = torch.Generator().manual_seed(3)
    p, q = 0.5 + torch.rand(5, generator=g, dtype=f64), 0.5 + torch.rand(5, generator=g, dtype=f64)
    A_hat, B_hat = A0 + torch.einsum("u,urk->rk", w * p, As - A0), B0 + torch.einsum("u,udr->dr", w * q, Bs - B0)
    dense = dense_rel(As, Bs, w, A_hat, B_hat)
    assert F.objective(As, Bs, w, A0, B0, p, q) == pytest.approx(dense, rel=1e-10)
    assert F.residual(As, Bs, w, A_hat, B_hat) == pytest.approx(dense, rel=1e-10)
    # two modules of different shapes, per-module scalars: J is the sum of the modules' relative residuals
    As2, Bs2, _, A02, B02 = clients(d=7, k=15, seed=1)
    P, Q = torch.stack([p, q]), torch.stack([q, p])
    A2 = A02 + torch.einsum("u,urk->rk", w * P[1], As2 - A02)
    B2 = B02 + torch.einsum("u,udr->dr", w * Q[1], Bs2 - B02)
    A1 = A0 + torch.einsum("u,urk->rk", w * P[0], As - A0)
    B1 = B0 + torch.einsum("u,udr->dr", w * Q[0], Bs - B0)
    both = F.objective([As, As2], [Bs, Bs2], w, [A0, A02], [B0, B02], P, Q)
    assert both == pytest.approx(dense_rel(As, Bs, w, A1, B1) + dense_rel(As2, Bs2, w, A2, B2), rel=1e-10)


@pytest.mark.parametrize("solver", F.SOLVERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flora_na_between_svd_bound_and_fedit(solver, seed):
    As, Bs, w, A0, B0 = clients(seed=seed)
    est = F.estimate(As, Bs, w, A0, B0, solver=solver)
    Abar, Bbar = torch.einsum("u,urk->rk", w, As), torch.einsum("u,udr->dr", w, Bs)
    fedit = dense_rel(As, Bs, w, Abar, Bbar)
    ours = dense_rel(As, Bs, w, est.A[0], est.B[0])
    bound = eckart_young(As, Bs, w, 3)
    assert est.fedit_objective == pytest.approx(fedit, rel=1e-10)      # p = q = 1 is FedIT
    assert est.objective == pytest.approx(ours, rel=1e-10)
    assert bound - 1e-12 <= ours <= fedit + 1e-12
    assert ours < 0.99 * fedit                                         # it does learn something here
    A_svd, B_svd = F.svd_oracle(As, Bs, w, 3)                          # the oracle attains the bound
    assert dense_rel(As, Bs, w, A_svd, B_svd) == pytest.approx(bound, rel=1e-9)
    assert F.residual(As, Bs, w, A_svd, B_svd) == pytest.approx(bound, rel=1e-9)


def test_per_module_scalars():
    As, Bs, w, A0, B0 = clients(seed=8)
    As2, Bs2, _, A02, B02 = clients(d=7, k=15, seed=9)
    shared = F.estimate([As, As2], [Bs, Bs2], w, [A0, A02], [B0, B02], solver="als")
    per = F.estimate([As, As2], [Bs, Bs2], w, [A0, A02], [B0, B02], solver="als", per_module=True)
    assert shared.p.shape == (5,) and per.p.shape == per.q.shape == (2, 5)
    assert per.objective <= shared.objective <= shared.fedit_objective
    assert per.objective == pytest.approx(F.residual([As, As2], [Bs, Bs2], w, per.A, per.B), rel=1e-9)
    one = F.estimate(As, Bs, w, A0, B0, solver="als", per_module=True)   # one module: the same problem
    torch.testing.assert_close(one.p[0], F.estimate(As, Bs, w, A0, B0, solver="als").p)


def test_als_reaches_a_stationary_point():
    As, Bs, w, A0, B0 = clients(seed=4)
    est = F.estimate(As, Bs, w, A0, B0, solver="als", sweeps=30)
    p, q = est.p[None].clone().requires_grad_(True), est.q[None].clone().requires_grad_(True)
    F.J(F.setup(As, Bs, w, A0, B0), p, q).backward()
    assert p.grad.abs().max() < 1e-8 and q.grad.abs().max() < 1e-8


def exact_cases():
    As, Bs, w, A0, B0 = clients(seed=5)
    yield "one client", As[:1], Bs[:1], torch.ones(1, dtype=f64), A0, B0
    yield "identical clients", As[:1].expand(5, -1, -1), Bs[:1].expand(5, -1, -1), w, A0, B0
    yield "all A equal", As[:1].expand(5, -1, -1), Bs, w, A0, B0
    yield "all B equal", As, Bs[:1].expand(5, -1, -1), w, A0, B0


@pytest.mark.parametrize("solver", F.SOLVERS)
@pytest.mark.parametrize("case", list(exact_cases()), ids=lambda c: c[0])
def test_flora_na_exact_cases(case, solver):
    _, As, Bs, w, A0, B0 = case
    est = F.estimate(As, Bs, w, A0, B0, solver=solver)
    assert dense_rel(As, Bs, w, est.A[0], est.B[0]) < 1e-20
    # the Gram-trick J is vec(D)ᵀ K vec(D), a sum of O(1) terms that cancel (D ≠ 0 in coefficient
    # space, K singular): its rounding floor is a few float64 eps, not the dense 1e-32
    assert est.objective < 50 * torch.finfo(f64).eps


@pytest.mark.parametrize("solver", F.SOLVERS)
def test_permuting_clients_permutes_p_q_and_keeps_the_result(solver):
    As, Bs, w, A0, B0 = clients(seed=6)
    perm = torch.tensor([3, 0, 4, 1, 2])
    # ALS converges linearly: after the default 10 sweeps p is still moving by ~1e-9, and two client
    # orders round differently on the way. Compare converged solutions (40 sweeps: moves < 1e-11).
    a = F.estimate(As, Bs, w, A0, B0, solver=solver, sweeps=40)
    b = F.estimate(As[perm], Bs[perm], w[perm], A0, B0, solver=solver, sweeps=40)
    assert a.objective == pytest.approx(b.objective, rel=1e-13)
    torch.testing.assert_close(b.p, a.p[perm], rtol=0, atol=1e-8)
    torch.testing.assert_close(b.q, a.q[perm], rtol=0, atol=1e-8)
    torch.testing.assert_close(b.A[0], a.A[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(b.B[0], a.B[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("solver", F.SOLVERS)
def test_no_nan_when_an_increment_is_zero(solver):
    As, Bs, w, A0, B0 = clients(seed=7)
    As[2], Bs[2] = A0, B0                                   # client 2 did not move
    est = F.estimate(As, Bs, w, A0, B0, solver=solver)
    assert torch.isfinite(est.p).all() and torch.isfinite(est.q).all() and est.objective <= est.fedit_objective
    zero = torch.zeros_like(B0)                             # nobody moved and B0 = 0: T = 0
    est = F.estimate(A0.expand(5, -1, -1), zero.expand(5, -1, -1), w, A0, zero, solver=solver)
    assert est.objective == 0.0 and torch.isfinite(est.A[0]).all() and torch.isfinite(est.B[0]).all()
    assert F.residual(A0.expand(5, -1, -1), zero.expand(5, -1, -1), w, est.A[0], est.B[0]) == 0.0


# ---- the server rules of §2.3 in a real model --------------------------------------------------

def lora_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    inject_lora(net, "*", r=2, alpha=4)
    return net


def client_factors(net, U=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = get_lora(net)
    return start, [{n: (A + torch.randn(A.shape, generator=g, dtype=f64), B + torch.randn(B.shape, generator=g, dtype=f64))
                    for n, (A, B) in start.items()} for _ in range(U)]


@pytest.mark.parametrize("method", ["flora", "fedex"])
def test_flora_and_fedex_reproduce_the_ideal_update_in_the_forward_pass(method):
    net = lora_net()
    start, cl = client_factors(net)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=f64) / 10
    x = torch.randn(5, 6, dtype=f64)
    ideal = lora_net()                                      # the same W0, with W0 + s Σ w_u B_u A_u in it
    fold_into_base(ideal, {n: F.target(*F._stack(cl, n), w) for n in start})
    set_lora(ideal, {n: (A, torch.zeros_like(B)) for n, (A, B) in start.items()})
    agg = F.aggregate_lora(method, start, cl, w, generator=torch.Generator().manual_seed(0))
    fold_into_base(net, agg.base_delta)
    set_lora(net, agg.lora)
    torch.testing.assert_close(net(x), ideal(x), rtol=0, atol=1e-12)
    if method == "flora":                                   # re-initialised adapters: fresh A, B = 0
        assert all(torch.count_nonzero(B) == 0 and not torch.equal(A, start[n][0]) for n, (A, B) in agg.lora.items())


def test_ffa_keeps_A_bitwise_and_fedsa_never_touches_client_B():
    net = lora_net()
    start, cl = client_factors(net)
    w = torch.full((4,), 0.25, dtype=f64)
    agg = F.aggregate_lora("ffa", start, cl, w)
    assert all(torch.equal(agg.lora[n][0], start[n][0]) for n in start)
    torch.testing.assert_close(agg.lora["0"][1], sum(c["0"][1] for c in cl) / 4)
    # FFA's clients train B only: A is bitwise unchanged by local SGD too
    for m in net.modules():
        if hasattr(m, "A"):
            m.A.requires_grad_(False)
    before = get_lora(net)
    x, y = torch.randn(32, 6, dtype=f64), torch.randint(0, 3, (32,))
    train(net, x, y, epochs=2, batch_size=8, lr=0.1, gen=torch.Generator().manual_seed(0))
    after = get_lora(net)
    assert all(torch.equal(after[n][0], before[n][0]) and not torch.equal(after[n][1], before[n][1]) for n in before)

    copies = [{n: (A.clone(), B.clone()) for n, (A, B) in c.items()} for c in cl]
    agg = F.aggregate_lora("fedsa", start, cl, w)
    for u, c in enumerate(cl):
        for n in c:
            assert agg.client_B[u][n] is c[n][1] and torch.equal(c[n][1], copies[u][n][1])
    assert all(B is None for _, B in agg.lora.values())
    torch.testing.assert_close(agg.lora["0"][0], sum(c["0"][0] for c in cl) / 4)


def test_flora_na_and_svd_through_aggregate_lora():
    net = lora_net()
    start, cl = client_factors(net)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=f64)
    fedit = F.aggregate_lora("fedit", start, cl, w)
    ours = F.aggregate_lora("flora_na", start, cl, w)
    svd = F.aggregate_lora("svd", start, cl, w)
    stacks = {n: F._stack(cl, n) for n in start}

    def res(agg):
        return sum(F.residual(*stacks[n], w, A, B) for n, (A, B) in agg.lora.items())
    assert res(svd) <= res(ours) <= res(fedit)
    assert res(ours) == pytest.approx(ours.info["objective"], rel=1e-9)
    assert len(ours.info["p"]) == 4 and len(ours.info["q"]) == 4


def test_payload_matches_method_table():
    shapes = {"a": (10, 20, 2), "b": (5, 7, 3)}            # (d, k, r)
    U, full = 4, 2 * 30 + 3 * 12
    expect = {"fedit": (full, full), "svd": (full, full), "flora_na": (full, full),
              "ffa": (2 * 10 + 3 * 5, 2 * 10 + 3 * 5), "fedsa": (2 * 20 + 3 * 7, 2 * 20 + 3 * 7),
              "flora": (full, U * full), "fedex": (full, full + 10 * 20 + 5 * 7)}
    assert set(expect) == set(F.AGGREGATORS)
    for m, (up, down) in expect.items():
        assert F.payload(m, shapes, U) == (4 * up, 4 * down), m


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stamp_min.flora_loop", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_smoke(tmp_path):
    out = tmp_path / "r.json"
    p = run_cli("--aggregator", "flora_na", "--seed", "1", "--rounds", "2", "--num-clients", "3",
                "--pretrain-epochs", "1", "--local-epochs", "1", "--solver-steps", "5", "--quiet", "true",
                "--out", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    for key in ("config", "accuracy", "residual", "residual_of_update", "bytes_up", "bytes_down",
                "server_time_s", "p", "q", "final_accuracy", "versions"):
        assert key in res, key
    assert len(res["residual"]) == len(res["accuracy"]) == 2 and len(res["p"][0]) == 3
    assert res["config"]["seed"] == 1


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    p = run_cli("--aggregator", "fedavg", cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: aggregator='fedavg'") and "flora_na" in lines[0]
    p = run_cli("--aggregator", "fedit", "--solver", "sgd", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: solver='sgd'")
    assert not (tmp_path / "results").exists()
