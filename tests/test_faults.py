"""Bad input and faults, table-driven (issue 16): every user mistake is one line and exit status 2
before any training, every failed write one line and exit status 1, and no case writes, damages or
leaves behind a file. Reference: the bytes of a file that was there before, and the folder's listing."""

import os
import pickle
import re
import signal
import subprocess
import sys
from dataclasses import replace
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


def png_claiming(path, width, height):
    """A PNG of a few bytes whose header claims width x height pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


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
    ("coreset-rule-not-used", ["--method", "replay", "--coreset-rule", "k_center"], None, "method replay_kcenter"),
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
    ("diverged", ["--lr", "1e6"], None, "lr=1000000.0: client 0's local training diverged (NaN/inf) in task 1 round 1, "
                                        "from a finite θ on checked data"),     # no cause told: what was checked
    # issue 24
    ("out-fifo", ["--out", "{tmp}/fifo.json"], lambda t: os.mkfifo(t / "fifo.json"), "is not a regular file"),
    ("out-device", ["--out", "/dev/null"], None, "out='/dev/null' is not a regular file"),
    ("checkpoint-dir-dangling-link", ["--checkpoint-dir", "{tmp}/ln"], lambda t: (t / "ln").symlink_to(t / "gone"),
     "is a link to nothing"),
    ("checkpoint-dir-nul", ["--checkpoint-dir", "ck\0x"], None, "checkpoint_dir='ck\\x00x' contains a NUL"),
    ("data-root-nul", ["--data-root", "d\0"], None, "data_root='d\\x00' contains a NUL"),
    ("eta-s-huge", ["--method", "stamp", "--eta-s", "1e300"], None, "eta_s=1e+300 is out of range"),
    ("lwf-temperature-tiny", ["--method", "lwf", "--lwf-temperature", "1e-300"], None, "lwf_temperature=1e-300 is out"),
    ("gm-c-huge", ["--method", "stamp", "--gm-c", "1e300"], None, "gm_c=1e+300 is out of range"),
    ("share-samples-huge", ["--num-clients", "100000", "--num-tasks", "0", "--share-samples", "true"], None,
     "would hold"),
    ("dirichlet-too-many-clients", ["--scenario", "dirichlet", "--num-clients", "5000"], None, "too few images"),
    ("diverged-eta-s", ["--method", "stamp", "--eta-s", "50", "--rounds-per-task", "3"], None,
     "eta_s=50.0: client 0's local training diverged (NaN/inf) in task "),
    ("imagefolder-bomb", ["--dataset", "imagefolder", "--data-root", "{tmp}/img"],
     lambda t: imagefolder(t / "img") or png_claiming(t / "img" / "b" / "big.png", 20000, 20000), "'b/big.png' is too large"),
    ("imagefolder-bomb-below-pil", ["--dataset", "imagefolder", "--data-root", "{tmp}/img"],
     lambda t: imagefolder(t / "img") or png_claiming(t / "img" / "b" / "big.png", 7000, 7000), "7000 x 7000 pixels"),
    ("imagefolder-link-loop", ["--dataset", "imagefolder", "--data-root", "{tmp}/img"],
     lambda t: imagefolder(t / "img") or (t / "img" / "a" / "l1").symlink_to(".."), "'a/l1' reaches '.' a second time"),
    ("imagefolder-two-loops", ["--dataset", "imagefolder", "--data-root", "{tmp}/img"],
     lambda t: imagefolder(t / "img") or (t / "img" / "a" / "l1").symlink_to("..") or (t / "img" / "b" / "l2").symlink_to(
         "../a"), "a second time"),
    ("imagefolder-link-out", ["--dataset", "imagefolder", "--data-root", "{tmp}/img"],
     lambda t: imagefolder(t / "img") or imagefolder(t / "other") or (t / "img" / "a" / "x").symlink_to(t / "other" / "a"),
     "'a/x' is a link that leaves the data folder"),
    ("imagefolder-link-to-class", ["--dataset", "imagefolder", "--data-root", "{tmp}/img"],
     lambda t: imagefolder(t / "img") or (t / "img" / "a" / "x").symlink_to("../b"), "'a/x' reaches 'b' a second time"),
    ("imagefolder-broken-link", ["--dataset", "imagefolder", "--data-root", "{tmp}/img"],
     lambda t: imagefolder(t / "img") or (t / "img" / "a" / "x.png").symlink_to("gone.png"), "'a/x.png' is a broken link"),
    ("imagefolder-empty-class", ["--dataset", "imagefolder", "--data-root", "{tmp}/img"],
     lambda t: imagefolder(t / "img") or (t / "img" / "c").mkdir(), "class folder 'c' holds no image"),
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

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, cli._sigterm)
    try:
        with pytest.raises(KeyboardInterrupt):
            cli.atomic_write(path, write)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
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


# ---------------------------------------------------------------------------------------------
# issue 24: checkpoints checked whole, one writer per folder, data, signals, the Python API

CK = dict(num_clients=2, num_tasks=2, rounds_per_task=1, local_epochs=1, method="replay", buffer_per_class=2,
          quiet=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The state of a finished tiny run's checkpoint (replay: clients keep a buffer), and its bytes."""
    folder = tmp_path_factory.mktemp("ck")
    run(Config(**CK, checkpoint_dir=str(folder)))
    return torch.load(folder / checkpoint.FILE, weights_only=True), (folder / checkpoint.FILE).read_bytes()


