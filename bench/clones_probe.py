"""Probe: TAM's old-task clones one after another (tam_clones="loop") vs together ("batched").

Builds a model and t old tasks of random images (a coreset each: --images images of 2 classes),
trains the t clones from the same start with client.clone_updates both ways, and reports the
wall time of each (best of --repeat, after a warm-up run), the speed-up loop/batched, and how far
the batched Δ_j lie from the loop's: the largest absolute difference over every float state entry
(weights and BatchNorm statistics), the same divided by that entry's largest |Δ|, and the largest
loss difference. For scale, the same differences between the loop and the loop started from
weights nudged by 1e-7 (relative): the rounding floor of this model and setting (BatchNorm on
few images amplifies rounding; no two float32 implementations can agree much better than that).
And the same in float64 (--float64 1, the default; floor: a 1e-15 nudge), where rounding is out of
the way: there the batched Δ_j match the loop's far below the floor (tests/test_clones.py: ~1e-11
relative), which says they compute the same thing.

    python bench/clones_probe.py --device cuda                    # ResNet-18, 4 tasks x 40 32x32 images
    python bench/clones_probe.py --device cpu --quick             # seconds on a CPU
    python bench/clones_probe.py --device cuda --tasks 9 --json probe.json

Defaults follow the paper's scale [METHOD §1.1]: ResNet-18, CIFAR-100's 100 classes, batch 128,
5 local epochs, lr 0.05, a coreset of 20 images per class x 2 classes per task. Times are ratios
within one run; compare them, not absolute times across machines.
"""

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stamp_min.client import clone_updates, float_state  # noqa: E402
from stamp_min.config import Config  # noqa: E402
from stamp_min.models import Classifier, build_model  # noqa: E402

QUICK = dict(model="resnet18", tasks=2, images=12, epochs=2, batch_size=12, image_size=8, repeat=1)


def old_tasks(t, n, channels, side, num_classes, seed=0):
    """t old tasks [(key, x (n, C, H, W) uint8, y (n,))], task j of classes 2j and 2j+1."""
    g = torch.Generator().manual_seed(seed)
    return [((2 * j, 2 * j + 1), torch.randint(0, 256, (n, channels, side, side), generator=g, dtype=torch.uint8),
             (2 * j + torch.randint(0, 2, (n,), generator=g)) % num_classes) for j in range(t)]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model, start, theta, old, cfg, device, repeat):
    """(best seconds, [(Δ_j, loss_j)]) of clone_updates, the same seed every time."""
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = clone_updates(model, start, theta, old, cfg, torch.Generator().manual_seed(1))
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def differences(a, b):
    """Largest |Δa − Δb|, largest |Δa − Δb| / max|Δa| per entry, largest |loss a − loss b|."""
    ab = rel = loss = 0.0
    for (da, la), (db, lb) in zip(a, b, strict=True):
        for n in da:
            e = (da[n].double() - db[n].double()).abs().max().item()
            ab, rel = max(ab, e), max(rel, e / max(da[n].abs().max().item(), 1e-30))
        loss = max(loss, abs(la - lb))
    return ab, rel, loss


class Float64(Classifier):
    """The same network in float64 (Classifier.features casts images to float32)."""
    def features(self, x):
        return self.body((x.double() / 255.0 - self.mean) / self.std)


def compare(net, theta, old, cfg, device, repeat, nudge, warm=True):
    """{mode: (best seconds, results)} for loop and batched, and the loop's results from θ nudged
    by `nudge` (relative): the rounding floor."""
    runs = {}
    for mode in ("loop", "batched"):
        c = replace(cfg, tam_clones=mode)
        if warm:
            timed(net, theta, theta, old, c, device, 1)                  # warm-up (kernels, allocator)
        runs[mode] = timed(net, theta, theta, old, c, device, repeat)
    g = torch.Generator().manual_seed(2)
    nudged = {n: v * (1 + nudge * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v)) for n, v in theta.items()}
    return runs, timed(net, nudged, theta, old, replace(cfg, tam_clones="loop"), device, 1)[1]


def probe(device="cpu", model="resnet18", tasks=4, images=40, epochs=5, batch_size=128, image_size=32, classes=100,
          lr=0.05, momentum=0.0, mixstyle=True, repeat=3, threads=0, float64=True):
    """Time and compare loop vs batched; returns a dict of the settings and the measures."""
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_model(model, classes, 3, image_size).to(device)
    old = old_tasks(tasks, images, 3, image_size, classes)
    cfg = replace(Config(), local_epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, mixstyle=mixstyle)
    res = {"device": str(device), "model": model, "tasks": tasks, "images": images, "epochs": epochs,
           "batch_size": batch_size, "image_size": image_size, "classes": classes, "lr": lr, "momentum": momentum,
           "mixstyle": mixstyle, "repeat": repeat, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()}
    runs, floor = compare(net, float_state(net), old, cfg, device, repeat, 1e-7)
    (t_loop, loop), (t_batched, batched) = runs["loop"], runs["batched"]
    res.update(loop_s=t_loop, batched_s=t_batched, speedup=t_loop / t_batched)
    res.update(zip(("max_abs_diff", "max_rel_diff", "max_loss_diff"), differences(loop, batched)))
    res.update(zip(("floor_abs_diff", "floor_rel_diff", "floor_loss_diff"), differences(loop, floor)))
    if float64:                                             # rounding out of the way: the same computation?
        torch.manual_seed(0)
        body = build_model(model, classes, 3, image_size)
        net = Float64(body.body, body.head.in_features, classes, (0.5,) * 3, (0.5,) * 3, body.early_block,
                      body.early_layout).double().to(device)
        f64 = replace(cfg, local_epochs=min(epochs, 2))      # fp64 convolutions are slow: 2 epochs show it
        runs, floor = compare(net, float_state(net), old, f64, device, 1, 1e-15, warm=False)
        res["f64_epochs"] = f64.local_epochs
        res.update(zip(("f64_max_abs_diff", "f64_max_rel_diff"), differences(runs["loop"][1], runs["batched"][1])))
        res.update(zip(("f64_floor_abs_diff", "f64_floor_rel_diff"), differences(runs["loop"][1], floor)))
    if device.type == "cuda":
        res["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--model", default="resnet18", choices=("cnn", "resnet18"), help="backbone (models.py)")
    p.add_argument("--tasks", type=int, default=4, help="number of old tasks t (clones)")
    p.add_argument("--images", type=int, default=40, help="coreset images per old task")
    p.add_argument("--epochs", type=int, default=5, help="local epochs per clone")
    p.add_argument("--batch-size", type=int, default=128, help="local mini-batch size")
    p.add_argument("--image-size", type=int, default=32, help="images are 3 x S x S")
    p.add_argument("--classes", type=int, default=100, help="classes of the head")
    p.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.0, help="local SGD momentum")
    p.add_argument("--mixstyle", type=int, default=1, choices=(0, 1), help="MixStyle on the replayed coreset")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each (best is kept), after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--float64", type=int, default=1, choices=(0, 1),
                   help="also compare loop and batched in float64, where rounding is out of the way")
    p.add_argument("--quick", action="store_true", help="a seconds-long CPU case: " + str(QUICK))
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    a = vars(p.parse_args(argv))
    path, quick = a.pop("json"), a.pop("quick")
    if quick:
        a.update(QUICK)
    a["mixstyle"], a["float64"] = bool(a["mixstyle"]), bool(a["float64"])
    res = probe(**a)
    for k, v in res.items():
        print(f"{k:>22}  {v:.3g}" if isinstance(v, float) else f"{k:>22}  {v}")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
