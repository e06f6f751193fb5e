"""Compare the federated-LoRA aggregators, and time FLoRA-NA's estimator against a dense SVD.

    python bench/flora_compare.py                 # full: every aggregator x 3 seeds + timing (~3 min, 2 CPU cores)
    python bench/flora_compare.py --rounds 3 --seeds 1 --timing-size 512   # a quick look
    python bench/flora_compare.py --timing-only --out results/flora_timing.json   # part 2 alone

Part 1 runs `stamp_min.flora_loop.run` (the `python -m stamp_min.flora_loop` experiment, default
Config) for every aggregator on the same seeds and prints a markdown table: final global test
accuracy and the aggregation residuals (mean over rounds) as mean ± std over seeds, bytes per
client per round, server time per round. FLoRA-NA is run with both solvers.

Part 2 times, at one realistic layer (d = k = 4096, r = 16, U = 10 by default):
  - FLoRA-NA's `estimate` (AdamW, 200 steps; and ALS) from the clients' factors (Gram trick),
  - a dense truncated SVD: form T = Σ w_u B_u A_u (d×k) and run torch.linalg.svd on it,
  - the factored SVD oracle `svd_oracle` (QR of the stacked factors, SVD of a Ur×Ur core),
and reports the ratio time(dense SVD) / time(FLoRA-NA). Median of --repeats runs, after a warm-up.
Timings are ratios within one run on one machine; never compare them across machines. Both sides
run on --threads intra-op threads (default 1): on a shared machine, multi-threaded timings of the
dense SVD swung by 6x between runs.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from stamp_min import flora_na as F
from stamp_min.cli import run_info, write_json
from stamp_min.flora_loop import Config, run

ROWS = [("fedit", "adamw"), ("ffa", "adamw"), ("fedsa", "adamw"), ("flora", "adamw"), ("fedex", "adamw"),
        ("svd", "adamw"), ("flora_na", "adamw"), ("flora_na", "als")]


def pm(xs, fmt):
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs) if len(xs) > 1 else 0.0)}"


def compare(seeds, rounds):
    results, lines = {}, []
    for agg, solver in ROWS:
        label = agg if agg != "flora_na" else f"flora_na ({solver})"
        runs = [run(Config(aggregator=agg, solver=solver, seed=s, rounds=rounds, quiet=True)) for s in seeds]
        results[label] = runs
        mean = lambda v: sum(v) / len(v)
        lines.append(f"| {label} | {pm([r['final_accuracy'] for r in runs], '{:.3f}')} "
                     f"| {pm([mean(r['residual']) for r in runs], '{:.2e}')} "
                     f"| {pm([mean(r['residual_of_update']) for r in runs], '{:.2e}')} "
                     f"| {runs[0]['bytes_up'][0] // runs[0]['config']['num_clients']:,} "
                     f"| {runs[0]['bytes_down'][0] // runs[0]['config']['num_clients']:,} "
                     f"| {1e3 * mean([mean(r['server_time_s']) for r in runs]):.1f} |")
        print(lines[-1], flush=True)
    head = ["| aggregator | final accuracy | residual ‖T−applied‖²/‖T‖² | residual / ‖round's update‖² "
            "| bytes up / client / round | bytes down / client / round | server ms / round |",
            "|---|---|---|---|---|---|---|"]
    return results, "\n".join(head + lines)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing(d, k, r, U, repeats, seed=0):
    g = torch.Generator().manual_seed(seed)
    A0, B0 = torch.randn(r, k, generator=g) / k ** 0.5, torch.randn(d, r, generator=g) / r ** 0.5
    As = A0 + 0.5 * torch.randn(U, r, k, generator=g) / k ** 0.5          # float32, like the adapters
    Bs = B0 + 0.5 * torch.randn(U, d, r, generator=g) / r ** 0.5
    w = torch.rand(U, generator=g) + 0.5
    w = w / w.sum()

    def dense_svd():
        T = F.target(As, Bs, w)                                            # (d, k), float32
        U_, S, Vh = torch.linalg.svd(T, full_matrices=False)
        return U_[:, :r] * S[:r], Vh[:r]

    F.estimate(As, Bs, w, A0, B0)                                          # warm-up (first-call overheads)
    t = {"flora_na_adamw": median_time(lambda: F.estimate(As, Bs, w, A0, B0), repeats),
         "flora_na_als": median_time(lambda: F.estimate(As, Bs, w, A0, B0, solver="als"), repeats),
         "svd_factored": median_time(lambda: F.svd_oracle(As, Bs, w, r), repeats),
         "dense_svd": median_time(dense_svd, repeats)}
    est = F.estimate(As, Bs, w, A0, B0)
    Ad, Bd = F.svd_oracle(As, Bs, w, r)
    res = {"fedit": est.fedit_objective, "flora_na_adamw": est.objective,
           "flora_na_als": F.estimate(As, Bs, w, A0, B0, solver="als").objective,
           "svd": F.residual(As, Bs, w, Ad, Bd)}
    return t, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    ap.add_argument("--rounds", type=int, default=Config.rounds, help="rounds per run")
    ap.add_argument("--timing-size", type=int, default=4096, help="d = k of the timed layer")
    ap.add_argument("--rank", type=int, default=16, help="r of the timed layer")
    ap.add_argument("--clients", type=int, default=10, help="U of the timed layer")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for the timing (1: both sides on one core, robust to other load)")
    ap.add_argument("--timing-only", action="store_true", help="skip the aggregator table")
    ap.add_argument("--out", default="results/flora_compare.json", help="results JSON (the table goes beside it as .md)")
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default Config: {Config()}", flush=True)
    results, table = ({}, "(table skipped: --timing-only)") if a.timing_only else compare(list(range(a.seeds)), a.rounds)
    n = a.timing_size
    torch.set_num_threads(a.threads)
    t, res = timing(n, n, a.rank, a.clients, a.repeats)
    ratio = t["dense_svd"] / t["flora_na_adamw"]
    text = (f"{table}\n\nTiming at d = k = {n}, r = {a.rank}, U = {a.clients} (median of {a.repeats}, "
            f"{torch.get_num_threads()} threads):\n"
            f"- FLoRA-NA estimate, AdamW 200 steps: {t['flora_na_adamw'] * 1e3:.1f} ms (ALS: {t['flora_na_als'] * 1e3:.1f} ms)\n"
            f"- dense truncated SVD (form T, torch.linalg.svd, float32): {t['dense_svd'] * 1e3:.0f} ms\n"
            f"- factored SVD oracle (QR of stacked factors): {t['svd_factored'] * 1e3:.1f} ms\n"
            f"- ratio dense SVD / FLoRA-NA (AdamW) = {ratio:.1f}x; dense SVD / FLoRA-NA (ALS) = "
            f"{t['dense_svd'] / t['flora_na_als']:.1f}x; dense SVD / factored SVD = {t['dense_svd'] / t['svd_factored']:.1f}x\n"
            f"- relative residuals on this random layer: FedIT {res['fedit']:.4e}, FLoRA-NA AdamW "
            f"{res['flora_na_adamw']:.4e}, ALS {res['flora_na_als']:.4e}, SVD {res['svd']:.4e}")
    print("\n" + text)
    out = Path(a.out)
    write_json(out, {"table": table, "timing_s": t, "timing_residuals": res, "ratio_dense_svd_over_flora_na": ratio,
                     "args": vars(a), "command": " ".join(["python"] + sys.argv), "versions": run_info(),
                     "runs": {k: [{x: r[x] for x in ("accuracy", "residual", "residual_of_update", "server_time_s")}
                                  for r in v] for k, v in results.items()}})
    out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
