"""The GPU path (`--device cuda`, bf16 autocast, channels-last, checkpoints, Flower) on a real GPU.

Every test here needs CUDA and is skipped without it, so the CPU suite only collects them. On a
GPU machine: `python -m pytest -m gpu tests/test_gpu.py` (bench/gpu_check.py runs it and puts the
summary and the measured differences, recorded with `record_property`, into its report).

What "the GPU computes the same thing" means here. A GPU sums in another order than a CPU, so
exact equality is impossible; what can be asked is that every difference is rounding:
- TF32 is switched off for these comparisons (cuDNN uses it for convolutions by default; it keeps
  10 mantissa bits, ~1e-3 relative, which is a precision choice, not a bug);
- the first round's update Δ of one client, from the same θ, state and random stream, is compared
  on both devices (`test_first_update_agrees_with_the_cpu`): fp32 rounding is ~1e-7 relative per
  operation, a few SGD steps amplify it by at most ~10-100, so max|Δ_gpu − Δ_cpu| <= 1e-4 ·
  max|Δ_cpu| is a 10-100x margin over rounding, while any real difference (another batch order, a
  lost MixStyle draw, a buffer on the wrong device, a different GM weight) is of the order of Δ;
- a whole short run is compared too, looser (errors compound over rounds, and an accuracy is a
  count of argmax decisions): final θ within 1e-3 · max|θ|, accuracies within 0.03 (a few test
  images of a pooled task).
A checkpoint resume on the GPU must give exactly the uninterrupted run's numbers: both runs use
deterministic algorithms (cuDNN deterministic, CUBLAS_WORKSPACE_CONFIG), as on the CPU.
"""

import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from stamp_min import server
from stamp_min.client import client_update, end_task, float_state, load_state, new_state
from stamp_min.config import METHODS, PRESETS
from stamp_min.fcl_loop import Config, build, run
from conftest import assert_same_run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

UPDATE_RTOL = 1e-4      # first round's update: max|Δ_gpu − Δ_cpu| / max|Δ_cpu|
THETA_RTOL = 1e-3       # whole short run: max|θ_gpu − θ_cpu| / max|θ_cpu|
ACC_ATOL = 0.03         # whole short run: accuracy matrix entries
DETERMINISTIC = ("import torch; torch.backends.cudnn.deterministic = True; torch.backends.cudnn.benchmark = False; "
                 "torch.use_deterministic_algorithms(True, warn_only=True); "
                 "from stamp_min.fcl_loop import cli; from stamp_min.cli import main; main(cli)")


def small(**kw):
    base = dict(dataset="digits", num_clients=2, num_tasks=2, classes_per_task=2, rounds_per_task=2, local_epochs=1,
                batch_size=32, buffer_per_class=5, device="cuda", plot=False, quiet=True)
    return Config(**{**base, **kw})


