"""Benchmark of stamp_min.gradmatch: is GM as cheap as one Gram matrix?

For n updates of P numbers (P up to ResNet-18's 11.7M, as an (n, P) tensor or as n state
dicts), times `gram`, the solver, `combine` (Σ α_i d_i) and `match` (= all three) on the same
input, next to torch's own D @ Dᵀ and α @ D, and prints a markdown table with match/gram and
the peak extra memory. match needs two passes over the updates (G, then Σ α_i d_i) and writes
a new P-vector, so match/(gram + combine) ≈ 1 is the goal; match/gram can't be.

    python bench/gradmatch_bench.py            # n in 2 5 10 20, P up to 11.7M, ~1–2 min
    python bench/gradmatch_bench.py --quick    # P up to 1M, seconds
    python bench/gradmatch_bench.py --accuracy # how far "sgd"/"adam" land from "exact", seconds

Times are the best of --repeat runs, on --threads CPU threads (default 1: on a small shared
machine a multi-threaded BLAS call can wait ~10 ms for a busy core, which drowns the signal).
Compare ratios within one run, never absolute times across machines.

Memory: the peak resident set size (VmHWM) during the call minus the resident size before it,
with the peak reset through /proc/self/clear_refs (Linux; "nan" elsewhere). The input is not
counted. The script re-runs itself with MALLOC_MMAP_THRESHOLD_=65536 so that glibc gives every
block of 64 KiB or more fresh pages and returns them on free: RSS then sees each temporary.
"""

import argparse
import gc
import math
import os
import platform
import re
import sys
import time

import torch

from stamp_min import gradmatch as gm


def rss_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def measure(fn, repeat):
    """(best seconds, peak extra MB or nan) over `repeat` calls of fn()."""
    best, extra = math.inf, float("nan")
    for _ in range(repeat):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                  # reset the peak RSS (VmHWM)
            before = rss_kb("VmRSS")
        except OSError:
            before = None
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
        if before is not None:
            extra = max(0.0 if math.isnan(extra) else extra, (rss_kb("VmHWM") - before) / 1024)
        del out
    return best, extra


def resnet18_shapes():
    """Float parameter shapes of a ResNet-18 state dict (11.7M numbers), without torchvision."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            c_in = cin if block == 0 else cout
            shapes += [(cout, c_in, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
        cin = cout
    return shapes + [(1000, 512), (1000,)]


def make(n, P, kind, gen):
    if kind == "tensor":
        return torch.randn(n, P, generator=gen)
    shapes = resnet18_shapes()
    return [{f"p{i}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)} for _ in range(n)]


def accuracy():
    """Table: each solver/preset vs "exact" (certified gap ≤ 1e-12) on 120 update sets, n = 2..20:
    random (mean offset), strongly conflicting (± one direction + noise), norms over four decades."""
    import statistics
    gen, sets = torch.Generator().manual_seed(0), []
    for n in (2, 3, 5, 8, 12, 20):
        for seed in range(20):
            kind, P = ("random", "conflicting", "scaled")[seed % 3], n + 12
            D = torch.randn(n, P, generator=gen, dtype=torch.float64)
            if kind == "random":
                D += 0.3
            elif kind == "conflicting":
                sign = torch.tensor([(-1.0) ** i for i in range(n)], dtype=torch.float64)[:, None]
                D = sign * (1 + torch.rand(n, 1, generator=gen, dtype=torch.float64)) * D[0] + 0.2 * D
            else:
                D *= torch.logspace(-2, 2, n, dtype=torch.float64)[:, None]
            sets.append(D)
    print("| solver | preset | f − f* median | f − f* max | ‖ΔGM‖/‖GM‖ median | ‖ΔGM‖/‖GM‖ max | steps |")
    print("|---|---|---|---|---|---|---|")
    for solver, preset in (("exact", {}), ("sgd", gm.SERVER), ("sgd", gm.CLIENT), ("adam", gm.SERVER), ("adam", gm.CLIENT)):
        gaps, moves, steps = [], [], 0
        for D in sets:
            G = gm.gram(D)
            best, res = gm.match_weights(G), gm.match_weights(G, solver=solver, **preset)
            exact, out = gm.match(D, G=G), gm.match(D, G=G, solver=solver, **preset)
            gaps.append(res.obj - best.obj)
            moves.append(float((out - exact).norm() / exact.norm()))
            steps = max(steps, len(res.history) - 1)
        name = "SERVER" if preset is gm.SERVER else "CLIENT" if preset is gm.CLIENT else "tol 1e-12"
        print(f"| {solver} | {name} | {statistics.median(gaps):.1e} | {max(gaps):.1e} | "
              f"{statistics.median(moves):.1e} | {max(moves):.1e} | {steps} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="P up to 1M only (seconds, for a smoke run)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per cell, best kept (default 5, quick 2)")
    ap.add_argument("--solver", default="exact", choices=gm.SOLVERS)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--accuracy", action="store_true", help="print the solver accuracy table instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.accuracy:
        return accuracy()
    repeat = args.repeat or (2 if args.quick else 5)
    P_r18 = sum(math.prod(s) for s in resnet18_shapes())
    cells = [("tensor", P) for P in ((100_000, 1_000_000) if args.quick else (1_000_000, P_r18))]
    if not args.quick:
        cells.append(("dicts", P_r18))
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, solver={args.solver!r}, best of {repeat}\n")
    print("| input | n | P | input MB | torch D@Dᵀ s | torch α@D s | gram s | solver ms | combine s | match s "
          "| match/gram | match/(gram+combine) | gram extra MB | match extra MB |")
    print("|---" * 14 + "|")
    nan = float("nan")
    for kind, P in cells:
        for n in (2, 5, 10, 20):
            D = make(n, P, kind, gen)
            flat = D if kind == "tensor" else None
            alpha = torch.full((n,), 1 / n, dtype=torch.float64)
            t_mm = measure(lambda: flat @ flat.T, repeat)[0] if flat is not None else nan
            t_mv = measure(lambda: alpha.float() @ flat, repeat)[0] if flat is not None else nan
            t_gram, m_gram = measure(lambda: gm.gram(D), repeat)
            G = gm.gram(D)
            t_solve = measure(lambda: gm.match_weights(G, solver=args.solver), repeat)[0]
            t_comb = measure(lambda: gm.combine(D, alpha), repeat)[0]
            t_match, m_match = measure(lambda: gm.match(D, solver=args.solver), repeat)
            print(f"| {kind} | {n} | {P / 1e6:.1f}M | {n * P * 4 / 2**20:.0f} | {t_mm:.3f} | {t_mv:.3f} | {t_gram:.3f} | "
                  f"{t_solve * 1e3:.1f} | {t_comb:.3f} | {t_match:.3f} | {t_match / t_gram:.2f} | "
                  f"{t_match / (t_gram + t_comb):.2f} | {m_gram:.0f} | {m_match:.0f} |", flush=True)
            del D, flat, G
            gc.collect()


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:           # see the module docstring
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    main()
