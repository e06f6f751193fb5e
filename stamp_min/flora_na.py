"""Federated LoRA aggregation and FLoRA-NA's nearly accurate estimate (METHOD Part 2).

Clients u = 1..U with weights w_u (Σ w_u = 1) fine-tune LoRA factors A_u (r×k), B_u (d×r) of
every adapted layer (lora.py) and send them back. What the server would like to apply is

    P = Σ_u w_u B_u A_u          (the ideal aggregate, d×k; METHOD.md's T: in the course T counts tasks)

but averaging the factors separately (FedIT) gives B̄Ā, and (METHOD §2.1, the cross term)

    P − B̄Ā = ½ Σ_u Σ_v w_u w_v (B_u − B_v)(A_u − A_v).

FLoRA-NA (§2.2) keeps FedIT's payload and shape but rescales each client's increment by a scalar
learned on the server, p_u for A and q_u for B (shared by all modules unless per_module=True):

    Â(p) = A_prev + Σ_u w_u p_u ΔA_u,   B̂(q) = B_prev + Σ_u w_u q_u ΔB_u,   ΔA_u = A_u − A_prev
    J(p, q) = Σ_modules ||P − B̂(q) Â(p)||²_F / (||P||²_F + ε)

p = q = 1 is FedIT. The Gram trick: with X = [A_prev, ΔA_1..ΔA_U] and Y = [B_prev, ΔB_1..ΔB_U],
both P and B̂Â are combinations Σ_{j,i} C_ji Y_j X_i of the (U+1)² products Y_j X_i, with

    C_00 = 1, C_0u = C_u0 = C_uu = w_u (else 0)      for P,     C = b aᵀ for B̂Â,
    a = [1, w∘p], b = [1, w∘q].

So ||Σ D_ji Y_j X_i||² = Σ D_ji D_lm tr((Y_jᵀY_l)(X_m X_iᵀ)) needs only r×r Gram blocks: the d×k
matrix P is never formed. They are collected once into K, the (U+1)²×(U+1)² Gram matrix of the
products (`products_gram`); then J(p, q) = vec(D)ᵀ K vec(D) with D = C − b aᵀ, O(U⁴) per solver step
whatever d, k, r are (memory (U+1)⁴ numbers per module: 15k at U = 10, 7M at U = 50). Solvers: AdamW
(lr 1e-2, 200 steps from p = q = 1, best iterate kept) or alternating least squares (J is quadratic
in q for fixed p and vice versa, so one Newton step with the pseudo-inverse Hessian is the exact
block minimiser). The start p = q = 1 is FedIT and the best iterate is returned, so FLoRA-NA is
never worse than FedIT (the guard).

Choices METHOD leaves open, made here: the server math runs in float64 (the Grams are tiny); AdamW's
weight decay is 0 (a decay pulls p, q towards 0, not towards FedIT's 1); ε = 1e-12; the relative
residual is summed over modules, each module normalised by its own ||P||².

The other server rules (§2.3) and their payloads are `aggregate_lora(method, ...)` and
`payload(method, ...)`. The experiment and its CLI: flora_loop.py, `python -m stamp_min.flora_loop`.
"""

from dataclasses import dataclass, field

import torch

from . import UserError
from .lora import init_A

AGGREGATORS = ("fedit", "ffa", "fedsa", "flora", "fedex", "svd", "flora_na")
SOLVERS = ("adamw", "als")
EPS = 1e-12


def _list(x):
    return [x] if torch.is_tensor(x) else list(x)


