"""STAMP on Flower: the same clients and server as `fcl_loop`, run by a federated-learning engine.

Optional: `pip install -r requirements-flower.txt` (Flower with its simulation engine). The rest
of stamp_min never imports this file.

    ServerApp (one process)                            ClientApp (one per SuperNode = client k)
      ask every node which client it is    --query-->   k = node_config "partition-id"
      StampStrategy.start, for every round r of every task t:
        configure_train: draw the clients, send θ   --train-->  client_update (TAM or a baseline)
          and {task t, round r, its classes, done}   <--Δ_k--  on its task-t data; ClientState
        aggregate_train: server.aggregate (FedAvg/SAM)           kept in context.state
        configure_evaluate, last round of a task:
          send the final θ                        --train.end_task-->  end_task (coreset refresh)
        evaluate_fn: accuracy of θ on every client's tasks (central, as in fcl_loop)
      write the results JSON (fcl_loop's format, "engine": "flower") and the final model beside it

Settings: every `Config` field, from the run config (`--run-config "method='stamp' gm-c=0.5"`,
field names with "-" or "_"), plus `reply-timeout` (seconds a client may stay silent);
`flower/pyproject.toml` lists them with their defaults. The ServerApp and every ClientApp build
the same scenario from the same settings and seed; the server also sends each client the classes
of its task and the number of messages it has completed ("done"), and a client whose scenario or
saved state disagrees stops the run with an error rather than train on the wrong data or state.

Why the result equals fcl_loop's: a client's random draws come from its own `ClientState.rng`,
which travels with the rest of its state; the server draws the participants from the seed and
aggregates the updates in client order, as the loop does (tests/test_flower.py checks it).
"""

import copy
import json
import time
from dataclasses import asdict, fields, replace
from functools import lru_cache
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from . import UserError, gradmatch
from .cli import check_writable, write_json
from .client import (client_update, end_task, float_state, from_state_dict, load_state, memory_bytes, new_state,
                     param_names, state_dict)
from .fcl_loop import Config, build, device_of, report, results, round_log
from .metrics import task_accuracy, tensor_bytes
from .server import aggregate, participants

ERROR_CODE = 1000               # Flower error code of a stamp_min client error (UserError)
FLOWER_SKIPS = ("checkpoint_dir", "resume", "plot", "quiet")   # fcl_loop-only settings
FLOWER_ONLY = {"reply_timeout": 600.0}   # seconds a client may stay silent before the run stops


def settings(run_config, base=Config()):
    """(Config, Flower-only settings) of a run: `base` and FLOWER_ONLY with the run config's
    entries ("num-clients" or "num_clients"). Values must have the field's type."""
    defaults = {**{f.name: f.default for f in fields(Config) if f.name not in FLOWER_SKIPS}, **FLOWER_ONLY}
    changes = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name not in defaults:
            raise UserError(f"run config {key}={value!r} is unknown; allowed: {', '.join(defaults)}")
        kind = type(defaults[name])
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            raise UserError(f"run config {key}={value!r} is not a {kind.__name__}; allowed: a {kind.__name__}")
        changes[name] = value
    extra = {n: changes.pop(n, v) for n, v in FLOWER_ONLY.items()}
    cfg = replace(base, **changes)
    cfg.validate()
    if not extra["reply_timeout"] > 0:
        raise UserError(f"reply-timeout={extra['reply_timeout']} must be positive; allowed: > 0 (seconds)")
    return cfg, extra


def config_from(run_config, base=Config()):
    return settings(run_config, base)[0]


def experiment(cfg):
    """(dataset, scenario, model with θ_0) of a run, built alike on the server and on every client.
    Data and scenario are built once per process (Flower calls a ClientApp once per message); the
    model is a fresh copy every time, so nothing a run does to it leaks into another."""
    ds, scenario, model = _experiment(json.dumps(asdict(cfg), sort_keys=True))
    return ds, scenario, copy.deepcopy(model)


@lru_cache(maxsize=2)
def _experiment(settings):
    return build(Config(**json.loads(settings)))


def on(arrays, device):
    """An ArrayRecord as {name: tensor} on `device`."""
    return {n: v.to(device) for n, v in arrays.to_torch_state_dict().items()}


# ---------------------------------------------------------------------------------------------
# ClientState <-> Flower records: tensors in an ArrayRecord, the rest as JSON in a ConfigRecord


