"""Every method on digits, two heterogeneity settings, 3 seeds, learning rates tuned fairly.

    python bench/compare.py                      # docs/stamp.md's comparison with 3 seeds (about 3 min on an idle 2-core machine)
    python bench/compare.py --seeds 1 --grid 0.1 --methods fedavg,stamp   # a quick look

1. Tuning: for every (setting, method), each lr of the same grid is run once (seed 0) with
   `validation=True`: the model is scored on images held out of the *training* split; the test
   split is not looked at. The lr with the best validation average accuracy is kept.
2. Test: that lr, seeds 0..S-1, scored on the test split. Mean ± std over seeds.

Same budget for every method: clients, rounds per task, local epochs, batch size, buffer size
(for the methods with a buffer). STAMP's clients do extra local work per round (one short pass
over each old task's coreset); the wall-time column shows what that costs.
Runs go two at a time, one thread each (2 cores); wall times are measured under that load.
"""

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stamp_min.cli import write_json  # noqa: E402
from stamp_min.fcl_loop import METHODS, Config  # noqa: E402

SETTINGS = {"2 classes/task, 5 tasks": dict(classes_per_task=2), "5 classes/task, 2 tasks": dict(classes_per_task=5)}
BUDGET = dict(dataset="digits", num_clients=5, rounds_per_task=5, local_epochs=2, batch_size=16, buffer_per_class=10,
              quiet=True, plot=False)


def one(cfg):
    import torch
    torch.set_num_threads(1)
    from stamp_min import UserError
    from stamp_min.fcl_loop import run
    try:
        r = run(cfg)
    except UserError as e:      # diverged at this lr: it is simply not chosen
        print(f"{cfg.method} lr={cfg.lr} seed={cfg.seed}: {e}", flush=True)
        return None
    return {k: r[k] for k in ("avg_accuracy", "avg_forgetting", "bwt", "wall_time_s", "comm_bytes", "buffer_bytes",
                              "current_task_accuracy")}


def fmt(values, scale=1.0, digits=3):
    vals = [v * scale for v in values if v is not None]
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--seeds", type=int, default=3, help="test seeds 0..S-1")
    p.add_argument("--grid", default="0.03,0.1,0.2", help="learning rates tried for every method")
    p.add_argument("--workers", type=int, default=2, help="runs at a time")
    p.add_argument("--out", default="bench/results/compare.md", help="markdown table; the raw numbers go beside it as .json")
    a = p.parse_args()
    methods, grid = a.methods.split(","), [float(g) for g in a.grid.split(",")]
    start = time.perf_counter()
    jobs = {}
    with ProcessPoolExecutor(a.workers) as pool:
        for s, kw in SETTINGS.items():
            for m in methods:
                for lr in grid:
                    cfg = Config(**BUDGET, **kw, method=m, lr=lr, seed=0, validation=True)
                    jobs[("val", s, m, lr)] = pool.submit(one, cfg)
        val = {key: f.result() for key, f in jobs.items()}
        score = lambda r: -1.0 if r is None else r["avg_accuracy"]   # noqa: E731
        best = {(s, m): max(grid, key=lambda lr: score(val[("val", s, m, lr)])) for s in SETTINGS for m in methods}
        print(f"tuned in {time.perf_counter() - start:.0f}s: " + ", ".join(f"{m}@{s[:1]}cpt lr={lr}" for (s, m), lr in best.items()), flush=True)
        test_jobs = {(s, m, seed): pool.submit(one, Config(**BUDGET, **SETTINGS[s], method=m, lr=best[s, m], seed=seed))
                     for s in SETTINGS for m in methods for seed in range(a.seeds)}
        test = {key: f.result() for key, f in test_jobs.items()}

    lines = [f"Digits, 5 clients, 5 rounds/task, 2 local epochs, batch 16, buffer 10 images/class; "
             f"lr tuned per method on a validation split over {grid}; mean ± std over {a.seeds} seed(s).", ""]
    for s in SETTINGS:
        fedavg_time = statistics.mean(test[s, "fedavg", i]["wall_time_s"] for i in range(a.seeds)) if "fedavg" in methods else None
        lines += [f"**{s}**", "",
                  "| method | lr | avg accuracy | forgetting | BWT | wall s | × FedAvg time | comm MB | buffer kB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            rs = [r for r in (test[s, m, i] for i in range(a.seeds)) if r is not None]
            if len(rs) < a.seeds:
                lines.append(f"| {m} | {best[s, m]} | diverged on {a.seeds - len(rs)} of {a.seeds} seeds | | | | | | |")
                continue
            wall = statistics.mean(r["wall_time_s"] for r in rs)
            ratio = f"{wall / fedavg_time:.2f}" if fedavg_time else "–"
            lines.append(f"| {m} | {best[s, m]} | {fmt([r['avg_accuracy'] for r in rs])} | "
                         f"{fmt([r['avg_forgetting'] for r in rs])} | {fmt([r['bwt'] for r in rs])} | {wall:.1f} | {ratio} | "
                         f"{rs[0]['comm_bytes'] / 1e6:.1f} | {rs[0]['buffer_bytes'] / 1e3:.1f} |")
        lines.append("")
    lines.append(f"total bench time {time.perf_counter() - start:.0f}s; command: `python bench/compare.py "
                 f"--methods {a.methods} --seeds {a.seeds} --grid {a.grid}`")
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    write_json(out.with_suffix(".json"), {"best_lr": {f"{s}|{m}": lr for (s, m), lr in best.items()},
                                          "validation": {"|".join(map(str, k[1:])): v for k, v in val.items()},
                                          "test": {"|".join(map(str, k)): v for k, v in test.items()}})


if __name__ == "__main__":
    main()
