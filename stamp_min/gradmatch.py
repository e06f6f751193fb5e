"""Gradient matching (GM): one update that serves n conflicting updates (METHOD.md §1.2).

STAMP uses GM twice: a client matches its task updates over time (TAM, §1.3) and the server
matches the clients' updates over space (SAM, §1.4). GM is the conflict-averse (CAGrad) rule,
solved through its dual as in the authors' code [code]. In plain words: among the directions
within distance c·||d̄|| of the mean update d̄, take the one whose *smallest* inner product with
any d_i is largest, i.e. the one that best serves the update doing worst. The dual turns this
into a small convex problem over simplex weights w on the n updates. With G = D Dᵀ (n×n, D the
(n, P) updates stacked), METHOD §1.2 reads:

    s  = mean_i sqrt(G_ii + 1e-4),  Ĝ = G / s²,  b = Ĝ 1 / n,  ρ = c · sqrt(mean(b) + 1e-4)
    w* = argmin_{w ∈ simplex}  f(w) = wᵀb + ρ · sqrt(wᵀĜw + 1e-4)          (convex)
    λ  = ρ / (sqrt(w*ᵀĜw* + 1e-4) + 1e-4)
    GM(d) = (d̄ + λ Σ_i w*_i d_i) / (1 + c²) = Σ_i α_i d_i,   α_i = (1/n + λ w*_i) / (1 + c²)

Everything after G touches n×n numbers only, so GM costs one Gram matrix plus one pass to form
Σ α_i d_i. The updates stream through in column blocks: neither a flat n×P copy of dict
updates nor an upcast copy of fp16/bf16 inputs is ever built (G accumulates in float64).

Solvers for w* (`solver=`; `steps`, `lr`, `momentum` configure only "sgd" and "adam"):
- "exact" (default, ours): accelerated projected gradient on the simplex (FISTA, backtracking,
  restarts, diagonal preconditioning) until the Frank–Wolfe duality gap g(w)ᵀw − min_i g(w)_i,
  a certified bound on f(w) − f(w*), is ≤ `tol` = 1e-12. Typically 10–50 iterations (a few ms);
  the worst we have seen, a strongly conflicting set with n = 20, took 771 (~0.1 s).
- "sgd" [code]: w = softmax(z), z = 0, SGD lr 25 with momentum, StepLR(30, ×0.5), best iterate
  kept; presets SERVER (100 steps, momentum 0.5) and CLIENT (25 steps, momentum 0.1). They do
  NOT reach w* for n ≤ 20. On 120 random/conflicting/badly scaled sets (`python
  bench/gradmatch_bench.py --accuracy`) f ends 4e-4 (median) / 4e-3 (worst) above f(w*) with
  SERVER, 2e-3 / 1e-2 with CLIENT, and GM(d) moves by 0.2 % / 27 % (SERVER), 1 % / 28 % (CLIENT).
  w* usually lies on a face of the simplex (some w*_i = 0); softmax gets there only as
  z_i → −∞, its gradient in z_i shrinks with w_i, and StepLR halves the lr every 30 steps, so
  those weights stall at small positive values; more steps don't help. Hence "exact" is the
  default.
- "adam" (ours): the same parametrisation and StepLR with Adam, lr 1 (best of 0.03–5 in our
  trials): far closer than "sgd" in the median (f − f* ~ 4e-6), as bad in the worst case.

Our reading, not the authors' code: the solver runs in float64; wᵀĜw is clamped at 0 before
the + 1e-4 (a no-op in exact arithmetic); `normalize=True` rescales every update to the mean
norm (the authors' version is dead code); no lr doubling at n = 50.
Degenerate inputs: all-zero or exactly opposite updates give d̄ = 0 and an output ≈ 0; an
all-zero update among updates that agree with d̄ takes all the weight (no direction improves
on it) and GM returns d̄/(1 + c²). Finite inputs give finite outputs (NaN/inf raise
ValueError); an fp16 output can overflow only for inputs near the fp16 maximum. Scale:
GM(a·d) = a·GM(d) within 1e-8 once all ||d_i|| ≥ 1, but for ||d_i|| ≲ 1e-3 the 1e-4's
dominate Ĝ and GM drifts by 1–90 %: rescale tiny updates before matching.
"""

import math
from dataclasses import dataclass, field

import torch

