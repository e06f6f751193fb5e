"""Paper-scale cost, offline: loop overhead, share of GM + aggregation, projected wall time.

    python bench/scale.py                 # CPU: a reduced version (a few minutes on 2 cores)
    python bench/scale.py --full          # the paper's size (10 clients, 25 rounds/task, 5 epochs,
                                          #   batch 128, 500 images/class); meant for a GPU

Data: CIFAR-100-shaped, generated in memory (32x32x3 uint8, 100 classes): each class is a
random smooth colour template plus noise, so classes are learnable. Scenario: per-client
permutations, 2 classes per task (50 tasks), disjoint shares: each client gets 50 images of a
class at the full size. Model: ResNet-18 (32x32 stem).

Measured on `--tasks` tasks (default 2) of STAMP:
- local-training throughput of the loop (images/s over the time clients spend in local training,
  task 0 after its first round: no old tasks, so pure local SGD) next to a bare PyTorch loop (SGD over the same
  batches of the same model, nothing else); their ratio is the loop's overhead;
- the share of a round spent in GM (clients' TAM + the server's SAM) and in aggregation;
- the projected wall time of the paper's run (50 tasks x 25 rounds, 10 clients, 5 epochs, TAM
  replaying t coresets of 2 x 20 images at task t): the images it trains, at the loop's throughput.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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
    model = build_model("resnet18", 100, 3, 32, ds.mean, ds.std).to(device)
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the paper's size (default: reduced for a CPU)")
    p.add_argument("--tasks", type=int, default=2, help="tasks actually run (>= 2 to measure old-task cost)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", default="off", help="off | bf16")
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args()
    size = (dict(num_clients=10, rounds_per_task=25, local_epochs=5, batch_size=128, per_class=500) if a.full else
            dict(num_clients=2, rounds_per_task=3, local_epochs=1, batch_size=32, per_class=50))
    per_class = size.pop("per_class")
    ds = cifar100_shaped(per_class)
    full_rounds = 25
    cfg = Config(dataset="cifar100-shaped", model="resnet18", method="stamp", classes_per_task=2, num_tasks=a.tasks,
                 lr=0.05, buffer_per_class=20, device=a.device, amp=a.amp, channels_last=a.channels_last,
                 quiet=True, **size)
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    bare_tput = bare_loop(cfg, ds, 4 * per_class, device)   # first: it also warms up kernels and lazy imports
    res = run(cfg, dataset=ds)
    rounds = res["rounds"]
    t0 = [r for r in rounds if r["task"] == 0][1:]     # round 0 carries one-off start-up costs
    loop_tput = sum(r["train_images"] * cfg.local_epochs for r in t0) / sum(r["client_seconds"] for r in t0)
    round_s = sum(r["seconds"] for r in rounds) / len(rounds)
    gm_s = sum(r["gm_client_seconds"] for r in rounds) / len(rounds)
    agg_s = sum(r["aggregate_seconds"] for r in rounds) / len(rounds)
    # the paper's run: 50 tasks x 25 rounds; at task t each of 10 clients trains 5 epochs on its
    # 100 current images and on t coresets of 2 x 20 images (TAM); projected at the loop's throughput
    paper_images = sum(25 * 10 * 5 * (100 + t * 2 * 20) for t in range(50))
    print(f"device {device}, {'full' if a.full else 'reduced'} size: {cfg.num_clients} clients, {per_class} images/class, "
          f"{cfg.rounds_per_task} rounds/task x {a.tasks} tasks run, {cfg.local_epochs} local epochs, batch {cfg.batch_size}, "
          f"amp {cfg.amp}, channels-last {cfg.channels_last}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| measure | value |\n|---|---|")
    print(f"| loop local-training throughput (task 0) | {loop_tput:.1f} images/s |")
    print(f"| bare PyTorch loop, same model and batches | {bare_tput:.1f} images/s |")
    print(f"| loop overhead (bare / loop − 1) | {100 * (bare_tput / loop_tput - 1):+.1f} % |")
    print(f"| mean round | {round_s:.2f} s |")
    print(f"| GM in clients (TAM) per round | {gm_s:.3f} s ({100 * gm_s / round_s:.2f} %) |")
    print(f"| Gram + server aggregation (SAM) per round | {agg_s:.3f} s ({100 * agg_s / round_s:.2f} %) |")
    print(f"| paper-scale run: images trained | {paper_images / 1e6:.1f} M |")
    print(f"| projected paper-scale wall time at this throughput | {paper_images / loop_tput / 3600:.1f} h |")
    if res.get("peak_gpu_memory_bytes"):
        print(f"| peak GPU memory | {res['peak_gpu_memory_bytes'] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
