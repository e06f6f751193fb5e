"""The baselines side by side with Avalanche's own code, on identical inputs (the project's cnn, real
digits images), and the conventions where the two differ. Not part of CI (the suite's references
are hand-computed: tests/test_baselines.py).

    python bench/baselines_check.py              # every check; Avalanche's rows when it is installed
    python bench/baselines_check.py --accuracy   # + replay pooled vs half of every batch from the buffer

Avalanche is optional. Install it next to this project's torch without replacing it (its own
requirement says just "torch", so pinning yours keeps it):

    pip install avalanche-lib==0.6.0 torch==<your torch version> torchvision==<your torchvision version>

(the script prints the line with your versions). What is compared:

  EWC Fisher     ours: per-image squared gradients, mean over every image of the task. Avalanche's
                 EWCPlugin.compute_importances with batch size 1 must give the same; with a batch
                 of 16 it squares batch-mean gradients: smaller by up to 16x, by how much depends on
                 how much the per-image gradients agree (measured here), so λ does not transfer.
  EWC penalty    ours (λ/2)·Σ F (w − w*)²; Avalanche λ·Σ F (w − w*)²: equal with λ_ours = 2·λ_theirs,
                 in online mode (decay 1) and separate mode, after two tasks.
  Fisher cap     the Fisher of the first 256 images of a class-sorted task (what this library did
                 before) and of a class-stratified sample of 256, against the whole task.
  LwF            ours with lwf_t2=false against LearningWithoutForgetting (α·KL); ours by default
                 is T² times that.
  A-GEM          our projection against AGEMPlugin.after_backward, conflicting and agreeing.
  replay         the share of every batch that comes from the buffer: ours pooled, ours with
                 replay_share 0.5, Avalanche's ReplayDataLoader (batch_size = batch_size_mem).
"""

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stamp_min import baselines  # noqa: E402
from stamp_min.client import local_train  # noqa: E402
from stamp_min.fcl_loop import Config, build, run  # noqa: E402
from stamp_min.metrics import t_quantile  # noqa: E402

ROWS = []


def row(check, ours, theirs, diff):
    ROWS.append((check, ours, theirs, diff))
    print(f"| {check} | {ours} | {theirs} | {diff} |", flush=True)


def rel_l1(a, b):
    """Σ|a − b| / Σ|b| over every entry of two {name: tensor} dicts."""
    return float(sum((a[n] - b[n]).abs().sum() for n in b) / sum(b[n].abs().sum() for n in b))


def task_data(classes_per_task=5, seed=0):
    """The two 5-class tasks of one client on digits, class-sorted as the scenario hands them, and the
    cnn trained on the first (2 epochs, batch 16, lr 0.1): the Fisher is taken at a task's end."""
    ds, scenario, model = build(Config(num_clients=1, classes_per_task=classes_per_task, seed=seed))
    data = [(ds.x_train[t.train_idx].float() / 255, ds.y_train[t.train_idx]) for t in scenario.tasks[0]]
    local_train(model, *data[0], 2, 16, 0.1, torch.Generator().manual_seed(seed))
    return data, model


def avalanche():
    try:
        import avalanche  # noqa: F401
        return True
    except ImportError:
        import torchvision
        print(f"\nAvalanche is not installed: its rows are skipped. To add them without replacing torch:\n"
              f"    pip install avalanche-lib==0.6.0 torch=={torch.__version__} torchvision=={torchvision.__version__}\n")
        return False


