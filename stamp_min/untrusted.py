"""Data from outside, checked before use: a checkpoint file's contents, a Flower client's reply.

Nothing read from a file or a network may steer the program into a crash, a hang or a silent
wrong result, so every such value is checked against what this run itself would have made:

    tensors_like(value, ref, what)   exactly ref's names, and for each a tensor of ref's shape and
                                     dtype with finite values (a model θ, an update Δ, EWC's Fisher)
    plain(value, what, budget)       nested dicts, lists and tuples of numbers, strings, None and
                                     tensors, visited once each within a node and byte budget (a
                                     pickle can share one list a million times, or describe a
                                     tensor of 10¹² elements on a 4-byte storage)
    number(value, what, low, high)   an int or float (never a bool) in [low, high], finite
    check_dataset(ds)                a data.Dataset given from memory (`fcl_loop.run(cfg, dataset=…)`):
                                     arrays of one length, dtypes and shapes, labels in range,
                                     finite statistics

Each failure is a `Bad` (a UserError) whose one line names `what` and what was wrong; callers add
where it came from (the checkpoint's path, the client and round).
"""

import math

import torch

from . import UserError
from .data import Dataset


class Bad(UserError):
    """A value from outside that fails its check."""


def tensors_like(value, ref, what, finite=True):
    """`value` is a dict with exactly the names of `ref` ({name: tensor}), each a tensor of its
    shape and dtype, with finite values (when `finite`). Returns `value`."""
    if not isinstance(value, dict) or set(value) != set(ref):
        got = sorted(map(str, value))[:6] if isinstance(value, dict) else type(value).__name__
        missing = sorted(set(ref) - set(value))[:3] if isinstance(value, dict) else []
        extra = sorted(map(str, set(value) - set(ref)))[:3] if isinstance(value, dict) else []
        why = f"missing {missing}" if missing else f"unknown entries {extra}" if extra else f"{got}"
        raise Bad(f"{what} does not have the model's entries ({why}); allowed: exactly θ's {len(ref)} entries")
    for n, r in ref.items():
        v = value[n]
        if not torch.is_tensor(v):
            raise Bad(f"{what}[{n!r}] is a {type(v).__name__}; allowed: a tensor")
        if v.shape != r.shape or v.dtype != r.dtype:
            raise Bad(f"{what}[{n!r}] is {tuple(v.shape)} {str(v.dtype)[6:]}; allowed: {tuple(r.shape)} {str(r.dtype)[6:]}")
        if finite and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise Bad(f"{what}[{n!r}] is not finite (NaN/inf); allowed: finite values")
    return value


def number(value, what, low=-math.inf, high=math.inf, kind=(int, float)):
    """An int (or float, if `kind` allows) in [low, high], finite; never a bool."""
    if type(value) not in ((kind,) if isinstance(kind, type) else kind):
        names = kind.__name__ if isinstance(kind, type) else "a number"
        raise Bad(f"{what}={value!r:.60} is a {type(value).__name__}; allowed: {names}")
    if not math.isfinite(value):
        raise Bad(f"{what}={value!r} is not finite; allowed: a finite number")
    if not low <= value <= high:
        raise Bad(f"{what}={value!r} is out of range; allowed: {low:g} <= {what} <= {high:g}")
    return value


LEAVES = (int, float, str, bool, type(None))


def plain(value, what, budget=None, finite=True):
    """`value` is plain data: dicts, lists, tuples, numbers, strings, None, tensors (finite when
    floating, if `finite`). budget: {"nodes": n, "bytes": b}, spent as the walk goes (shared by calls that pass
    the same dict): a structure that visits more nodes or holds more tensor bytes than that is
    refused before anything computes on it. Returns `value`."""
    budget = {"nodes": 10**6, "bytes": 2**34} if budget is None else budget
    stack = [(value, what)]
    while stack:
        v, where = stack.pop()
        budget["nodes"] -= 1
        if budget["nodes"] < 0:
            raise Bad(f"{what} has too many parts (shared or nested beyond what this run can write); allowed: "
                      f"a structure written by stamp_min")
        if torch.is_tensor(v):
            budget["bytes"] -= v.numel() * v.element_size()            # logical size: a stride-0 view counts whole
            if budget["bytes"] < 0:
                raise Bad(f"{where} makes {what} larger than this run can write; allowed: a structure written by stamp_min")
            if finite and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise Bad(f"{where} is not finite (NaN/inf); allowed: finite values")
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, (str, int, tuple)):
                    raise Bad(f"{where} has a key of kind {type(k).__name__}; allowed: str, int or tuple keys")
                stack += [(k, f"{where} key"), (x, f"{where}[{k!r:.40}]")]
        elif isinstance(v, (list, tuple)):
            stack += [(x, f"{where}[{i}]") for i, x in enumerate(v)]
        elif type(v) not in LEAVES:
            raise Bad(f"{where} is a {type(v).__name__}; allowed: numbers, strings, None, tensors, lists and dicts")
        elif type(v) is float and not math.isfinite(v) and not math.isnan(v):
            raise Bad(f"{where}={v} is infinite; allowed: finite numbers (or NaN for 'not measured')")
    return value


def check_dataset(ds):
    """A Dataset from outside the loaders (`fcl_loop.run(cfg, dataset=…)`), checked before use:
    one UserError line naming the field that is wrong and what it must be."""
    if not isinstance(ds, Dataset):
        raise UserError(f"dataset={type(ds).__name__} is not a data.Dataset; allowed: None or a data.Dataset "
                        f"(rules are keywords: run(cfg, aggregate=f))")
    C = ds.num_classes
    if type(C) is not int or C < 1:
        raise UserError(f"dataset.num_classes={C!r}; allowed: a positive int")
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and len(x) > 0 and x.shape[2] == x.shape[3]):
            got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise UserError(f"dataset.x_{split} is {got}; allowed: a uint8 tensor (N, C, H, H) with N >= 1")
        if not (torch.is_tensor(y) and y.dtype == torch.int64 and tuple(y.shape) == (len(x),)):
            got = f"{y.dtype} {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
            raise UserError(f"dataset.y_{split} is {got} for {len(x)} images in x_{split}; allowed: int64 ({len(x)},)")
        if int(y.min()) < 0 or int(y.max()) >= C:
            raise UserError(f"dataset.y_{split} holds label {int(y.min()) if int(y.min()) < 0 else int(y.max())}; "
                            f"allowed: 0..{C - 1} (num_classes={C})")
    if ds.x_test.shape[1:] != ds.x_train.shape[1:]:
        raise UserError(f"dataset.x_test has images {tuple(ds.x_test.shape[1:])}, x_train {tuple(ds.x_train.shape[1:])}; "
                        f"allowed: one image shape")
    for name in ("mean", "std"):
        v = getattr(ds, name)
        ok = isinstance(v, (tuple, list)) and len(v) == ds.in_channels and all(
            type(a) in (int, float) and math.isfinite(a) and (name == "mean" or a > 0) for a in v)
        if not ok:
            raise UserError(f"dataset.{name}={v!r:.60}; allowed: {ds.in_channels} finite numbers (one per channel"
                            f"{', each > 0' if name == 'std' else ''})")
