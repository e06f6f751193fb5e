"""Helpers for the course notebooks: where things are, which device to use, checking an exercise,
and words computed from numbers (so that a printed sentence stays true when a setting changes).

Every notebook starts with the same setup cell (its text lives in `notebooks/setup_cell.py`): it
finds this package beside the notebook, or clones it on Colab, and then imports from here.

    DEVICE = course.device()                      # prints the device; without a GPU, how to get one
    course.check_close("average accuracy", course.attempt(my_function, A), metrics.average_accuracy(A))
    guess = course.prediction(my_guess, ("higher", "lower"))   # None (and a line) until a guess is written
    if guess is not None:                                      # ... run the experiment, then
        course.check("your prediction", guess == measured_word, hint="...")
    print(f"the step is {course.sign_word(ip)} on client 0")   # 'negative' / 'positive' / 'zero'
"""

from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent          # the repository (a clone, or /content/stamp_min on Colab)
DATA_ROOT = ROOT / "data"                              # datasets the user downloaded (CIFAR, an image folder)
NO_GPU = ("no GPU here, so everything runs on the CPU (fine for notebooks 01-06 and 08-10). For a GPU: on "
          "Colab, Runtime → Change runtime type → a GPU, then run the notebook again; elsewhere, a machine with an "
          "NVIDIA GPU and a CUDA build of torch")


def bf16_native(device):
    """True when `device` computes in bfloat16 natively (CUDA, compute capability ≥ 8.0: A100, H100, …).
    Older GPUs only emulate it (slower than fp32), and the CPU path of this course stays in fp32."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def device(want="auto", quiet=False):
    """The torch.device to use: 'auto' → CUDA when there is one, else the CPU. Prints what it chose:
    the GPU's name, memory and bf16 support, or, without a GPU, how to get one."""
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={want!r}: allowed 'auto', 'cpu' or 'cuda'")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device='cuda' but torch sees no GPU: {NO_GPU}")
    d = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    if not quiet:
        if d.type == "cuda":
            p = torch.cuda.get_device_properties(d)
            print(f"device: cuda ({p.name}, {p.total_memory / 2**30:.0f} GiB, "
                  f"bf16 {'native' if bf16_native(d) else 'not native: stay in fp32'})")
        else:
            print(f"device: cpu ({torch.get_num_threads()} threads) — {NO_GPU}" if want == "auto" else "device: cpu")
    return d


class Checked:
    """What a check returns: true when the answer is right. It shows nothing in a notebook, so a cell
    that ends with a check prints its one line and no stray True/False under it."""

    def __init__(self, ok):
        self.ok = bool(ok)

    def __bool__(self):
        return self.ok

    def __repr__(self):
        return f"Checked({self.ok})"

    def _ipython_display_(self):            # IPython calls this instead of showing the repr: nothing
        pass


class Raised:
    """What `attempt` returns when the student's code raised: the error, for the check's hint."""

    def __init__(self, error):
        self.error = error

    def __repr__(self):
        return f"{type(self.error).__name__}: {self.error}"


def attempt(fn, *args, **kwargs):
    """fn(*args, **kwargs), or a `Raised` when the student's half-written code raises: the check then
    says "not yet" with the error, instead of a traceback that stops the notebook."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:                  # noqa: BLE001 - any mistake in an answer is a hint, not a crash
        return Raised(e)


def check(name, ok, hint=""):
    """Say whether an exercise's answer is right; a wrong one gets the hint. Returns a `Checked`."""
    ok = bool(ok)
    print(f"✔ {name}: right" if ok else f"✘ {name}: not yet" + (f" — hint: {hint}" if hint else ""))
    return Checked(ok)


def raised(x):
    """The `Raised` errors in an answer (it may be a list of attempts)."""
    if isinstance(x, Raised):
        return [x]
    return [e for v in x for e in raised(v)] if isinstance(x, (list, tuple)) else []


def unanswered(x):
    """True while an answer is still the `...` placeholder (or holds one, e.g. a list of them)."""
    if x is ... or x is None:
        return True
    if isinstance(x, (list, tuple)):
        return any(unanswered(v) for v in x)
    if isinstance(x, dict):
        return any(unanswered(v) for v in x.values())
    return False


