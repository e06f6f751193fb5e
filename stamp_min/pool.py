"""Many runs at once: local worker processes or a Ray cluster, every finished run cached on disk.

A job is one experiment: `Job(cfg, rules, data)`, run as `fcl_loop.run(cfg, data(cfg), **rules)`
(data: a function of the Config that returns a data.Dataset, or None for cfg.dataset), or as
`flora_loop.run(cfg)` when cfg is a flora_loop.Config.
`run_all(jobs, workers=N)` runs them N at a time and returns their results in order:

    cache       every finished run is written at once (atomically) to
                <cache>/<key[:2]>/<key>.json, where key = sha256 of what decides the result:
                the Config's fields (not out, quiet, plot, name), every rule's identity
                (qualified name, a hash of its code, the values a closure or partial fixes), the
                data function's identity, the package's code (a hash of stamp_min/*.py but study.py
                and tuning.py, which choose the runs and never run in one, as this process imported
                it) and torch's version. A job whose key is there is not run again, so an interrupted
                call, called again, computes only what is missing; Ctrl-C or SIGTERM loses at
                most the runs in flight.
    same bits   every run uses one thread (torch.set_num_threads(1)) wherever it runs, so N
                workers, one worker and a Ray cluster give the same bits.
    not sent    a job that cannot be pickled (a rule that is a lambda or a closure) cannot go to
                another process: it runs here, serially, after a one-line note saying which rule
                to move to module level to run it in parallel. (Ray pickles functions by value
                and takes them all.)

A run that diverges (a UserError) is a result too: {"error": message}, cached like any other.
"""

import hashlib
import inspect
import json
import math
import multiprocessing
import pickle
import signal
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from . import UserError
from .cli import _clean, write_json
from . import flora_loop
from .fcl_loop import run        # imported here, once: forked workers inherit it instead of importing it each

NOT_IN_KEY = ("out", "quiet", "plot", "name")        # fields that change no number of a run


@dataclass
class Job:
    cfg: object                                      # a Config
    rules: dict = field(default_factory=dict)        # keywords of fcl_loop.run: client_update, aggregate, ...
    data: object = None                              # None, or a function cfg -> data.Dataset


NOT_A_RUN = ("study.py", "tuning.py")      # they choose which runs to ask for; a run never imports them (tested)


