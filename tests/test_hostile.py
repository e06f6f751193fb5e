"""A Flower server that trusts no client and no job (issue 24): every client reply is checked
before use, every costly job value is bounded by the operator's limits, and nothing a job can
read names an operator's folder.

Most cases run the real ServerApp and ClientApps in this process on `LocalGrid`, a Grid that hands
each message straight to a ClientApp (no Ray, no SuperLink: a case takes about a second); a
hostile client is the honest ClientApp whose reply is altered on its way back. On Flower's
simulation engine (Ray), one simulation runs jobs one after another (its Ray starts once): a job
that meets every attack with the operator's bad-replies=drop, whose model must equal the loop's
with the hostile client's updates left out, then one job per attack with bad-replies=stop, each
stopped in one line (the last one's error raised out of run_simulation).
Reference of "nothing written": the results folder's listing (names and bytes) before and after.
"""

import copy
import json
import logging
import sys
import uuid
from dataclasses import replace

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is optional: pip install -r requirements-flower.txt")
import cloudpickle  # noqa: E402  (comes with Ray)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from conftest import write_cifar100  # noqa: E402
from stamp_min import UserError, limits, server  # noqa: E402
from stamp_min.fcl_loop import Config, run  # noqa: E402
from stamp_min.flower_app import make_client_app, make_server_app, settings  # noqa: E402

import flower_jobs  # noqa: E402
from flower_jobs import job_context, job_of, next_job  # noqa: E402

BASE = Config(dataset="digits", num_clients=2, num_tasks=1, classes_per_task=2, rounds_per_task=1, local_epochs=1,
              batch_size=64, device="cpu", plot=False, quiet=True)
HONEST = make_client_app(BASE)


# ---------------------------------------------------------------------------------------------
# what a hostile client does to its reply: fn(reply, its message) -> the replies it sends


def arrays(reply, change):
    a = reply.content["arrays"].to_torch_state_dict()
    change(a)
    reply.content["arrays"] = ArrayRecord(a)
    return [reply]


def metric(name, value):
    def tamper(reply, msg):
        reply.content["metrics"][name] = value
        return [reply]
    return tamper


def stray(reply, msg):
    other = copy.deepcopy(msg)
    other.metadata.__dict__["_message_id"] = uuid.uuid4().hex            # a message the server never sent
    return [reply, Message(RecordDict({"metrics": reply.content["metrics"]}), reply_to=other)]


def extra_record(reply, msg):
    reply.content["junk"] = ConfigRecord({"x": "y"})
    return [reply]


def bias(a):
    return next(n for n in a if n.endswith("bias"))


# (id, tamper, text the refusal names)
ATTACKS = [
    ("negative-num-examples", metric("num_examples", -99), "num_examples=-99 but the client has"),
    ("huge-num-examples", metric("num_examples", 10**15), "num_examples=1000000000000000 but"),
    ("spoofed-id", metric("client", 0), "says it is client 0"),
    ("wrong-shape", lambda r, m: arrays(r, lambda a: a.update({bias(a): torch.zeros(1)})), "is (1,) float32; allowed: ("),
    ("extra-key", lambda r, m: arrays(r, lambda a: a.update(junk=torch.zeros(10**6))), "unknown entries ['junk']"),
    ("missing-key", lambda r, m: arrays(r, lambda a: a.pop(bias(a))), "missing ["),
    ("float64", lambda r, m: arrays(r, lambda a: a.update({n: v.double() for n, v in a.items()})), "float64; allowed"),
    ("nan", lambda r, m: arrays(r, lambda a: a[bias(a)].fill_(float("nan"))), "is not finite"),
    ("loss-nan", metric("loss", float("nan")), "loss=nan is not finite"),
    ("loss-missing", lambda r, m: r.content["metrics"].pop("loss") and [r], "loss=None is a NoneType"),
    ("arrays-as-config", lambda r, m: r.content.__setitem__("arrays", ConfigRecord({"x": "y"})) or [r],
     "the update does not have the model's entries"),
    ("extra-record", extra_record, "holds the records ['arrays', 'junk', 'metrics']"),
    ("duplicate", lambda r, m: [r, r], "answers no message of this round (or one already answered)"),
    ("stray", stray, "answers no message of this round"),
]