def _w(weights):
    """Client weights as float64 summing to 1 (every public function normalises them)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    return w / w.sum()


# ------------------------------------ the ideal aggregate, dense (small sizes: teaching and tests)
def target(As, Bs, w):
    """P = Σ_u w_u B_u A_u for one module. As (U, r, k), Bs (U, d, r), w (U,) -> (d, k)."""
    return torch.einsum("u,udr,urk->dk", _w(w).to(As), Bs, As)


def cross_term(As, Bs, w):
    """½ Σ_u Σ_v w_u w_v (B_u − B_v)(A_u − A_v), (d, k): equals P − B̄Ā (§2.1)."""
    w = _w(w).to(As)
    dB, dA = Bs[:, None] - Bs[None], As[:, None] - As[None]                 # (U, U, d, r), (U, U, r, k)
    return 0.5 * torch.einsum("u,v,uvdr,uvrk->dk", w, w, dB, dA)


# ---------------------------------------------------------------------------------- the Gram trick
def products_gram(Y, X):
    """K[(j,i),(l,m)] = <Y_j X_i, Y_l X_m>_F = tr((Y_jᵀ Y_l)(X_m X_iᵀ)): the Gram matrix of the n²
    rank-r products Y_j X_i, from r×r blocks only. Y (n, d, r), X (n, r, k) -> (n², n²).
    Then ||Σ_{j,i} D_ji Y_j X_i||²_F = vec(D)ᵀ K vec(D). Cost O(n² (d+k) r² + n⁴ r²), memory n⁴."""
    n = Y.shape[0]
    GY = torch.einsum("jdr,lds->jlrs", Y, Y)                               # Y_jᵀ Y_l   (n, n, r, r)
    GX = torch.einsum("mrk,isk->mirs", X, X)                               # X_m X_iᵀ   (n, n, r, r)
    return torch.einsum("jlrs,misr->jilm", GY, GX).reshape(n * n, n * n)


def _sqnorm(D, K):
    """vec(D)ᵀ K vec(D); D (..., n, n), K (..., n², n²)."""
    d = D.flatten(-2)
    return torch.einsum("...a,...ab,...b->...", d, K, d)


def residual(As, Bs, w, A_hat, B_hat, eps=EPS):
    """Σ_modules ||P − B̂Â||² / (||P||² + ε) with P = Σ w_u B_u A_u, by the Gram trick.

    As, Bs: per module (U, r, k) / (U, d, r) (a list over modules, or one tensor for one module);
    A_hat, B_hat: the aggregate's factors per module (r, k) / (d, r), the clients' rank r."""
    w, total = _w(w), 0.0
    for A, B, Ah, Bh in zip(_list(As), _list(Bs), _list(A_hat), _list(B_hat)):
        Y = torch.cat([B, Bh[None]]).double()                               # (U+1, d, r)
        X = torch.cat([A, Ah[None]]).double()                               # (U+1, r, k)
        K = products_gram(Y, X)
        D = torch.diag(torch.cat([w, -torch.ones(1, dtype=w.dtype)]))      # P − B̂Â
        T = torch.diag(torch.cat([w, torch.zeros(1, dtype=w.dtype)]))      # P
        total += float(_sqnorm(D, K) / (_sqnorm(T, K) + eps))
    return total


# ------------------------------------------------------- FLoRA-NA's objective and estimator (§2.2)
@dataclass
class Problem:
    """One module group reduced to what J(p, q) needs: (U+1)² × (U+1)² numbers per module."""
    K: torch.Tensor         # (M, n², n²) products' Gram per module / (||P_m||² + ε); shared: summed, M = 1
    C: torch.Tensor         # (n, n) P's coefficients on the products Y_j X_i, n = U + 1
    w: torch.Tensor         # (U,)


def setup(As, Bs, w, A_prev, B_prev, per_module=False, eps=EPS):
    """Build the Problem for modules As (U, r, k), Bs (U, d, r) (lists over modules) started
    from A_prev (r, k), B_prev (d, r). The modules of a group may have different shapes."""
    w, U = _w(w), len(w)
    C = torch.diag(torch.cat([torch.ones(1, dtype=torch.float64), w]))      # C_00 = 1, C_uu = w_u
    C[0, 1:] = C[1:, 0] = w                                                 # C_0u = C_u0 = w_u
    Ks = []
    for A, B, A0, B0 in zip(_list(As), _list(Bs), _list(A_prev), _list(B_prev)):
        X = torch.cat([A0[None], A - A0]).double()                          # (U+1, r, k)
        Y = torch.cat([B0[None], B - B0]).double()                          # (U+1, d, r)
        K = products_gram(Y, X)
        Ks.append(K / (_sqnorm(C, K) + eps))                                # relative: / (||P||² + ε)
    K = torch.stack(Ks) if per_module else sum(Ks)[None]                    # shared p, q: J is one quadratic form
    return Problem(K, C, w)


def J(prob, p, q):
    """J(p, q) = Σ_m ||P − B̂Â||²/(||P||²+ε); p, q (1, U) shared or (M, U) per module."""
    one = torch.ones(*p.shape[:-1], 1, dtype=p.dtype)
    a = torch.cat([one, prob.w * p], -1)                                    # Â's coefficients on X
    b = torch.cat([one, prob.w * q], -1)                                    # B̂'s coefficients on Y
    D = prob.C - b[..., :, None] * a[..., None, :]                          # (M, n, n) coefficients of P − B̂Â
    return _sqnorm(D, prob.K).sum()


def objective(As, Bs, w, A_prev, B_prev, p, q, eps=EPS):
    """J(p, q) straight from the factors (the Gram trick, no d×k matrix)."""
    p, q = torch.as_tensor(p).double(), torch.as_tensor(q).double()
    prob = setup(As, Bs, w, A_prev, B_prev, per_module=p.dim() == 2, eps=eps)
    return float(J(prob, p if p.dim() == 2 else p[None], q if q.dim() == 2 else q[None]))


@dataclass
class Estimate:
    A: list                 # Â per module (r, k)
    B: list                 # B̂ per module (d, r)
    p: torch.Tensor         # (U,) or (M, U)
    q: torch.Tensor
    objective: float        # J(p, q)
    fedit_objective: float  # J(1, 1), FedIT's residual
    history: list = field(default_factory=list)   # J of every iterate the solver visited


def _newton(f, x):
    """Exact minimiser of a convex quadratic f from x: x − H⁺ ∇f (pseudo-inverse: H may be singular)."""
    x = x.detach().requires_grad_(True)
    g, = torch.autograd.grad(f(x), x)
    H = torch.autograd.functional.hessian(f, x.detach()).reshape(x.numel(), x.numel())
    return (x - (torch.linalg.pinv(H, hermitian=True, rtol=1e-10) @ g.flatten()).view_as(x)).detach()


def estimate(As, Bs, w, A_prev, B_prev, solver="adamw", per_module=False, steps=200, lr=1e-2,
             weight_decay=0.0, sweeps=10, eps=EPS):
    """FLoRA-NA for one module group (§2.2): learn p, q and return the Estimate.

    As, Bs, A_prev, B_prev as in `setup`; w (U,) client weights (normalised here)."""
    if solver not in SOLVERS:
        raise UserError(f"solver={solver!r} is unknown; allowed: {', '.join(SOLVERS)}")
    prob = setup(As, Bs, w, A_prev, B_prev, per_module, eps)
    shape = (prob.K.shape[0], len(prob.w))
    p, q = torch.ones(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64)
    fedit = float(J(prob, p, q))
    best, history = (fedit, p.clone(), q.clone()), [fedit]   # the start is FedIT: this is the guard

    def keep(j, p, q):
        nonlocal best
        history.append(j)
        if j < best[0]:
            best = (j, p.detach().clone(), q.detach().clone())

    if solver == "adamw":
        p, q = p.requires_grad_(True), q.requires_grad_(True)
        opt = torch.optim.AdamW([p, q], lr=lr, weight_decay=weight_decay)
        for step in range(steps):
            opt.zero_grad()
            j = J(prob, p, q)
            if step:                                         # step 0 is the start, already kept
                keep(float(j.detach()), p, q)
            j.backward()
            opt.step()
        keep(float(J(prob, p, q).detach()), p, q)
    else:                                                    # alternating exact block solves
        for _ in range(sweeps):
            q = _newton(lambda q_: J(prob, p, q_), q)
            p = _newton(lambda p_: J(prob, p_, q), p)
            keep(float(J(prob, p, q)), p, q)
    j, p, q = best
    A_hat, B_hat = [], []
    for m, (A, B, A0, B0) in enumerate(zip(_list(As), _list(Bs), _list(A_prev), _list(B_prev))):
        pm, qm = (p[m], q[m]) if per_module else (p[0], q[0])
        A_hat.append((A0.double() + torch.einsum("u,urk->rk", prob.w * pm, (A - A0).double())).to(A0.dtype))
        B_hat.append((B0.double() + torch.einsum("u,udr->dr", prob.w * qm, (B - B0).double())).to(B0.dtype))
    p, q = (p, q) if per_module else (p[0], q[0])
    return Estimate(A_hat, B_hat, p, q, j, fedit, history)


# -------------------------------------- the truncated-SVD oracle (Eckart–Young), without forming T
def svd_oracle(As, Bs, w, r):
    """Best rank-r factors of P = Σ w_u B_u A_u for one module, via QR of the stacked factors.

    P = [B_1..B_U] diag(w ⊗ 1_r) [A_1; ..; A_U] = Q1 (R1 diag R2ᵀ) Q2ᵀ, so the SVD of the small
    (Ur × Ur) core gives P's. Needs r ≤ min(d, k). Returns Â (r, k) = √S Vᵀ, B̂ (d, r) = U √S."""
    U_, r0, k = As.shape
    Bst = Bs.double().permute(1, 0, 2).reshape(Bs.shape[1], U_ * r0)       # (d, U r0)
    Ast = As.double().reshape(U_ * r0, k)                                   # (U r0, k)
    (Q1, R1), (Q2, R2) = torch.linalg.qr(Bst), torch.linalg.qr(Ast.T)
    core = R1 @ torch.diag(_w(w).repeat_interleave(r0)) @ R2.T
    Uc, S, Vh = torch.linalg.svd(core)
    s = S[:r].sqrt()
    B_hat = (Q1 @ Uc[:, :r]) * s                                            # (d, r)
    A_hat = s[:, None] * (Vh[:r] @ Q2.T)                                    # (r, k)
    return A_hat.to(As.dtype), B_hat.to(Bs.dtype)


