"""Rules with memory (issue 22): the server optimisers against a hand-computed two-round case, a
server state that survives resume bit for bit, the client -> server channel (SCAFFOLD), memory as a
function (a selector, Buffer.put, buffer_bytes, the loop's own record of seen tasks), names that
hold a closure's values, and every misuse as one line naming the rule."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from stamp_min import UserError, client, server
from stamp_min.coreset import Buffer
from stamp_min.fcl_loop import Config, build, run
from stamp_min.rules import qualname
from stamp_min.server import ServerState, server_step
from conftest import toy_dataset

TINY = dict(num_clients=2, num_tasks=2, classes_per_task=2, rounds_per_task=2, local_epochs=1, buffer_per_class=3,
            quiet=True, plot=False)


DATA = toy_dataset()                  # 6 classes of 8x8 grey images, 20 each: faster than digits


def go(cfg, **rules):
    return run(cfg, DATA, **rules)


def same(a, b):
    """Two results agree exactly: accuracy matrix (NaN where not measured) and every round's loss."""
    return (torch.equal(torch.tensor(a["acc_matrix"]).nan_to_num(-1), torch.tensor(b["acc_matrix"]).nan_to_num(-1))
            and [r["loss"] for r in a["rounds"]] == [r["loss"] for r in b["rounds"]])


# ----------------------------------------------------------------------------- the server optimisers, by hand

def two_rounds(opt, **kw):
    """θ = (1, 2) and a BatchNorm-like entry; the rule's steps s1 = (0.1, −0.2), s2 = (0.3, 0.1)."""
    cfg = Config(server_opt=opt, **kw)
    state, theta = ServerState(), {"w": torch.tensor([1.0, 2.0], dtype=torch.float64), "bn": torch.tensor([5.0])}
    out = []
    for s in ([0.1, -0.2], [0.3, 0.1]):
        new = {"w": theta["w"] + torch.tensor(s, dtype=torch.float64), "bn": theta["bn"] + 1}
        theta = server_step(theta, new, state, cfg, params=["w"])
        out.append(theta["w"].tolist())
    return out, theta, state


def test_momentum_two_rounds_by_hand():
    # β = 0.5, η = 2: m1 = s1 = (0.1, −0.2), θ1 = (1.2, 1.6); m2 = 0.5·m1 + s2 = (0.35, 0.0), θ2 = (1.9, 1.6)
    (t1, t2), theta, state = two_rounds("momentum", server_lr=2.0, server_momentum=0.5)
    assert t1 == pytest.approx([1.2, 1.6], abs=1e-12) and t2 == pytest.approx([1.9, 1.6], abs=1e-12)
    assert theta["bn"].item() == 7.0 and state.rounds == 2          # BatchNorm statistics: the rule's value


def test_adam_two_rounds_by_hand():
    # β1 = 0.5, β2 = 0.75, τ = 0.1, η = 1, v0 = τ² = 0.01:
    # m1 = (0.05, −0.1), v1 = 0.75·0.01 + 0.25·s1² = (0.01, 0.0175), u1 = m1/(√v1 + τ) = (0.25, −0.4305008)
    # m2 = (0.175, 0.0), v2 = 0.75·v1 + 0.25·s2² = (0.03, 0.015625), u2 = (0.175/(0.1732051 + 0.1), 0) = (0.6405445, 0)
    (t1, t2), _, state = two_rounds("adam", server_lr=1.0, server_momentum=0.5, server_beta2=0.75, server_tau=0.1)
    assert t1 == pytest.approx([1.25, 2 - 0.4305008], abs=1e-6)
    assert t2 == pytest.approx([1.25 + 0.6405445, 2 - 0.4305008], abs=1e-6)
    assert state.opt["v"]["w"].tolist() == pytest.approx([0.03, 0.015625], abs=1e-12)


def test_sgd_with_lr_1_is_the_rules_step_itself_and_lr_scales_it():
    (t1, t2), _, state = two_rounds("sgd")
    assert t1 == [1.1, 1.8] and state.opt == {}
    (t1, _), _, _ = two_rounds("sgd", server_lr=0.5)
    assert t1 == pytest.approx([1.05, 1.9], abs=1e-12)