EPS = 1e-4                                # the stabiliser of METHOD §1.2, used exactly where it is written
SOLVERS = ("exact", "sgd", "adam")
SERVER = dict(steps=100, momentum=0.5)    # the authors' server settings [code] (sgd lr 25 is the default)
CLIENT = dict(steps=25, momentum=0.1)     # the authors' client settings [code]
CHUNK = 1 << 18                           # columns per block when streaming updates


# ----------------------------------------------------------------------------- streaming updates

def _blocks(updates, chunk=CHUNK):
    """Yield (key, lo, hi, block): columns lo:hi of parameter `key` of all n updates, an (n, hi-lo)
    float32 block (float64 for float64 inputs). A float32/64 (n, P) tensor is sliced, no copy;
    anything else (dicts, fp16/bf16) is copied block by block into one reused (n, ≤ chunk) buffer.
    A block is valid only until the next one is yielded."""
    n, buf = len(updates), None
    if torch.is_tensor(updates):
        parts, P = [(None, updates.reshape(n, -1))], updates[0].numel()          # (n, P)
    else:
        parts = ((k, [u[k].reshape(-1) for u in updates]) for k in updates[0])   # n flat views
        P = sum(v.numel() for v in updates[0].values())
    for key, rows in parts:
        if not rows[0].is_floating_point():
            raise ValueError(f"gradmatch: update {key!r} has dtype {rows[0].dtype}; only floating-point tensors allowed")
        cdtype = torch.float64 if rows[0].dtype == torch.float64 else torch.float32
        size = rows[0].numel()
        for lo in range(0, size, chunk):
            hi = min(lo + chunk, size)
            if torch.is_tensor(rows) and rows.dtype == cdtype:
                yield key, lo, hi, rows[:, lo:hi]
                continue
            if buf is None or buf.dtype != cdtype:
                buf = torch.empty(n, min(chunk, P), dtype=cdtype, device=rows[0].device)
            blk = buf[:, :hi - lo]
            for i in range(n):
                blk[i].copy_(rows[i][lo:hi])                      # upcasts fp16/bf16 on the way
            yield key, lo, hi, blk


def gram(updates, chunk=CHUNK):
    """G = D Dᵀ, (n, n) float64. updates: an (n, ...) tensor, or a list of n dicts name -> tensor."""
    G = None
    for _, _, _, blk in _blocks(updates, chunk):
        g = (blk @ blk.T).double()                                # (n, n) per block, summed in float64
        g = g if torch.isfinite(g).all() else blk.double() @ blk.double().T   # overflowed: again in float64
        G = g if G is None else G + g
    if not torch.isfinite(G).all():
        raise ValueError("gradmatch.gram: non-finite Gram matrix (inf/NaN in the updates, or norms beyond float range)")
    return G


def combine(updates, alpha, chunk=CHUNK):
    """Σ_i alpha_i d_i in the form and dtype of `updates`: a (...) tensor or a dict. alpha: (n,)."""
    if torch.is_tensor(updates):
        out = torch.empty(updates.shape[1:], dtype=updates.dtype, device=updates.device)
    else:
        out = {k: torch.empty(v.shape, dtype=v.dtype, device=v.device) for k, v in updates[0].items()}
    for key, lo, hi, blk in _blocks(updates, chunk):
        dst = (out if key is None else out[key]).view(-1)[lo:hi]
        if dst.dtype == blk.dtype:
            torch.mv(blk.T, alpha.to(blk), out=dst)               # (m, n) @ (n,) -> (m,), in place
        else:
            dst.copy_(blk.T @ alpha.to(blk))                      # fp16/bf16 output: round on store
    return out


# ----------------------------------------------------------------------------- the simplex problem

def problem(G, c=0.25):
    """(Ĝ, b, ρ) of METHOD §1.2 from the Gram matrix G, in float64 on the CPU."""
    G = G.detach().to("cpu", torch.float64)
    s = (G.diagonal() + EPS).sqrt().mean()                        # one global scale, cancels in GM
    Gh = G / s**2                                                 # (n, n)
    b = Gh.mean(1)                                                # (n,) b_i = <d_i, d̄> / s²
    rho = c * (b.mean() + EPS).sqrt()                             # mean(b) = ||d̄||² / s²
    return Gh, b, float(rho)