# ------------------------------------------------------------------------ the server rules of §2.3
@dataclass
class Aggregate:
    lora: dict              # {name: (A, B)} the new global factors (FedSA: B is None, it stays on clients)
    base_delta: dict = field(default_factory=dict)   # {name: Δ (d, k)} to fold into W0 (FLoRA, FedEx)
    client_B: list = None   # FedSA: per client {name: B_u}, the very tensors the client had
    info: dict = field(default_factory=dict)         # FLoRA-NA: p, q, objectives


def _stack(client_lora, name):
    return (torch.stack([c[name][0] for c in client_lora]),                # (U, r, k)
            torch.stack([c[name][1] for c in client_lora]))                # (U, d, r)


def _mean(X, w):
    return torch.einsum("u,u...->...", w.to(X), X)


def aggregate_lora(method, global_lora, client_lora, weights, generator=None, solver="adamw",
                   per_module=False, steps=200, lr=1e-2):
    """One server step. global_lora: {name: (A, B)} sent at the start of the round (A_prev, B_prev);
    client_lora: per client {name: (A_u, B_u)}; weights (U,) e.g. sample counts; generator: the
    fresh A of FLoRA's re-initialisation."""
    if method not in AGGREGATORS:
        raise UserError(f"aggregator={method!r} is unknown; allowed: {', '.join(AGGREGATORS)}")
    w, names = _w(weights), list(global_lora)
    stacks = {n: _stack(client_lora, n) for n in names}
    avg = {n: (_mean(As, w), _mean(Bs, w)) for n, (As, Bs) in stacks.items()}   # FedIT's Ā, B̄
    if method == "fedit":
        return Aggregate(avg)
    if method == "ffa":                      # A frozen: keep the very tensor, average B
        return Aggregate({n: (global_lora[n][0], avg[n][1]) for n in names})
    if method == "fedsa":                    # share A only; every B stays where it was
        return Aggregate({n: (avg[n][0], None) for n in names},
                         client_B=[{n: c[n][1] for n in names} for c in client_lora])
    if method == "fedex":                    # FedIT + the exact residual P − B̄Ā folded into W0
        delta = {n: target(*stacks[n], w) - avg[n][1] @ avg[n][0] for n in names}
        return Aggregate(avg, base_delta=delta)
    if method == "flora":                    # stacking = exact P merged into W0, then a fresh LoRA
        fresh = {n: (init_A(*global_lora[n][0].shape, generator=generator).to(global_lora[n][0]),
                     torch.zeros_like(global_lora[n][1])) for n in names}
        return Aggregate(fresh, base_delta={n: target(*stacks[n], w) for n in names})
    if method == "svd":
        return Aggregate({n: svd_oracle(*stacks[n], w, global_lora[n][0].shape[0]) for n in names})
    est = estimate([stacks[n][0] for n in names], [stacks[n][1] for n in names], w,
                   [global_lora[n][0] for n in names], [global_lora[n][1] for n in names],
                   solver=solver, per_module=per_module, steps=steps, lr=lr)
    return Aggregate({n: (a, b) for n, a, b in zip(names, est.A, est.B)},
                     info={"p": est.p.tolist(), "q": est.q.tolist(), "objective": est.objective,
                           "fedit_objective": est.fedit_objective})


def payload(method, shapes, num_clients, bytes_per_number=4):
    """(up, down) bytes per client per round, METHOD §2.3. shapes: {name: (d, k, r)}."""
    if method not in AGGREGATORS:
        raise UserError(f"aggregator={method!r} is unknown; allowed: {', '.join(AGGREGATORS)}")
    up = down = 0
    for d, k, r in shapes.values():
        full = r * (d + k)
        u, dn = {"ffa": (r * d, r * d), "fedsa": (r * k, r * k), "flora": (full, num_clients * full),
                 "fedex": (full, full + d * k)}.get(method, (full, full))
        up, down = up + u, down + dn
    return up * bytes_per_number, down * bytes_per_number


if __name__ == "__main__":        # the old command: say where the experiment's CLI is (exit status 2, a mistake)
    import sys
    sys.stderr.write("error: flora_na holds the aggregators; allowed: python -m stamp_min.flora_loop (the experiment)\n")
    raise SystemExit(2)