def test_server_momentum_in_the_loop_follows_the_hand_computed_steps():
    """Clients that always send Δ = 0.1 everywhere: with FedAvg and momentum β = 0.5, η = 1, the θ the
    clients receive is θ0, θ0 + 0.1, θ0 + 0.1 + 0.15 (m2 = 0.5·0.1 + 0.1), θ0 + 0.25 + 0.175."""
    seen = []

    def constant(model, theta, state, x, y, classes, cfg):
        if state.client_id == 0:
            seen.append(theta["head.bias"].clone())
        return {n: torch.full_like(v, 0.1) for n, v in theta.items()}, {"loss": 0.0}
    go(Config(**TINY, method="fedavg", server_opt="momentum", server_momentum=0.5), client_update=constant)
    steps = [(b - seen[0]).tolist() for b in seen]
    for got, want in zip(steps, (0.0, 0.1, 0.25, 0.425)):
        assert got == pytest.approx([want] * len(got), abs=1e-6)


# ----------------------------------------------------------------------------- server state survives resume

class Interrupted(Exception):
    pass


STOP = {"after": None, "calls": 0, "rule": client.client_update}


def stopping_update(model, theta, state, x, y, classes, cfg):
    """STOP["rule"], and Interrupted once STOP["after"] rounds are done (2 clients a round), after their
    checkpoint; one module-level function, so the interrupted and the resumed run have one rule name."""
    STOP["calls"] += 1
    if STOP["after"] is not None and STOP["calls"] > 2 * STOP["after"]:
        raise Interrupted
    return STOP["rule"](model, theta, state, x, y, classes, cfg)


def interrupted_then_resumed(cfg, tmp_path, rule=client.client_update, after=3, **rules):
    """The run of cfg uninterrupted, and interrupted after `after` rounds then resumed (and the checkpoint)."""
    STOP.update(after=None, calls=0, rule=rule)
    ref = go(cfg, client_update=stopping_update, **rules)
    ck = replace(cfg, checkpoint_dir=str(tmp_path / "ck"))
    STOP.update(after=after, calls=0)
    with pytest.raises(Interrupted):
        go(ck, client_update=stopping_update, **rules)
    saved = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)
    STOP.update(after=None)
    return ref, go(replace(ck, resume=True), client_update=stopping_update, **rules), saved


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_fedavgm_and_fedadam_interrupted_and_resumed_equal_the_uninterrupted_run(opt, tmp_path):
    cfg = Config(**TINY, method="stamp", server_opt=opt, server_lr=0.5 if opt == "adam" else 1.0, seed=3)
    ref, resumed, saved = interrupted_then_resumed(cfg, tmp_path)
    assert saved["progress"]["server"]["rounds"] == 3 and set(saved["progress"]["server"]["opt"]) >= {"m"}
    assert same(ref, resumed) and resumed["server_state"] == ref["server_state"]
    with pytest.raises(UserError, match=r"^server_momentum=0.5 differs from the checkpoint's 0.9"):
        go(replace(cfg, checkpoint_dir=str(tmp_path / "ck"), resume=True, server_momentum=0.5),
            client_update=stopping_update)


def counting_aggregate(theta, updates, weights, cfg, params=None, G=None, state=None):
    """A server rule with memory: FedAvg, and a count of the rounds and of the updates it saw, in state.extra."""
    state.extra["rounds"] = state.extra.get("rounds", 0) + 1
    state.extra["updates"] = state.extra.get("updates", 0) + len(updates)
    return server.aggregate(theta, updates, weights, cfg, params=params, G=G)


