"""STAMP on Flower: the same clients and server as `fcl_loop`, run by a federated-learning engine.

Optional: `pip install -r requirements-flower.txt` (Flower with its simulation engine). The rest
of stamp_min never imports this file or flower_client.py.

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

Settings: every `Config` field but the operator's (data: a SuperNode's node config "data-root"/
"download", the server's $STAMP_DATA_ROOT; results: $STAMP_RESULTS_DIR, a job's `out` names one
file there), from the run config ("method='stamp' gm-c=0.5"), plus `reply-timeout` (seconds a client
may stay silent); `flower/pyproject.toml` lists them. Server and clients build the same scenario
from the same settings and seed; the server sends each client its task's classes and the number
of messages it has completed ("done"), and a client whose scenario or saved state disagrees stops
the run rather than train on the wrong data or state.

Rules, as in `fcl_loop.run`: `make_server_app(cfg, aggregate=…, match=…)` and
`make_client_app(cfg, client_update=…, end_task=…, new_state=…, match=…)` (flower_client.py, the
client side) run any of them instead of the library's; every client tells the server the names
of its rules, and the results JSON records them.

Trust: the server checks every reply before use (replies.py: the client is the one the message
went to, its weight the task size the server knows, its update like θ) and bounds every job by its
operator's limits (limits.py); no line it logs names an operator's folder.

Why the result equals fcl_loop's: a client's random draws come from its own `ClientState.rng`,
which travels with the rest of its state; the server draws the participants from the seed and
aggregates in client order (tests/test_flower.py checks it).
"""

import os
import time
from dataclasses import replace
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from . import UserError, gradmatch, replies, server
from .cli import atomic_write, write_json
from .client import float_state, load_state, param_names
from .fcl_loop import Config, device_of, report, results, round_log
from .rules import DEFAULTS, bind, run_name
from .flower_client import (FLOWER_ONLY, FLOWER_SKIPS, client_app, config_from, experiment,  # noqa: F401 (public)
                            make_client_app, on, restore_client, save_client, settings)
from .limits import check as check_job, check_out, operator_limits, private, results_path  # noqa: F401 (public)
from .metrics import task_accuracy, tensor_bytes
from .server import participants, server_step

# ---------------------------------------------------------------------------------------------
# ServerApp

def client_nodes(grid, K, timeout):
    """({client k: node id}, the clients' rules {keyword: qualified name}, their own rules {keyword:
    short name}): waits for K SuperNodes, then asks each which client it is and which rules it
    runs (all must run the same; replies.nodes checks the answers)."""
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
    answers = list(grid.send_and_receive(msgs, timeout=timeout))
    if len(answers) < len(nodes):
        raise UserError(f"{len(nodes) - len(answers)} of {len(nodes)} SuperNodes did not answer within {timeout:.0f} s; "
                        f"allowed: every SuperNode of the run connected and running, or a larger reply-timeout")
    return replies.nodes(answers, K, timeout)


