"""The workbench: rules are arguments of `run` (client_update, end_task, new_state, aggregate,
match), presets are rule pairs, a variant has a name, and the round log has the step sizes."""

import ast
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from stamp_min import UserError, client, gradmatch, server
from stamp_min.config import PRESETS, Config
from stamp_min.client import float_state, load_state, param_names
from stamp_min.fcl_loop import build, run
from stamp_min.metrics import task_accuracy

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(num_clients=2, num_tasks=2, classes_per_task=2, rounds_per_task=2, local_epochs=1, buffer_per_class=3,
            ewc_fisher_samples=32, quiet=True, plot=False)         # EWC's Fisher: one backward pass an image


def same(a, b):
    """Two results with bit-identical numbers (NaN = NaN)."""
    keys = ("acc_matrix", "current_task_accuracy", "comm_bytes", "buffer_bytes")
    return all(str(a[k]) == str(b[k]) for k in keys) and [r["loss"] for r in a["rounds"]] == [r["loss"] for r in b["rounds"]]


@pytest.mark.parametrize("method", list(PRESETS))
def test_a_preset_is_bit_identical_to_its_explicit_pair(method):
    c, s = PRESETS[method]
    a = run(Config(**TINY, method=method, seed=2))
    b = run(Config(**TINY, client=c, server=s, seed=2))                 # the default method is fedavg: overridden
    assert same(a, b) and a["name"] == b["name"] == method
    assert a["config"]["client"] == b["config"]["client"] == c and a["config"]["server"] == s
    assert a["config"]["method"] == b["config"]["method"] == method       # the pair's preset is recorded


def test_passing_the_librarys_own_rules_changes_nothing():
    cfg = Config(**TINY, method="stamp", seed=1)
    a = run(cfg)
    b = run(cfg, client_update=client.client_update, end_task=client.end_task, new_state=client.new_state,
            aggregate=server.aggregate, new_server_state=server.new_server_state, match=gradmatch.match)
    assert same(a, b) and a["name"] == b["name"] == "stamp"
    assert a["rules"] == b["rules"] == {"client_update": "stamp_min.client.client_update",
                                        "end_task": "stamp_min.client.end_task", "new_state": "stamp_min.client.new_state",
                                        "aggregate": "stamp_min.server.aggregate",
                                        "new_server_state": "stamp_min.server.new_server_state",
                                        "match": "stamp_min.gradmatch.match"}


def test_match_reaches_tam_and_sam_and_a_changed_match_changes_the_run():
    cfg = Config(**TINY, method="stamp", seed=1)
    calls = []

    def counting(updates, **kw):                                      # gradmatch.match, counted
        calls.append(len(updates))
        return gradmatch.match(updates, **kw)
    a, b = run(cfg), run(cfg, match=counting)
    assert same(a, b)
    # SAM: one call a round with both clients' updates (4 rounds); TAM: from task 2 on, every
    # client every round matches its 2 task updates (2 clients x 2 rounds)
    assert sorted(calls) == [2] * 8 and b["rules"]["match"].endswith("counting")

    def half(updates, **kw):                                          # a different operator: half of GM
        return {n: 0.5 * v for n, v in gradmatch.match(updates, **kw).items()}
    c = run(cfg, match=half)
    assert not same(a, c) and c["name"] == "stamp-half"
    for r in c["rounds"]:                                             # SAM's step is half of GM's
        assert r["step_norm"] < r["mean_norm"]


