"""fcl_loop.py: the CLI end to end, determinism, the results file, and one-line errors."""

import json
import math
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from stamp_min.cli import field_docs, main, parse_config
from stamp_min.client import float_state
from stamp_min.fcl_loop import Config, cli, run
from stamp_min.metrics import tensor_bytes
from stamp_min.models import build_model

TINY = dict(num_clients=2, num_tasks=2, classes_per_task=2, rounds_per_task=2, local_epochs=1, quiet=True)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "stamp_min.fcl_loop", "--num-clients", "2", "--num-tasks", "2",
                        "--rounds-per-task", "1", "--local-epochs", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "client | task 0" in p.stdout and "task 2/2 round 1/1" in p.stdout and "accuracy matrix" in p.stdout
    res = json.loads(out.read_text())
    for key in ("config", "acc_matrix", "avg_accuracy", "avg_forgetting", "bwt", "current_task_accuracy",
                "comm_bytes", "wall_time_s", "versions"):
        assert key in res
    assert res["acc_matrix"][0][1] is None                   # task 1 not seen after task 0
    assert res["versions"]["torch"] == torch.__version__
    assert (tmp_path / "r_acc.png").stat().st_size > 1000


def test_same_seed_same_numbers_bit_for_bit():
    a, b = run(Config(**TINY, seed=4)), run(Config(**TINY, seed=4))
    for key in ("acc_matrix", "avg_accuracy", "avg_forgetting", "bwt", "current_task_accuracy"):
        assert a[key] == b[key] or (key == "acc_matrix" and str(a[key]) == str(b[key]))
    c = run(Config(**TINY, seed=5))
    assert str(c["acc_matrix"]) != str(a["acc_matrix"])


def test_results_are_consistent_with_the_matrix_and_costs():
    cfg = Config(**TINY, seed=1)
    res = run(cfg)
    A = res["acc_matrix"]
    assert math.isnan(A[0][1]) and all(0 <= a <= 1 for a in (A[0][0], A[1][0], A[1][1]))
    assert res["avg_accuracy"] == pytest.approx((A[1][0] + A[1][1]) / 2)
    assert res["bwt"] == pytest.approx(A[1][0] - A[0][0])
    model = build_model("cnn", 10, 1, 8)
    per_round = 2 * tensor_bytes(float_state(model)) * cfg.num_clients
    assert res["comm_bytes"] == per_round * cfg.rounds_per_task * 2
    assert len(res["rounds"]) == 4 and res["current_task_accuracy"][0] == max(r["current_task_acc"] for r in res["rounds"][:2])


def test_fedavg_learns_digits():
    """Not a benchmark: one task of 5 classes, 2 clients; FedAvg must beat chance by far."""
    res = run(Config(num_clients=2, num_tasks=1, classes_per_task=5, rounds_per_task=5, quiet=True))
    assert res["avg_accuracy"] > 0.8


def test_every_config_field_is_documented_in_help(capsys):
    docs = field_docs(Config)
    assert set(docs) == {f.name for f in fields(Config)}
    with pytest.raises(SystemExit):
        parse_config(Config, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(Config):
        assert "--" + f.name.replace("_", "-") in text
        assert " ".join(docs[f.name].split()[:4]) in text


def test_flags_parse_into_typed_fields():
    cfg = parse_config(Config, ["--num-clients", "3", "--lr", "0.2", "--share-samples", "true", "--method", "fedavg"])
    assert cfg.num_clients == 3 and cfg.lr == 0.2 and cfg.share_samples is True
    assert parse_config(Config, ["--gm-normalize"]).gm_normalize is True          # a bare boolean flag
    assert parse_config(Config, ["--mixstyle", "false"]).mixstyle is False


@pytest.mark.parametrize("argv, field", [
    (["--dataset", "mnist"], "dataset='mnist'"),
    (["--method", "magic"], "method='magic'"),
    (["--num-clients", "0"], "num_clients=0"),
    (["--batch-size", "-1"], "batch_size=-1"),
    (["--classes-per-task", "11"], "classes_per_task=11"),
    (["--num-tasks", "9"], "num_tasks=9"),
    (["--scenario", "dirichlet", "--alpha", "0.001", "--num-clients", "10"], "alpha=0.001"),
    (["--dataset", "cifar100", "--data-root", "{tmp}/nothing"], "dataset='cifar100'"),
    (["--out", "/proc/forbidden/r.json"], "out="),
    (["--participation", "0"], "participation=0"),
    (["--lr", "1e6"], "diverged"),
    (["--gm-solver", "newton"], "gm_solver='newton'"),
    (["--resume", "true"], "checkpoint_dir"),
    (["--model", "vit"], "model='vit'"),
    (["--method", "lwf", "--lwf-temperature", "0"], "lwf_temperature=0"),
])
def test_user_mistakes_are_one_line_and_exit_2(argv, field, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    argv = argv + (["--out", str(out)] if "--out" not in argv else [])
    with pytest.raises(SystemExit) as e:
        main(lambda: cli(argv + ["--quiet", "true", "--rounds-per-task", "1"]))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and field in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".r.json*"))   # nothing half-written


def test_a_user_mistake_shows_no_traceback_from_the_shell():
    p = subprocess.run([sys.executable, "-m", "stamp_min.fcl_loop", "--dataset", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("argv, says", [(["--num-clients", "x"], "argument --num-clients: invalid int value: 'x'"),
                                        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
                                        (["--mixstyle", "maybe"], "argument --mixstyle")])
def test_a_bad_flag_is_one_line_and_exit_2(argv, says):
    p = subprocess.run([sys.executable, "-m", "stamp_min.fcl_loop", *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and says in p.stderr
    assert "see python -m stamp_min.fcl_loop --help" in p.stderr and "usage:" not in p.stderr


def test_the_results_file_can_never_be_the_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(lambda: cli(["--checkpoint-dir", str(tmp_path), "--out", str(tmp_path / "checkpoint.pt")]))
    assert e.value.code == 2 and not list(tmp_path.iterdir())


def test_a_failed_picture_write_keeps_the_previous_picture(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from stamp_min import plots
    old = tmp_path / "acc.xyz"
    old.write_text("the previous picture")
    with pytest.raises(ValueError):                      # matplotlib knows no .xyz format: the write fails
        plots.save(plots.accuracy_matrix([[0.5]]), old)
    assert old.read_text() == "the previous picture" and [f.name for f in tmp_path.iterdir()] == ["acc.xyz"]
    png = tmp_path / "acc.png"
    plots.save(plots.accuracy_matrix([[0.5]]), png)
    assert png.read_bytes()[:4] == b"\x89PNG"