def objective(w, Gh, b, rho):
    """f(w) = wᵀb + ρ sqrt(wᵀĜw + 1e-4), differentiable (used by the softmax solvers)."""
    return w @ b + rho * ((w @ Gh @ w).clamp_min(0) + EPS).sqrt()


def _value_grad(w, Gh, b, rho):
    """(f(w) as float, ∇f(w)) for the exact solver."""
    Gw = Gh @ w
    r = ((w @ Gw).clamp_min(0) + EPS).sqrt()
    return float(w @ b + rho * r), b + rho * Gw / r


def _project(x, a):
    """Euclidean projection of x (n,) onto {v >= 0, aᵀv = 1}, a > 0: v = max(x − θa, 0), θ by sorting."""
    order = (x / a).argsort(descending=True)
    xs, as_ = x[order], a[order]
    theta = ((as_ * xs).cumsum(0) - 1) / (as_ * as_).cumsum(0)   # θ if the support were the top k
    k = int((xs - theta * as_ > 0).sum())                          # the true support size
    return (x - theta[k - 1] * a).clamp_min(0)


def _exact(Gh, b, rho, tol, max_iter, hist):
    """Accelerated projected gradient (FISTA, backtracking, gradient restart) until gap ≤ tol.

    It runs in v = σ ⊙ w, σ_i = sqrt(Ĝ_ii + 1e-4), i.e. on the weights of the unit-norm updates:
    this diagonal preconditioning makes updates of very different norms cost no extra iterations.
    All tests use gradients, never differences of f, so the gap can reach ~1e-15."""
    a = (Gh.diagonal() + EPS).rsqrt()                             # w = a ⊙ v, simplex: aᵀv = 1

    def value_grad(v):
        f, g = _value_grad(a * v, Gh, b, rho)
        return f, a * g                                           # chain rule: ∂f/∂v = a ⊙ ∂f/∂w

    v = 1 / (a * len(b))                                          # w = 1/n
    fv, gv = value_grad(v)
    y, t, L = v, 1.0, 1.0
    hist.append(fv)
    for _ in range(max_iter):
        g = gv / a                                                # ∂f/∂w
        if float(g @ (a * v) - g.min()) <= tol:                   # f(w) − f(w*) ≤ gap ≤ tol
            break
        fy, gy = value_grad(y)
        L *= 0.5                                                  # try a longer step first
        for _ in range(100):                                      # backtrack: convexity + this test imply
            vn = _project(y - gy / L, a)                          # f(vn) ≤ f(y) + gyᵀd + L/2 ||d||²
            fn, gn = value_grad(vn)
            d = vn - y
            if float((gn - gy) @ d) <= 0.5 * L * float(d @ d):
                break
            L *= 2
        if float((y - vn) @ (vn - v)) > 0:                        # momentum points uphill: restart
            y, t = vn, 1.0                                        # (O'Donoghue & Candès 2015)
        else:
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y, t = vn + (t - 1) / t_next * (vn - v), t_next
        v, fv, gv = vn, fn, gn
        hist.append(fv)
    return a * v


def _softmax_descent(Gh, b, rho, solver, steps, lr, momentum, hist):
    """The authors' parametrisation: w = softmax(z), z = 0, StepLR(30, 0.5), best iterate kept."""
    z = torch.zeros_like(b, requires_grad=True)
    opt = torch.optim.SGD([z], lr=lr, momentum=momentum) if solver == "sgd" else torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)
    best, z_best = math.inf, z.detach().clone()
    for i in range(steps + 1):                                    # steps updates, steps + 1 evaluations
        obj = objective(torch.softmax(z, 0), Gh, b, rho)
        hist.append(obj.item())
        if obj.item() < best:
            best, z_best = obj.item(), z.detach().clone()
        if i < steps:
            opt.zero_grad()
            obj.backward()
            opt.step()
            sched.step()
    return torch.softmax(z_best, 0)


@dataclass
class Weights:
    """What match_weights returns; unpacks as `w, lam = match_weights(G)`."""
    w: torch.Tensor                               # (n,) float64 simplex weights w*
    lam: float                                    # λ of METHOD §1.2
    obj: float                                    # f(w)
    gap: float                                    # duality gap at w: f(w) − f(w*) ≤ gap
    history: list = field(default_factory=list)   # f per step (accepted steps for "exact")

    def __iter__(self):
        return iter((self.w, self.lam))