def test_a_server_rules_own_state_is_checkpointed_and_restored(tmp_path):
    cfg = Config(**TINY, method="fedavg", server_opt="momentum", seed=1)
    box = {}

    def keep(theta, updates, weights, cfg, params=None, G=None, state=None):
        box["state"] = state
        return counting_aggregate(theta, updates, weights, cfg, params, G, state)
    ref = go(cfg, aggregate=keep)
    assert box["state"].extra == {"rounds": 4, "updates": 8} and ref["server_state"]["extra"] == ["rounds", "updates"]
    ck = replace(cfg, checkpoint_dir=str(tmp_path / "ck"))
    calls = [0]

    def interrupting(theta, updates, weights, cfg, params=None, G=None, state=None):
        calls[0] += 1
        if calls[0] == 3:
            raise Interrupted
        return keep(theta, updates, weights, cfg, params, G, state)
    with pytest.raises(Interrupted):
        go(ck, aggregate=interrupting)
    resumed = go(replace(ck, resume=True), aggregate=interrupting)
    assert same(ref, resumed) and box["state"].extra == {"rounds": 4, "updates": 8}


# ----------------------------------------------------------------------------- a channel from clients to the server

def scaffold_update(model, theta, state, x, y, classes, cfg):
    """SCAFFOLD's client (Karimireddy et al. 2020, option II): SGD on the loss plus ⟨c − c_k, w⟩, whose
    gradient adds the correction c − c_k; then c_k⁺ = c_k − c + (θ − θ_k)/(steps·lr). Sends Δ and Δc_k."""
    params = [n for n, _ in model.named_parameters()]
    c = {n: state.server.get(f"c/{n}", torch.zeros_like(theta[n])) for n in params}      # the server's c
    ck = state.extra.setdefault("c", {n: torch.zeros_like(theta[n]) for n in params})      # this client's c_k
    steps = [0]

    def correction(model, z, logits, xb, yb):
        steps[0] += 1
        return sum(((c[n] - ck[n]) * p).sum() for n, p in model.named_parameters())
    delta, loss = client.train_from(model, theta, theta, x, y, cfg, state.rng, extra_losses=[correction])
    state.extra["c"] = {n: ck[n] - c[n] - delta[n] / (steps[0] * cfg.lr) for n in params}
    return delta, {"loss": loss, **{f"dc/{n}": state.extra["c"][n] - ck[n] for n in params}}


def scaffold_aggregate(theta, updates, weights, cfg, params=None, G=None, state=None, infos=None):
    """SCAFFOLD's server: θ ← θ + mean Δ_k (η_g = 1); c ← c + (|S|/N) mean Δc_k, sent to every client."""
    new, step = server.aggregate(theta, updates, weights, cfg, params=params, G=G)
    for n in params:
        dc = sum(i[f"dc/{n}"] for i in infos) / len(infos)
        state.broadcast[f"c/{n}"] = state.broadcast.get(f"c/{n}", torch.zeros_like(dc)) + len(infos) / cfg.num_clients * dc
    return new, step


def test_scaffold_through_the_channel_runs_and_its_state_survives_resume(tmp_path):
    cfg = Config(**TINY, method="fedavg", seed=2)
    got = {}

    def watch(theta, updates, weights, cfg, params=None, G=None, state=None, infos=None):
        got["infos"], got["state"] = infos, state
        return scaffold_aggregate(theta, updates, weights, cfg, params, G, state, infos)
    ref = go(cfg, client_update=scaffold_update, aggregate=watch)
    assert all(len(i) == 1 + len(got["state"].broadcast) and "loss" in i for i in got["infos"]) and len(got["infos"]) == 2
    assert sorted(got["state"].broadcast) == sorted(f"c/{n}" for n, _ in build(cfg, DATA)[2].named_parameters())
    assert not same(ref, go(cfg))                                           # the correction acts
    ref, resumed, saved = interrupted_then_resumed(cfg, tmp_path, scaffold_update, aggregate=scaffold_aggregate)
    assert len(saved["progress"]["server"]["broadcast"]) > 0 and all("c" in c["extra"] for c in saved["clients"])
    assert same(ref, resumed)


# ----------------------------------------------------------------------------- memory as a function