def code_version():
    """sha256 of the package's source files a run may execute (all but NOT_A_RUN): a cached run is
    reused only by the same code, and a fix to how a study tunes or compares keeps its cached runs."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).resolve().parent.glob("*.py")):
        if f.name in NOT_A_RUN:
            continue
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


VERSION = code_version()        # the code this process imported (an edit made while it runs does not change it)


def identity(fn):
    """What makes a function's results: its qualified name, a hash of its code, and the values a
    partial or a closure fixes (recursively for functions among them)."""
    if fn is None:
        return None
    if isinstance(fn, partial):
        return [identity(fn.func), [identity(a) if callable(a) else repr(a) for a in fn.args],
                {k: identity(v) if callable(v) else repr(v) for k, v in sorted(fn.keywords.items())}]
    try:
        code = inspect.getsource(fn)
    except (OSError, TypeError):
        code = repr(getattr(getattr(fn, "__code__", None), "co_code", fn))
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
    return [f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}",
            hashlib.sha256(code.encode()).hexdigest()[:16], [identity(c) if callable(c) else repr(c) for c in cells]]


def key(job, version):
    """The cache key of a job (see the module docstring)."""
    cfg = {k: v for k, v in asdict(job.cfg).items() if k not in NOT_IN_KEY}
    what = {"cfg": cfg, "rules": {k: identity(v) for k, v in sorted(job.rules.items())}, "data": identity(job.data),
            "code": version, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()


def execute(job):
    """Run one job with one thread; the results dict, or {"error": message} if it failed as a
    UserError (e.g. diverged at this learning rate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if isinstance(job.cfg, flora_loop.Config):
            return flora_loop.run(job.cfg)
        return run(job.cfg, job.data(job.cfg) if job.data else None, **job.rules)
    except UserError as e:
        return {"error": str(e)}
    finally:
        torch.set_num_threads(threads)


def _warm():
    """Do once here, before any run, what a process's first run would do inside its timed part: the
    lazy import behind torch's optimisers (torch._dynamo, seconds). Forked workers inherit it, and no
    run's wall_time_s counts it, serial runs' included."""
    w = torch.zeros(1, requires_grad=True)
    w.sum().backward()
    torch.optim.SGD([w], lr=0.1).step()


def _indexed(item):
    i, job = item
    return i, execute(job)


def _quiet_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the parent's to handle: it stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)     # and the pool stops its workers with SIGTERM, quietly


def sendable(job):
    """Can the job be pickled for another process? (a lambda or a closure cannot)"""
    try:
        pickle.dumps(job)
        return True
    except (pickle.PicklingError, AttributeError, TypeError):
        return False


def _blocker(job):
    """The rule that stops a job from being pickled, named for the note."""
    for k, fn in [*job.rules.items(), ("data", job.data)]:
        try:
            pickle.dumps(fn)
        except (pickle.PicklingError, AttributeError, TypeError):
            return f"{k}={getattr(fn, '__qualname__', fn)}"
    return "a setting"


def _read(path):
    try:
        res = json.loads(path.read_text())
        return res if isinstance(res, dict) else None
    except (OSError, ValueError):
        return None                                   # damaged: run it again


class Progress:
    """One line per finished run: done / total, from the cache, elapsed, an estimate of the time left."""

    def __init__(self, total, cached, workers, say):
        self.total, self.done, self.cached, self.workers, self.say = total, cached, cached, max(1, workers), say
        self.start, self.last = time.perf_counter(), 0.0

    def step(self):
        self.done += 1
        now = time.perf_counter()
        if now - self.last < 2 and self.done < self.total:
            return
        self.last = now
        ran, elapsed = self.done - self.cached, now - self.start
        left = elapsed / ran * (self.total - self.done) if ran else math.nan
        self.say(f"  {self.done}/{self.total} runs ({self.cached} from the cache), {elapsed:.0f} s"
                 + (f", about {left:.0f} s left" if self.done < self.total else ""))


def run_all(jobs, workers=1, cache=None, engine="local", address=None, resources=None, say=print):
    """Results of `jobs` (a list of Job), in order. workers: runs at a time on this machine;
    engine "ray": send them to the Ray cluster at `address` (None: start a local one), each asking
    for `resources` (default {"num_cpus": 1}; e.g. {"num_gpus": 0.25}). cache: a folder, or None."""
    if engine not in ("local", "ray"):
        raise UserError(f"engine={engine!r} is unknown; allowed: local, ray")
    if not (isinstance(workers, int) and 1 <= workers <= 1024):
        raise UserError(f"workers={workers!r}; allowed: an int from 1 to 1024")
    version, out = VERSION, [None] * len(jobs)
    paths = [Path(cache) / k[:2] / f"{k}.json" if cache else None for k in (key(j, version) for j in jobs)]
    todo = []
    for i, p in enumerate(paths):
        out[i] = _read(p) if p is not None and p.exists() else None
        if out[i] is None:
            todo.append(i)
    progress = Progress(len(jobs), len(jobs) - len(todo), workers, say)

    def finish(i, res):
        out[i] = json.loads(json.dumps(_clean(res)))    # as the cache gives it back: NaN as None, tuples as lists
        if paths[i] is not None:
            write_json(paths[i], out[i])
        progress.step()

    if engine == "ray":
        _run_ray(jobs, todo, address, resources or {"num_cpus": 1}, finish)
        return out
    here = [i for i in todo if workers == 1 or not sendable(jobs[i])]
    for note in sorted({_blocker(jobs[i]) for i in here} if workers > 1 else ()):
        say(f"note: {note} cannot be sent to another process (a lambda or a closure); its runs go one after "
            f"another in this process (define it at module level to run it in parallel)")
    there = [i for i in todo if i not in set(here)]
    if not todo:
        say(f"  {len(jobs)}/{len(jobs)} runs from the cache")
    else:
        _warm()
    pool = multiprocessing.get_context().Pool(min(workers, len(there)), _quiet_worker) if there else None
    try:
        results = pool.imap_unordered(_indexed, [(i, jobs[i]) for i in there]) if pool else ()
        for i in here:
            finish(i, execute(jobs[i]))
        for i, res in results:
            finish(i, res)
    finally:
        if pool is not None:
            pool.terminate()                          # done, or interrupted: the runs in flight are lost
            pool.join()
    return out


def _run_ray(jobs, todo, address, resources, finish):
    try:
        import ray
    except ImportError:
        raise UserError("engine='ray' needs Ray; allowed: pip install -r requirements-flower.txt "
                        "(Flower's simulation extra brings it), or engine='local'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    remote = ray.remote(**resources)(execute)
    pending = {remote.remote(jobs[i]): i for i in todo}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            finish(pending.pop(done[0]), ray.get(done[0]))
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