class StampStrategy(Strategy):
    """fcl_loop's schedule and server on Flower. Flower's round `server_round` = 1, 2, … is round r
    of task t; every round Strategy.start calls, in this order:

        configure_train     draw the clients; send θ and {task t, round r, classes, done}
        aggregate_train     θ ← server.aggregate(θ, updates in client order, sample counts[, the
                            server's state, the clients' infos]), then the server optimiser
        configure_evaluate  Flower's after-aggregation step. Used here for the end of a task:
                            the clients that trained task t get the final θ (`train.end_task`)
        aggregate_evaluate  check their replies
        evaluate (evaluate_fn)  central accuracy of θ, as fcl_loop measures it
    """

    def __init__(self, cfg, nodes, timeout, aggregate, bad_replies="stop", new_server_state=server.new_server_state):
        """aggregate, new_server_state: the server's rules as rules.bind returns them (checked);
        bad_replies: the operator's policy for a reply that fails its checks (limits.py): stop | drop.
        The server's state (server.ServerState) lives here for the whole run; its broadcast goes
        with θ to every client."""
        self.cfg, self.nodes, self.timeout, self.aggregate, self.policy = cfg, nodes, timeout, aggregate, bad_replies
        self.sstate = new_server_state(cfg)
        self.device = device_of(cfg)
        self.ds, self.scenario, model = experiment(cfg)
        self.model = model.to(self.device)                               # for central evaluation
        self.params = param_names(self.model)
        self.gen = torch.Generator().manual_seed(cfg.seed)              # client sampling, as in fcl_loop
        T = self.scenario.num_tasks
        self.acc = torch.full((T, T), float("nan"), dtype=torch.float64)   # A[t, j]
        self.round_acc, self.log, self.comm, self.refused = [[] for _ in range(T)], [], 0, []
        self.done = {k: 0 for k in nodes}          # messages each client has completed (its state must agree)
        self.memory = {k: 0 for k in nodes}        # bytes each client keeps for old tasks
        self.ids, self.theta, self.t0 = [], {}, 0.0          # this round: participants, θ, start time
        self.sent, self.trained, self.ending = [], set(), []   # messages out; clients that trained task t; ending it

    def task_round(self, server_round):
        return divmod(server_round - 1, self.cfg.rounds_per_task)

    def messages(self, arrays, t, r, ids, message_type):
        self.sent = [(k, Message(RecordDict({"arrays": arrays, "broadcast": ArrayRecord(
                    {n: v.cpu() for n, v in self.sstate.broadcast.items()}), "config": ConfigRecord(
                    {"task": t, "round": r, "classes": list(self.scenario.tasks[k][t].classes), "done": self.done[k]})}),
                        dst_node_id=self.nodes[k], message_type=message_type)) for k in ids]
        return [m for _, m in self.sent]

    def answers(self, got, where):
        """[(client k, reply)] in client order; the client is the one its message went to (Flower
        sets the message ids when it sends them)."""
        out, strays = replies.by_client(got, {m.metadata.message_id: k for k, m in self.sent}, self.timeout, where)
        for e in strays:
            self.refuse(e)
        for k, _ in out:
            self.done[k] += 1                       # the client has done the work; its state counts it
        return out

    def refuse(self, e, k=None, t=None, r=None):
        """A reply that failed its checks: stop the run, or log one line and go on without it."""
        if self.policy == "stop":
            raise UserError(f"{e}; the run stops (the operator's bad-replies=stop)") from None
        log(ERROR, "stamp_min: %s; the run goes on without it (the operator's bad-replies=drop)", e)
        self.refused.append({"client": k, "task": t, "round": r, "why": str(e)})

    def configure_train(self, server_round, arrays, config, grid):
        t, r = self.task_round(server_round)
        self.ids = participants(len(self.nodes), self.cfg.participation, self.gen)
        self.theta = on(arrays, self.device)
        self.t0 = time.perf_counter()
        return self.messages(arrays, t, r, self.ids, MessageType.TRAIN)

    def aggregate_train(self, server_round, got):
        t, r = self.task_round(server_round)
        ids, updates, infos, weights = [], [], [], []
        for k, m in self.answers(got, f"in task {t + 1} round {r + 1}"):
            self.trained.add(k)
            size = len(self.scenario.tasks[k][t].train_idx)                  # what the server knows, not what k says
            try:
                delta, info = replies.train(m, k, t, r, self.theta, size)
            except replies.Refused as e:
                self.refuse(e, k, t, r)
                continue
            ids.append(k), updates.append(delta), infos.append(info), weights.append(size)
        if not updates:
            raise UserError(f"task {t + 1} round {r + 1}: every reply was refused; the run stops (no update to aggregate)")
        t1 = time.perf_counter()
        p_updates = [{n: u[n] for n in self.params} for u in updates]
        G = gradmatch.gram(p_updates)                     # (K, K) over the weights: diagnostics, and SAM's G
        theta = self.aggregate(self.theta, updates, weights, self.cfg, params=self.params, G=G, state=self.sstate,
                               infos=infos)                                              # θ' (checked)
        theta = server_step(self.theta, theta, self.sstate, self.cfg, self.params)   # the server optimiser
        p_step = {n: theta[n] - self.theta[n] for n in self.params}     # the step taken, measured (as fcl_loop)
        self.comm += 2 * tensor_bytes(theta) * len(self.ids)     # θ down, Δ up, per participant (as fcl_loop)
        self.log.append(round_log(t, r, ids, infos, weights, G, p_updates, p_step, t1 - self.t0,
                                  time.perf_counter() - t1))
        return ArrayRecord({n: v.cpu() for n, v in theta.items()}), MetricRecord({"loss": self.log[-1]["loss"]})

    def configure_evaluate(self, server_round, arrays, config, grid):
        t, r = self.task_round(server_round)
        if r < self.cfg.rounds_per_task - 1:
            self.ending, self.sent = [], []
            return []
        # end of task t: the clients that trained it refresh their memory from the final θ
        self.ending, self.trained = sorted(self.trained), set()
        return self.messages(arrays, t, r, self.ending, "train.end_task")

    def aggregate_evaluate(self, server_round, got):
        t, _ = self.task_round(server_round)
        for k, m in self.answers(got, f"at the end of task {t + 1}"):
            try:
                self.memory[k] = replies.end_task(m, k, t)
            except replies.Refused as e:
                self.refuse(e, k, t)
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
        log(INFO, "StampStrategy: client rule %s, server rule %s, %d clients, %d tasks x %d rounds", self.cfg.client_rule,
            self.cfg.server_rule, len(self.nodes), self.scenario.num_tasks, self.cfg.rounds_per_task)


