"""STAMP on Flower: the same clients and server as `fcl_loop`, run by a federated-learning engine.

Optional: `pip install -r requirements-flower.txt` (Flower with its simulation engine). The rest
of stamp_min never imports this file.

    ServerApp (one process)                            ClientApp (one per SuperNode = client k)
      ask every node its partition-id      --query-->   reply k (node_config "partition-id")
      StampStrategy.start, for every round t, r:
        configure_train: draw the clients, send θ   --train-->  client_update (TAM or a baseline)
          and config {task t, round r, task classes}  <--Δ_k--  on its task-t data; ClientState
        aggregate_train: server.aggregate (FedAvg/SAM)           kept in context.state
        configure_evaluate, last round of a task:
          send the final θ                        --train.end_task-->  end_task (coreset refresh)
        evaluate_fn: accuracy of θ on every client's tasks (central, as in fcl_loop)
      write the results JSON (fcl_loop's format) and the final model beside it

Settings: every `Config` field, from the run config (`--run-config "method='stamp' gm-c=0.5"`,
field names with "-" or "_"); `flower/pyproject.toml` lists them with their defaults. The
ServerApp and every ClientApp build the same scenario from the same settings and seed; the
server also sends each client the classes of its task, and a client whose own scenario
disagrees stops the run with an error rather than train on the wrong data.

Why the result equals fcl_loop's: a client's random draws come from its own `ClientState.rng`,
which travels with the rest of its state; the server draws the participants from the seed and
aggregates the updates in client order, as the loop does (tests/test_flower.py checks it).
"""

import json
import time
from logging import ERROR
from dataclasses import asdict, fields, replace
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from . import UserError, gradmatch
from .cli import run_info, write_json
from .client import client_update, end_task, float_state, from_state_dict, load_state, new_state, param_names, state_dict
from .data import load_dataset, make_scenario, validation_split
from .fcl_loop import Config, mean
from .metrics import current_task_accuracy, summary, task_accuracy, tensor_bytes
from .models import build_model
from .server import aggregate, participants

REPLY_TIMEOUT_S = 600           # a client silent this long stops the run (it never hangs)
ERROR_CODE = 1000               # Flower error code of a stamp_min client error (UserError)
FLOWER_SKIPS = ("checkpoint_dir", "resume", "plot", "quiet")   # fcl_loop-only settings


def config_from(run_config, base=Config()):
    """The Config of a run: `base` with the run config's entries ("num-clients" or "num_clients")."""
    types = {f.name: type(f.default) for f in fields(Config) if f.name not in FLOWER_SKIPS}
    changes = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name not in types:
            raise UserError(f"run config {key}={value!r} is unknown; allowed: the Config fields ({', '.join(types)})")
        changes[name] = types[name](value)
    cfg = replace(base, **changes)
    cfg.validate()
    return cfg


def experiment(cfg):
    """(dataset, scenario, model) of a run: built alike on the server and on every client (once
    per process: Flower calls a ClientApp once per message)."""
    return _experiment(json.dumps(asdict(cfg), sort_keys=True))


@lru_cache(maxsize=2)
def _experiment(settings):
    cfg = Config(**json.loads(settings))
    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size)
    if cfg.validation:
        ds = validation_split(ds)
    scenario = make_scenario(ds, cfg.scenario, cfg.num_clients, cfg.num_tasks or None, cfg.classes_per_task,
                             cfg.alpha, cfg.share_samples, seed=cfg.seed)
    torch.manual_seed(cfg.seed)                             # the initial model θ_0, as in fcl_loop
    model = build_model(cfg.model, ds.num_classes, ds.in_channels, ds.image_size, ds.mean, ds.std)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return ds, scenario, model


def device_of(cfg):
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")


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


def save_client(context, state):
    tensors = {}
    skeleton = pack(state_dict(state), tensors)
    context.state["client.tensors"] = ArrayRecord({k: v for k, v in tensors.items()})
    context.state["client.skeleton"] = ConfigRecord({"json": json.dumps(skeleton), "format": "stamp_min-client-v1"})


def restore_client(context, k, cfg):
    """Client k's state from context.state (a fresh one on its first message). Any problem: UserError."""
    if "client.skeleton" not in context.state:
        return new_state(k, cfg)
    try:
        assert context.state["client.skeleton"]["format"] == "stamp_min-client-v1"
        tensors = context.state["client.tensors"].to_torch_state_dict()
        state = from_state_dict(unpack(json.loads(context.state["client.skeleton"]["json"]), tensors))
    except Exception as e:
        raise UserError(f"client {k}: its saved state cannot be restored ({type(e).__name__}: {e}); "
                        f"allowed: a state written by this stamp_min ClientApp in this run") from None
    if state.client_id != k:
        raise UserError(f"client {k}: its saved state belongs to client {state.client_id}; allowed: one "
                        f"partition-id per SuperNode for the whole run")
    return state


# ---------------------------------------------------------------------------------------------
# ClientApp


