"""How much N worker processes save on a study: the same 10-run study (2 arms × 5 seeds, no tuning)
serially and with --workers N, each from an empty cache, and whether the results are the same bits.

    python bench/study_speedup.py              # workers 1 and 2 (about 2 min on an idle 2-core machine)
    python bench/study_speedup.py --workers 1 2 4 --seeds 10

Prints one line per worker count: wall time, speed-up over serial, and "bit-identical" (or what
differs). Run it on an idle machine: the ratio is what N processes buy when nothing else competes.
The load average before and after is printed too.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stamp_min.fcl_loop import Config  # noqa: E402
from stamp_min.study import study  # noqa: E402

ARMS = {"stamp": dict(method="stamp"), "replay": dict(method="replay")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (the first is the reference)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per arm (2 arms)")
    a = p.parse_args()
    base = Config(num_clients=3, num_tasks=3, rounds_per_task=3, local_epochs=1)
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} cores; {2 * a.seeds} runs per study", flush=True)
    ref, t_ref = None, None
    for w in a.workers:
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            s = study(ARMS, seeds=range(a.seeds), base=base, tune=False, workers=w, cache=cache, quiet=True)
            wall = time.perf_counter() - t
        runs = {(arm, x): s.runs[arm][x]["acc_matrix"] for arm in s.arms for x in s.seeds}
        ref, t_ref = (runs, wall) if ref is None else (ref, t_ref)
        differ = sum(repr(runs[k]) != repr(ref[k]) for k in ref)          # repr: NaN (unmeasured cells) equals NaN
        same = "bit-identical" if not differ else f"{differ} runs differ"
        print(f"workers {w}: {wall:.1f} s, speed-up {t_ref / wall:.2f}x over workers {a.workers[0]}, {same}", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