def test_each_rule_keyword_is_used():
    cfg = Config(**TINY, method="stamp", seed=3)
    ref = run(cfg)
    seen = []

    def scaled_update(model, theta, state, x, y, classes, cfg):      # the library's update, times 0.5
        assert all(torch.equal(v, theta[n]) for n, v in float_state(model).items())    # called with θ loaded
        seen.append(state.client_id)
        delta, info = client.client_update(model, theta, state, x, y, classes, cfg)
        return {n: 0.5 * v for n, v in delta.items()}, info
    a = run(cfg, client_update=scaled_update)
    assert seen == [0, 1] * 4 and not same(ref, a) and a["name"] == "stamp-scaled_update"

    def forget(model, theta, state, x, y, classes, cfg):              # no coreset is ever stored
        pass
    b = run(cfg, end_task=forget)
    assert b["buffer_bytes"] == 0 < ref["buffer_bytes"] and not same(ref, b)

    def messy(model, theta, state, x, y, classes, cfg):               # leaves zeros in the shared model
        client.end_task(model, theta, state, x, y, classes, cfg)
        load_state(model, {n: torch.zeros_like(v) for n, v in theta.items()})
    assert same(ref, run(cfg, end_task=messy))                         # the loop evaluates θ, not what a rule left

    def small_buffer(k, cfg):                                          # 1 image per class instead of 3
        return client.new_state(k, replace(cfg, buffer_per_class=1))
    c = run(cfg, new_state=small_buffer)
    assert c["buffer_bytes"] * 3 == ref["buffer_bytes"] and not same(ref, c)

    def stay(theta, updates, weights, cfg, params=None, G=None):     # the server never moves
        return theta, {n: torch.zeros_like(v) for n, v in theta.items()}
    d = run(cfg, aggregate=stay)
    ds, scenario, model = build(cfg)                                    # θ_0, evaluated by hand
    acc0 = [task_accuracy(model, ds, scenario, j) for j in range(2)]
    assert d["acc_matrix"] == [[acc0[0], float("nan")], acc0] or (
        d["acc_matrix"][0][0] == acc0[0] and d["acc_matrix"][1] == acc0)
    assert all(r["step_norm"] == 0 for r in d["rounds"])
    assert d["rules"]["aggregate"] == f"{__name__}.test_each_rule_keyword_is_used.<locals>.stay"


def test_the_round_log_has_the_step_sizes_computed_by_hand():
    cfg = Config(**TINY, method="fedavg", seed=0)
    deltas = []

    def keep(model, theta, state, x, y, classes, cfg):
        delta, info = client.client_update(model, theta, state, x, y, classes, cfg)
        deltas.append((delta, len(y)))
        return delta, info
    res = run(replace(cfg, name="fedavg_logged"), client_update=keep)
    params = param_names(build(cfg)[2])
    for r, entry in enumerate(res["rounds"]):
        (d1, n1), (d2, n2) = deltas[2 * r: 2 * r + 2]

        def norm(f):
            return math.sqrt(sum(float(f(n).double().square().sum()) for n in params))
        # the log's update and mean norms come from the Gram matrix, whose blocks are multiplied in float32
        # (gradmatch.gram): ~1e-6 relative apart from these float64 sums (measured on 2 threads), so 1e-5;
        # a wrong formula (a missing weight, a wrong client) is off by far more
        assert entry["update_norms"] == pytest.approx([norm(lambda n: d1[n]), norm(lambda n: d2[n])], rel=1e-5)
        assert entry["mean_norm"] == pytest.approx(norm(lambda n: (d1[n] + d2[n]) / 2), rel=1e-5)
        assert entry["step_norm"] == pytest.approx(norm(lambda n: (n1 * d1[n] + n2 * d2[n]) / (n1 + n2)), rel=1e-6)
    assert res["name"] == "fedavg_logged"