def make_client_app(base=Config()):
    app = ClientApp()

    def setup(msg, context):
        cfg = config_from(context.run_config, base)
        if "partition-id" not in context.node_config:
            raise UserError("this SuperNode has no partition-id; allowed: flower-supernode --node-config "
                            "'partition-id=K num-partitions=N' with K in 0..N-1")
        k = int(context.node_config["partition-id"])
        ds, scenario, model0 = experiment(cfg)
        if not 0 <= k < len(scenario.tasks):
            raise UserError(f"partition-id={k} but the run has {len(scenario.tasks)} clients; allowed: 0..{len(scenario.tasks) - 1}")
        return cfg, k, ds, scenario, model0

    def receive(msg, context):
        """Everything a train message needs: settings, client k, model and θ on the device, client
        state, and the client's own data of task t (checked against the classes the server sent)."""
        cfg, k, ds, scenario, model0 = setup(msg, context)
        t, classes = int(msg.content["config"]["task"]), list(msg.content["config"]["classes"])
        task = scenario.tasks[k][t]
        if list(task.classes) != classes:
            raise UserError(f"client {k}, task {t}: the server sends classes {classes} but this client's scenario has "
                            f"{list(task.classes)}; allowed: the same dataset, scenario and seed settings everywhere")
        state = restore_client(context, k, cfg)
        device = device_of(cfg)
        theta = {n: v.to(device) for n, v in msg.content["arrays"].to_torch_state_dict().items()}
        return cfg, k, model0.to(device), theta, state, ds.x_train[task.train_idx], ds.y_train[task.train_idx], task.classes

    def guarded(handler):
        def run(msg, context):
            try:
                return handler(msg, context)
            except UserError as e:                          # a clear reason in the server's log
                return Message(Error(code=ERROR_CODE, reason=str(e)), reply_to=msg)
        return run

    @app.query()
    @guarded
    def who(msg, context):
        _, k, *_ = setup(msg, context)
        return Message(RecordDict({"metrics": MetricRecord({"client": k})}), reply_to=msg)

    @app.train()
    @guarded
    def train(msg, context):
        cfg, k, model, theta, state, x, y, classes = receive(msg, context)
        delta, info = client_update(model, theta, state, x, y, classes, cfg)
        save_client(context, state)
        metrics = {"loss": info["loss"], "num-examples": len(y), "client": k, "gm-seconds": info.get("gm_seconds", 0.0)}
        return Message(RecordDict({"arrays": ArrayRecord({n: v.cpu() for n, v in delta.items()}),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.train("end_task")
    @guarded
    def finish_task(msg, context):
        cfg, k, model, theta, state, x, y, classes = receive(msg, context)
        end_task(model, theta, state, x, y, classes, cfg)
        save_client(context, state)
        return Message(RecordDict({"metrics": MetricRecord({"client": k})}), reply_to=msg)

    return app


# ---------------------------------------------------------------------------------------------
# ServerApp


def check_replies(replies, expected):
    """The replies, in client order; a missing reply or a client's error stops the run (UserError)."""
    replies = list(replies)
    for m in replies:
        if m.has_error():
            raise UserError(f"a client failed (node {m.metadata.src_node_id}): {m.error.reason}")
    if len(replies) < expected:
        raise UserError(f"{expected - len(replies)} of {expected} clients did not reply within {REPLY_TIMEOUT_S} s; "
                        f"allowed: every SuperNode of the run connected and running")
    return sorted(replies, key=lambda m: int(m.content["metrics"]["client"]))


def client_nodes(grid, K):
    """{client k: node id}: waits for K nodes, then asks each its partition-id."""
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while len(list(grid.get_node_ids())) < K:
        if time.monotonic() > deadline:
            raise UserError(f"only {len(list(grid.get_node_ids()))} of {K} SuperNodes connected within "
                            f"{REPLY_TIMEOUT_S} s; allowed: num-clients SuperNodes")
        time.sleep(1.0)
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = check_replies(grid.send_and_receive(msgs, timeout=REPLY_TIMEOUT_S), len(nodes))
    found = {int(m.content["metrics"]["client"]): m.metadata.src_node_id for m in replies}
    ids = sorted(int(m.content["metrics"]["client"]) for m in replies)
    if ids != list(range(K)):
        raise UserError(f"the SuperNodes have partition-ids {ids}; allowed: exactly 0..{K - 1}, once each")
    return found


class StampStrategy(Strategy):
    """fcl_loop's schedule and server on Flower: round `server_round` = task t, round r of it."""

    def __init__(self, cfg, nodes):
        self.cfg, self.nodes = cfg, nodes
        self.ds, self.scenario, model = experiment(cfg)
        self.model = model.to(device_of(cfg))
        self.params = param_names(self.model)
        self.gen = torch.Generator().manual_seed(cfg.seed)          # client sampling, as in fcl_loop
        T = self.scenario.num_tasks
        self.acc = torch.full((T, T), float("nan"), dtype=torch.float64)
        self.round_acc, self.log, self.comm = [[] for _ in range(T)], [], 0

    def task_round(self, server_round):
        return divmod(server_round - 1, self.cfg.rounds_per_task)

    def messages(self, arrays, t, r, ids, message_type):
        return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                    {"task": t, "round": r, "classes": list(self.scenario.tasks[k][t].classes)})}),
                        dst_node_id=self.nodes[k], message_type=message_type) for k in ids]

    def configure_train(self, server_round, arrays, config, grid):
        t, r = self.task_round(server_round)
        self.ids = participants(len(self.nodes), self.cfg.participation, self.gen)
        self.theta, self.t0 = arrays.to_torch_state_dict(), time.perf_counter()
        return self.messages(arrays, t, r, self.ids, MessageType.TRAIN)

    def aggregate_train(self, server_round, replies):
        t, r = self.task_round(server_round)
        replies = check_replies(replies, len(self.ids))
        updates = [m.content["arrays"].to_torch_state_dict() for m in replies]
        weights = [int(m.content["metrics"]["num-examples"]) for m in replies]
        p_updates = [{n: u[n] for n in self.params} for u in updates]
        G = gradmatch.gram(p_updates)
        theta, _ = aggregate(self.theta, updates, weights, self.cfg, params=self.params, G=G)
        self.comm += 2 * tensor_bytes(theta) * len(self.ids)
        self.log.append({"task": t, "round": r, "clients": self.ids, "train_images": sum(weights),
                         "loss": mean(float(m.content["metrics"]["loss"]) for m in replies),
                         "spatial_cos": gradmatch.mean_pairwise_cosine(G)})
        return ArrayRecord(theta), MetricRecord({"loss": self.log[-1]["loss"]})

    def configure_evaluate(self, server_round, arrays, config, grid):
        t, r = self.task_round(server_round)
        if r < self.cfg.rounds_per_task - 1:
            return []
        # end of task t: the clients that trained it refresh their memory from the final θ
        trained = sorted({k for e in self.log if e["task"] == t for k in e["clients"]})
        self.ended = len(trained)
        return self.messages(arrays, t, r, trained, "train.end_task")

    def aggregate_evaluate(self, server_round, replies):
        if self.task_round(server_round)[1] == self.cfg.rounds_per_task - 1:
            check_replies(replies, self.ended)
        return None

    def evaluate(self, server_round, arrays):
        """Central evaluation after every round (evaluate_fn): current task, and A[t, :] at a task's end."""
        if server_round == 0:
            return None
        t, r = self.task_round(server_round)
        load_state(self.model, {n: v.to(device_of(self.cfg)) for n, v in arrays.to_torch_state_dict().items()})
        cur = task_accuracy(self.model, self.ds, self.scenario, t)
        self.round_acc[t].append(cur)
        self.log[-1].update(current_task_acc=cur, seconds=time.perf_counter() - self.t0)
        if r == self.cfg.rounds_per_task - 1:
            for j in range(t + 1):
                self.acc[t, j] = task_accuracy(self.model, self.ds, self.scenario, j)
        return MetricRecord({"current-task-acc": cur})

    def summary(self):
        print(f"StampStrategy: method {self.cfg.method}, {len(self.nodes)} clients, "
              f"{self.scenario.num_tasks} tasks x {self.cfg.rounds_per_task} rounds")


