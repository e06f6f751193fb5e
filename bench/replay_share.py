"""How much of replay's training is the buffer? The pooled convention (replay_share 0) against a fixed
share of every batch, in the claims bench's federated settings (docs/claims.md, "The replay arm").

    python bench/replay_share.py              # pooled shares (instant) + cpt 2 trained on the validation split (~3 min)
    python bench/replay_share.py --no-train   # only the pooled shares, printed (nothing written unless --out)
    python bench/replay_share.py --settings "cpt 2" "Dirichlet α 0.1" --shares 0 0.25 0.5 0.75 --lrs 0.1 0.2

1. Pooled replay (replay_share 0) joins the buffer to a client's task images in one pool, so the
   buffer's share of an epoch is b/(b + n): b the images the client keeps (m per class it has
   seen in earlier tasks, at most the images it had of that class), n its images of the current
   task. With 5 clients a client's task is small (about 46 images at 2 classes per task on the
   validation split's training images, 57 on the confirmation runs' ones), so at 1 and 2 classes
   per task this share grows task by task from 0 to over one half. Counted from the scenarios
   alone, no training, for the tuning runs (validation split, tuning seeds) and the confirmation
   runs (seeds 0–9, each its own test split). (The 7 % of baselines_check.py is one client
   holding a whole 712-image task.)
2. replay_share s > 0 gives every batch of batch_size task images round(batch_size·s/(1 − s)) buffer
   images (baselines.replay_per_batch), drawn from consecutive permutations of the buffer, so a
   share larger than the buffer repeats images. The second part trains replay on the validation
   split (the claims bench's budget and tuning seeds) for each share and lr, so the pooled form
   can be read against fixed shares: mean validation accuracy over the tuning seeds.
"20 % noisy labels" is left out: its noise comes with the claims bench's arm, not with its setting.
Writes bench/results/replay_share.md when it trains (or wherever --out says).
"""

import argparse
import os
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
from stamp_min import UserError, baselines  # noqa: E402
from stamp_min.fcl_loop import Config, build, run  # noqa: E402
from stamp_min.tuning import TUNE_SEEDS  # noqa: E402

torch.set_num_threads(1)                        # one thread per run, as the benches' workers
SETTINGS = {s: v for s, v in claims.SETTINGS.items() if s != "20 % noisy labels"}
CONFIRM_SEEDS = range(10)                       # the claims bench's confirmation seeds
RESULTS = ROOT / "bench" / "results" / "replay_share.md"


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


def share_table(base, seeds):
    """Markdown rows: every setting's pooled share per task, mean over clients and `seeds`."""
    rows = []
    for s, fields in SETTINGS.items():
        per_seed = [pooled_shares(replace(base, **fields, seed=x)) for x in seeds]
        rows.append(f"| {s} | {', '.join(f'{statistics.mean(v):.2f}' for v in zip(*per_seed))} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["cpt 2"],
                   help="trained settings, of: " + "; ".join(SETTINGS).replace("%", "%%"))
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 0.75],
                   help="replay_share values, 0 (pooled) to 0.9 (ignored with --no-train)")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.2], help="learning rates (ignored with --no-train)")
    p.add_argument("--no-train", action="store_true", help="only the pooled shares, printed")
    p.add_argument("--out", default=None, help=f"the report (default: {RESULTS.relative_to(ROOT)} when it trains; "
                                               "with --no-train nothing is written unless given)")
    a = p.parse_args(argv)
    bad = [s for s in a.settings if s not in SETTINGS]
    if bad:
        p.error(f"--settings {bad[0]!r} is unknown; allowed: {'; '.join(SETTINGS)}")
    base = replace(Config(), **claims.BUDGET, method="replay", quiet=True, plot=False, out="")
    tuning = replace(base, validation=True, test_split="per_seed")              # what the tuning runs see
    jobs = [] if a.no_train else [(s, share, lr) for s in a.settings for share in a.shares for lr in a.lrs]
    for s, share, lr in jobs:                                                   # every mistake before any work
        try:
            replace(tuning, **SETTINGS[s], replay_share=share, lr=lr).validate()
        except UserError as e:
            p.error(f"--shares {share:g} / --lrs {lr:g}: {e}")
    out = Path(a.out) if a.out else (None if a.no_train else RESULTS)
    if out is not None and not (out.parent.is_dir() and os.access(out.parent, os.W_OK)):
        p.error(f"--out {out}: its folder does not exist or cannot be written; allowed: a file in a writable folder")
    cmd = " ".join(["python bench/replay_share.py", *(sys.argv[1:] if argv is None else argv)])
    lines = ["# Replay's buffer share: pooled against a fixed share of every batch", "", f"`{cmd}` "
             f"(bench/replay_share.py; budget: {claims.BUDGET}).", "",
             "**Pooled replay (replay_share 0): the buffer's share b/(b + n) of each task's pool**, b the images a "
             "client keeps (m per class of its earlier tasks, at most what it had), n its images of the task; mean "
             "over clients and seeds.", ""]
    for what, cfg, seeds in ((f"tuning runs (validation split, seeds {list(TUNE_SEEDS)})", tuning, TUNE_SEEDS),
                             (f"confirmation runs (seeds {CONFIRM_SEEDS.start}–{CONFIRM_SEEDS.stop - 1}, each its own "
                              "test split)", replace(base, test_split="per_seed"), CONFIRM_SEEDS)):
        lines += [f"*{what}*", "", "| setting | task 1, 2, … |", "|---|---|", *share_table(cfg, seeds), ""]
    print("\n".join(lines), flush=True)
    if jobs:
        head = ["**Validation accuracy by replay_share and lr** (mean over the tuning seeds; 0 = pooled; a share "
                "larger than the buffer repeats buffer images within a batch):", "",
                "| setting | replay_share | buffer images per batch | " + " | ".join(f"lr {lr:g}" for lr in a.lrs) + " |",
                "|---|---|---|" + "---|" * len(a.lrs)]
        lines += head
        print("\n".join(head), flush=True)
        start = time.perf_counter()
        for s in a.settings:
            cfg = replace(tuning, **SETTINGS[s])
            for share in a.shares:
                cells = []
                for lr in a.lrs:
                    try:
                        accs = [run(replace(cfg, replay_share=share, lr=lr, seed=x))["avg_accuracy"] for x in TUNE_SEEDS]
                        cells.append(f"{statistics.mean(accs):.3f}")
                    except UserError as e:                          # e.g. diverged at this lr: said, not fatal
                        cells.append(f"failed ({str(e).split(':')[0]})")
                per_batch = "pooled" if share == 0 else str(baselines.replay_per_batch(cfg.batch_size, share))
                lines.append(f"| {s} | {share:g} | {per_batch} | " + " | ".join(cells) + " |")
                print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
        lines += ["", f"{len(jobs) * len(TUNE_SEEDS)} runs, {time.perf_counter() - start:.0f} s, one process."]
    if out is not None:
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
