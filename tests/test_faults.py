"""Bad input and faults, table-driven (issue 16): every user mistake is one line and exit status 2
before any training, every failed write one line and exit status 1, and no case writes, damages or
leaves behind a file. Reference: the bytes of a file that was there before, and the folder's listing."""

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stamp_min import UserError, checkpoint, cli
from stamp_min import flora_loop, flower_app
from stamp_min.fcl_loop import Config, cli as fcl_cli, run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--num-clients", "2", "--num-tasks", "2", "--rounds-per-task", "1", "--local-epochs", "1", "--quiet", "true"]
PREVIOUS = b'{"previous": "results"}'


def ckpt(folder):
    """A real checkpoint of a tiny run in `folder` (made once per test that needs one)."""
    run(Config(num_clients=2, num_tasks=2, rounds_per_task=1, local_epochs=1, quiet=True, checkpoint_dir=str(folder)))


def crafted(folder):
    """The right format string, nothing else right."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save({"format": checkpoint.FORMAT, "config": {}, "rules": {}, "progress": {"t": "x"}, "clients": [], "rng": {}},
               Path(folder) / checkpoint.FILE)


def imagefolder(root, bad=None):
    """Two classes of tiny PNGs; `bad`: also a file with an image's name that is no image."""
    from PIL import Image
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / c / f"{i}.png")
    if bad:
        (root / "a" / bad).write_bytes(b"not an image at all")


def cifar_damaged(root):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps({"data": 1})[:7])


# (id, argv for the fcl CLI ({tmp} = the test's folder), setup(tmp), text the one line must contain)
FCL = [
    ("not-a-number", ["--num-clients", "abc"], None, "--num-clients"),
    ("unknown-flag", ["--num-clientz", "3"], None, "--num-clientz"),
    ("bad-bool", ["--plot", "maybe"], None, "--plot"),
    ("clients-0", ["--num-clients", "0"], None, "num_clients=0"),
    ("seed-negative", ["--seed", "-1"], None, "seed=-1"),
    ("seed-huge", ["--seed", "99999999999"], None, "seed=99999999999"),
    ("seed-dirichlet-negative", ["--scenario", "dirichlet", "--seed", "-5"], None, "seed=-5"),
    ("image-size-0", ["--image-size", "0"], None, "image_size=0"),
    ("image-size-huge", ["--image-size", "100000"], None, "image_size=100000"),
    ("alpha-nan", ["--scenario", "dirichlet", "--alpha", "nan"], None, "alpha=nan"),
    ("alpha-inf", ["--scenario", "dirichlet", "--alpha", "inf"], None, "alpha=inf"),
    ("gm-c-inf", ["--method", "stamp", "--gm-c", "inf"], None, "gm_c=inf"),
    ("momentum-inf", ["--momentum", "inf"], None, "momentum=inf"),
    ("momentum-1.5", ["--momentum", "1.5"], None, "momentum=1.5"),
    ("lr-nan", ["--lr", "nan"], None, "lr=nan"),
    ("lr-negative", ["--lr", "-0.1"], None, "lr=-0.1"),
    ("participation-1.5", ["--participation", "1.5"], None, "participation=1.5"),
    ("eta-inf", ["--eta-s", "inf"], None, "eta_s=inf"),
    ("method-unknown", ["--method", "magic"], None, "method='magic'"),
    ("server-unknown", ["--client", "tam", "--server", "nope"], None, "server='nope'"),
    ("name-path", ["--name", "../escape"], None, "name='../escape'"),
    ("out-is-folder", ["--out", "{tmp}/folder"], lambda t: (t / "folder").mkdir(), "is a folder"),
    ("out-unwritable", ["--out", "/proc/forbidden/r.json"], None, "out='/proc/forbidden/r.json'"),
    ("out-under-a-file", ["--out", "{tmp}/r.json/x.json"], None, "cannot be written"),
    ("png-is-folder", [], lambda t: (t / "r_acc.png").mkdir(), "_acc.png"),
    ("checkpoint-dir-is-file", ["--checkpoint-dir", "{tmp}/r.json"], None, "is a file"),
    ("checkpoint-dir-under-file", ["--checkpoint-dir", "{tmp}/r.json/sub"], None, "checkpoint_dir="),
    ("checkpoint-exists", ["--checkpoint-dir", "{tmp}/ck"], lambda t: ckpt(t / "ck"), "already holds a checkpoint"),
    ("resume-and-overwrite", ["--checkpoint-dir", "{tmp}/ck", "--resume", "true", "--overwrite", "true"], None,
     "contradict"),
    ("resume-nothing", ["--checkpoint-dir", "{tmp}/ck", "--resume", "true"], None, "holds no checkpoint.pt"),
    ("resume-crafted", ["--checkpoint-dir", "{tmp}/ck", "--resume", "true"], lambda t: crafted(t / "ck"), "damaged"),
    ("resume-truncated", ["--checkpoint-dir", "{tmp}/ck", "--resume", "true"],
     lambda t: (t / "ck").mkdir() or (t / "ck" / checkpoint.FILE).write_bytes(b"PK\x03\x04trunc"), "cannot be read"),
    ("resume-other-settings", ["--checkpoint-dir", "{tmp}/ck", "--resume", "true", "--lr", "0.05"],
     lambda t: ckpt(t / "ck"), "lr=0.05 differs"),
    ("out-is-checkpoint", ["--checkpoint-dir", "{tmp}/ck", "--out", "{tmp}/ck/checkpoint.pt"], None, "checkpoint file"),
    ("cifar-missing", ["--dataset", "cifar100", "--data-root", "{tmp}/nothing"], None, "dataset='cifar100'"),
    ("cifar-damaged", ["--dataset", "cifar100", "--data-root", "{tmp}/c"], lambda t: cifar_damaged(t / "c"),
     "dataset='cifar100'"),
    ("imagefolder-empty", ["--dataset", "imagefolder", "--data-root", "{tmp}/img"], lambda t: (t / "img").mkdir(),
     "dataset='imagefolder'"),
    ("imagefolder-bad-image", ["--dataset", "imagefolder", "--data-root", "{tmp}/img"],
     lambda t: imagefolder(t / "img", bad="9.png"), "9.png' is not a readable image"),
    ("diverged", ["--lr", "1e6"], None, "diverged"),
]
if not torch.cuda.is_available():
    FCL.append(("no-cuda", ["--device", "cuda"], None, "device='cuda'"))