def fisher_checks(data, model, have_avalanche):
    (x, y), _ = data
    ours = baselines.fisher_diagonal(model, x, y)
    first = baselines.fisher_diagonal(model, x[:256], y[:256])
    strat = baselines.fisher_diagonal(model, x, y, 256, torch.Generator().manual_seed(0))
    row(f"Fisher, first 256 of {len(y)} class-sorted images (before) vs whole task",
        f"classes {sorted(set(y[:256].tolist()))} of {sorted(set(y.tolist()))}", "", f"rel. L1 {rel_l1(first, ours):.2f}")
    row("Fisher, class-stratified 256 vs whole task", "", "", f"rel. L1 {rel_l1(strat, ours):.2f}")
    if not have_avalanche:
        return
    from avalanche.training.plugins import EWCPlugin
    plugin = EWCPlugin(ewc_lambda=1.0)
    loader_set = torch.utils.data.TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long))
    for bs in (1, 16):
        imp = plugin.compute_importances(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                                         loader_set, "cpu", bs)
        theirs = {n: p.data for n, p in imp.items()}
        if bs == 1:
            row("Fisher vs Avalanche, batch size 1", f"sum {sum(float(v.sum()) for v in ours.values()):.4g}",
                f"sum {sum(float(v.sum()) for v in theirs.values()):.4g}", f"rel. L1 {rel_l1(ours, theirs):.1e}")
        else:
            ratio = sum(float(v.sum()) for v in ours.values()) / sum(float(v.sum()) for v in theirs.values())
            row("Fisher vs Avalanche, batch size 16 (squared batch-mean gradients)", "", "",
                f"ours / theirs = {ratio:.1f}x: λ does not transfer")


def ewc_penalty_checks(data, lam=10.0):
    """Two tasks: our (λ/2) penalty against EWCPlugin's λ penalty with λ_theirs = λ/2, both modes."""
    from avalanche.training.plugins import EWCPlugin
    from avalanche.training.utils import copy_params_dict
    g = torch.Generator().manual_seed(0)
    for mode in ("online", "separate"):
        net = build(Config(num_clients=1, classes_per_task=5))[2]
        plugin = EWCPlugin(ewc_lambda=lam / 2, mode=mode, decay_factor=1.0 if mode == "online" else None,
                           keep_importance_data=mode == "separate")
        extra = {}
        for t, (x, y) in enumerate(data):
            x, y = x[::5], y[::5]                     # every 5th image: every class, a fifth of the time
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
            baselines.ewc_update_state(net, x, y, extra, mode)
            imp = plugin.compute_importances(net, F.cross_entropy, torch.optim.SGD(net.parameters(), lr=0.1),
                                             torch.utils.data.TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long)),
                                             "cpu", 1)
            plugin.update_importances(imp, t)
            plugin.saved_params[t] = copy_params_dict(net)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        ours = baselines.ewc_loss(extra, lam, "cpu")(net, None, None, None, None).item()
        strategy = SimpleNamespace(clock=SimpleNamespace(train_exp_counter=len(data)), model=net, device="cpu",
                                   loss=torch.tensor(0.0))
        plugin.before_backward(strategy)
        theirs = float(strategy.loss)
        row(f"EWC penalty, {mode}, 2 tasks (λ_ours = 2·λ_theirs = {lam:g})", f"{ours:.6g}", f"{theirs:.6g}",
            f"{abs(ours - theirs) / abs(theirs):.1e}")


def lwf_checks(data, model, have_avalanche):
    (x, y), _ = data
    old = build(Config(num_clients=1, classes_per_task=5, seed=1))[2].eval()
    logits = model(x[:16])
    cols = sorted(set(y.tolist()))
    plain = float(baselines.lwf_loss(old, set(cols), 1.0, 2.0, t2=False)(model, None, logits, x[:16], None))
    t2 = float(baselines.lwf_loss(old, set(cols), 1.0, 2.0)(model, None, logits, x[:16], None))
    row("LwF at T = 2, default (×T²) vs lwf_t2=false", f"{t2:.6g}", f"{plain:.6g}", f"ratio {t2 / plain:.2f} = T²")
    if have_avalanche:
        from avalanche.training.regularization import LearningWithoutForgetting
        lwf = LearningWithoutForgetting(alpha=1.0, temperature=2.0)
        with torch.no_grad():
            prev = old(x[:16])
        theirs = float(lwf._distillation_loss(logits, prev, set(cols)))
        row("LwF, lwf_t2=false vs Avalanche (α·KL)", f"{plain:.6g}", f"{theirs:.6g}", f"{abs(plain - theirs):.1e}")