def first(d, end):
    return next(n for n in d if n.endswith(end))


def chain(n):
    """A list shared 2**n times (a pickle of n+1 small lists): a walk that follows it visits 2**n nodes."""
    x = [0]
    for _ in range(n):
        x = [x, x]
    return x


def edit(path, *keys, value=None, fn=None):
    def change(state):
        *head, last = keys
        d = state
        for k in head:
            d = d[k]
        d[last] = fn(d[last]) if fn else value
    return change


# (id, change(state) in place, text the one line must contain)
CHECKPOINTS = [
    ("acc-int64", edit(None, "progress", "acc", fn=lambda a: a.long()), "acc is int64 (2, 2); allowed: a float64 (2, 2)"),
    ("acc-unmeasured", edit(None, "progress", "acc", fn=lambda a: torch.full_like(a, float("nan"))),
     "acc is not an accuracy matrix of 2 finished tasks"),
    ("acc-over-1", edit(None, "progress", "acc", fn=lambda a: a.nan_to_num(7.0)), "acc is not an accuracy matrix"),
    ("r-beyond-rounds", edit(None, "progress", "r", value=1), "r=1 is out of range"),
    ("t-beyond-tasks", edit(None, "progress", "t", value=3), "t=3 is out of range"),
    ("t-str", edit(None, "progress", "t", value="1"), "t='1' is a str"),
    ("t-bool", edit(None, "progress", "t", value=True), "t=True is a bool"),
    ("theta-nan", lambda s: s["progress"]["theta"][first(s["progress"]["theta"], "weight")].fill_(float("nan")),
     "is not finite"),
    ("theta-float64", edit(None, "progress", "theta", fn=lambda th: {n: v.double() for n, v in th.items()}), "float64; allowed"),
    ("theta-missing", lambda s: s["progress"]["theta"].pop(first(s["progress"]["theta"], "bias")),
     "θ does not have the model's entries (missing"),
    ("theta-not-a-dict", edit(None, "progress", "theta", value=[1, 2]), "θ does not have the model's entries (list)"),
    ("log-short", edit(None, "progress", "log", fn=lambda x: x[:1]), "log does not hold one entry per round done"),
    ("log-tensor", lambda s: s["progress"]["log"][0].update(loss=torch.ones(3)), "holds something a results file cannot"),
    ("log-out-of-order", edit(None, "progress", "log", fn=lambda x: x[::-1]), "log[0] is not the entry of task 0 round 0"),
    ("round-acc-short", edit(None, "progress", "round_acc", value=[[0.5], []]), "round_acc does not hold one accuracy"),
    ("round-acc-str", edit(None, "progress", "round_acc", value=[["0.5"], [0.5]]), "round_acc[0]='0.5' is a str"),
    ("comm-negative", edit(None, "progress", "comm", value=-1), "comm=-1 is out of range"),
    ("elapsed-inf", edit(None, "progress", "elapsed", value=float("inf")), "is infinite"),
    ("progress-extra-field", lambda s: s["progress"].update(x=1), "progress has fields"),
    ("clients-short", edit(None, "clients", fn=lambda c: c[:1]), "does not hold 2 client states"),
    ("clients-swapped", edit(None, "clients", fn=lambda c: c[::-1]), "clients[0] belongs to client 1"),
    ("client-class-out-of-range", lambda s: s["clients"][0]["seen"].append([3, 99]), "seen class=99 is out of range"),
    ("client-rng-list", edit(None, "clients", 0, "rng", value=[1, 2]), "clients[0]['rng'] is a list"),
    ("client-buffer-images", lambda s: s["clients"][1]["buffer"]["x"].__setitem__(0, torch.zeros(2, 3, 8, 8, dtype=torch.uint8)),
     "clients[1].buffer holds images or labels unlike the dataset's"),
    ("client-buffer-labels", lambda s: s["clients"][1]["buffer"]["y"][0].fill_(42), "unlike the dataset's"),
    ("client-buffer-missing", edit(None, "clients", 0, "buffer", value=None), "clients[0].buffer is missing"),
    ("client-extra-theta-shaped", lambda s: s["clients"][0]["extra"].update(
        lwf_old={n: torch.zeros(1) for n in s["progress"]["theta"]}), "clients[0].extra['lwf_old']"),
    ("client-extra-nan", lambda s: s["clients"][0]["extra"].update(x=torch.tensor([float("nan")])), "is not finite"),
    ("rng-missing", lambda s: s["rng"].pop("generator"), "its random states are not torch's"),
    ("rng-wrong-size", edit(None, "rng", "torch", fn=lambda r: r[:10]), "rng['torch'] is (10,) uint8"),
    ("config-empty", edit(None, "config", value={}), "its config lacks the settings"),
    ("config-tensor", lambda s: s["config"].update(lr=torch.ones(2)), "its config or rules are not plain settings"),
    ("extra-top-field", lambda s: s.update(more=1), "it has the fields"),
    ("shared-list-bomb", lambda s: s["progress"]["log"][0].update(x=chain(40)), "has too many parts"),
    ("stride-0-bomb", lambda s: s["clients"][0]["extra"].update(x=torch.zeros(1).expand(10**12)),
     "larger than this run can write"),
]


