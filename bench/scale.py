"""Paper-scale cost, offline: loop overhead, share of GM + aggregation, projected wall time.

    python bench/scale.py                 # CPU: a reduced version (a few minutes on 2 cores)
    python bench/scale.py --full          # the paper's size (10 clients, 25 rounds/task, 5 epochs,
                                          #   batch 128, 500 images/class); meant for a GPU
    python bench/scale.py --full --device cuda --amp bf16 --channels-last --json scale.json

Data: CIFAR-100-shaped, generated in memory (32x32x3 uint8, 100 classes): each class is a
random smooth colour template plus noise, so classes are learnable. Scenario: per-client
permutations, 2 classes per task (50 tasks), disjoint shares: each client gets 50 images of a
class at the full size. Model: ResNet-18 (32x32 stem).

Measured on `--tasks` tasks (default 2) of STAMP:
- local-training throughput of the loop (images/s over the time clients spend in local training,
  task 0 after its first round: no old tasks, so pure local SGD) next to a bare PyTorch loop (SGD over the same
  batches of the same model, nothing else); their ratio is the loop's overhead;
- the share of a round spent in GM (clients' TAM + the server's SAM) and in aggregation;
- the share of a round spent training TAM's old-task clones (rounds of tasks >= 1; the clients'
  `clone_seconds`), and the clones' own throughput (small batches: one coreset of 2 x 20 images);
- the projected wall time of the paper's run (50 tasks x 25 rounds, 10 clients, 5 epochs, TAM
  replaying t coresets of 2 x 20 images at task t): the images it trains, at the loop's throughput;
  and again with the clones' images at the clones' throughput plus each round's other costs.

`--rounds N` runs N rounds per task instead of the size's (the projection always counts the
paper's 25; `--per-class` and `--model cnn` shrink a smoke test further); `--json PATH` writes the measures as JSON too; `--tam-clones loop|batched` passes
Config.tam_clones through (where this Config has that field).
"""

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stamp_min.cli import write_json  # noqa: E402
from stamp_min.data import Dataset  # noqa: E402
from stamp_min.fcl_loop import Config, run  # noqa: E402
from stamp_min.models import build_model  # noqa: E402


