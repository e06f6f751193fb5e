"""One command for a lent GPU: check the GPU path and measure the paper-scale shape, in < 8 minutes.

    python bench/gpu_check.py OUTDIR          # on a CUDA machine: about 6-8 minutes, never more than 8
    python bench/gpu_check.py OUTDIR --dry    # anywhere (automatic without CUDA): a CPU smoke, < 60 s

On a CUDA machine it runs these parts, each in its own subprocess with a time limit (a part that
fails or runs out of time is recorded with the tail of its output, and the next part still runs):

  device   torch / CUDA / cuDNN versions, the GPU's name, memory, compute capability, bf16 support
  tests    (a) pytest -m gpu tests/test_gpu.py: every method with --device cuda; CPU and GPU agree
           (first round's update, a short run's θ and accuracies, TF32 off); bf16 autocast and
           channels-last; SIGKILL + resume on the GPU equals the uninterrupted run;
           peak_gpu_memory_bytes; Flower's simulation with GPU clients (skipped without flwr)
  scale    (b) bench/scale.py --full --device cuda --tasks 2 --rounds 10 on generated
           CIFAR-100-shaped data with ResNet-18: fp32, then --amp bf16 --channels-last (and
           --tam-clones batched where Config has it, if time is left): images/s next to a bare
           loop, shares of old-task clones, GM and aggregation, projected paper-scale wall time
  probe    (d) bench/clones_probe.py --device cuda (if that script exists): TAM's old-task clones
           one after another vs batched with torch.func (max abs difference, speed-up)
  notebook (c) notebooks/07_full_gpu_run.ipynb executed with nbclient (STAMP_SMOKE=0,
           STAMP_GPU_CHECK=1), outputs kept, saved as OUTDIR/07_full_gpu_run.ipynb

Without CUDA (or with --dry) it says so in one line and runs the CPU side only: the GPU tests are
collected (they skip), scale.py runs a tiny version on the CPU, the probe runs on the CPU if present,
the notebook is not executed. That mode is what tests/test_gpu_check.py runs.

OUTDIR gets report.md and report.json (rewritten after every part, so a kill loses nothing that
finished), one <part>.log each, gpu_tests.xml, scale_*.json, clones_probe.json and the notebook.
This script writes nothing outside OUTDIR (and a temporary kernelspec). Reports of lent GPUs are
committed by hand under bench/results/gpu/<device-name>/ (report.json names the folder).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BUDGET_S = 470                 # the whole check, parts included; the notebook gets what is left
LIMITS = {"device": 30, "tests": 170, "scale_fp32": 80, "scale_bf16": 70, "probe": 45, "notebook": 180,
          "scale_batched": 70}
DRY_LIMITS = {"device": 60, "tests": 90, "scale_fp32": 120, "probe": 90}     # generous: CI machines are busy
SCALE_GPU = ["--full", "--device", "cuda", "--tasks", "2", "--rounds", "10"]
SCALE_DRY = ["--device", "cpu", "--tasks", "2", "--rounds", "1", "--per-class", "10", "--model", "cnn"]

DEVICE_CODE = r"""
import json, platform, importlib.metadata as md, torch
d = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
     "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
     "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads(), "cpu_count": __import__("os").cpu_count()}