@pytest.fixture
def no_tf32():
    """fp32 really fp32 on the GPU for the comparisons (restored afterwards)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def max_rel(a, b):
    """max |a − b| over all entries / max |b| (dicts of tensors, same names)."""
    diff = max(float((a[n].double().cpu() - b[n].double().cpu()).abs().max()) for n in b)
    scale = max(float(b[n].double().abs().max()) for n in b)
    return diff / scale if scale > 0 else diff


def final_theta(res_dir):
    return torch.load(res_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["progress"]["theta"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_cuda(method, record_property):
    res = run(small(method=method))
    peak = res["peak_gpu_memory_bytes"]
    record_property("peak_gpu_memory_bytes", peak)
    assert peak and 0 < peak <= torch.cuda.get_device_properties(0).total_memory
    assert all(math.isfinite(r["loss"]) for r in res["rounds"])
    A = torch.tensor(res["acc_matrix"])
    lower = A[torch.tril(torch.ones_like(A, dtype=torch.bool))]
    assert torch.isfinite(lower).all() and (lower >= 0).all() and (lower <= 1).all()


@pytest.mark.parametrize("method", METHODS)
def test_first_update_agrees_with_the_cpu(method, no_tf32, record_property):
    """One client's update in round 0 of task 1 (after task 0 and its end_task on the CPU, so TAM
    has a coreset to clone, EWC its Fisher, LwF its old model, ...) on both devices, and the
    server's aggregation of both clients' updates."""
    cfg = small(method=method, device="cpu")
    ds, scenario, model = build(cfg)
    theta = float_state(model)
    states = [new_state(k, cfg) for k in range(cfg.num_clients)]
    for k, st in enumerate(states):                          # task 0 on the CPU: fills every client's memory
        task = scenario.tasks[k][0]
        x, y = ds.x_train[task.train_idx], ds.y_train[task.train_idx]
        load_state(model, theta)
        client_update(model, theta, st, x, y, task.classes, cfg)
        end_task(model, theta, st, x, y, task.classes, cfg)

    def updates(device):
        net = copy.deepcopy(model).to(device)
        th = {n: v.to(device) for n, v in theta.items()}
        out = []
        for k, st in enumerate(copy.deepcopy(states)):      # the same state and random stream on both devices
            task = scenario.tasks[k][1]
            load_state(net, th)
            delta, info = client_update(net, th, st, ds.x_train[task.train_idx].to(device),
                                        ds.y_train[task.train_idx].to(device), task.classes, replace(cfg, device=device))
            out.append(({n: v.cpu() for n, v in delta.items()}, info["loss"]))
        return out, th

    cpu, th_cpu = updates("cpu")
    gpu, th_gpu = updates("cuda")
    worst = max(max_rel(dg, dc) for (dg, _), (dc, _) in zip(gpu, cpu))
    record_property("update_max_rel_diff", worst)
    assert worst <= UPDATE_RTOL, f"{method}: max|Δ_gpu − Δ_cpu| / max|Δ_cpu| = {worst:.2e} > {UPDATE_RTOL}"
    for (_, lg), (_, lc) in zip(gpu, cpu):
        assert lg == pytest.approx(lc, rel=1e-4, abs=1e-6)
    params = [n for n, _ in model.named_parameters()]
    weights = [len(scenario.tasks[k][1].train_idx) for k in range(cfg.num_clients)]
    new_c, _ = server.aggregate(th_cpu, [d for d, _ in cpu], weights, cfg, params=params)
    new_g, _ = server.aggregate(th_gpu, [{n: v.cuda() for n, v in d.items()} for d, _ in cpu], weights,
                             replace(cfg, device="cuda"), params=params)
    step_c = {n: new_c[n] - th_cpu[n] for n in params}
    step_g = {n: new_g[n].cpu() - th_cpu[n] for n in params}
    record_property("server_step_max_rel_diff", max_rel(step_g, step_c))
    assert max_rel(step_g, step_c) <= UPDATE_RTOL, PRESETS[method][1]


@pytest.mark.parametrize("method", ["fedavg", "stamp"])
def test_short_run_agrees_with_the_cpu(method, no_tf32, tmp_path, record_property):
    runs = {dev: run(small(method=method, device=dev, checkpoint_dir=str(tmp_path / dev))) for dev in ("cpu", "cuda")}
    theta = {dev: final_theta(tmp_path / dev) for dev in runs}
    d_theta = max_rel(theta["cuda"], theta["cpu"])
    A = {dev: torch.tensor(r["acc_matrix"]).nan_to_num(0.0) for dev, r in runs.items()}
    d_acc = float((A["cuda"] - A["cpu"]).abs().max())
    record_property("theta_max_rel_diff", d_theta)
    record_property("acc_max_abs_diff", d_acc)
    assert runs["cuda"]["scenario"] == runs["cpu"]["scenario"]
    assert runs["cuda"]["comm_bytes"] == runs["cpu"]["comm_bytes"]
    assert d_theta <= THETA_RTOL, f"max|θ_gpu − θ_cpu| / max|θ_cpu| = {d_theta:.2e}"
    assert d_acc <= ACC_ATOL, f"accuracy matrices differ by {d_acc:.3f}"


@pytest.mark.parametrize("model", ["cnn", "resnet18"])
def test_bf16_autocast_and_channels_last_run(model, tmp_path, record_property):
    res = run(small(method="stamp", model=model, amp="bf16", channels_last=True, checkpoint_dir=str(tmp_path)))
    assert res["config"]["amp"] == "bf16" and res["config"]["channels_last"] is True
    assert all(math.isfinite(r["loss"]) for r in res["rounds"])
    assert all(v.dtype == torch.float32 for v in final_theta(tmp_path).values() if v.is_floating_point())   # θ stays fp32
    record_property("peak_gpu_memory_bytes", res["peak_gpu_memory_bytes"])
    record_property("avg_accuracy", res["avg_accuracy"])
    assert res["peak_gpu_memory_bytes"] > 0


ARGS = ["--num-clients", "2", "--num-tasks", "5", "--rounds-per-task", "3", "--local-epochs", "1",
        "--buffer-per-class", "4", "--plot", "false", "--device", "cuda", "--method", "stamp"]


def cli(*args):
    return [sys.executable, "-c", DETERMINISTIC, *ARGS, *args]


def test_killed_and_resumed_on_gpu_equals_uninterrupted(tmp_path):
    """As tests/test_checkpoint.py on the CPU: SIGKILL at an arbitrary instant after task 2 has
    begun, resume, and compare with an uninterrupted run; deterministic GPU algorithms in both."""
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    ref, out, ck = tmp_path / "ref.json", tmp_path / "out.json", tmp_path / "ck"
    subprocess.run(cli("--out", str(ref)), check=True, capture_output=True, timeout=120, env=env)
    p = subprocess.Popen(cli("--out", str(out), "--checkpoint-dir", str(ck)), env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        try:
            if torch.load(ck / "checkpoint.pt", map_location="cpu", weights_only=True)["progress"]["t"] >= 1:
                break
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.01)
    time.sleep(random.Random(1).uniform(0.0, 0.1))
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    r = subprocess.run(cli("--out", str(out), "--checkpoint-dir", str(ck), "--resume", "true"),
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, b = json.loads(ref.read_text()), json.loads(out.read_text())
    assert_same_run(a, b)
    assert b["peak_gpu_memory_bytes"] > 0


def test_flower_simulation_with_gpu_clients(no_tf32, own_ray, tmp_path, record_property, monkeypatch):
    """Flower's simulation engine, its clients on the GPU (Ray gives each half the GPU): the same
    results as the in-process loop on the GPU, within the short-run tolerances."""
    pytest.importorskip("flwr", reason="Flower is optional: pip install -r requirements-flower.txt")
    from flwr.simulation import run_simulation
    from stamp_min.flower_app import make_client_app, make_server_app
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")          # the Ray workers: no TF32 either
    cfg = small(method="stamp")
    ref = run(replace(cfg, checkpoint_dir=str(tmp_path / "ckpt")))
    job = replace(cfg, out="flower.json")
    run_simulation(make_server_app(job, results_dir=tmp_path), make_client_app(job), num_supernodes=cfg.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.5},
                                   "init_args": {"num_cpus": 2, "num_gpus": 1, "include_dashboard": False}})
    res = json.loads((tmp_path / "flower.json").read_text())
    theta = torch.load(tmp_path / "flower_model.pt", map_location="cpu", weights_only=True)
    d_theta = max_rel(theta, final_theta(tmp_path / "ckpt"))
    acc = torch.tensor([[float("nan") if a is None else a for a in row] for row in res["acc_matrix"]]).nan_to_num(0.0)
    d_acc = float((acc - torch.tensor(ref["acc_matrix"]).nan_to_num(0.0)).abs().max())
    record_property("theta_max_rel_diff", d_theta)
    record_property("acc_max_abs_diff", d_acc)
    assert res["engine"] == "flower" and res["scenario"] == ref["scenario"]
    assert d_theta <= THETA_RTOL and d_acc <= ACC_ATOL