@pytest.mark.parametrize("change, text", [c[1:] for c in CHECKPOINTS], ids=[c[0] for c in CHECKPOINTS])
def test_a_checkpoint_is_checked_whole_before_use(change, text, saved, tmp_path):
    import copy
    state = copy.deepcopy(saved[0])
    change(state)
    (tmp_path / "ck").mkdir()
    torch.save(state, tmp_path / "ck" / checkpoint.FILE)
    before = listing(tmp_path)
    with pytest.raises(UserError) as e:
        run(Config(**CK, checkpoint_dir=str(tmp_path / "ck"), resume=True))
    assert text in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert "is damaged" in str(e.value) or "cannot be read" in str(e.value), str(e.value)
    assert listing(tmp_path) == before                     # nothing written, nothing removed


def test_the_untouched_checkpoint_resumes(saved, tmp_path):
    """The reference of the table above: the same file, unchanged, resumes (the run is finished)."""
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / checkpoint.FILE).write_bytes(saved[1])
    res = run(Config(**CK, checkpoint_dir=str(tmp_path / "ck"), resume=True))
    assert torch.equal(torch.tensor(res["acc_matrix"], dtype=torch.float64).nan_to_num(-1), saved[0]["progress"]["acc"].nan_to_num(-1))


def deflated(state, path, limit):
    """The checkpoint's zip with every entry compressed: small on disk, `limit` bytes when unpacked."""
    import io
    import zipfile
    raw = io.BytesIO()
    torch.save(state, raw)
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
        dst.writestr("bomb/data/99", b"\0" * limit)