class LocalGrid:
    """Flower's Grid in this process: each message goes to the ClientApp of its node at once.
    Node ids are not in client order (the server must not assume they are). tamper(client k,
    message, reply) -> the replies that come back."""

    def __init__(self, app, run_config, K=2, tamper=None, node_config=None):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1     # what a SuperLink sets
        self.app, self.tamper = app, tamper or (lambda k, msg, reply: [reply])
        self.client = {1000 + 7 * (K - k): k for k in range(K)}
        self.ctx = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config=run_config,
                               node_config={"partition-id": k, "num-partitions": K, **(node_config or {})})
                    for n, k in self.client.items()}

    def get_node_ids(self):
        return list(self.client)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            out += self.tamper(self.client[m.metadata.dst_node_id], m, self.app(m, self.ctx[m.metadata.dst_node_id]))
        return out


@pytest.fixture
def flwr_log():
    """The lines Flower's logger writes (what `flwr run --stream` shows a job's submitter)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def serve(tmp_path, run_config=None, tamper=None, base=BASE, client_app=HONEST, node_config=None, **server):
    """Run the ServerApp on a LocalGrid; the results folder is tmp_path/results."""
    run_config = {"out": "r.json", **(run_config or {})}
    grid = LocalGrid(client_app, run_config, base.num_clients, tamper, node_config)
    app = make_server_app(base, results_dir=tmp_path / "results", **server)
    app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))


def on_train(k, attack):
    """Client k's train replies are tampered with by `attack`."""
    return lambda c, msg, reply: attack(reply, msg) if c == k and msg.metadata.message_type == "train" else [reply]


