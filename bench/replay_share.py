"""How much of replay's training is the buffer? The pooled convention (replay_share 0) against a fixed
share of every batch, in the claims bench's federated settings (docs/claims.md, "The replay arm").

    python bench/replay_share.py              # the pooled shares (instant) + cpt 2 on the validation split (~3 min)
    python bench/replay_share.py --no-train   # only the pooled shares, every setting
    python bench/replay_share.py --settings "cpt 2" "Dirichlet α 0.1" --shares 0 0.25 0.5 0.75 --lrs 0.1 0.2

1. Pooled replay (replay_share 0) joins the buffer to a client's task images in one pool, so the
   buffer's share of an epoch is b/(b + n): b the images the client keeps (m per class it has
   seen, at most the images it had of that class), n its images of the current task. With 5
   clients a client's task is small (about 47 images at 2 classes per task on digits), so this
   share grows task by task, from 0 to well above one half. Counted from the scenarios alone: no
   training. (The 7 % of baselines_check.py is one client holding a whole 712-image task.)
2. replay_share s > 0 gives every batch of batch_size task images round(batch_size·s/(1 − s)) buffer
   images (baselines.replay_per_batch), whatever the task. The second part trains replay on the
   validation split (the claims bench's budget and tuning seeds) for each share and lr, so the
   pooled form can be read against fixed shares. Mean validation accuracy over the seeds.
Writes bench/results/replay_share.md (or --out).
"""

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import claims  # noqa: E402  (SETTINGS, BUDGET: the claims bench's own)
from stamp_min.fcl_loop import Config, build, run  # noqa: E402
from stamp_min.tuning import TUNE_SEEDS  # noqa: E402

torch.set_num_threads(1)                        # one thread per run, as the benches' workers


def pooled_shares(cfg):
    """(tasks,) the buffer's share b/(b + n) of each task's pool, averaged over clients, for one seed."""
    ds, scenario, _ = build(cfg)
    labels = ds.y_train
    per_task = []
    for t in range(scenario.num_tasks):
        shares = []
        for row in scenario.tasks:
            kept = 0
            for old in row[:t]:                                     # m per class seen, at most what it had
                y = labels[old.train_idx]
                kept += sum(min(cfg.buffer_per_class, int((y == c).sum())) for c in old.classes)
            n = len(row[t].train_idx)
            shares.append(kept / (kept + n) if kept + n else 0.0)
        per_task.append(statistics.mean(shares))
    return per_task


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["cpt 2"], help=f"trained settings (of {list(claims.SETTINGS)})")
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 0.75], help="replay_share values")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.2], help="learning rates")
    p.add_argument("--no-train", action="store_true", help="only the pooled shares (no training)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "replay_share.md"), help="the report")
    a = p.parse_args(argv)
    bad = [s for s in a.settings if s not in claims.SETTINGS]
    if bad:
        p.error(f"--settings {bad[0]!r} is unknown; allowed: {', '.join(claims.SETTINGS)}")
    base = replace(Config(), **claims.BUDGET, method="replay", validation=True, test_split="per_seed",
                   quiet=True, plot=False, out="")
    lines = ["# Replay's buffer share: pooled against a fixed share of every batch", "",
             "`" + " ".join(["python bench/replay_share.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
             f"(budget: {claims.BUDGET}; tuning seeds {list(TUNE_SEEDS)}; validation split). What it measures: "
             "the docstring.", "", "**Pooled replay (replay_share 0): the buffer's share of each task's epoch**, "
             "mean over clients and seeds:", "", "| setting | task 0, 1, … |", "|---|---|"]
    for s, fields in claims.SETTINGS.items():
        per_seed = [pooled_shares(replace(base, **fields, seed=x)) for x in TUNE_SEEDS]
        mean = [statistics.mean(v) for v in zip(*per_seed)]
        lines.append(f"| {s} | {', '.join(f'{v:.2f}' for v in mean)} |")
        print(lines[-1], flush=True)
    if not a.no_train:
        lines += ["", "**Validation accuracy by replay_share and lr** (mean over the tuning seeds; 0 = pooled):", "",
                  "| setting | replay_share | buffer images per batch | " + " | ".join(f"lr {lr:g}" for lr in a.lrs) + " |",
                  "|---|---|---|" + "---|" * len(a.lrs)]
        start = time.perf_counter()
        for s in a.settings:
            for share in a.shares:
                accs = [statistics.mean(run(replace(base, **claims.SETTINGS[s], replay_share=share, lr=lr, seed=x))
                                        ["avg_accuracy"] for x in TUNE_SEEDS) for lr in a.lrs]
                per_batch = "pooled" if share == 0 else str(round(base.batch_size * share / (1 - share)))
                lines.append(f"| {s} | {share:g} | {per_batch} | " + " | ".join(f"{v:.3f}" for v in accs) + " |")
                print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
        lines += ["", f"{len(a.settings) * len(a.shares) * len(a.lrs) * len(TUNE_SEEDS)} runs, "
                      f"{time.perf_counter() - start:.0f} s, one process."]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