def pack(obj, tensors, path="state"):
    """A JSON-able skeleton of nested dicts/lists/tuples; every tensor goes into `tensors[path]`."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu()
        return {"tensor": path}
    if isinstance(obj, dict):
        return {"dict": [[pack(k, tensors, f"{path}.{i}k"), pack(v, tensors, f"{path}.{i}")]
                         for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    return obj                                              # int, float, str, bool, None


def unpack(skeleton, tensors):
    if not isinstance(skeleton, dict):
        return skeleton
    (kind, value), = skeleton.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {unpack(k, tensors): unpack(v, tensors) for k, v in value}
    items = [unpack(v, tensors) for v in value]
    return tuple(items) if kind == "tuple" else items


FORMAT = "stamp_min-client-v1"


def save_client(context, state, done):
    """Store client state in context.state; `done`: messages (train, end_task) it has completed."""
    tensors = {}
    skeleton = pack(state_dict(state), tensors)
    context.state["client.tensors"] = ArrayRecord(tensors)
    context.state["client.skeleton"] = ConfigRecord({"json": json.dumps(skeleton), "format": FORMAT, "done": done})


def restore_client(context, k, cfg, done):
    """Client k's state from context.state, after `done` completed messages (a fresh state when
    done = 0). A state that is missing, corrupt, someone else's or out of step: UserError."""
    if "client.skeleton" not in context.state:
        if done == 0:
            return new_state(k, cfg)
        raise UserError(f"client {k}: its state of {done} earlier messages is gone (did the SuperNode restart?); "
                        f"allowed: SuperNodes that keep running for the whole run")
    try:
        record = context.state["client.skeleton"]
        if record["format"] != FORMAT:
            raise ValueError(f"format {record['format']!r}")
        tensors = context.state["client.tensors"].to_torch_state_dict()
        state, saved = from_state_dict(unpack(json.loads(record["json"]), tensors)), int(record["done"])
    except Exception as e:
        raise UserError(f"client {k}: its saved state cannot be restored ({type(e).__name__}: {e}); "
                        f"allowed: a state written by this stamp_min ClientApp in this run") from None
    if state.client_id != k:
        raise UserError(f"client {k}: its saved state belongs to client {state.client_id}; allowed: one "
                        f"partition-id per SuperNode for the whole run")
    if saved != done:
        raise UserError(f"client {k}: its saved state is from after message {saved}, the server counts {done}; "
                        f"allowed: a state that kept pace with the run")
    return state


# ---------------------------------------------------------------------------------------------
# ClientApp


def make_client_app(base=Config()):
    app = ClientApp()

    def whoami(context):
        """(Config, client k) from the run config and this SuperNode's node config."""
        cfg = config_from(context.run_config, base)
        if "partition-id" not in context.node_config:
            raise UserError("this SuperNode has no partition-id; allowed: flower-supernode --node-config "
                            "'partition-id=K num-partitions=N' with K in 0..N-1")
        k = int(context.node_config["partition-id"])
        if not 0 <= k < cfg.num_clients:
            raise UserError(f"partition-id={k} but the run has num-clients={cfg.num_clients}; "
                            f"allowed: 0..{cfg.num_clients - 1}")
        return cfg, k

    def receive(msg, context):
        """What a train message brings to client k: settings, the model holding θ (on the device),
        θ itself, the client's restored state, and its own data of task t (x, y, classes)."""
        cfg, k = whoami(context)
        ds, scenario, model = experiment(cfg)
        config = msg.content["config"]
        t, classes = int(config["task"]), list(config["classes"])
        task = scenario.tasks[k][t]
        if list(task.classes) != classes:
            raise UserError(f"client {k}, task {t}: the server sends classes {classes} but this client's scenario has "
                            f"{list(task.classes)}; allowed: the same dataset, scenario and seed settings everywhere")
        state = restore_client(context, k, cfg, int(config["done"]))
        device = device_of(cfg)
        theta = on(msg.content["arrays"], device)
        data = (ds.x_train[task.train_idx], ds.y_train[task.train_idx], task.classes)
        return cfg, k, model.to(device), theta, state, data

    def guarded(handler):
        """A stamp_min error becomes an error reply with a plain reason (the ServerApp reports it)."""
        def handle(msg, context):
            try:
                return handler(msg, context)
            except UserError as e:
                return Message(Error(code=ERROR_CODE, reason=str(e)), reply_to=msg)
        return handle

    def reply(msg, metrics, arrays=None):
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if arrays is not None:
            content["arrays"] = ArrayRecord({n: v.cpu() for n, v in arrays.items()})
        return Message(content, reply_to=msg)

    @app.query()
    @guarded
    def who(msg, context):
        cfg, k = whoami(context)
        return reply(msg, {"client": k, "num-partitions": int(context.node_config.get("num-partitions", -1))})

    @app.train()
    @guarded
    def train(msg, context):
        cfg, k, model, theta, state, (x, y, classes) = receive(msg, context)
        delta, info = client_update(model, theta, state, x, y, classes, cfg)
        save_client(context, state, int(msg.content["config"]["done"]) + 1)
        return reply(msg, {"client": k, "num_examples": len(y), **info}, delta)     # info: fcl_loop's round log

    @app.train("end_task")
    @guarded
    def finish_task(msg, context):
        cfg, k, model, theta, state, (x, y, classes) = receive(msg, context)
        end_task(model, theta, state, x, y, classes, cfg)
        save_client(context, state, int(msg.content["config"]["done"]) + 1)
        return reply(msg, {"client": k, "memory_bytes": memory_bytes(state)})

    return app


