"""STAMP on Flower, the client side: settings from the run config, client state kept between
messages, and the ClientApp (flower_app.py has the overview and the ServerApp).

A ClientApp is started for every message. It reads its settings from the run config and its
client id k from the SuperNode's node config, rebuilds the run's data and scenario (the same on
every node: same settings, same seed), restores its `ClientState` from `context.state`, and
answers:

    query           which client it is, and the qualified names of the rules it runs
    train           Δ_k = client_update(θ, its task-t data), with the metrics of fcl_loop's round log
    train.end_task  end_task(θ_final, its task-t data): coreset / baseline state refresh

`make_client_app(cfg, client_update=…, end_task=…, new_state=…, match=…)` takes the same rules
as `fcl_loop.run`; the library's client_update gets the `match` in use.
"""

import copy
import json
import math
from dataclasses import asdict, fields, replace
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import UserError, client, gradmatch
from .client import load_state, memory_bytes, restore, state_dict
from .data import load_dataset
from .fcl_loop import Config, build, client_failure, device_of
from .limits import check as check_job, operator_limits, private
from .rules import bind

ERROR_CODE = 1000               # Flower error code of a stamp_min client error (UserError)
# not job settings: fcl_loop-only ones, and where data live on a machine (the operator's: a SuperNode's
# --node-config "data-root=... download=...", the server's STAMP_DATA_ROOT), never the job submitter's
FLOWER_SKIPS = ("checkpoint_dir", "resume", "overwrite", "plot", "quiet", "data_root", "download")
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
    if not (math.isfinite(extra["reply_timeout"]) and extra["reply_timeout"] > 0):
        raise UserError(f"reply-timeout={extra['reply_timeout']} must be positive and finite; allowed: > 0 (seconds)")
    return cfg, extra


def config_from(run_config, base=Config()):
    return settings(run_config, base)[0]


def node_settings(cfg, node_config):
    """`cfg` with this machine's data settings: node config "data-root" and "download" (operator's)."""
    download = node_config.get("download", cfg.download)
    if not isinstance(download, bool):
        download = str(download).lower() in ("1", "true", "yes", "on")
    return replace(cfg, data_root=str(node_config.get("data-root", cfg.data_root)), download=download)


def experiment(cfg, check=None):
    """(dataset, scenario, model with θ_0) of a run, built alike on the server and on every client.
    Data and scenario are built once per process (Flower calls a ClientApp once per message); the
    model is a fresh copy every time, so nothing a run does to it leaks into another. check(number
    of classes): called once the dataset is read, before the scenario is built (limits.check)."""
    ds = _dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size)
    if check is not None:
        check(ds.num_classes)
    ds, scenario, model = _experiment(json.dumps(asdict(cfg), sort_keys=True))
    return ds, scenario, copy.deepcopy(model)


@lru_cache(maxsize=2)
def _dataset(name, root, download, image_size):
    return load_dataset(name, root, download, image_size)


@lru_cache(maxsize=2)
def _experiment(settings):
    cfg = Config(**json.loads(settings))
    return build(cfg, _dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size))


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


def restore_client(context, k, cfg, done, new_state=client.new_state):
    """Client k's state from context.state, after `done` completed messages: what `new_state`
    makes, filled with the saved state (fresh when done = 0). A state that is missing, corrupt,
    someone else's or out of step: UserError."""
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
        saved_state, saved = unpack(json.loads(record["json"]), tensors), int(record["done"])
        owner = int(saved_state["client_id"])
    except Exception as e:
        raise UserError(f"client {k}: its saved state cannot be restored ({type(e).__name__}: {e}); "
                        f"allowed: a state written by this stamp_min ClientApp in this run") from None
    if owner != k:
        raise UserError(f"client {k}: its saved state belongs to client {owner}; allowed: one "
                        f"partition-id per SuperNode for the whole run")
    if saved != done:
        raise UserError(f"client {k}: its saved state is from after message {saved}, the server counts {done}; "
                        f"allowed: a state that kept pace with the run")
    try:
        return restore(new_state(k, cfg), saved_state)
    except Exception as e:
        raise UserError(f"client {k}: its saved state cannot be restored ({type(e).__name__}: {e}); "
                        f"allowed: a state written by this stamp_min ClientApp in this run") from None



# ---------------------------------------------------------------------------------------------
# ClientApp


def split_info(info, name):
    """client_update's info as Flower can carry it: (numbers or lists of numbers, for a MetricRecord;
    tensors, for the "info" ArrayRecord the server's aggregate gets, rules.py)."""
    ok = lambda v: type(v) in (int, float) or (isinstance(v, list) and all(type(x) in (int, float) for x in v))  # noqa: E731
    bad = [k for k, v in info.items() if not (ok(v) or torch.is_tensor(v))]
    if bad:
        raise UserError(f"client_update={name}: info[{bad[0]!r}] is a {type(info[bad[0]]).__name__}; allowed: numbers "
                        f"and tensors, one name each (Flower sends them as records)")
    return ({k: v for k, v in info.items() if not torch.is_tensor(v)},
            {k: v.detach().cpu().float() for k, v in info.items() if torch.is_tensor(v)})