def k_center(features, m, seed=0):
    """Greedy k-center: the image farthest from those picked, starting at the one nearest the mean."""
    d = (features - features.mean(0)).norm(dim=1)
    picks = [int(d.argmin())]
    dist = (features - features[picks[0]]).norm(dim=1)
    while len(picks) < min(m, len(features)):
        picks.append(int(dist.argmax()))
        dist = torch.minimum(dist, (features - features[picks[-1]]).norm(dim=1))
    return torch.tensor(picks)


def test_a_selector_function_fills_the_buffer_and_survives_resume(tmp_path):
    def kcenter_state(k, cfg):
        state = client.new_state(k, cfg)
        state.buffer = Buffer(cfg.buffer_per_class, k_center, seed=cfg.seed + k)
        return state
    cfg = Config(**TINY, method="stamp")
    res = go(cfg, new_state=kcenter_state)
    assert res["buffer_bytes"] == go(cfg)["buffer_bytes"] > 0            # same memory as herding's
    b = Buffer(2, k_center)
    x = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    assert b.state_dict()["rule"] == f"{__name__}.k_center"
    ds, _, model = build(cfg, DATA)
    with pytest.raises(UserError, match=r"^coreset rule .*<lambda> returned tensor\(\[0, 1, 2\]\) for class 0; allowed: a 1-D"):
        Buffer(2, lambda f, m, seed=0: torch.arange(m + 1)).add_task(model, ds.x_train[ds.y_train == 0][:5], torch.zeros(5).long())
    b.put([3], x[:2], torch.tensor([3, 3]))
    assert b.nbytes == 2 * 4 + 2 * 8 and b.classes() == {3}
    b.put([3], x[:0], torch.zeros(0).long())
    assert len(b) == 0


def test_buffer_bytes_counts_what_a_rule_keeps_and_the_loop_records_seen_tasks():
    def forgetful(model, theta, state, x, y, classes, cfg):       # trains, never touches state.seen
        delta, loss = client.train_from(model, theta, theta, x, y, cfg, state.rng)
        state.extra["mine"] = torch.zeros(10)                      # 40 bytes of its own
        return delta, {"loss": loss}
    res = go(Config(**TINY, method="replay"), client_update=forgetful)
    # end_task ran (the buffer filled) although the rule never recorded a task
    per_client = 2 * 2 * 3 * (64 + 8)                              # 2 tasks x 2 classes x m=3 (8x8 uint8 + int64)
    assert res["buffer_bytes"] == 2 * (per_client + 40)


# ----------------------------------------------------------------------------- names

def momentum_rule(beta):
    """A closure that holds a number (its β) and a function."""
    inner = server.aggregate
    return lambda theta, updates, weights, cfg, params=None, G=None: inner(theta, updates, weights, cfg, params, G) \
        if beta >= 0 else None


def test_names_hold_a_closures_values_and_resume_refuses_other_ones(tmp_path):
    a, b = qualname(momentum_rule(0.9)), qualname(momentum_rule(0.0))
    assert "beta=0.9" in a and "beta=0.0" in b and a != b
    cfg = Config(**TINY, method="fedavg", checkpoint_dir=str(tmp_path / "ck"))
    go(cfg, aggregate=momentum_rule(0.9))
    with pytest.raises(UserError, match=r"aggregate=.*beta=0\.0.* differs from the checkpoint's .*beta=0\.9"):
        go(replace(cfg, resume=True), aggregate=momentum_rule(0.0))