def make_server_app(base=Config(), *, results_dir=None, overwrite=None, limits=None, aggregate=server.aggregate,
                    new_server_state=server.new_server_state, match=gradmatch.match):
    """A ServerApp running these rules (defaults: the library's; the library's aggregate gets the
    `match` in use) with the settings `base` changed by the run config.

    The operator's settings, which no job can change: results_dir (default: $STAMP_RESULTS_DIR, else
    ./results) holds every results file, a job's `out` only names a file in it; overwrite (default:
    $STAMP_OVERWRITE=1) lets a job replace an existing one; limits ({name: value}, default:
    $STAMP_LIMITS, see limits.py) bound what a job may ask and say what a bad client reply does;
    the server's data folder is base.data_root, or $STAMP_DATA_ROOT. No line the ServerApp logs
    names these folders."""
    fns, own_names, own = bind(aggregate=aggregate, match=match, new_server_state=new_server_state, calls=("aggregate",))
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context):
        folder = Path(results_dir or os.environ.get("STAMP_RESULTS_DIR", "results"))
        data_root = os.environ.get("STAMP_DATA_ROOT", base.data_root)
        try:
            serve(grid, context, folder, data_root)
        except Exception as e:                      # one plain line in the log, above Flower's traceback
            why = str(e) if isinstance(e, UserError) else f"the run failed: {type(e).__name__}: {' '.join(str(e).split())}"
            why = private(why, {str(data_root): "<the server's data folder>", str(folder): "<the server's results folder>"})
            log(ERROR, "stamp_min: %s", why)
            raise (UserError if isinstance(e, UserError) else RuntimeError)(why) from None

    def serve(grid, context, folder, data_root):
        start = time.perf_counter()
        lim = operator_limits(limits)
        cfg, extra = settings(context.run_config, base)
        cfg = cfg.resolved()                                     # the rule pair in force, spelled out
        cfg = replace(cfg, data_root=data_root)                  # the operator's
        allow = overwrite if overwrite is not None else os.environ.get("STAMP_OVERWRITE") == "1"
        check_out(cfg.out)                                        # refuse before any client is asked
        check_job(cfg, extra, lim)                                # and before anything is built
        _, scenario, model = experiment(cfg, lambda classes: check_job(cfg, extra, lim, classes))
        nodes, names, theirs = client_nodes(grid, scenario.num_clients, extra["reply_timeout"])
        if names.get("match") != own_names["match"]:          # the clients' TAM and the server's SAM match differently
            names["match"] = f"{own_names['match']} (server), {names.get('match')} (clients)"
            own["match"] = "-".join(filter(None, (own.get("match"), theirs.get("match"))))
        names = {k: names.get(k, own_names[k]) for k in DEFAULTS}                # in the loop's order
        name = run_name(cfg, {**theirs, **own})
        out = results_path(folder, cfg.out, f"{cfg.dataset}_{name}_seed{cfg.seed}_flower.json", allow)   # writable now
        strategy = StampStrategy(cfg, nodes, extra["reply_timeout"], fns["aggregate"], lim["bad-replies"],
                                 fns["new_server_state"])
        result = strategy.start(grid, ArrayRecord(float_state(model)), timeout=extra["reply_timeout"],
                                num_rounds=scenario.num_tasks * cfg.rounds_per_task, evaluate_fn=strategy.evaluate)
        res = {"engine": "flower", **results(cfg, scenario, strategy.acc, strategy.round_acc, strategy.log, strategy.comm,
                                              sum(strategy.memory.values()), time.perf_counter() - start,
                                              name=name, rules=names, server_state=strategy.sstate), "refused": strategy.refused}
        write_json(out, res)
        atomic_write(out.with_name(out.stem + "_model.pt"), lambda f: torch.save(result.arrays.to_torch_state_dict(), f))
        for line in report(res).splitlines():
            log(INFO, "%s", line)
        log(INFO, "wrote %s and its model in the server's results folder", out.name)

    return app


server_app = make_server_app()      # flower/pyproject.toml: components of `flwr run` (client_app: flower_client.py)