# ---------------------------------------------------------------------------------------------
# ServerApp


def check_replies(replies, expected, timeout, clients=None):
    """The replies, in client order. A client's error or a missing reply stops the run (UserError).
    clients: {node id: client k}, to name the client in the error."""
    replies = list(replies)
    for m in replies:
        if m.has_error():
            who = f"client {clients[m.metadata.src_node_id]}" if clients else f"node {m.metadata.src_node_id}"
            raise UserError(f"a client failed ({who}): {m.error.reason}")
    if len(replies) < expected:
        raise UserError(f"{expected - len(replies)} of {expected} clients did not reply within {timeout:.0f} s; "
                        f"allowed: every SuperNode of the run connected and running, or a larger reply-timeout")
    return sorted(replies, key=lambda m: int(m.content["metrics"]["client"]))


def client_nodes(grid, K, timeout):
    """{client k: node id}: waits for K SuperNodes, then asks each which client it is."""
    deadline, said = time.monotonic() + timeout, time.monotonic()
    while len(list(grid.get_node_ids())) < K:
        if time.monotonic() > deadline:
            raise UserError(f"only {len(list(grid.get_node_ids()))} of {K} SuperNodes connected within "
                            f"{timeout:.0f} s; allowed: num-clients SuperNodes")
        if time.monotonic() - said > 10:
            log(INFO, "waiting for SuperNodes: %d of %d connected", len(list(grid.get_node_ids())), K)
            said = time.monotonic()
        time.sleep(1.0)
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = check_replies(grid.send_and_receive(msgs, timeout=timeout), len(nodes), timeout)
    ids = [int(m.content["metrics"]["client"]) for m in replies]
    parts = {int(m.content["metrics"]["num-partitions"]) for m in replies} - {-1}
    if ids != list(range(K)) or parts - {K}:
        raise UserError(f"the SuperNodes are clients {ids} of {sorted(parts)}; allowed: partition-id 0..{K - 1}, once "
                        f"each, num-partitions={K} (= num-clients)")
    return {int(m.content["metrics"]["client"]): m.metadata.src_node_id for m in replies}