def make_server_app(base=Config()):
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context):
        try:
            run(grid, context)
        except UserError as e:                      # one plain line in the log, above Flower's traceback
            log(ERROR, "stamp_min: %s", e)
            raise

    def run(grid, context):
        start = time.perf_counter()
        cfg = config_from(context.run_config, base)
        out = Path(cfg.out or f"results/{cfg.dataset}_{cfg.method}_seed{cfg.seed}_flower.json")
        _, scenario, model = experiment(cfg)
        theta = float_state(model)                                   # θ_0
        strategy = StampStrategy(cfg, client_nodes(grid, scenario.num_clients))
        result = strategy.start(grid, ArrayRecord(theta), num_rounds=scenario.num_tasks * cfg.rounds_per_task,
                                timeout=REPLY_TIMEOUT_S, evaluate_fn=strategy.evaluate)
        res = {"config": asdict(cfg), "engine": "flower", "acc_matrix": strategy.acc.tolist(), **summary(strategy.acc),
               "current_task_accuracy": current_task_accuracy(strategy.round_acc), "comm_bytes": strategy.comm,
               "wall_time_s": time.perf_counter() - start, "rounds": strategy.log,
               "scenario": [[list(task.classes) for task in row] for row in scenario.tasks], "versions": run_info()}
        write_json(out, res)
        torch.save(result.arrays.to_torch_state_dict(), out.with_name(out.stem + "_model.pt"))
        print(f"average accuracy {res['avg_accuracy']:.4f} | forgetting {res['avg_forgetting']:.4f}; wrote {out}")

    return app


server_app = make_server_app()      # flower/pyproject.toml: components of `flwr run`
client_app = make_client_app()