for pkg in ("flwr", "nbclient"):
    try:
        d[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
        d[pkg] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(name=torch.cuda.get_device_name(0), total_memory_bytes=p.total_memory,
             total_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
             multiprocessors=p.multi_processor_count, device_count=torch.cuda.device_count(),
             bf16_supported=torch.cuda.is_bf16_supported(), cudnn_tf32_default=torch.backends.cudnn.allow_tf32,
             matmul_tf32_default=torch.backends.cuda.matmul.allow_tf32)
    try:
        import subprocess
        d["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=15).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        d["driver"] = None
else:
    d.update(name="CPU (" + (platform.processor() or platform.machine()) + ")", bf16_supported=None)
print("DEVICE " + json.dumps(d))
"""

NOTEBOOK_CODE = r"""
import sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient
src, dst, limit, kernel = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
deadline = time.time() + limit
nb = nbformat.read(src, as_version=4)
for cell in nb.cells:                   # no stale outputs: a cell not reached shows none
    if cell.cell_type == "code":
        cell.outputs, cell.execution_count = [], None
client = NotebookClient(nb, kernel_name=kernel, timeout_func=lambda cell: max(5, int(deadline - time.time())),
                        resources={"metadata": {"path": str(Path(src).parent)}})
code = 0
try:
    client.execute()
except Exception as e:
    print(f"notebook stopped: {type(e).__name__}: {str(e)[-1500:]}")
    code = 1
finally:
    nbformat.write(nb, dst)
    print(f"wrote {dst}")
sys.exit(code)
"""


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tail(path, lines=25):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_part(cmd, log, limit, env):
    """Run cmd in its own process group, output to `log`; (status, seconds). A part over its
    limit gets SIGTERM, then SIGKILL, with everything it started."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(str(c) for c in cmd) + "\n")
        f.flush()
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                             start_new_session=True)
        try:
            status = "ok" if p.wait(timeout=max(1, limit)) == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
    return status, time.monotonic() - t0


def pytest_results(xml, log):
    """Per-test outcome, seconds, message and recorded properties: from the JUnit XML, or (after a
    timeout, when there is none) from the -v lines of the log."""
    tests = []
    if Path(xml).exists():
        for case in ET.parse(xml).iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome, message = {"failure": "failed"}.get(tag, tag), (el.get("message") or "").splitlines()[:1]
                    message = message[0][:300] if message else ""
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            tests.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                          "message": message, "measured": props})
        return tests
    text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
    for m in re.finditer(r"^\S*::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M):
        tests.append({"test": m.group(1), "outcome": m.group(2).lower(), "seconds": None, "message": "", "measured": {}})
    return tests


class Check:
    def __init__(self, out, dry):
        self.out, self.dry, self.start = out, dry, time.monotonic()
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        self.report = {"format": "stamp_min-gpu-check-v1", "mode": "dry" if dry else "gpu", "started": now(),
                       "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "budget_s": BUDGET_S,
                       "git": git_commit(), "device": {}, "results_folder": None, "parts": {}}

    def left(self):
        return BUDGET_S - (time.monotonic() - self.start)

    def say(self, text):
        print(f"[{time.monotonic() - self.start:5.0f}s] {text}", flush=True)

    def part(self, name, cmd, limit, env=None, **extra):
        limit = int(min(limit, self.left())) if not self.dry else limit
        if limit < 15:
            return self.skip(name, f"no time left ({self.left():.0f} s of the {BUDGET_S} s budget)")
        self.say(f"{name}: start (limit {limit} s)")
        log = self.out / f"{name}.log"
        status, seconds = run_part(cmd, log, limit, env or self.env)
        entry = {"status": status, "seconds": round(seconds, 1), "limit_s": limit, "log": log.name,
                 "command": " ".join(str(c) for c in cmd), **extra}
        if status != "ok":
            entry["tail"] = tail(log)
        self.report["parts"][name] = entry
        self.say(f"{name}: {status} ({seconds:.0f} s)")
        return entry

    def skip(self, name, why, status="skipped"):
        self.report["parts"][name] = {"status": status, "why": why}
        self.say(f"{name}: {status}: {why}")
        self.write()
        return self.report["parts"][name]

    def write(self):
        self.report.update(finished=now(), wall_s=round(time.monotonic() - self.start, 1))
        for name, text in (("report.json", json.dumps(self.report, indent=1)), ("report.md", markdown(self.report))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def git_commit():
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return (r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", help="folder for report.md, report.json and the parts' files (made if missing)")
    p.add_argument("--dry", action="store_true", help="CPU smoke of every part (automatic without CUDA), < 60 s")
    a = p.parse_args(argv)
    out = Path(a.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    c = Check(out, a.dry)
    c.say(f"gpu_check: writing {out}")

    # device: also decides whether this is a GPU run
    e = c.part("device", [PY, "-c", DEVICE_CODE], DRY_LIMITS["device"] if a.dry else LIMITS["device"])
    line = next((ln for ln in Path(out / "device.log").read_text().splitlines() if ln.startswith("DEVICE ")), None)
    dev = json.loads(line[7:]) if line else {"name": "unknown (the device probe failed)", "cuda_available": False}
    c.report["device"] = dev
    if not dev.get("cuda_available") and not a.dry:
        c.dry = a.dry = True
        c.report["mode"] = "dry"
        print("no CUDA device here: dry run (CPU smoke of every part; no GPU numbers)", flush=True)
    if c.dry:
        c.report["device"]["name"] = f"{dev.get('name')} — dry run, no GPU numbers"
    else:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", dev["name"]).strip("-").lower()
        c.report["results_folder"] = f"bench/results/gpu/{slug}"
        c.say(f"device: {dev['name']}, {dev['total_memory_bytes'] / 2**30:.0f} GiB, torch {dev['torch']}, "
              f"CUDA {dev['cuda_runtime']}, bf16 {dev['bf16_supported']}")
    c.write()

    # (a) the GPU path's tests
    xml = out / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [PY, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-v", "-rfEs", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit1", "--junitxml", xml]
    if c.dry and dev.get("cuda_available"):
        cmd.append("--collect-only")                       # --dry on a GPU machine: do not run them
    e = c.part("tests", cmd, DRY_LIMITS["tests"] if c.dry else LIMITS["tests"])
    e["tests"] = pytest_results(xml, out / "tests.log")
    e["summary"] = next((ln.strip("= ") for ln in reversed(tail(out / "tests.log", 30).splitlines())
                         if re.search(r"\d+ (passed|failed|skipped|error|deselected|tests? collected)", ln)), "")
    c.write()

    # (b) the paper-scale shape on generated data
    runs = [("scale_fp32", SCALE_DRY if c.dry else SCALE_GPU)]
    if not c.dry:
        runs.append(("scale_bf16", SCALE_GPU + ["--amp", "bf16", "--channels-last"]))
    for name, args in runs:
        path = out / f"{name}.json"
        path.unlink(missing_ok=True)
        e = c.part(name, [PY, "bench/scale.py", *args, "--json", path],
                   DRY_LIMITS["scale_fp32"] if c.dry else LIMITS[name], args=" ".join(args))
        if path.exists():
            e["result"] = json.loads(path.read_text())
        c.write()
    if c.dry:
        c.skip("scale_bf16", "dry: bf16 autocast and channels-last are measured on a GPU only")

    # (d) the faster road: batched clones
    probe = ROOT / "bench" / "clones_probe.py"
    if not probe.exists():
        c.skip("probe", "bench/clones_probe.py is not in this checkout", status="not available")
    else:
        path = out / "clones_probe.json"
        path.unlink(missing_ok=True)
        args = ["--device", "cpu" if c.dry else "cuda", "--json", path]
        if c.dry:       # the small version, without the float64 cross-check: the dry run only shows the probe works
            args += ["--quick", "--float64", "0"]
        e = c.part("probe", [PY, probe, *args], DRY_LIMITS["probe"] if c.dry else LIMITS["probe"])
        if path.exists():
            e["result"] = json.loads(path.read_text())
        c.write()

    # (c) notebook 07 on the GPU
    if c.dry:
        c.skip("notebook", "dry: notebook 07 is executed on a GPU only (tests/test_notebooks.py smoke-runs it on the CPU)")
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_check_kernel_") as kdir:
            spec = Path(kdir) / "kernels" / "stamp-gpu-check"
            spec.mkdir(parents=True)
            (spec / "kernel.json").write_text(json.dumps({"argv": [PY, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                                          "display_name": "stamp-gpu-check", "language": "python"}))
            env = {**c.env, "JUPYTER_PATH": kdir, "STAMP_SMOKE": "0", "STAMP_GPU_CHECK": "1"}
            limit = int(min(LIMITS["notebook"], c.left() - 25))     # room to save the notebook and stop the kernel
            dst = out / "07_full_gpu_run.ipynb"
            e = c.part("notebook", [PY, "-c", NOTEBOOK_CODE, ROOT / "notebooks" / "07_full_gpu_run.ipynb", dst, limit,
                                    "stamp-gpu-check"], limit + 20, env=env)
        if e["status"] == "failed" and "CellTimeoutError" in tail(out / "notebook.log", 40):
            e["status"] = "timeout"                        # its time limit, not an error in the notebook
        e["outputs"] = notebook_text(dst)
        c.write()

    # (b, extra) batched clones in the loop, where Config has tam_clones and time is left
    if not c.dry:
        from_config = re.search(r"^\s+tam_clones\s*:", (ROOT / "stamp_min" / "config.py").read_text(), re.M)
        if not from_config:
            c.skip("scale_batched", "this Config has no tam_clones", status="not available")
        elif c.left() < LIMITS["scale_batched"]:
            c.skip("scale_batched", f"no time left ({c.left():.0f} s)")
        else:
            path = out / "scale_batched.json"
            args = SCALE_GPU + ["--tam-clones", "batched"]
            e = c.part("scale_batched", [PY, "bench/scale.py", *args, "--json", path], LIMITS["scale_batched"],
                       args=" ".join(args))
            if path.exists():
                e["result"] = json.loads(path.read_text())
            c.write()

    c.write()
    bad = [n for n, e in c.report["parts"].items() if e["status"] in ("failed", "timeout")]
    c.say(f"done in {time.monotonic() - c.start:.0f} s: {out / 'report.md'}" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def notebook_text(path, lines=40):
    """The last `lines` lines the executed notebook printed (stream and text outputs)."""
    try:
        nb = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return ""
    text = []
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []):
            t = o.get("text") or o.get("data", {}).get("text/plain") or (o.get("ename", "") + ": " + o.get("evalue", "")
                                                                          if o.get("output_type") == "error" else "")
            text += ("".join(t) if isinstance(t, list) else t).splitlines()
    return "\n".join(text[-lines:])


def number(text):
    """A recorded test property (a string in the XML) as a number where it is one."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def flat(d, prefix=""):
    """Scalars of a nested dict as (dotted key, value) rows."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            yield f"{prefix}{k}", v


def markdown(r):
    P = r["parts"]
    L = [f"# GPU check: {r['device'].get('name', '?')}", "",
         f"mode **{r['mode']}**; started {r['started']}, {r.get('wall_s', 0):.0f} s of the {r['budget_s']} s budget; "
         f"git {r['git']}; `{r['command']}`", ""]
    if r["results_folder"]:
        L += [f"Commit this folder's files under `{r['results_folder']}/`.", ""]
    L += ["## Device", "", "| | |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in r["device"].items()] + [""]
    L += ["## Parts", "", "| part | status | seconds | limit | log |", "|---|---|---|---|---|"]
    L += [f"| {n} | {e['status']} | {fmt(e.get('seconds'))} | {fmt(e.get('limit_s'))} | {e.get('log', e.get('why', ''))} |"
          for n, e in P.items()] + [""]
    if "tests" in P:
        e = P["tests"]
        L += ["## a. The GPU path's tests (pytest -m gpu tests/test_gpu.py)", "", f"{e['status']}: {e.get('summary', '')}",
              "", "| test | outcome | s | measured / message |", "|---|---|---|---|"]
        L += [f"| {t['test']} | {t['outcome']} | {fmt(t['seconds'])} | "
              f"{', '.join(f'{k} {fmt(number(v))}' for k, v in t['measured'].items()) or t['message']} |"
              for t in e.get("tests", [])] + [""]
    L += ["## b. Paper-scale shape: bench/scale.py on generated CIFAR-100-shaped data", ""]
    if r["mode"] == "dry":
        L += ["Dry run: a tiny CPU smoke of the script (2-conv CNN, 1 round per task); its numbers measure nothing.", ""]
    for name in ("scale_fp32", "scale_bf16", "scale_batched"):
        e = P.get(name)
        if not e:
            continue
        L += [f"### {name}: {e['status']}" + (f" (`{e['args']}`)" if e.get("args") else ""), ""]
        if "result" in e:
            s = e["result"]
            L += [f"{s['device_name']}, {s['size']} size; " + ", ".join(f"{k} {v}" for k, v in s["settings"].items()), "",
                  s["table"], ""]
        else:
            L += [e.get("why") or "```\n" + e.get("tail", "") + "\n```", ""]
    e = P.get("notebook", {})
    L += ["## c. Notebook 07 (nbclient, STAMP_SMOKE=0 STAMP_GPU_CHECK=1)", "", f"{e.get('status')}: "
          + (e.get("why") or "saved as 07_full_gpu_run.ipynb; its last printed lines:"), ""]
    if e.get("outputs"):
        L += ["```", e["outputs"], "```", ""]
    e = P.get("probe", {})
    L += ["## d. Batched clones probe (bench/clones_probe.py)", "", f"{e.get('status')}" + (f": {e['why']}" if e.get("why") else ""), ""]
    if isinstance(e.get("result"), dict):
        L += ["| measure | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in flat(e["result"])] + [""]
    for name, e in P.items():
        if e.get("tail") and name not in ("scale_fp32", "scale_bf16", "scale_batched"):
            L += [f"### {name}: {e['status']}, last lines of {e['log']}", "", "```", e["tail"], "```", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
