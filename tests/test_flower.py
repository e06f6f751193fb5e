"""STAMP on Flower (stamp_min/flower_app.py) against the in-process loop it must equal.

Needs the optional Flower install (pip install -r requirements-flower.txt); skipped without it.
A simulation starts Flower's simulation engine (Ray): about 30 s on 2 cores; one simulation per number
of clients runs every job below (JOBS).
"""

import json
import re
import subprocess
import sys
import tomllib
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is optional: pip install -r requirements-flower.txt")
import cloudpickle  # noqa: E402  (comes with Ray)
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from stamp_min import UserError, client, server  # noqa: E402
from stamp_min.client import new_state  # noqa: E402
from stamp_min.coreset import task_key  # noqa: E402
from stamp_min.fcl_loop import Config, run  # noqa: E402
from stamp_min.flower_app import (FLOWER_ONLY, FLOWER_SKIPS, config_from, make_client_app, make_server_app,  # noqa: E402
                                  restore_client, results_path, save_client, settings)
from stamp_min.flower_client import node_settings  # noqa: E402

import test_memory  # noqa: E402  (SCAFFOLD's rules, on Flower below)
import flower_jobs  # noqa: E402
from flower_jobs import job_context, job_of, next_job  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
           "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False}}


def small(**kw):
    base = dict(dataset="digits", num_clients=2, num_tasks=2, classes_per_task=2, rounds_per_task=2, local_epochs=1,
                batch_size=32, buffer_per_class=5, device="cpu", plot=False, quiet=True)
    return Config(**{**base, **kw})


def damped_update(model, theta, state, x, y, classes, cfg):
    """A client rule of a user's: the library's update, times 0.7."""
    delta, info = client.client_update(model, theta, state, x, y, classes, cfg)
    return {n: 0.7 * v for n, v in delta.items()}, info


def projected_mean(theta, updates, weights, cfg, params=None, G=None):
    """A server rule of a user's (PCGrad-like): each update loses its component against the mean."""
    mean = server.weighted_mean(updates, [1.0] * len(updates))
    dot = sum(float((mean[n] * mean[n]).sum()) for n in params)
    fixed = []
    for u in updates:
        c = sum(float((u[n] * mean[n]).sum()) for n in params)
        fixed.append({n: u[n] - min(c, 0.0) / dot * mean[n] if n in params else u[n] for n in u})
    step = server.weighted_mean(fixed, weights)
    return {n: theta[n] + step[n] for n in theta}, step


# The jobs on Flower's simulation engine. Starting a simulation (its Ray, one actor per client, each importing
# torch) costs about 30 s on 2 cores, a job of these a few seconds: so one simulation per number of clients
# runs its jobs one after another, as a deployment runs one `flwr run` after another. A job: the server's
# Config, and optionally the server's and the clients' rules and the clients' own Config.
JOBS = {
    "fedavg-2-1.0": dict(cfg=small(method="fedavg")),
    "stamp-2-1.0": dict(cfg=small(method="stamp")),
    "wrong-data": dict(cfg=small(method="stamp"), client_cfg=small(method="stamp", seed=1)),   # it stops; the next go on
    "rules": dict(cfg=small(method="stamp"), server_rules={"aggregate": projected_mean},          # a user's rules
                  client_rules={"client_update": damped_update}),
    "scaffold-momentum": dict(cfg=small(method="fedavg", server_opt="momentum", server_momentum=0.5),  # with memory
                              server_rules={"aggregate": test_memory.scaffold_aggregate},
                              client_rules={"client_update": test_memory.scaffold_update}),
    "lwf-3-0.67": dict(cfg=small(method="lwf", num_clients=3, participation=0.67)),  # state, clients skip end_task
    "stamp-3-0.34": dict(cfg=small(method="stamp", num_clients=3, participation=0.34)),  # SAM with a single update
}


def jobs_apps(jobs, folder, seen):
    """A ServerApp and a ClientApp that run `jobs` one after another in one simulation (flower_jobs.py):
    the server runs each job's stamp_min ServerApp (results: folder/NAME.json) and records in `seen` its
    error or None; a node runs each job with that job's ClientApp."""
    server_app, client_app = ServerApp(), ClientApp()
    clients = [make_client_app(job.get("client_cfg", job["cfg"]), **job.get("client_rules", {})) for job in jobs.values()]

    @server_app.main()
    def main(grid, context):
        for name, job in jobs.items():
            app = make_server_app(job["cfg"], results_dir=folder, **job.get("server_rules", {}))
            try:
                app(grid, job_context(context, {"out": f"{name}.json"}))
                seen[name] = None
            except Exception as e:                      # noqa: BLE001 - recorded, the test of that job reads it
                seen[name] = e

    def who(msg, context):
        return clients[next_job(context)](msg, context)

    def relay(msg, context):
        return clients[job_of(context)](msg, context)
    client_app.query()(who)
    client_app.train()(relay)
    client_app.train("end_task")(relay)
    return server_app, client_app


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, own_ray):
    """Every job of JOBS on the simulation engine: (the server's results folder, {job: its error or None})."""
    for module in (sys.modules[__name__], test_memory, flower_jobs):
        cloudpickle.register_pickle_by_value(module)         # Ray's workers get these functions by value
    folder, seen = tmp_path_factory.mktemp("flower"), {}
    for clients in sorted({job["cfg"].num_clients for job in JOBS.values()}):
        jobs = {name: job for name, job in JOBS.items() if job["cfg"].num_clients == clients}
        run_simulation(*jobs_apps(jobs, folder, seen), num_supernodes=clients, backend_config=BACKEND)
    return folder, seen