def test_a_rule_pair_without_a_preset_is_named_by_its_rules_and_runs(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "stamp_min.fcl_loop", "--client", "replay", "--server", "gm",
                        "--num-clients", "2", "--num-tasks", "2", "--rounds-per-task", "1", "--local-epochs", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["name"] == "replay+gm" and res["buffer_bytes"] > 0 and "replay+gm: client rule replay, server rule gm" in p.stdout
    # the default file name and the plot title follow the name
    p = subprocess.run([sys.executable, "-m", "stamp_min.fcl_loop", "--client", "tam", "--name", "my_tam",
                        "--num-clients", "2", "--num-tasks", "1", "--rounds-per-task", "1", "--local-epochs", "1"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "results" / "digits_my_tam_seed0.json").read_text())["name"] == "my_tam"
    assert (tmp_path / "results" / "digits_my_tam_seed0_acc.png").exists()


@pytest.mark.parametrize("kw, message", [(dict(client="magic"), "client='magic' is unknown"),
                                         (dict(server="median"), "server='median' is unknown"),
                                         (dict(name="../evil"), "name='../evil' is not a plain name"),
                                         (dict(name=".hidden"), "is not a plain name")])
def test_bad_rules_and_names_are_one_line_errors(kw, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        run(Config(**TINY, **kw))


class Interrupted(Exception):
    pass


def test_resume_refuses_other_functions_and_keeps_the_variants_state(tmp_path):
    cfg = Config(**TINY, method="stamp", seed=4)
    stop = {"client": None}

    def tagged_state(k, cfg):                         # a variant's state: its buffer carries a mark
        state = client.new_state(k, cfg)
        state.buffer.mark = "variant"
        return state

    def checked_end_task(model, theta, state, x, y, classes, cfg):
        assert getattr(state.buffer, "mark", None) == "variant", "the variant's buffer object was replaced"
        client.end_task(model, theta, state, x, y, classes, cfg)
        if state.client_id == stop["client"]:
            raise Interrupted                         # the run stops at the end of task 1, before its checkpoint

    ref = run(cfg, new_state=tagged_state, end_task=checked_end_task)
    ck = replace(cfg, checkpoint_dir=str(tmp_path / "ck"))
    stop["client"] = 1
    with pytest.raises(Interrupted):
        run(ck, new_state=tagged_state, end_task=checked_end_task)
    stop["client"] = None
    with pytest.raises(UserError, match=r"^new_state=stamp_min.client.new_state differs from the checkpoint's .*tagged_state"):
        run(replace(ck, resume=True), end_task=checked_end_task)
    with pytest.raises(UserError, match=r"aggregate=.*<lambda>:\d+ differs"):
        run(replace(ck, resume=True), new_state=tagged_state, end_task=checked_end_task,
            aggregate=lambda *a, **k: server.aggregate(*a, **k))
    resumed = run(replace(ck, resume=True), new_state=tagged_state, end_task=checked_end_task)
    assert same(ref, resumed) and resumed["buffer_bytes"] == ref["buffer_bytes"] > 0


def _stamp_min_names(tree):
    """Names bound to stamp_min modules or objects by the imports of a parsed file."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("stamp_min")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stamp_min"):
            names |= {a.asname or a.name for a in node.names}
    return names


def test_the_readme_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Prototype a variant"):]
    exec(section[section.index("```python\n") + 10:section.index("```\n", section.index("```python"))], {})
    assert capsys.readouterr().out.startswith("fedavg-median ")


def test_no_test_or_notebook_monkeypatches_the_library():
    sources = {p: p.read_text() for p in (ROOT / "tests").glob("*.py")}
    for nb in (ROOT / "notebooks").rglob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        sources[nb] = "\n".join("#" + line if line.lstrip().startswith(("%", "!")) else line    # IPython magics
                                for line in code.splitlines())
    for path, text in sources.items():
        tree = ast.parse(text)
        ours = _stamp_min_names(tree)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
            for t in targets:
                base = t
                while isinstance(base, ast.Attribute):
                    base = base.value
                assert not (isinstance(t, ast.Attribute) and isinstance(base, ast.Name) and base.id in ours and
                            isinstance(t.value, ast.Name)), f"{path.name}: assigns {ast.unparse(t)}"
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("setattr") and node.args:
                first = ast.unparse(node.args[0])
                assert first.split(".")[0] not in ours and "stamp_min" not in first, f"{path.name}: {ast.unparse(node)}"


def test_a_rule_that_changes_theta_in_place_is_a_one_line_error():
    cfg = Config(**TINY, method="fedavg")

    def sneaky(model, theta, state, x, y, classes, cfg):
        delta, info = client.client_update(model, theta, state, x, y, classes, cfg)
        theta[next(iter(theta))].add_(1.0)                          # the next client would start from this
        return delta, info
    with pytest.raises(UserError, match=r"^client_update=.*sneaky changed θ in place"):
        run(cfg, client_update=sneaky)

    def zeroing(model, theta, state, x, y, classes, cfg):
        for v in theta.values():
            v.mul_(0)
    with pytest.raises(UserError, match=r"^end_task=.*zeroing changed θ in place"):
        run(cfg, end_task=zeroing)


@pytest.mark.parametrize("bad, message", [
    (lambda theta, *a, **k: ({n: v[:1].clone() for n, v in theta.items()}, {}), r"θ'\['.*'\] is \(1"),
    (lambda theta, *a, **k: ({n: v for n, v in list(theta.items())[1:]}, {}), "has entries"),
    (lambda theta, *a, **k: ({n: v * float("nan") for n, v in theta.items()}, {}), "is not finite"),
    (lambda theta, *a, **k: {n: v for n, v in theta.items()}, "returned dict; allowed: \\(θ'")])
def test_what_a_server_rule_returns_is_checked(bad, message):
    with pytest.raises(UserError, match=r"^aggregate=test_workbench.<lambda>:\d+.*" + message):
        run(Config(**TINY), aggregate=bad)


def test_what_client_rules_return_is_checked():
    cfg = Config(**TINY)
    with pytest.raises(UserError, match=r"client_update=.* returned tuple; allowed: \(Δ"):
        run(cfg, client_update=lambda *a: (client.client_update(*a)[0], {}))               # no "loss"
    with pytest.raises(UserError, match=r"Δ\['.*'\] is \(2,\)"):
        run(cfg, client_update=lambda *a: ({n: torch.zeros(2) for n in a[1]}, {"loss": 0.0}))
    with pytest.raises(UserError, match="new_state=.* returned .* for client 0; allowed: a client.ClientState"):
        run(cfg, new_state=lambda k, cfg: replace(client.new_state(k, cfg), rng=None))


def test_rules_must_be_functions_given_by_keyword_and_a_match_must_be_called():
    cfg = Config(**TINY)
    with pytest.raises(UserError, match="dataset=function is not a data.Dataset"):
        run(cfg, lambda *a: None)
    with pytest.raises(UserError, match="aggregate='gm' is not a function"):
        run(cfg, aggregate="gm")

    def own_update(*a):
        return client.client_update(*a)

    def own_aggregate(*a, **k):
        return server.aggregate(*a, **k)
    with pytest.raises(UserError, match="match=.* would never be called"):
        run(cfg, client_update=own_update, aggregate=own_aggregate, match=lambda u, **k: gradmatch.match(u, **k))


def test_partials_and_lambdas_are_recorded_with_what_makes_them_different():
    from functools import partial

    def per_layer(updates, G=None, **kw):
        return {n: gradmatch.match(torch.stack([u[n] for u in updates]), **kw) for n in updates[0]}
    res = run(Config(**TINY, method="stamp"), aggregate=partial(server.aggregate, match=per_layer))
    assert res["rules"]["aggregate"] == ("stamp_min.server.aggregate(match=test_workbench.test_partials_and_lambdas_"
                                         "are_recorded_with_what_makes_them_different.<locals>.per_layer)")
    assert res["name"] == "stamp-aggregate-per_layer"
    one = lambda *a, **k: server.aggregate(*a, **k)          # noqa: E731  two lambdas, told apart by their lines
    two = lambda *a, **k: server.aggregate(*a, **k)          # noqa: E731
    assert run(Config(**TINY), aggregate=one)["rules"]["aggregate"] != run(Config(**TINY), aggregate=two)["rules"]["aggregate"]


def test_the_logged_step_is_measured_not_taken_from_the_rule():
    def lying(theta, updates, weights, cfg, params=None, G=None):      # moves θ, claims a zero step
        new, _ = server.aggregate(theta, updates, weights, cfg, params, G)
        return new, {n: torch.zeros_like(v) for n, v in theta.items()}
    a, b = run(Config(**TINY), aggregate=lying), run(Config(**TINY))
    assert same(a, b) and [r["step_norm"] for r in a["rounds"]] == [r["step_norm"] for r in b["rounds"]]
    assert all(r["step_norm"] > 0 for r in a["rounds"])


def test_the_results_record_the_preset_of_the_pair_or_none():
    assert run(Config(**TINY, client="tam", server="mean"))["config"]["method"] == "stamp_tam"
    res = run(Config(**TINY, method="", client="replay", server="gm"))
    assert res["config"]["method"] == "" and res["name"] == "replay+gm"
    with pytest.raises(UserError, match="method='' needs both rules"):
        run(Config(**TINY, method="", client="replay"))