@pytest.mark.parametrize("make, text", [
    (lambda s, p: deflated(s, p, 2**20), "cannot be read (ValueError)"),
    (lambda s, p: open(p, "wb").truncate(2**31), "MiB, more than a checkpoint of this run can be"),
    (lambda s, p: torch.save(s, p, _use_new_zipfile_serialization=False), "cannot be read (BadZipFile)"),
], ids=["deflated-bomb", "too-large", "legacy-format"])
def test_a_checkpoint_file_is_bounded_before_it_is_unpacked(make, text, saved, tmp_path):
    (tmp_path / "ck").mkdir()
    make(saved[0], tmp_path / "ck" / checkpoint.FILE)
    files = lambda: [(p, p.is_file() and (p.stat().st_size, p.stat().st_mtime_ns)) for p in sorted(tmp_path.rglob("*"))]  # noqa: E731
    before = files()                                # sizes and times: 2 GiB are not read to compare
    with pytest.raises(UserError, match=re.escape(text)) as e:
        run(Config(**CK, checkpoint_dir=str(tmp_path / "ck"), resume=True))
    assert "\n" not in str(e.value)
    assert files() == before                        # nothing written, nothing removed


def test_stale_temp_files_of_a_killed_write_are_removed_at_start(saved, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")        # SIGKILL in the middle of a write
    with pytest.raises(UserError, match="holds no checkpoint.pt \\(an interrupted first write was removed\\)"):
        run(Config(**CK, checkpoint_dir=str(ck), resume=True))
    assert list(ck.iterdir()) == []
    (ck / checkpoint.FILE).write_bytes(saved[1])
    (ck / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (ck / ".probe-x7").write_bytes(b"")
    run(Config(**CK, checkpoint_dir=str(ck), resume=True))
    assert sorted(p.name for p in ck.iterdir()) == [checkpoint.FILE]


def test_a_folder_held_by_a_run_is_refused_to_a_second_one(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    fd = checkpoint.lock(ck, "held")                         # what a running run holds
    try:
        with pytest.raises(UserError, match=r"checkpoint_dir='.*ck' is in use by another run"):
            run(Config(**CK, checkpoint_dir=str(ck)))
        assert list(ck.iterdir()) == []
    finally:
        os.close(fd)
    with checkpoint.claim(Config(**CK, checkpoint_dir=str(ck))):     # released: the folder is free again
        assert list(ck.iterdir()) == []


def test_two_runs_racing_for_one_checkpoint_folder(tmp_path):
    """Started together: one runs, the other is refused in one line (exit 2) and writes nothing
    (while the winner trains, by its lock; should the winner be done first, by its checkpoint);
    the winner's checkpoint is whole."""
    args = ["--num-clients", "2", "--num-tasks", "2", "--rounds-per-task", "2", "--local-epochs", "1", "--quiet", "true",
            "--plot", "false", "--checkpoint-dir", "ck"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "stamp_min.fcl_loop", *args, "--out", f"{i}.json"], cwd=tmp_path,
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], errs
    loser = codes.index(2)
    assert errs[loser].count("\n") == 1 and ("is in use by another run" in errs[loser]
                                             or "already holds a checkpoint" in errs[loser]), errs[loser]
    assert not (tmp_path / f"{loser}.json").exists() and (tmp_path / f"{1 - loser}.json").exists()
    assert torch.load(tmp_path / "ck" / checkpoint.FILE, weights_only=True)["progress"]["t"] == 2
    assert not leftovers(tmp_path)


def test_resume_on_a_read_only_folder_fails_before_any_training(saved, tmp_path):
    """The checkpoint on a read-only file system: --resume is refused up front (one line, exit 2),
    before the data are even loaded."""
    (tmp_path / "c.pt").write_bytes(saved[1])
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in CK.items()]
    script = ('mkdir $DISK/ck && cp c.pt $DISK/ck/checkpoint.pt && mount -o remount,ro $DISK && '
              f'$PY -m stamp_min.fcl_loop {" ".join(flags)} --checkpoint-dir $DISK/ck --resume true --out r.json 2> err; '
              'echo rc=$?')
    out = full_disk(tmp_path, 4096, script)
    err = (tmp_path / "err").read_text()
    assert "rc=2" in out and not (tmp_path / "r.json").exists(), (out, err)
    assert err.count("\n") == 1 and "checkpoint_dir=" in err and "Read-only file system" in err, err


DATASETS = [
    ("labels-short", lambda d: replace(d, y_train=d.y_train[:-3]), "dataset.y_train is torch.int64 (117,) for 120 images"),
    ("label-out-of-range", lambda d: replace(d, y_test=d.y_test.clone().fill_(6)), "dataset.y_test holds label 6; allowed: 0..5"),
    ("label-negative", lambda d: replace(d, y_train=d.y_train - 1), "dataset.y_train holds label -1"),
    ("images-float", lambda d: replace(d, x_train=d.x_train.float()), "dataset.x_train is torch.float32"),
    ("images-3d", lambda d: replace(d, x_test=d.x_test[:, 0]), "dataset.x_test is torch.uint8 (30, 8, 8)"),
    ("test-other-size", lambda d: replace(d, x_test=torch.zeros(30, 1, 4, 4, dtype=torch.uint8)), "dataset.x_test has images"),
    ("std-zero", lambda d: replace(d, std=(0.0,)), "dataset.std=(0.0,)"),
    ("mean-nan", lambda d: replace(d, mean=(float("nan"),)), "dataset.mean=(nan,)"),
    ("classes-float", lambda d: replace(d, num_classes=6.0), "dataset.num_classes=6.0"),
    ("not-a-dataset", lambda d: {"x": d.x_train}, "dataset=dict is not a data.Dataset"),
]


@pytest.mark.parametrize("change, text", [c[1:] for c in DATASETS], ids=[c[0] for c in DATASETS])
def test_a_dataset_from_memory_whose_arrays_disagree_is_one_line(change, text):
    from conftest import toy_dataset
    with pytest.raises(UserError) as e:
        run(Config(num_clients=2, num_tasks=2, rounds_per_task=1, quiet=True), dataset=change(toy_dataset()))
    assert text in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("call, text", [
    (lambda: run(dict(num_clients=2)), "cfg=dict is not a Config"),
    (lambda: run(None), "cfg=NoneType is not a Config"),
    (lambda: run(Config(checkpoint_dir="ck\0")), "contains a NUL"),
    (lambda: flora_loop.run({"rounds": 1}), "cfg=dict is not a flora_loop.Config"),
], ids=["dict", "none", "nul", "flora-dict"])
def test_the_python_api_refuses_what_is_no_config(call, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=text) as e:
        call()
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_a_second_signal_during_shutdown_is_quiet(tmp_path):
    """Two SIGTERMs 1 ms apart, once training runs: one line, exit 130, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "stamp_min.fcl_loop", "--num-clients", "2", "--local-epochs", "1",
                          "--rounds-per-task", "50", "--plot", "false", "--out", "r.json"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "round 1/50" not in p.stdout.readline():
        assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    import time
    time.sleep(0.001)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_signal_while_the_command_starts_is_one_line(tmp_path):
    """SIGINT while torch is still loading: one line, exit 130, nothing written. The signal goes once
    torch's library is mapped into the process (/proc/PID/maps), not after a fixed delay: on a busy
    machine 0.3 s can end before the command's own code has run at all."""
    import time
    p = subprocess.Popen([sys.executable, "-m", "stamp_min.fcl_loop", "--out", "r.json"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    maps, deadline = Path(f"/proc/{p.pid}/maps"), time.monotonic() + 60
    if maps.exists():
        while "libtorch" not in maps.read_text() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    else:
        time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_old_flora_na_command_says_where_the_cli_is(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stamp_min.flora_na"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "python -m stamp_min.flora_loop" in out.stderr
    assert out.stdout == "" and list(tmp_path.iterdir()) == []