def assert_flower_equals_the_loop(name, simulated, tmp_path):
    folder, seen = simulated
    job = JOBS[name]
    cfg, server_rules, client_rules = job["cfg"], job.get("server_rules", {}), job.get("client_rules", {})
    assert seen[name] is None, f"the job failed on Flower: {seen[name]!r}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # Flower's clients run with one thread each (Ray actors, num_cpus=1)
    try:
        ref = run(replace(cfg, checkpoint_dir=str(tmp_path / "ckpt")), **server_rules, **client_rules)
    finally:
        torch.set_num_threads(threads)
    theta_ref = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)["progress"]["theta"]

    res = json.loads((folder / f"{name}.json").read_text())
    theta = torch.load(folder / f"{name}_model.pt", weights_only=True)

    assert res["engine"] == "flower" and res["scenario"] == ref["scenario"]
    assert res["name"] == ref["name"] and res["rules"] == ref["rules"]
    assert sorted(theta) == sorted(theta_ref)
    for n in theta_ref:
        assert torch.allclose(theta[n], theta_ref[n], rtol=1e-5, atol=1e-6), n
    acc = [[float("nan") if a is None else a for a in row] for row in res["acc_matrix"]]    # JSON null = NaN
    assert torch.allclose(torch.tensor(acc), torch.tensor(ref["acc_matrix"]), atol=1e-9, equal_nan=True)
    assert [r["clients"] for r in res["rounds"]] == [r["clients"] for r in ref["rounds"]]
    for a, b in zip(res["rounds"], ref["rounds"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["current_task_acc"] == pytest.approx(b["current_task_acc"])
        assert a["step_norm"] == pytest.approx(b["step_norm"], rel=1e-4)
    for key in ("comm_bytes", "buffer_bytes", "current_task_accuracy"):
        assert res[key] == pytest.approx(ref[key]), key
    return ref


@pytest.mark.parametrize("name", ["fedavg-2-1.0", "stamp-2-1.0", "lwf-3-0.67", "stamp-3-0.34"])
def test_flower_simulation_equals_the_loop(name, simulated, tmp_path):
    assert_flower_equals_the_loop(name, simulated, tmp_path)


def test_injected_client_and_server_rules_on_flower_equal_the_loop(simulated, tmp_path):
    ref = assert_flower_equals_the_loop("rules", simulated, tmp_path)
    assert ref["name"] == "stamp-damped_update-projected_mean"
    assert ref["rules"]["aggregate"].endswith("projected_mean") and ref["rules"]["client_update"].endswith("damped_update")


def test_scaffold_with_server_momentum_on_flower_equals_the_loop(simulated, tmp_path):
    """Rules with memory on Flower's simulation engine: SCAFFOLD's clients send Δc_k through their info,
    its server keeps c in the ServerState and broadcasts it, and FedAvgM's moment lives on the server."""
    ref = assert_flower_equals_the_loop("scaffold-momentum", simulated, tmp_path)
    assert ref["server_state"]["opt"] == ["m"] and len(ref["server_state"]["broadcast"]) > 0


def test_a_client_with_the_wrong_data_stops_the_run_with_its_reason(simulated):
    # the ClientApps were started with another seed: their scenario disagrees with the server's
    folder, seen = simulated
    assert isinstance(seen["wrong-data"], UserError), repr(seen["wrong-data"])
    assert re.search(r"a client failed .*the server sends classes .* but this client's scenario has", str(seen["wrong-data"]))
    assert not (folder / "wrong-data.json").exists()
    assert (folder / "rules.json").exists()          # the next job on the same federation ran: it stays up


def test_bad_settings_are_one_line_errors_and_types_are_checked():
    with pytest.raises(UserError, match="method='sgd' is unknown"):
        config_from({"method": "sgd"})
    with pytest.raises(UserError, match="run config gm_z"):
        config_from({"gm_z": 1.0})
    with pytest.raises(UserError, match="mixstyle='false' is not a bool"):
        config_from({"mixstyle": "false"})
    with pytest.raises(UserError, match="num-clients=2.5 is not a int"):
        config_from({"num-clients": 2.5})
    with pytest.raises(UserError, match="reply-timeout=0.0 must be positive"):
        settings({"reply-timeout": 0})
    cfg, extra = settings({"gm-c": 1, "num-clients": 3, "reply-timeout": 30})      # an int is a fine float
    assert cfg == replace(Config(), gm_c=1.0, num_clients=3) and extra == {"reply_timeout": 30.0}


@pytest.mark.parametrize("out", ["../escape.json", "/etc/stamp.json", "sub/dir.json", "..json", ".hidden.json",
                                 "notes.txt", "a b.json", "x" * 200 + ".json", "C:\\evil.json"])
def test_a_job_cannot_choose_a_server_path(out, tmp_path):
    with pytest.raises(UserError, match=r"^out=.* is not a plain file name; allowed: a name like 'stamp.json'") as e:
        results_path(tmp_path, out, "default.json")
    assert str(tmp_path) not in str(e.value)                           # the error names no server folder
    assert not list(tmp_path.iterdir())


def test_results_stay_in_the_operators_folder_and_are_not_overwritten(tmp_path):
    assert results_path(tmp_path, "stamp.json", "d.json") == tmp_path / "stamp.json"
    assert results_path(tmp_path, "", "d.json") == tmp_path / "d.json"
    (tmp_path / "stamp.json").write_text("{}")
    with pytest.raises(UserError, match=r"out='stamp.json' exists in the server's results folder") as e:
        results_path(tmp_path, "stamp.json", "d.json")
    assert str(tmp_path) not in str(e.value)
    assert results_path(tmp_path, "stamp.json", "d.json", overwrite=True) == tmp_path / "stamp.json"
    (tmp_path / "other_model.pt").write_bytes(b"")                      # the model beside it counts too
    with pytest.raises(UserError, match="exists"):
        results_path(tmp_path, "other.json", "d.json")


def test_where_data_live_is_the_operators_setting_not_the_jobs():
    for key, value in (("data-root", "/etc"), ("download", True), ("data_root", "/")):
        with pytest.raises(UserError, match=f"run config {key}=.* is unknown"):
            config_from({key: value})
    cfg = node_settings(small(), {"partition-id": 0, "data-root": "/srv/data", "download": "true"})
    assert cfg.data_root == "/srv/data" and cfg.download is True
    assert node_settings(small(), {"partition-id": 0}) == small()


def test_client_state_round_trips_through_flower_records_and_bad_state_is_a_clear_error():
    cfg = small(method="ewc")
    state = new_state(1, cfg)
    state.seen.append(task_key((3, 4)))
    state.extra = {"ewc_fisher": {"w": torch.rand(3)}, "full": {(3, 4): (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([3, 4]))}}
    torch.randperm(10, generator=state.rng)             # move the stream on
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    assert restore_client(ctx, 1, cfg, done=0).seen == []            # first message: a fresh state
    with pytest.raises(UserError, match="state of 3 earlier messages is gone"):
        restore_client(ctx, 1, cfg, done=3)
    save_client(ctx, state, done=3)
    assert isinstance(ctx.state["client.tensors"], ArrayRecord)       # plain tensors in context.state
    back = restore_client(ctx, 1, cfg, done=3)
    assert back.seen == state.seen and back.client_id == 1
    assert torch.equal(back.rng.get_state(), state.rng.get_state())
    assert torch.equal(back.extra["ewc_fisher"]["w"], state.extra["ewc_fisher"]["w"])
    assert torch.equal(back.extra["full"][(3, 4)][1], torch.tensor([3, 4]))

    with pytest.raises(UserError, match="belongs to client 1"):
        restore_client(ctx, 0, cfg, done=3)
    with pytest.raises(UserError, match="from after message 3, the server counts 4"):
        restore_client(ctx, 1, cfg, done=4)
    ctx.state["client.skeleton"] = ConfigRecord({"json": "{not json", "format": "stamp_min-client-v1", "done": 3})
    with pytest.raises(UserError, match="cannot be restored"):
        restore_client(ctx, 1, cfg, done=3)


def test_the_flower_app_project_lists_every_setting_with_the_loops_default():
    app = tomllib.loads((ROOT / "flower" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "stamp_min.flower_app:server_app", "clientapp": "stamp_min.flower_client:client_app"}
    expected = {f.name.replace("_", "-"): f.default for f in fields(Config) if f.name not in FLOWER_SKIPS}
    expected.update({n.replace("_", "-"): v for n, v in FLOWER_ONLY.items()})
    assert app["config"] == {**expected, "method": "stamp"}


def test_loopback_deployment_superlink_two_supernodes_and_flwr_run():
    # bench/flower_deploy.py: real processes, a bad job refused, a tiny STAMP job, everything stopped
    p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "flower_deploy.py"), "--timeout", "400"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        p.terminate()                       # the script stops its SuperLink and SuperNodes on SIGTERM
        out, _ = p.communicate(timeout=60)
    print(out[-4000:])
    assert p.returncode == 0 and "OK: run finished" in out and "NOT" not in out
    assert "bad input (method='sgd'): refused" in out
    assert "hostile job (out='../escape.json'): refused" in out