def agem_checks(data, model):
    from avalanche.training.plugins import AGEMPlugin
    (xm, ym), (x, y) = data
    for name, (a, b) in {"current task vs buffer": ((x[:16], y[:16]), (xm[:16], ym[:16])),
                         "buffer vs itself": ((xm[:16], ym[:16]), (xm[16:32], ym[16:32]))}.items():
        model.zero_grad()
        F.cross_entropy(model(b[0]), b[1]).backward()
        g_ref = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad()
        F.cross_entropy(model(a[0]), a[1]).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        ours = baselines.agem_project(g, g_ref)
        plugin = AGEMPlugin(patterns_per_experience=10, sample_size=16)
        plugin.buffers, plugin.reference_gradients = [None], g_ref
        plugin.after_backward(SimpleNamespace(model=model, device="cpu"))
        theirs = torch.cat([p.grad.flatten() for p in model.parameters()])
        row(f"A-GEM projection, {name} (g·g_ref {float(g @ g_ref):+.3g})", "", "",
            f"max |ours − theirs| {float((ours - theirs).abs().max()):.1e}")


def replay_checks(data, have_avalanche, B=16):
    (xm, ym), (x, y) = data
    buf = 10 * len(set(ym.tolist()))                  # 10 images per class of the old task, as the claims bench
    pool = len(y) + buf
    share0 = buf / pool
    m = baselines.replay_per_batch(B, 0.5)
    row(f"replay: buffer share of a batch (task {len(y)} images, buffer {buf})", f"pooled: {share0:.1%} on average",
        f"replay_share 0.5: {m}/{B + m} = {m / (B + m):.0%}", "")
    if have_avalanche:
        from avalanche.benchmarks.utils.classification_dataset import \
            _make_taskaware_tensor_classification_dataset as tensor_dataset
        from avalanche.benchmarks.utils.data_loader import ReplayDataLoader
        cur = tensor_dataset(x, y, task_labels=0)
        mem = tensor_dataset(xm[:buf], ym[:buf], task_labels=0)
        loader = ReplayDataLoader(cur, mem, batch_size=B, batch_size_mem=B)
        sizes = [len(b[1]) for b in loader]
        row("replay: Avalanche ReplayDataLoader (batch_size = batch_size_mem = 16)", "",
            f"{B}/{sizes[0]} = {B / sizes[0]:.0%} of a batch, {len(sizes)} batches a pass", "")


def accuracy(seeds=5):
    """One client, 2 tasks × 5 classes: replay pooled against half of every batch from the buffer."""
    res = {}
    for share in (0.0, 0.5):
        res[share] = [run(Config(method="replay", num_clients=1, classes_per_task=5, replay_share=share, seed=s,
                                 quiet=True, plot=False))["avg_accuracy"] for s in range(seeds)]
    d = [b - a for a, b in zip(res[0.0], res[0.5])]
    half = t_quantile(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    row(f"replay accuracy, 1 client, 2 tasks × 5 classes, {seeds} seeds: share 0.5 − pooled",
        f"{statistics.mean(res[0.5]):.3f}", f"{statistics.mean(res[0.0]):.3f}",
        f"{statistics.mean(d):+.3f} [{statistics.mean(d) - half:+.3f}, {statistics.mean(d) + half:+.3f}]")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", action="store_true", help="also measure replay pooled vs replay_share 0.5 (~1 min)")
    a = p.parse_args()
    torch.manual_seed(0)
    have = avalanche()
    data, model = task_data()
    print("| check | ours | Avalanche / other | difference |\n|---|---|---|---|")
    fisher_checks(data, model, have)
    if have:
        ewc_penalty_checks(data)
    lwf_checks(data, model, have)
    if have:
        agem_checks(data, model)
    replay_checks(data, have)
    if a.accuracy:
        accuracy()


if __name__ == "__main__":
    main()
