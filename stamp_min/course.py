"""Helpers for the course notebooks: where things are, which device to use, checking an exercise,
and words computed from numbers (so that a printed sentence stays true when a setting changes).

Every notebook starts with the same setup cell (its text lives in `notebooks/setup_cell.py`): it
finds this package beside the notebook, or clones it on Colab, and then imports from here.

    DEVICE = course.device()                      # prints the device; without a GPU, how to get one
    course.check_close("forgetting of task 0", mine, metrics.forgetting(A)[0])
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


def check(name, ok, hint=""):
    """Say whether an exercise's answer is right; a wrong one gets the hint. Returns ok."""
    ok = bool(ok)
    print(f"✔ {name}: right" if ok else f"✘ {name}: not yet" + (f" — hint: {hint}" if hint else ""))
    return ok


def check_close(name, got, want, rtol=1e-4, atol=1e-6, hint=""):
    """check() for numbers, arrays or tensors: same shape and equal within rtol/atol of `want`."""
    if got is None or got is ...:
        return check(name, False, hint or "replace the ... with your code")
    g = np.asarray(got.detach().cpu() if torch.is_tensor(got) else got, dtype=float)
    w = np.asarray(want.detach().cpu() if torch.is_tensor(want) else want, dtype=float)
    if g.shape != w.shape:
        return check(name, False, f"shape {g.shape}, expected {w.shape}" + (f"; {hint}" if hint else ""))
    ok = bool(np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True))
    if not ok and g.size == 1:
        hint = f"got {g.item():.4g}, expected {w.item():.4g}" + (f"; {hint}" if hint else "")
    return check(name, ok, hint)


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