class StampStrategy(Strategy):
    """fcl_loop's schedule and server on Flower. Flower's round `server_round` = 1, 2, … is round r
    of task t; every round Strategy.start calls, in this order:

        configure_train     draw the clients; send θ and {task t, round r, classes, done}
        aggregate_train     θ ← server.aggregate(θ, updates in client order, sample counts)
        configure_evaluate  Flower's after-aggregation step. Used here for the end of a task:
                            the clients that trained task t get the final θ (`train.end_task`)
        aggregate_evaluate  check their replies
        evaluate (evaluate_fn)  central accuracy of θ, as fcl_loop measures it
    """

    def __init__(self, cfg, nodes, timeout):
        self.cfg, self.nodes, self.timeout = cfg, nodes, timeout
        self.clients = {node: k for k, node in nodes.items()}            # node id -> client k
        self.device = device_of(cfg)
        self.ds, self.scenario, model = experiment(cfg)
        self.model = model.to(self.device)                               # for central evaluation
        self.params = param_names(self.model)
        self.gen = torch.Generator().manual_seed(cfg.seed)              # client sampling, as in fcl_loop
        T = self.scenario.num_tasks
        self.acc = torch.full((T, T), float("nan"), dtype=torch.float64)   # A[t, j]
        self.round_acc, self.log, self.comm = [[] for _ in range(T)], [], 0
        self.done = {k: 0 for k in nodes}          # messages each client has completed (its state must agree)
        self.memory = {k: 0 for k in nodes}        # bytes each client keeps for old tasks
        self.ids, self.theta, self.t0 = [], {}, 0.0          # this round: participants, θ, start time
        self.ending = []                                     # clients finishing the current task

    def task_round(self, server_round):
        return divmod(server_round - 1, self.cfg.rounds_per_task)

    def messages(self, arrays, t, r, ids, message_type):
        return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                    {"task": t, "round": r, "classes": list(self.scenario.tasks[k][t].classes), "done": self.done[k]})}),
                        dst_node_id=self.nodes[k], message_type=message_type) for k in ids]

    def replies(self, replies, expected):
        replies = check_replies(replies, expected, self.timeout, self.clients)
        for m in replies:
            self.done[int(m.content["metrics"]["client"])] += 1
        return replies

    def configure_train(self, server_round, arrays, config, grid):
        t, r = self.task_round(server_round)
        self.ids = participants(len(self.nodes), self.cfg.participation, self.gen)
        self.theta = on(arrays, self.device)
        self.t0 = time.perf_counter()
        return self.messages(arrays, t, r, self.ids, MessageType.TRAIN)

    def aggregate_train(self, server_round, replies):
        t, r = self.task_round(server_round)
        replies = self.replies(replies, len(self.ids))
        t1 = time.perf_counter()
        updates = [on(m.content["arrays"], self.device) for m in replies]
        infos = [dict(m.content["metrics"]) for m in replies]
        weights = [int(i["num_examples"]) for i in infos]
        p_updates = [{n: u[n] for n in self.params} for u in updates]
        G = gradmatch.gram(p_updates)                     # (K, K) over the weights: diagnostics, and SAM's G
        theta, step = aggregate(self.theta, updates, weights, self.cfg, params=self.params, G=G)
        self.comm += 2 * tensor_bytes(theta) * len(self.ids)     # θ down, Δ up, per participant (as fcl_loop)
        self.log.append(round_log(t, r, self.ids, infos, weights, G, p_updates, {n: step[n] for n in self.params},
                                  t1 - self.t0, time.perf_counter() - t1))
        return ArrayRecord({n: v.cpu() for n, v in theta.items()}), MetricRecord({"loss": self.log[-1]["loss"]})

    def configure_evaluate(self, server_round, arrays, config, grid):
        t, r = self.task_round(server_round)
        if r < self.cfg.rounds_per_task - 1:
            self.ending = []
            return []
        # end of task t: the clients that trained it refresh their memory from the final θ
        self.ending = sorted({k for e in self.log if e["task"] == t for k in e["clients"]})
        return self.messages(arrays, t, r, self.ending, "train.end_task")

    def aggregate_evaluate(self, server_round, replies):
        for m in self.replies(replies, len(self.ending)):
            self.memory[int(m.content["metrics"]["client"])] = int(m.content["metrics"]["memory_bytes"])
        return None

    def evaluate(self, server_round, arrays):
        """Central evaluation after every round (evaluate_fn): current task, and A[t, :] at a task's end."""
        if server_round == 0:
            return None
        t, r = self.task_round(server_round)
        load_state(self.model, on(arrays, self.device))
        cur = task_accuracy(self.model, self.ds, self.scenario, t)
        self.round_acc[t].append(cur)
        self.log[-1].update(current_task_acc=cur, seconds=time.perf_counter() - self.t0)
        log(INFO, "task %d/%d round %d/%d | loss %.3f | current-task acc %.3f", t + 1, self.scenario.num_tasks, r + 1,
            self.cfg.rounds_per_task, self.log[-1]["loss"], cur)
        if r == self.cfg.rounds_per_task - 1:
            for j in range(t + 1):
                self.acc[t, j] = task_accuracy(self.model, self.ds, self.scenario, j)
        return MetricRecord({"current-task-acc": cur})

    def summary(self):
        log(INFO, "StampStrategy: method %s, %d clients, %d tasks x %d rounds", self.cfg.method, len(self.nodes),
            self.scenario.num_tasks, self.cfg.rounds_per_task)


def make_server_app(base=Config()):
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context):
        try:
            serve(grid, context)
        except UserError as e:                      # one plain line in the log, above Flower's traceback
            log(ERROR, "stamp_min: %s", e)
            raise

    def serve(grid, context):
        start = time.perf_counter()
        cfg, extra = settings(context.run_config, base)
        out = Path(cfg.out or f"results/{cfg.dataset}_{cfg.method}_seed{cfg.seed}_flower.json")
        check_writable(out)                                          # fail now, not after the run
        _, scenario, model = experiment(cfg)
        strategy = StampStrategy(cfg, client_nodes(grid, scenario.num_clients, extra["reply_timeout"]),
                                 extra["reply_timeout"])
        result = strategy.start(grid, ArrayRecord(float_state(model)), timeout=extra["reply_timeout"],
                                num_rounds=scenario.num_tasks * cfg.rounds_per_task, evaluate_fn=strategy.evaluate)
        res = {"engine": "flower", **results(cfg, scenario, strategy.acc, strategy.round_acc, strategy.log, strategy.comm,
                                              sum(strategy.memory.values()), time.perf_counter() - start)}
        write_json(out, res)
        torch.save(result.arrays.to_torch_state_dict(), out.with_name(out.stem + "_model.pt"))
        for line in report(res).splitlines():
            log(INFO, "%s", line)
        log(INFO, "wrote %s", out)

    return app


server_app = make_server_app()      # flower/pyproject.toml: components of `flwr run`
client_app = make_client_app()