FLORA = [
    ("hidden-0", ["--hidden", "0"], "hidden=0"),
    ("hidden-negative", ["--hidden", "-4"], "hidden=-4"),
    ("lora-alpha-inf", ["--lora-alpha", "inf"], "lora_alpha=inf"),
    ("rank-0", ["--rank", "0"], "rank=0"),
    ("alpha-nan", ["--alpha", "nan"], "alpha=nan"),
    ("aggregator-unknown", ["--aggregator", "best"], "aggregator='best'"),
    ("seed-negative", ["--seed", "-2"], "seed=-2"),
    ("argparse", ["--rounds", "two"], "--rounds"),
]


def leftovers(folder):
    """Temp files an interrupted write would leave (atomic writes name them .<file>.*.tmp / .probe-*)."""
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".probe-")]


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


@pytest.mark.parametrize("argv, setup, text", [c[1:] for c in FCL], ids=[c[0] for c in FCL])
def test_fcl_cli_mistakes(argv, setup, text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_bytes(PREVIOUS)                 # a results file from before: must stay as it is
    if setup:
        setup(tmp_path)
    before = listing(tmp_path)
    capsys.readouterr()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    argv = TINY + (argv if "--out" in argv else argv + ["--out", str(tmp_path / "r.json")])   # the case's flags win
    with pytest.raises(SystemExit) as e:
        cli.main(lambda: fcl_cli(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert text in err, err
    assert listing(tmp_path) == before and not leftovers(tmp_path)   # nothing written, nothing damaged


@pytest.mark.parametrize("argv, text", [c[1:] for c in FLORA], ids=[c[0] for c in FLORA])
def test_flora_cli_mistakes(argv, text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        flora_loop.cli(argv + ["--out", str(tmp_path / "f.json"), "--rounds", "1", "--quiet", "true"]
                       if "--rounds" not in argv else argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and text in err, err
    assert list(tmp_path.iterdir()) == []


API = [
    ("clients-str", dict(num_clients="3"), "num_clients='3' is a str"),
    ("lr-str", dict(lr="0.1"), "lr='0.1' is a str"),
    ("plot-int", dict(plot=1), "plot=1 is a int"),
    ("seed-float", dict(seed=1.5), "seed=1.5 is a float"),
    ("tasks-bool", dict(num_tasks=True), "num_tasks=True is a bool"),
    ("gm-c-nan", dict(gm_c=float("nan")), "gm_c=nan"),
    ("method-none", dict(method=None), "method=None"),
]


@pytest.mark.parametrize("kwargs, text", [c[1:] for c in API], ids=[c[0] for c in API])
def test_python_api_mistakes_are_user_errors(kwargs, text):
    with pytest.raises(UserError) as e:
        run(Config(**kwargs))
    assert text in str(e.value) and "\n" not in str(e.value)


def test_flora_python_api_checks_types_too():
    with pytest.raises(UserError, match="hidden='64' is a str"):
        flora_loop.run(flora_loop.Config(hidden="64"))


@pytest.mark.parametrize("out", ["../x.json", "/etc/x.json", "a/b.json", ".hidden.json", "x.txt", "..", ""])
def test_flower_job_cannot_name_a_path_outside_the_results_folder(out, tmp_path):
    """A Flower job's `out` is untrusted: only a bare *.json name inside the operator's folder."""
    if out == "":
        assert flower_app.results_path(tmp_path, out, "default.json", False) == tmp_path / "default.json"
        return
    with pytest.raises(UserError) as e:
        flower_app.results_path(tmp_path, out, "default.json", False)
    assert "out=" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_a_write_waits_for_the_rename(tmp_path):
    """SIGTERM arriving in the middle of a write (sent by the writer itself, so the timing is exact):
    the file is completed and renamed, no temp file is left, and only then does the signal act."""
    path = tmp_path / "c.pt"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"first half ")
        os.kill(os.getpid(), signal.SIGTERM)           # arrives now, held back by atomic_write
        f.write(b"second half")

    old = signal.signal(signal.SIGTERM, cli._sigterm)
    try:
        with pytest.raises(KeyboardInterrupt):
            cli.atomic_write(path, write)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert path.read_bytes() == b"first half second half" and not leftovers(tmp_path)


def run_cli(args, tmp_path, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "stamp_min.fcl_loop", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def test_sigterm_during_a_run_leaves_a_resumable_checkpoint_and_no_temp_file(tmp_path):
    """SIGTERM once the first checkpoint exists (it may land in the middle of the next write): exit
    130, one line, no temp file, and --resume finishes with the uninterrupted run's accuracy matrix."""
    import json
    args = ["--num-clients", "2", "--num-tasks", "4", "--rounds-per-task", "2", "--local-epochs", "1", "--quiet", "true",
            "--plot", "false", "--method", "stamp", "--checkpoint-dir", "ck"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "stamp_min.fcl_loop", *args, "--out", "a.json"], cwd=tmp_path, env=env,
                         stderr=subprocess.PIPE, text=True)
    import time
    while not (tmp_path / "ck" / checkpoint.FILE).exists() and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    err = p.stderr.read()
    assert p.wait() == 130, err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
    assert not leftovers(tmp_path)
    resumed = run_cli([*args, "--resume", "true", "--out", "a.json"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    whole = run_cli([*args[:-2], "--out", "b.json"], tmp_path)
    a, b = (json.loads((tmp_path / f).read_text())["acc_matrix"] for f in ("a.json", "b.json"))
    assert whole.returncode == 0 and a == b


def full_disk(tmp_path, size_kb, script):
    """Run `script` (sh) with a tmpfs of size_kb mounted at tmp_path/disk, in a private mount namespace
    (needs root and unshare; skipped otherwise). Returns its stdout."""
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {disk}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and unshare)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "PY": sys.executable, "DISK": str(disk)}
    out = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={size_kb}k tmpfs {disk} && {script}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_full_disk_is_one_line_exit_1_and_the_previous_results_stay(tmp_path):
    """A real full disk (a 64 kB tmpfs, all of it taken by the previous results): the previous results file
    is kept byte for byte, no temp file."""
    script = ('head -c 63000 /dev/zero | tr "\\0" x > $DISK/r.json; '
              f'$PY -m stamp_min.fcl_loop {" ".join(TINY)} --out $DISK/r.json 2> $DISK/../err; echo rc=$?; '
              'head -c 63000 /dev/zero | tr "\\0" x | cmp - $DISK/r.json && echo same; ls -a $DISK')
    out = full_disk(tmp_path, 64, script)
    err = (tmp_path / "err").read_text()
    assert "rc=1" in out and "same" in out, (out, err)
    assert err.count("\n") == 1 and "No space left on device" in err and "r.json" in err and "intact" in err, err
    assert out.split("same")[1].split() == [".", "..", "r.json"]          # no temp file left on the disk


def test_a_file_size_limit_is_one_line_exit_1(tmp_path):
    """RLIMIT_FSIZE below the results file's size: EFBIG (SIGXFSZ is ignored), one line, exit 1,
    the previous file intact and no temp file."""
    import resource
    (tmp_path / "r.json").write_bytes(PREVIOUS)
    out = run_cli([*TINY, "--out", "r.json"], tmp_path,
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)))
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1 and "File too large" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "r.json").read_bytes() == PREVIOUS and not leftovers(tmp_path)
    assert "r.json" in out.stderr                          # the results file (> 1 kB) is what failed, not the picture


def test_a_download_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    """--download true with no way out (every request goes to a proxy that refuses): one line naming
    the folder and the fix, exit 2, no traceback."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main(lambda: fcl_cli(TINY + ["--dataset", "cifar10", "--download", "true", "--data-root", str(tmp_path / "c"),
                                         "--out", str(tmp_path / "r.json")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "download into" in err and "internet" in err and not (tmp_path / "r.json").exists()
