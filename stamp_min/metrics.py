"""Continual-learning metrics and cost accounting (METHOD §1.6). Pure functions on arrays.

The accuracy matrix A (T x T) holds A[t, j] = accuracy of the global model after training task t
on the test data of task j (pooled over clients: each client's own classes for its task j).
Entries with j > t (tasks not seen yet) are NaN and never used.

    average accuracy  = mean_j A[T-1, j]                                  (after the last task)
    forgetting        = mean_{j<T-1} ( max_{j<=t<T-1} A[t, j] - A[T-1, j] )
    BWT               = mean_{j<T-1} ( A[T-1, j] - A[j, j] )              (backward transfer)

With one task there is nothing to forget: forgetting and BWT are NaN (null in JSON).

A[t, j] itself comes from `task_accuracy`: the model's argmax over all classes on the test
images of task j of every client, pooled.

The authors' logs report *current-task accuracy*: for each task, the best accuracy on that
task's own test data over the task's rounds. It says nothing about forgetting, so it is reported
under that name, never as "accuracy".
"""

import math

import torch


def _matrix(acc):
    A = torch.as_tensor(acc, dtype=torch.float64)
    assert A.ndim == 2 and A.shape[0] == A.shape[1], f"accuracy matrix must be square, got {tuple(A.shape)}"
    return A


def average_accuracy(acc):
    A = _matrix(acc)
    return A[-1].mean().item()


def forgetting(acc):
    A = _matrix(acc)
    T = A.shape[0]
    if T < 2:
        return math.nan
    # best accuracy on task j before the last task, over the steps at which j had been seen
    best = [A[j:T - 1, j].max() for j in range(T - 1)]
    return torch.stack([b - A[T - 1, j] for j, b in enumerate(best)]).mean().item()


def bwt(acc):
    A = _matrix(acc)
    T = A.shape[0]
    if T < 2:
        return math.nan
    return (A[T - 1, :T - 1] - A.diagonal()[:T - 1]).mean().item()


def current_task_accuracy(round_acc):
    """round_acc[t] = list of current-task accuracies over task t's rounds -> best per task."""
    return [max(r) for r in round_acc]


def summary(acc):
    return {"avg_accuracy": average_accuracy(acc), "avg_forgetting": forgetting(acc), "bwt": bwt(acc)}


def t_quantile(p, df):
    """Student t quantile with df degrees of freedom (scipy, which scikit-learn brings): the one used
    by every 95 % interval of the library, its notebooks and bench/claims.py."""
    from scipy.stats import t
    return float(t.ppf(p, df))


def paired_interval(d, level=0.95):
    """(mean, low, high) of the Student-t interval of paired differences d (one per seed):
    mean ± t(1 − (1 − level)/2, n − 1) · sd(d) / √n; (mean, −inf, inf) for fewer than 2."""
    n = len(d)
    m = sum(d) / n if n else math.nan
    if n < 2:
        return m, -math.inf, math.inf
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    half = t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    return m, m - half, m + half


def verdict(low, high, kind="better", delta=0.01):
    """THE VERDICT RULE of every comparison in the library, its notebooks and the claims bench,
    from the 95 % interval [low, high] of the paired differences d = A − B (signed so that d > 0
    is what the claim says) and δ, the smallest effect worth reporting:

      "better"  (A beats B)  supported     the whole interval is above 0 (however small the gain)
                             contradicted  the whole interval is below 0, or it contains 0 and lies
                                           inside (−δ, δ): no sign of a gain, and none as large as δ
                             inconclusive  otherwise
      "same"    (A equals B, an equivalence test)
                             supported     the whole interval lies inside (−δ, δ)
                             contradicted  the whole interval lies outside it (low ≥ δ or high ≤ −δ)
                             inconclusive  otherwise (e.g. it excludes 0 but reaches inside ±δ)

    A claim made of several comparisons is supported when every part is, contradicted when any
    part is (`combined`). No correction for multiplicity: of many 95 % intervals, a few that
    barely exclude 0 may do so by chance."""
    if kind == "better":
        if low > 0:
            return "supported"
        return "contradicted" if high < 0 or (-delta < low and high < delta) else "inconclusive"
    if kind == "same":
        if -delta < low and high < delta:
            return "supported"
        return "contradicted" if low >= delta or high <= -delta else "inconclusive"
    raise ValueError(f"kind={kind!r}; allowed: better, same")


def combined(verdicts):
    """A claim of several comparisons: supported if all are, contradicted if any is."""
    verdicts = list(verdicts)
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    return "contradicted" if "contradicted" in verdicts else "inconclusive"


def tensor_bytes(tensors):
    """Bytes of the tensors in a collection: a dict's values or a list, nested (other values count 0)."""
    if torch.is_tensor(tensors):
        return tensors.numel() * tensors.element_size()
    items = tensors.values() if isinstance(tensors, dict) else tensors if isinstance(tensors, (list, tuple)) else ()
    return sum(tensor_bytes(t) for t in items)


# ----------------------------------------------------------------------------------------------
# filling A[t, j]: accuracy of a model

@torch.no_grad()
def correct(model, x, y, batch_size=1024):
    """Number of images of (x, y) the model classifies right (argmax over all classes), in eval
    mode; the model is left in the mode it came in."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        hits += (logits.argmax(1) == y[i:i + batch_size].to(device)).sum().item()
    model.train(was_training)
    return hits


def task_accuracy(model, ds, scenario, t):
    """Accuracy on task t of every client, pooled (each client's own classes for its task t)."""
    idx = torch.cat([scenario.tasks[k][t].test_idx for k in range(scenario.num_clients)])
    return correct(model, ds.x_test[idx], ds.y_test[idx]) / len(idx)