def cifar100_shaped(per_class, test_per_class=10, seed=0):
    """Learnable CIFAR-100-shaped data: class template (smooth, coloured) + per-image noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(100, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)

    def make(n):
        y = torch.arange(100).repeat_interleave(n)
        x = templates[y] * 0.6 + torch.rand(len(y), 3, 32, 32, generator=g) * 0.4
        return (x * 255).to(torch.uint8), y

    x, y = make(per_class)
    xt, yt = make(test_per_class)
    return Dataset("cifar100-shaped", x, y, xt, yt, 100, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def bare_loop(cfg, ds, images, device):
    """Plain PyTorch: the same model, batch size and epochs over `images` random images. imgs/s."""
    torch.manual_seed(0)
    model = build_model(cfg.model, 100, 3, 32, ds.mean, ds.std).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    x, y = ds.x_train[:images].to(device), ds.y_train[:images].to(device)
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg.local_epochs):
        for idx in torch.randperm(len(y)).split(cfg.batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                loss = F.cross_entropy(model(x[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync()
    return len(y) * cfg.local_epochs / (time.perf_counter() - t0)


PAPER_TASKS, PAPER_ROUNDS, PAPER_CLIENTS, PAPER_EPOCHS, PAPER_CUR, PAPER_CORESET = 50, 25, 10, 5, 100, 2 * 20


def measure(res, cfg, per_class, bare_tput):
    """The measures of one run (its results dict) as a flat dict of numbers."""
    rounds = res["rounds"]
    t0 = [r for r in rounds if r["task"] == 0][1:] or [r for r in rounds if r["task"] == 0]  # round 0: start-up costs
    old = [r for r in rounds if r["task"] >= 1]                    # rounds with old tasks: TAM trains clones
    loop_tput = sum(r["train_images"] * cfg.local_epochs for r in t0) / sum(r["client_seconds"] for r in t0)
    round_s = sum(r["seconds"] for r in rounds) / len(rounds)
    gm_s = sum(r["gm_client_seconds"] for r in rounds) / len(rounds)
    agg_s = sum(r["aggregate_seconds"] for r in rounds) / len(rounds)
    other_s = sum(r["seconds"] - r["client_seconds"] for r in rounds) / len(rounds)   # aggregation + evaluation
    # an old task's coreset: buffer_per_class images of each of its classes (fewer if a client has fewer)
    coreset = cfg.classes_per_task * min(cfg.buffer_per_class, per_class // cfg.num_clients)
    clone_s = sum(r.get("clone_client_seconds", 0.0) for r in old)
    clone_images = sum(len(r["clients"]) * r["task"] * coreset * cfg.local_epochs for r in old)
    clone_tput = clone_images / clone_s if clone_s > 0 else None
    # the paper's run: 50 tasks x 25 rounds; at task t each of 10 clients trains 5 epochs on its
    # 100 current images and on t coresets of 2 x 20 images (TAM)
    per_round = PAPER_ROUNDS * PAPER_CLIENTS * PAPER_EPOCHS
    cur_images = per_round * PAPER_CUR * PAPER_TASKS
    old_images = per_round * PAPER_CORESET * sum(range(PAPER_TASKS))
    m = {"loop_images_per_s": loop_tput, "bare_images_per_s": bare_tput,
         "loop_overhead_pct": 100 * (bare_tput / loop_tput - 1), "mean_round_s": round_s,
         "gm_client_s_per_round": gm_s, "gm_client_share": gm_s / round_s,
         "aggregate_s_per_round": agg_s, "aggregate_share": agg_s / round_s,
         "clone_s_per_round_old_tasks": clone_s / len(old) if old else None,
         "clone_share_old_tasks": clone_s / sum(r["seconds"] for r in old) if old and clone_s > 0 else None,
         "clone_images_per_s": clone_tput, "coreset_images": coreset,
         "paper_images": cur_images + old_images, "paper_clone_images": old_images,
         "projected_hours_at_loop_throughput": (cur_images + old_images) / loop_tput / 3600,
         "projected_hours_with_clone_throughput": None, "projected_clone_share": None,
         "peak_gpu_memory_bytes": res.get("peak_gpu_memory_bytes"), "run_wall_s": res["wall_time_s"]}
    if clone_tput:
        cur_h, old_h = cur_images / loop_tput / 3600, old_images / clone_tput / 3600
        other_h = other_s * PAPER_TASKS * PAPER_ROUNDS / 3600
        m.update(projected_hours_with_clone_throughput=cur_h + old_h + other_h,
                 projected_clone_share=old_h / (cur_h + old_h + other_h))
    return m


def table(m):
    """The measures as a markdown table."""
    pct = (lambda x: "n/a" if x is None else f"{100 * x:.2f} %")
    num = (lambda x, f: "n/a" if x is None else format(x, f))
    rows = [("loop local-training throughput (task 0)", f"{m['loop_images_per_s']:.1f} images/s"),
            ("bare PyTorch loop, same model and batches", f"{m['bare_images_per_s']:.1f} images/s"),
            ("loop overhead (bare / loop − 1)", f"{m['loop_overhead_pct']:+.1f} %"),
            ("mean round", f"{m['mean_round_s']:.2f} s"),
            ("GM in clients (TAM) per round", f"{m['gm_client_s_per_round']:.3f} s ({pct(m['gm_client_share'])})"),
            ("Gram + server aggregation (SAM) per round", f"{m['aggregate_s_per_round']:.3f} s ({pct(m['aggregate_share'])})"),
            ("old-task clones (TAM) per round, tasks >= 2", f"{num(m['clone_s_per_round_old_tasks'], '.3f')} s "
                                                          f"({pct(m['clone_share_old_tasks'])} of those rounds)"),
            (f"old-task clone throughput (coresets of {m['coreset_images']} images)",
             f"{num(m['clone_images_per_s'], '.1f')} images/s"),
            ("paper-scale run: images trained", f"{m['paper_images'] / 1e6:.1f} M "
                                                f"({m['paper_clone_images'] / 1e6:.1f} M in old-task clones)"),
            ("projected paper-scale wall time at the loop's throughput", f"{m['projected_hours_at_loop_throughput']:.1f} h"),
            ("projected, clones at their throughput + other per-round costs",
             f"{num(m['projected_hours_with_clone_throughput'], '.1f')} h (clones {pct(m['projected_clone_share'])})")]
    if m.get("peak_gpu_memory_bytes"):
        rows.append(("peak GPU memory", f"{m['peak_gpu_memory_bytes'] / 2**30:.2f} GiB"))
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the paper's size (default: reduced for a CPU)")
    p.add_argument("--tasks", type=int, default=2, help="tasks actually run (>= 2 to measure old-task cost)")
    p.add_argument("--rounds", type=int, default=0, help="rounds per task actually run (0: the size's, 25 or 3)")
    p.add_argument("--per-class", type=int, default=0, help="images per class (0: the size's, 500 or 50)")
    p.add_argument("--model", default="resnet18", help="backbone (resnet18: the paper's; cnn: a smoke test)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", default="off", help="off | bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tam-clones", choices=("loop", "batched"), default=None,
                   help="Config.tam_clones: TAM's old-task clones one after another or batched (default: Config's)")
    p.add_argument("--json", default="", metavar="PATH", help="also write the measures to this JSON file")
    a = p.parse_args()
    size = (dict(num_clients=10, rounds_per_task=PAPER_ROUNDS, local_epochs=5, batch_size=128, per_class=500) if a.full else
            dict(num_clients=2, rounds_per_task=3, local_epochs=1, batch_size=32, per_class=50))
    per_class = a.per_class or size.pop("per_class")
    size.pop("per_class", None)
    if a.rounds:
        size["rounds_per_task"] = a.rounds
    extra = {}
    if a.tam_clones is not None:
        if "tam_clones" in {f.name for f in fields(Config)}:
            extra["tam_clones"] = a.tam_clones
        elif a.tam_clones != "loop":
            sys.exit(f"--tam-clones {a.tam_clones}: this stamp_min has no Config.tam_clones; allowed: loop")
    ds = cifar100_shaped(per_class)
    cfg = Config(dataset="cifar100-shaped", model=a.model, method="stamp", classes_per_task=2, num_tasks=a.tasks,
                 lr=0.05, buffer_per_class=20, device=a.device, amp=a.amp, channels_last=a.channels_last,
                 quiet=True, **size, **extra)
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    bare_tput = bare_loop(cfg, ds, 4 * per_class, device)   # first: it also warms up kernels and lazy imports
    res = run(cfg, dataset=ds)
    m = measure(res, cfg, per_class, bare_tput)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    tam_clones = getattr(cfg, "tam_clones", "loop")
    print(f"device {device} ({where}), {'full' if a.full else 'reduced'} size, {cfg.model}: {cfg.num_clients} clients, "
          f"{per_class} images/class, {cfg.rounds_per_task} rounds/task x {a.tasks} tasks run, {cfg.local_epochs} local "
          f"epochs, batch {cfg.batch_size}, amp {cfg.amp}, channels-last {cfg.channels_last}, tam-clones {tam_clones}; "
          f"torch {torch.__version__}")
    print(table(m))
    if a.json:
        write_json(a.json, {"device": str(device), "device_name": where, "size": "full" if a.full else "reduced",
                            "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
                            "settings": {"model": cfg.model, "num_clients": cfg.num_clients, "per_class": per_class,
                                         "rounds_per_task": cfg.rounds_per_task, "tasks": a.tasks,
                                         "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size,
                                         "amp": cfg.amp, "channels_last": cfg.channels_last, "tam_clones": tam_clones},
                            "measures": m, "table": table(m)})
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