def match_weights(G, c=0.25, solver="exact", steps=None, lr=None, momentum=None, tol=1e-12, max_iter=5000):
    """Solve METHOD §1.2's simplex problem on the (n, n) Gram matrix G; see the module docstring."""
    if solver not in SOLVERS:
        raise ValueError(f"gradmatch: solver={solver!r}; allowed: {', '.join(SOLVERS)}")
    if c < 0 or G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(f"gradmatch: need c >= 0 and a square non-empty G; got c={c}, G of shape {tuple(G.shape)}")
    Gh, b, rho = problem(G, c)
    hist = []
    if solver == "exact":
        w = _exact(Gh, b, rho, tol, max_iter, hist)
    else:
        default_lr = 25.0 if solver == "sgd" else 1.0
        w = _softmax_descent(Gh, b, rho, solver, 100 if steps is None else steps,
                             default_lr if lr is None else lr, 0.5 if momentum is None else momentum, hist)
    f, g = _value_grad(w, Gh, b, rho)
    lam = rho / (math.sqrt(max(float(w @ Gh @ w), 0) + EPS) + EPS)
    return Weights(w, lam, f, float(g @ w - g.min()), hist)


def coefficients(G, c=0.25, solver="exact", normalize=False, **solver_kw):
    """α (n,) float64 with GM(d) = Σ_i α_i d_i, from the (n, n) Gram matrix G alone.
    normalize=True rescales each d_i to the mean norm first (zero updates stay zero)."""
    G = G.detach().to("cpu", torch.float64)
    n = len(G)
    scale = torch.ones(n, dtype=torch.float64)
    if normalize:
        norm = G.diagonal().clamp_min(0).sqrt()
        scale = torch.where(norm > 0, norm.mean() / norm, torch.zeros_like(norm))
        G = G * scale[:, None] * scale[None, :]                  # Gram matrix of the rescaled updates
    w, lam = match_weights(G, c, solver, **solver_kw)
    return (1 / n + lam * w) / (1 + c * c) * scale               # METHOD §1.2: (d̄ + λ Σ w_i d_i)/(1+c²)


def match(updates, c=0.25, solver="exact", normalize=False, G=None, **solver_kw):
    """GM(d): the matched update, same form and dtype as `updates` ((n, ...) tensor -> (...) tensor,
    list of dicts -> dict). G: the Gram matrix if already computed; see `coefficients` for the
    rest. solver_kw: steps, lr, momentum, tol, max_iter."""
    G = gram(updates) if G is None else G
    return combine(updates, coefficients(G, c, solver, normalize, **solver_kw))


# ----------------------------------------------------------------------------- conflict diagnostics

def cosine_matrix(G):
    """(n, n) pairwise cosines from G; a zero update has cosine 0 with everything (itself too)."""
    G = G.detach().to(torch.float64)
    norm = G.diagonal().clamp_min(0).sqrt()
    denom = norm[:, None] * norm[None, :]
    return torch.where(denom > 0, G / denom, torch.zeros_like(G)).clamp(-1, 1)


def _pairs(G):
    C = cosine_matrix(G)
    return C[torch.triu_indices(len(C), len(C), offset=1).unbind()]   # (n(n-1)/2,) cosines, i < j


def mean_pairwise_cosine(G):
    """Mean cosine over pairs i < j (a float); 1.0 for n = 1 (one update agrees with itself)."""
    return float(_pairs(G).mean()) if len(G) > 1 else 1.0


def num_conflicts(G):
    """Number of pairs i < j whose cosine is negative (conflicting updates)."""
    return int((_pairs(G) < 0).sum())


def agreement(updates, step):
    """Mean cosine between each update d_i and one combined direction `step` (same form as a
    single update): how well that direction serves every d_i. Zero vectors count as cosine 0."""
    if torch.is_tensor(updates):
        updates, step = [{"": u} for u in updates], {"": step}
    dots = sum(torch.stack([(u[k].double() * step[k].double()).sum() for u in updates]) for k in step)   # (n,)
    norms = sum(torch.stack([u[k].double().pow(2).sum() for u in updates]) for k in step)
    step_norm = sum(v.double().pow(2).sum() for v in step.values())
    denom = (norms * step_norm).sqrt()
    cos = torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(dots))
    return float(cos.mean())