def make_client_app(base=Config(), *, client_update=client.client_update, end_task=client.end_task,
                    new_state=client.new_state, match=gradmatch.match):
    """A ClientApp running these rules (defaults: the library's) with the settings `base` changed
    by the run config."""
    fns, names, own = bind(client_update, end_task, new_state, None, match, calls=("client_update",))
    del names["aggregate"], names["new_server_state"]                       # the server's rules
    client_update, end_task, new_state = fns["client_update"], fns["end_task"], fns["new_state"]   # checked rules
    app = ClientApp()

    def whoami(context):
        """(Config, client k, check(number of classes)) from the run config and this SuperNode's
        node config, within the limits its operator set there (limits.py)."""
        cfg, extra = settings(context.run_config, base)
        cfg, lim = node_settings(cfg, context.node_config), operator_limits(context.node_config, "node config")
        check_job(cfg, extra, lim)
        if "partition-id" not in context.node_config:
            raise UserError("this SuperNode has no partition-id; allowed: flower-supernode --node-config "
                            "'partition-id=K num-partitions=N' with K in 0..N-1")
        k = int(context.node_config["partition-id"])
        if not 0 <= k < cfg.num_clients:
            raise UserError(f"partition-id={k} but the run has num-clients={cfg.num_clients}; "
                            f"allowed: 0..{cfg.num_clients - 1}")
        return cfg, k, lambda classes: check_job(cfg, extra, lim, classes)

    def receive(msg, context):
        """What a train message brings to client k: settings, the model holding θ (on the device),
        θ itself, the client's restored state, and its own data of task t (x, y, classes)."""
        cfg, k, check = whoami(context)
        ds, scenario, model = experiment(cfg, check)
        config = msg.content["config"]
        t, classes = int(config["task"]), list(config["classes"])
        task = scenario.tasks[k][t]
        if list(task.classes) != classes:
            raise UserError(f"client {k}, task {t}: the server sends classes {classes} but this client's scenario has "
                            f"{list(task.classes)}; allowed: the same dataset, scenario and seed settings everywhere")
        state = restore_client(context, k, cfg, int(config["done"]), new_state)
        device = device_of(cfg)
        theta = on(msg.content["arrays"], device)
        state.server = on(msg.content["broadcast"], device) if "broadcast" in msg.content else {}   # the server's
        load_state(model := model.to(device), theta)                # every rule is called with the model holding θ
        data = (ds.x_train[task.train_idx], ds.y_train[task.train_idx], task.classes)
        return cfg, k, model, theta, state, data

    def guarded(handler):
        """Any error becomes an error reply with a plain one-line reason (the ServerApp reports it),
        naming no folder of this machine."""
        def handle(msg, context):
            try:
                return handler(msg, context)
            except Exception as e:
                why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {' '.join(str(e).split())}"
                root = str(context.node_config.get("data-root", base.data_root))
                return Message(Error(code=ERROR_CODE, reason=private(why, {root: "<this node's data folder>"})),
                               reply_to=msg)
        return handle

    def reply(msg, metrics, arrays=None):
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if arrays is not None:
            content["arrays"] = ArrayRecord({n: v.cpu() for n, v in arrays.items()})
        return Message(content, reply_to=msg)

    @app.query()
    @guarded
    def who(msg, context):
        cfg, k, _ = whoami(context)
        answer = reply(msg, {"client": k, "num-partitions": int(context.node_config.get("num-partitions", -1))})
        answer.content["rules"] = ConfigRecord(names)                      # the server records them
        answer.content["own"] = ConfigRecord(own)                          # and names the run after them
        return answer

    @app.train()
    @guarded
    def train(msg, context):
        cfg, k, model, theta, state, (x, y, classes) = receive(msg, context)
        try:
            delta, info = client_update(model, theta, state, x, y, classes, cfg)
        except UserError as e:                  # the same diagnosis as fcl_loop's (η_s > 1, the user's rule, lr)
            config = msg.content["config"]
            raise client_failure(e, cfg, int(config["task"]), int(config["round"]), k,
                                 names["client_update"] if own.get("client_update") else None) from None
        metrics, tensors = split_info(info, names["client_update"])
        save_client(context, state, int(msg.content["config"]["done"]) + 1)
        answer = reply(msg, {**metrics, "client": k, "num_examples": len(y)}, delta)
        if tensors:
            answer.content["info"] = ArrayRecord(tensors)
        return answer

    @app.train("end_task")
    @guarded
    def finish_task(msg, context):
        cfg, k, model, theta, state, (x, y, classes) = receive(msg, context)
        end_task(model, theta, state, x, y, classes, cfg)
        save_client(context, state, int(msg.content["config"]["done"]) + 1)
        return reply(msg, {"client": k, "memory_bytes": memory_bytes(state)})

    return app


client_app = make_client_app()      # flower/pyproject.toml: the ClientApp of `flwr run`