@pytest.mark.parametrize("attack, text", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_a_hostile_reply_stops_the_run_naming_the_client_and_the_round(attack, text, tmp_path, flwr_log):
    (tmp_path / "results").mkdir()
    with pytest.raises(UserError) as e:
        serve(tmp_path, tamper=on_train(1, attack))
    line = str(e.value)
    assert text in line and "\n" not in line, line
    assert "bad-replies=stop" in line and ("client 1" in line or "node" in line), line
    assert "task 1 round 1" in line or "answers no message" in line, line
    errors = [x for x in flwr_log if x.startswith("stamp_min:")]
    assert errors == [f"stamp_min: {line}"]                                   # one line in the log
    assert list((tmp_path / "results").iterdir()) == []                       # nothing written


def test_a_bad_end_of_task_reply_is_refused_too(tmp_path):
    def tamper(k, msg, reply):
        if k == 0 and msg.metadata.message_type == "train.end_task":
            reply.content["metrics"]["memory_bytes"] = -5
        return [reply]
    with pytest.raises(UserError, match=r"client 0's reply at the end of task 1 is refused: memory_bytes=-5 is out"):
        serve(tmp_path, tamper=tamper)
    assert not (tmp_path / "results" / "r.json").exists()


def test_an_error_reply_names_the_client_the_server_sent_to(tmp_path):
    def tamper(k, msg, reply):
        if k == 1 and msg.metadata.message_type == "train":
            from flwr.app import Error
            return [Message(Error(code=1, reason="disk on fire"), reply_to=msg)]
        return [reply]
    with pytest.raises(UserError, match=r"a client failed \(client 1\): disk on fire"):
        serve(tmp_path, tamper=tamper)


def test_every_reply_refused_stops_even_with_drop(tmp_path):
    def tamper(k, msg, reply):
        return metric("num_examples", 1)(reply, msg) if msg.metadata.message_type == "train" else [reply]
    with pytest.raises(UserError, match="task 1 round 1: every reply was refused"):
        serve(tmp_path, tamper=tamper, limits={"bad-replies": "drop"})
    assert not (tmp_path / "results" / "r.json").exists()


# ---------------------------------------------------------------------------------------------
# the operator's limits


JOBS = [
    ("reply-timeout-inf", {"reply-timeout": float("inf")}, "reply-timeout=inf must be positive and finite"),
    ("reply-timeout-huge", {"reply-timeout": 1e6}, "reply-timeout=1000000.0 is out of range; allowed: 0 < reply-timeout <= 3600"),
    ("clients-x-tasks", {"num-clients": 100000}, "num-clients=100000 with 5 tasks is over the operator's limit max-clients-x-tasks"),
    ("rounds", {"rounds-per-task": 100000}, "rounds-per-task=100000 with 5 tasks is over the operator's limit max-rounds"),
    ("epochs", {"local-epochs": 100000}, "local-epochs=100000 is over the operator's limit max-local-epochs=20"),
    ("image-size", {"image-size": 1024}, "image-size=1024 is over the operator's limit max-image-size=64"),
    ("gm-c", {"gm-c": 1e300}, "gm_c=1e+300 is out of range"),
    ("gm-c-limit", {"gm-c": 50.0}, "gm-c=50.0 is over the operator's limit max-gm-c=10"),
    ("batch-size", {"batch-size": 100000}, "batch-size=100000 is over the operator's limit max-batch-size=1024"),
    ("buffer", {"buffer-per-class": 5000}, "buffer-per-class=5000 is over the operator's limit max-buffer-per-class=100"),
]


@pytest.mark.parametrize("run_config, text", [j[1:] for j in JOBS], ids=[j[0] for j in JOBS])
def test_a_job_over_the_operators_limits_is_refused_before_anything_is_built(run_config, text, tmp_path, flwr_log):
    grid = LocalGrid(HONEST, run_config)
    grid.get_node_ids = lambda: pytest.fail("the limits must be checked before any client is asked")
    app = make_server_app(replace(BASE, num_tasks=0), results_dir=tmp_path / "results")
    with pytest.raises(UserError) as e:
        app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    assert text in str(e.value), str(e.value)
    assert [x for x in flwr_log if x.startswith("stamp_min:")] == [f"stamp_min: {e.value}"]
    assert not (tmp_path / "results").exists()


def test_operators_set_the_limits_and_their_mistakes_are_one_line(monkeypatch):
    cfg, extra = settings({"local-epochs": 30})
    limits.check(cfg, extra, limits.operator_limits({"max-local-epochs": 50}))          # raised by the operator
    monkeypatch.setenv("STAMP_LIMITS", "max-local-epochs=25 bad-replies=drop")
    lim = limits.operator_limits()
    assert lim["max-local-epochs"] == 25 and lim["bad-replies"] == "drop"
    with pytest.raises(UserError, match="local-epochs=30 is over the operator's limit max-local-epochs=25"):
        limits.check(cfg, extra, lim)
    for bad, text in (({"max-rounds": "many"}, "max-rounds='many'"), ({"max-rounds": float("inf")}, "max-rounds=inf"),
                      ({"max-rounds": 2.5}, "max-rounds=2.5; allowed: a positive finite int"),
                      ({"max-speed": 3}, "max-speed is no limit"), ({"bad-replies": "ignore"}, "bad-replies='ignore'"),
                      ("max-rounds", "is not name=value pairs")):
        with pytest.raises(UserError, match=text):
            limits.operator_limits(bad)
    # a node config's other keys are no limits, and a node's limits bind its ClientApp too
    assert limits.operator_limits({"partition-id": 0, "data-root": "/d"}, "node config") == limits.DEFAULTS


def test_a_node_refuses_a_job_over_its_own_limits(tmp_path):
    with pytest.raises(UserError, match=r"a client failed \(node .*\): run config local-epochs=2 is over the operator's "
                                        r"limit max-local-epochs=1; allowed: local-epochs <= 1"):
        serve(tmp_path, {"local-epochs": 2}, node_config={"max-local-epochs": 1})


def test_no_line_a_job_reads_names_an_operators_folder(tmp_path, flwr_log, monkeypatch, skip_cifar_md5):
    secret = tmp_path / "srv-secret"
    monkeypatch.setenv("STAMP_DATA_ROOT", str(secret / "data"))
    with pytest.raises(UserError) as e:                          # the server's data are missing
        serve(tmp_path, {"dataset": "cifar10"})
    assert "dataset='cifar10'" in str(e.value) and "<the server's data folder>" in str(e.value), str(e.value)
    monkeypatch.setenv("STAMP_DATA_ROOT", str(secret / "server"))
    write_cifar100(secret / "server", n_train_per_class=3, n_test_per_class=1)
    with pytest.raises(UserError, match=r"a client failed .*<this node's data folder>"):   # a node's data are missing
        serve(tmp_path, {"dataset": "cifar100"}, node_config={"data-root": str(secret / "node")})
    monkeypatch.delenv("STAMP_DATA_ROOT")
    (tmp_path / "results" / "r.json").mkdir(parents=True)           # `out` names a folder in the results folder
    with pytest.raises(UserError, match="out='r.json' cannot be written in the server's results folder"):
        serve(tmp_path, overwrite=True)
    (tmp_path / "results" / "r.json").rmdir()
    assert len([x for x in flwr_log if x.startswith("stamp_min:")]) == 3
    assert not [x for x in flwr_log if "srv-secret" in x or str(tmp_path) in x]
    assert list((tmp_path / "results").iterdir()) == []


def test_private_replaces_every_spelling_of_a_folder_but_not_words(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (f"no valid data files under data_root='data' ({tmp_path}/data/cifar-10-batches-py); "
            f"data/x.json; mydata/y; {tmp_path}/database")
    assert limits.private(text, {"data": "<D>"}) == ("no valid data files under data_root='<D>' (<D>/cifar-10-batches-py); "
                                                   f"<D>/x.json; mydata/y; {tmp_path}/database")


# ---------------------------------------------------------------------------------------------
# Flower's simulation engine: one simulation (its Ray starts once) runs several jobs one after
# another on its grid: job 0 meets every attack with the operator's bad-replies=drop, then job j
# meets attack j - 1 alone with bad-replies=stop

SIM_ATTACKS = [a for a in ATTACKS if a[0] in ("negative-num-examples", "huge-num-examples", "spoofed-id", "wrong-shape",
                                              "extra-key", "float64", "nan", "missing-key")]
SIM = replace(BASE, rounds_per_task=len(SIM_ATTACKS))
PREVIOUS = b'{"previous": "results"}'


def hostile_app(cfg):
    """The simulation's ClientApp: the honest one for client 0; for client 1 the honest one with
    its replies altered: in job 0 the train reply of round r by SIM_ATTACKS[r] and the end of the
    task's by memory_bytes=-1, in job j >= 1 the train reply by SIM_ATTACKS[j - 1] (flower_jobs.py
    counts the jobs)."""
    honest, app = make_client_app(cfg), ClientApp()

    def who(msg, context):
        next_job(context)
        return honest(msg, context)

    def answer(msg, context):
        reply = honest(msg, context)
        if context.node_config["partition-id"] != 1 or reply.has_error():
            return reply
        job = job_of(context)
        if msg.metadata.message_type == "train.end_task":
            if job == 0:
                reply.content["metrics"]["memory_bytes"] = -1
            return reply
        attack = SIM_ATTACKS[int(msg.content["config"]["round"]) if job == 0 else job - 1]
        return attack[1](reply, msg)[0]
    app.query()(who)
    app.train()(answer)
    app.train("end_task")(answer)
    return app


def listing(folder):
    return sorted((p.name, p.read_bytes()) for p in folder.iterdir())


def jobs_app(folder, seen):
    """A ServerApp that runs the stamp_min ServerApp as 1 + len(SIM_ATTACKS) jobs on the engine's
    grid, each with a Context of its own: job 0 with bad-replies=drop (out drop.json), then the
    others with bad-replies=stop (out r.json). For each but the last it records in `seen` (its error
    line or None, the error's type, the results folder's listing after it); the last job's error
    leaves run_simulation as any job's would, and so does any error that is no refusal."""
    app = ServerApp()

    @app.main()
    def main(grid, context):
        for job in range(1 + len(SIM_ATTACKS)):
            policy, out = ("drop", "drop.json") if job == 0 else ("stop", "r.json")
            server_app = make_server_app(SIM, results_dir=folder, limits={"bad-replies": policy})
            try:
                server_app(grid, job_context(context, {"out": out, "reply-timeout": 90.0}))
            except Exception as e:
                if job == len(SIM_ATTACKS) or not str(e).startswith("client 1's reply"):
                    raise                   # the last job's, or no refusal (the engine failed?): out of run_simulation
                seen.append((str(e), type(e), listing(folder)))
                continue
            seen.append((None, None, listing(folder)))          # a broken engine fails in 90 s, not 600
    return app


@pytest.fixture(scope="module")
def engine(tmp_path_factory, own_ray):
    """The jobs on Flower's simulation engine: {folder: the server's results folder, before: its
    listing before (one file from an earlier run), seen: per job (error line or None, type, listing
    after), lines: the stamp_min lines of Flower's log, in order}."""
    for module in (sys.modules[__name__], flower_jobs):
        cloudpickle.register_pickle_by_value(module)                 # Ray's workers get these modules by value
    folder = tmp_path_factory.mktemp("results")
    (folder / "r_before.json").write_bytes(PREVIOUS)
    before, seen, lines = listing(folder), [], []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:
        with pytest.raises(UserError) as last:
            run_simulation(jobs_app(folder, seen), hostile_app(SIM), num_supernodes=2,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                           "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False}})
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    seen.append((str(last.value), type(last.value), listing(folder)))
    return {"folder": folder, "before": before, "seen": seen, "lines": [x for x in lines if x.startswith("stamp_min:")]}


def first_only(theta, updates, weights, cfg, params=None, G=None):
    """The loop's reference: FedAvg of client 0's update alone."""
    return server.aggregate(theta, updates[:1], weights[:1], cfg, params=params, G=G)


def test_hostile_client_on_the_simulation_engine_is_dropped_and_the_model_is_the_honest_ones(engine, tmp_path):
    """Job 0 (bad-replies=drop): every refusal one log line, recorded in the results; the model is
    the loop's with client 1's updates left out."""
    assert engine["seen"][0][:2] == (None, None)                                     # the job finished
    res = json.loads((engine["folder"] / "drop.json").read_text())
    refused = [(x["client"], x["task"], x["round"]) for x in res["refused"]]
    assert refused == [(1, 0, r) for r in range(len(SIM_ATTACKS))] + [(1, 0, None)]
    for x, (_, _, text) in zip(res["refused"], SIM_ATTACKS):
        assert text in x["why"], x["why"]
    assert res["refused"][-1]["why"].startswith("client 1's reply at the end of task 1 is refused: memory_bytes=-1")
    assert engine["lines"][:len(refused)] == [f"stamp_min: {x['why']}; the run goes on without it (the operator's "
                                              f"bad-replies=drop)" for x in res["refused"]]          # one line each
    assert [r["clients"] for r in res["rounds"]] == [[0]] * len(SIM_ATTACKS) and res["buffer_bytes"] == 0
    theta = torch.load(engine["folder"] / "drop_model.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                          # Flower's clients run with one thread each (Ray actors)
    try:
        run(replace(SIM, checkpoint_dir=str(tmp_path / "ref")), aggregate=first_only)
    finally:
        torch.set_num_threads(threads)
    ref = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["progress"]["theta"]
    assert sorted(theta) == sorted(ref) and all(theta[n].dtype == torch.float32 for n in theta)
    for n in ref:
        assert torch.allclose(theta[n], ref[n], rtol=1e-5, atol=1e-6), n


def test_each_hostile_reply_on_the_simulation_engine_stops_its_job_in_one_line(engine):
    """Jobs 1.. (bad-replies=stop), one attack each: the job stops with one line (a UserError, the
    last one raised out of run_simulation), logged once, and the results folder is as it was."""
    drop_lines = 1 + len(SIM_ATTACKS)
    after_job_0 = engine["seen"][0][2]
    assert sorted(name for name, _ in after_job_0) == ["drop.json", "drop_model.pt", "r_before.json"]
    assert dict(after_job_0)["r_before.json"] == PREVIOUS
    stops, lines = engine["seen"][1:], engine["lines"][drop_lines:]
    assert len(stops) == len(SIM_ATTACKS) and len(lines) == len(SIM_ATTACKS), (stops, lines)
    for (name, _, text), (line, kind, after), logged in zip(SIM_ATTACKS, stops, lines):
        assert kind is UserError and "\n" not in line, (name, line)
        assert line.startswith("client 1's reply in task 1 round 1 ") and text in line, (name, line)
        assert line.endswith("; the run stops (the operator's bad-replies=stop)"), (name, line)
        assert logged == f"stamp_min: {line}", (name, logged)                  # the one line in the log
        assert after == after_job_0, name                                     # nothing written, nothing damaged


def test_a_client_that_diverges_after_server_steps_scaled_by_eta_s_names_eta_s(tmp_path):
    """The Flower client says what fcl_loop says of the same divergence (fcl_loop.diverged): after server
    steps scaled by η_s > 1 the cause named is η_s, not the lr (test_faults' diverged-eta-s, over Flower)."""
    base = replace(BASE, method="stamp", eta_s=100.0, lr=0.5, rounds_per_task=2)
    with pytest.raises(UserError, match=r"a client failed \(client \d\): eta_s=100\.0: client \d's local training "
                                        r"diverged \(NaN/inf\) in task 1 round 2, from θ after server steps"):
        serve(tmp_path, base=base, client_app=make_client_app(base))