def numbers(x):
    """An answer as a float array: a number, a tensor, a NumPy array, or a (nested) list or tuple of
    them, e.g. a list of 0-d tensors. Raises ValueError, naming what it got, for anything else."""
    if torch.is_tensor(x):
        return x.detach().cpu().double().numpy()
    if isinstance(x, (list, tuple)):
        parts = [numbers(v) for v in x]
        if len({p.shape for p in parts}) > 1:
            raise ValueError(f"a list of pieces of different shapes {sorted({p.shape for p in parts})}")
        return np.array(parts, dtype=float).reshape(len(parts), *(parts[0].shape if parts else ()))
    try:
        return np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{type(x).__name__} {x!r:.60}") from None


def check_close(name, got, want, rtol=1e-4, atol=1e-6, hint="", reveal=True):
    """check() for numbers: `got` (a number, list, array or tensor, in any of these types) equals `want`
    within rtol/atol. A single wrong number is shown with the expected one when `reveal` (leave it False
    for a prediction). A placeholder, a wrong shape or an error is a hint, never a traceback."""
    more = f"; {hint}" if hint else ""
    error = next(iter(raised(got)), None)
    if error is not None:
        return check(name, False, f"your code raised {error!r}{more}")
    if unanswered(got):
        return check(name, False, hint or "replace the ... with your code")
    try:
        g = numbers(got)
    except ValueError as e:
        return check(name, False, f"expected numbers (a number, list, array or tensor), got {e}{more}")
    w = numbers(want)
    if g.shape != w.shape:
        if g.size != w.size or g.squeeze().shape != w.squeeze().shape:
            return check(name, False, f"shape {g.shape}, expected {w.shape}{more}")
        g = g.reshape(w.shape)                 # (5, 1) for (5,): the same numbers, accepted
    ok = bool(np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True))
    if not ok and g.size == 1:
        hint = f"got {g.item():.4g}" + (f", expected {w.item():.4g}" if reveal else "") + more
    return check(name, ok, hint)


def choice(guess, choices):
    """`guess` as one of `choices`, or None: strings match without case or surrounding blanks ("tam" is
    "TAM", "true" is True), numbers match by value (3.0, a 0-d tensor or "3" is 3)."""
    for c in choices:
        if isinstance(c, (str, bool)):
            if isinstance(guess, str) and guess.strip().lower() == str(c).lower():
                return c
            if isinstance(c, bool) and isinstance(guess, (bool, np.bool_)) and bool(guess) == c:
                return c
        elif not isinstance(guess, bool):
            try:
                if float(guess) == float(c):
                    return c
            except (TypeError, ValueError, RuntimeError):
                pass
    return None


def prediction(guess, choices, name="your prediction"):
    """A prediction exercise's gate: the guess as one of `choices`, or None after one "not yet" line saying
    what to write. The cell runs its experiment (and shows its result) only once a guess is written, so
    nothing gives the answer away before the prediction."""
    c = choice(guess, choices)
    if c is None:
        words = " or ".join(repr(x) for x in choices) if len(choices) <= 4 else \
            f"one of {choices[0]!r} … {choices[-1]!r}"
        check(name, False, ("write your prediction first: " if unanswered(guess) else f"{guess!r} is not a choice: write ")
              + words + ", then run this cell")
    return c


def sign_word(x, negative="negative", positive="positive", zero="zero", tol=0.0):
    """The word for the sign of x (|x| ≤ tol counts as zero)."""
    x = float(x)
    return zero if abs(x) <= tol else (positive if x > 0 else negative)


def compare(a, b, more="higher", less="lower", same="level with", tol=0.0):
    """The word that puts a beside b: 'higher' / 'lower' / 'level with' (|a − b| ≤ tol)."""
    return sign_word(float(a) - float(b), negative=less, positive=more, zero=same, tol=tol)


def minutes(seconds):
    """'42 s' or '3.5 min': a duration for a sentence."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