def test_the_cli_never_replaces_another_runs_results(tmp_path):
    out = tmp_path / "r.json"
    base = [sys.executable, "-m", "stamp_min.fcl_loop", "--num-clients", "2", "--num-tasks", "1", "--rounds-per-task", "1",
            "--local-epochs", "1", "--plot", "false", "--quiet", "true", "--name", "mine", "--out", str(out)]
    assert subprocess.run(base + ["--client", "replay", "--server", "gm"], capture_output=True, timeout=300).returncode == 0
    first = out.read_bytes()
    p = subprocess.run(base + ["--client", "tam", "--server", "mean"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "holds another run's results (" in p.stderr
    assert "client" in p.stderr and "--overwrite true" in p.stderr
    assert out.read_bytes() == first
    p = subprocess.run(base + ["--client", "tam", "--server", "mean", "--overwrite", "true"], capture_output=True, timeout=300)
    assert p.returncode == 0 and json.loads(out.read_text())["config"]["client"] == "tam"


# ----------------------------------------------------------------------------- misuse: one line naming the rule

def returns(delta_fn=None, theta_fn=None):
    def cu(model, theta, state, x, y, classes, cfg):
        d, info = client.client_update(model, theta, state, x, y, classes, cfg)
        return (delta_fn(d) if delta_fn else d), info

    def ag(theta, updates, weights, cfg, params=None, G=None):
        new, step = server.aggregate(theta, updates, weights, cfg, params=params, G=G)
        return (theta_fn(new, theta) if theta_fn else new), step
    return dict(client_update=cu) if delta_fn else dict(aggregate=ag)


def set_entry(new, theta):
    theta["head.bias"] = new["head.bias"]
    return new


def in_place(new, theta):
    theta["head.bias"].add_(1)
    return new


def update_dict(new, theta):
    theta.update(new)
    return new


@pytest.mark.parametrize("rules, message", [
    (returns(delta_fn=lambda d: {n: v.double() for n, v in d.items()}), r"client_update=.*: Δ\[.*\] is float64 on cpu; allowed: θ's float32"),
    (returns(theta_fn=lambda new, th: {n: v.half() for n, v in new.items()}), r"aggregate=.*: θ'\[.*\] is float16 .*allowed: θ's float32"),
    (returns(theta_fn=lambda new, th: {n: v.bfloat16() for n, v in new.items()}), r"θ'\[.*\] is bfloat16"),
    (returns(theta_fn=lambda new, th: {n: v.long() for n, v in new.items()}), r"θ'\[.*\] is int64"),
    (returns(theta_fn=set_entry), r"^aggregate=.*\.ag\[theta_fn=.*set_entry\] replaced entries of θ \(theta\[name\] = … or theta.update"),
    (returns(theta_fn=update_dict), r"^aggregate=.*\.ag\[theta_fn=.*update_dict\] replaced entries of θ"),
    (returns(theta_fn=in_place), r"^aggregate=.*changed θ in place"),
])
def test_wrong_dtypes_and_changes_to_theta_are_one_line_naming_the_rule(rules, message):
    with pytest.raises(UserError, match=message):
        go(Config(**TINY, method="fedavg"), **rules)


def test_match_is_checked_when_bound_and_when_it_returns():
    with pytest.raises(UserError, match=r"^match=.*<lambda>:\d+ cannot be called as match\(updates, c=, solver="):
        go(Config(**TINY, method="stamp"), match=lambda updates: updates[0])
    wrong = lambda updates, **kw: {n: v[:1] for n, v in updates[0].items()}            # noqa: E731
    with pytest.raises(UserError, match=r"^match=.*<lambda>:\d+: the matched update\[.*\] is \(1"):
        go(Config(**TINY, method="stamp"), match=wrong)


def test_a_match_that_nothing_calls_is_refused():
    mean_of = lambda updates, **kw: {n: sum(u[n] for u in updates) / len(updates) for n in updates[0]}  # noqa: E731
    with pytest.raises(UserError, match=r"^match=.* would never be called: .*\(client rule sgd, server rule mean\)"):
        go(Config(**TINY, method="fedavg"), match=mean_of)
    go(Config(**{**TINY, "rounds_per_task": 1}, method="stamp_sam"), match=mean_of)   # SAM calls it: accepted


def test_a_nan_from_a_users_rule_names_that_rule():
    def nan_loss(model, theta, state, x, y, classes, cfg):
        nan = lambda model, z, logits, xb, yb: logits.sum() * float("nan")      # noqa: E731
        delta, loss = client.train_from(model, theta, theta, x, y, cfg, state.rng, extra_losses=[nan])
        return delta, {"loss": loss}
    with pytest.raises(UserError, match=r"^client_update=test_memory.*nan_loss: client 0's local training diverged"):
        go(Config(**TINY, method="fedavg"), client_update=nan_loss)
