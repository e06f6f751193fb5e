"""The teachers' key: for every exercise of the course, the reference answer and the typical wrong answers,
each named by the mistake it makes, written as edits of the exercise's own cell (old text -> new text).

    python notebooks/solutions/key.py              # writes notebooks/solutions/NN_*.ipynb: every exercise solved
    python notebooks/solutions/key.py --execute    # and runs them in full (about as long as the course itself),
                                                   # listing any check that does not say "right"

The students' notebooks keep only the hints. tests/test_exercises.py runs each exercise's cell, in the
notebook's own kernel after a smoke run, with the reference answer (every check must say right), with the
other right answers (a tensor where an int was asked, a list where an array was), and with every wrong answer
(a check must say "not yet" with a hint, and nothing may raise). Predictions ("predict, then check") are
tested with every choice: exactly one is right, whatever the run measured; `answer` is the one a full CPU
run of the committed notebook measures, for the solved notebooks.

An exercise:  ex(cell, answer, wrong, right={}, before="")
    cell    a piece of text found in that exercise's code cell and in no other cell
    answer  {old: new} edits of the cell that make it the reference answer
    wrong   {mistake: edits}: at least two typical wrong answers
    right   {what: edits}: other answers that must count as right
    before  code run first in the kernel (e.g. a switch in the settings cell)
A prediction: guess(cell, placeholder, choices, answer, before="")
    placeholder  the line `name = ...` the student edits; every choice is tried in its place
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = HERE.parent


def ex(cell, answer, wrong, right=None, before=""):
    assert len(wrong) >= 2, f"{cell}: at least two typical wrong answers"
    return dict(kind="code", cell=cell, answer=answer, wrong=wrong, right=right or {}, before=before)


def guess(cell, placeholder, choices, answer, before=""):
    return dict(kind="prediction", cell=cell, placeholder=placeholder, choices=tuple(choices), answer=answer,
                before=before)


def predicted(placeholder, value):
    """The placeholder line with `value` written in (its comment kept)."""
    name, _, comment = placeholder.partition("...")
    return f"{name}{value!r}{comment}"


DECIDE = 'my_decide = ...          # def my_decide(parts, seeds): ...  ->  "beats replay", "mixed", "worse" or "not shown"'

KEY = {
    "01": [
        ex("ip_mine = ...",
           {"ip_mine = ...": "ip_mine = [sum(float((mean_delta[n] * d[n]).sum()) for n in d) for d in deltas]"},
           right={"a list of 0-d tensors": {"ip_mine = ...": "ip_mine = [sum((mean_delta[n] * d[n]).sum() for n in d) for d in deltas]"}},
           wrong={"cosines instead of inner products":
                  {"ip_mine = ...": "ip_mine = gradmatch.cosine_matrix(gradmatch.gram(deltas + [mean_delta]))[-1, :-1]"},
                  "one parameter tensor only":
                  {"ip_mine = ...": "ip_mine = [float((mean_delta[n] * d[n]).sum()) for d in deltas for n in list(d)[:1]]"},
                  "the sum of the updates, not their mean":
                  {"ip_mine = ...": "ip_mine = [len(deltas) * sum(float((mean_delta[n] * d[n]).sum()) for n in d) for d in deltas]"}}),
        ex("PREDICT_SMALL = ...",
           {"PREDICT_SMALL = ...": 'PREDICT_SMALL = "lower"', "PREDICT_FULL = ...": 'PREDICT_FULL = "raise"'},
           right={"other spelling": {"PREDICT_SMALL = ...": 'PREDICT_SMALL = "Lower "', "PREDICT_FULL = ...": 'PREDICT_FULL = "RAISE"'}},
           wrong={"the first-order rule applied to the full step":
                  {"PREDICT_SMALL = ...": 'PREDICT_SMALL = "lower"', "PREDICT_FULL = ...": 'PREDICT_FULL = "lower"'},
                  "a conflict read off the picture: both raise":
                  {"PREDICT_SMALL = ...": 'PREDICT_SMALL = "raise"', "PREDICT_FULL = ...": 'PREDICT_FULL = "raise"'},
                  "a word that is not a choice":
                  {"PREDICT_SMALL = ...": 'PREDICT_SMALL = "down"', "PREDICT_FULL = ...": 'PREDICT_FULL = "up"'}}),
        ex("ratio_mine = ...",
           {"ratio_mine = ...": "norm = lambda v: float(sum(t.pow(2).sum() for t in v.values()).sqrt())\n"
                                "ratio_mine = norm(mean_delta) / (sum(norm(d) for d in deltas) / len(deltas))"},
           wrong={"the sum of the norms, not their mean":
                  {"ratio_mine = ...": "norm = lambda v: float(sum(t.pow(2).sum() for t in v.values()).sqrt())\n"
                                       "ratio_mine = norm(mean_delta) / sum(norm(d) for d in deltas)"},
                  "squared norms":
                  {"ratio_mine = ...": "sq = lambda v: float(sum(t.pow(2).sum() for t in v.values()))\n"
                                       "ratio_mine = sq(mean_delta) / (sum(sq(d) for d in deltas) / len(deltas))"}}),
    ],
    "02": [
        ex("def worst_ip(g):",
           {"    return ...       # min over i of ⟨d_i, g⟩, a float": "    return float((D @ g).min())"},
           right={"a 0-d tensor": {"    return ...       # min over i of ⟨d_i, g⟩, a float": "    return (D @ g).min()"}},
           wrong={"the largest inner product": {"    return ...       # min over i of ⟨d_i, g⟩, a float": "    return float((D @ g).max())"},
                  "the mean inner product": {"    return ...       # min over i of ⟨d_i, g⟩, a float": "    return float((D @ g).mean())"},
                  "which update, not the value": {"    return ...       # min over i of ⟨d_i, g⟩, a float": "    return int((D @ g).argmin())"}}),
        ex("c_mine = ...",
           {"c_mine = ...": "c_mine = next(c_ for c_ in np.arange(0, 2, 0.001) if float(D2[1] @ gradmatch.match(D2, c=c_)) > 0)"},
           wrong={"read off section 3's table (its first c that serves d2)": {"c_mine = ...": "c_mine = 0.5"},
                  "the library's default c": {"c_mine = ...": "c_mine = 0.25"}}),
        ex("PREDICT_DIST = ...",
           {"PREDICT_DIST = ...": "PREDICT_DIST = 0.25"},
           wrong={"no conflict, so GM stays on the mean": {"PREDICT_DIST = ...": "PREDICT_DIST = 0"},
                  "a whole ‖d̄‖ away": {"PREDICT_DIST = ...": "PREDICT_DIST = 1.0"}}),
    ],
    "03": [
        ex("def herding_step(z, picked):",
           {"    ...                                 # your code: return an int index\n    return ...":
            "    k = len(picked) + 1\n    d = ((z[picked].sum(0) + z) / k - p).norm(dim=1)\n    d[picked] = float('inf')\n"
            "    return int(d.argmin())"},
           right={"a tensor index": {"    ...                                 # your code: return an int index\n    return ...":
                                     "    k = len(picked) + 1\n    d = ((z[picked].sum(0) + z) / k - p).norm(dim=1)\n"
                                     "    d[picked] = float('inf')\n    return d.argmin()"}},
           wrong={"does not exclude the images already picked":
                  {"    ...                                 # your code: return an int index\n    return ...":
                   "    k = len(picked) + 1\n    return int(((z[picked].sum(0) + z) / k - p).norm(dim=1).argmin())"},
                  "the nearest image to p each time (the 'nearest' rule, not herding)":
                  {"    ...                                 # your code: return an int index\n    return ...":
                   "    d = (z - p).norm(dim=1)\n    d[picked] = float('inf')\n    return int(d.argmin())"},
                  "half-written: an error inside the step":
                  {"    ...                                 # your code: return an int index\n    return ...":
                   "    return int((z - p).norm(dim=1).argmin(picked))"}}),
        guess("PREDICT = ...", "PREDICT = ...      # \"higher\" or \"lower\" than with A_REF", ("higher", "lower"), "lower"),
        ex("m_random = ...",
           {"m_random = ...      # an int, or None":
            "m_random = next((m for m, y in zip(ms, curves['random']) if y <= curves['prototypical'][4]), None)"},
           wrong={"herding's own m": {"m_random = ...      # an int, or None": "m_random = 5"},
                  "the first m": {"m_random = ...      # an int, or None": "m_random = 1"},
                  "a word, not a number": {"m_random = ...      # an int, or None": "m_random = 'never'"}}),
    ],
    "04": [
        ex("def forgetting_of(A, j):",
           {"    return ...   # your code: best of column j in rows j … T−2, minus its last row":
            "    return np.max(A[j:T - 1, j]) - A[T - 1, j]"},
           right={"a Python float": {"    return ...   # your code: best of column j in rows j … T−2, minus its last row":
                                     "    return float(np.nanmax(A[j:T - 1, j]) - A[T - 1, j])"}},
           wrong={"includes the last row": {"    return ...   # your code: best of column j in rows j … T−2, minus its last row":
                                            "    return np.max(A[j:, j]) - A[T - 1, j]"},
                  "against the diagonal: that is −BWT": {"    return ...   # your code: best of column j in rows j … T−2, minus its last row":
                                                         "    return A[j, j] - A[T - 1, j]"}}),
        guess("TINY_BUFFER = 2", 'my_guess = ...          # "replay" or "TAM"', ("replay", "TAM"), "TAM"),
        guess("my_guess_within = ...", "my_guess_within = ...          # True or False: TAM with this change is within 0.02 of TAM",
              (True, False), True),
    ],
    "05": [
        ex("def fedavg_step(updates, sizes):",
           {"    return ...   # your code: {name: Σ_k n_k Δ_k[name] / Σ_k n_k for every name}":
            "    return {n: sum(k * u[n] for k, u in zip(sizes, updates)) / sum(sizes) for n in updates[0]}"},
           wrong={"the unweighted mean": {"    return ...   # your code: {name: Σ_k n_k Δ_k[name] / Σ_k n_k for every name}":
                                          "    return {n: sum(u[n] for u in updates) / len(updates) for n in updates[0]}"},
                  "the weighted sum, not divided by Σ n_k": {"    return ...   # your code: {name: Σ_k n_k Δ_k[name] / Σ_k n_k for every name}":
                                                             "    return {n: sum(k * u[n] for k, u in zip(sizes, updates)) for n in updates[0]}"},
                  "a list of tensors, not a dict by name": {"    return ...   # your code: {name: Σ_k n_k Δ_k[name] / Σ_k n_k for every name}":
                                                            "    return [sum(k * u[n] for k, u in zip(sizes, updates)) / sum(sizes) for n in updates[0]]"}}),
        ex("def inner_products(updates, step):",
           {"    return ...   # your code: a list of K numbers, ⟨Δ_k, step⟩ = Σ_name (Δ_k[name] * step[name]).sum()":
            "    return [sum((u[n] * step[n]).sum().item() for n in step) for u in updates]"},
           right={"a list of 0-d tensors": {"    return ...   # your code: a list of K numbers, ⟨Δ_k, step⟩ = Σ_name (Δ_k[name] * step[name]).sum()":
                                            "    return [sum((u[n] * step[n]).sum() for n in step) for u in updates]"}},
           wrong={"cosines, not inner products": {"    return ...   # your code: a list of K numbers, ⟨Δ_k, step⟩ = Σ_name (Δ_k[name] * step[name]).sum()":
                                                  "    nrm = lambda v: float(sum(t.pow(2).sum() for t in v.values()).sqrt())\n"
                                                  "    return [sum((u[n] * step[n]).sum().item() for n in step) / (nrm(u) * nrm(step)) for u in updates]"},
                  "one parameter tensor only": {"    return ...   # your code: a list of K numbers, ⟨Δ_k, step⟩ = Σ_name (Δ_k[name] * step[name]).sum()":
                                                "    return [(u[n] * step[n]).sum().item() for u in updates for n in list(step)[:1]]"}}),
        guess("C_BIG = 1.0", 'my_guess = ...          # "higher" or "lower": the smallest ⟨Δ_k, step⟩ with c = C_BIG than with the default c',
              ("higher", "lower"), "lower"),
        guess("my_guess_pairs = ...", "my_guess_pairs = ...     # a whole number", range(0, 11), 0),
    ],
    "06": [
        ex("def plain_mean(",
           {"    step = ...   # your code: {name: (1/K) Σ_k Δ_k[name]}":
            "    step = {n: sum(u[n] for u in updates) / len(updates) for n in theta}"},
           wrong={"FedAvg's weighted mean": {"    step = ...   # your code: {name: (1/K) Σ_k Δ_k[name]}":
                                             "    step = {n: sum(k * u[n] for k, u in zip(weights, updates)) / sum(weights) for n in theta}"},
                  "the sum, not the mean": {"    step = ...   # your code: {name: (1/K) Σ_k Δ_k[name]}":
                                            "    step = {n: sum(u[n] for u in updates) for n in theta}"}}),
        ex("def average_accuracy(A):",
           {"    return ...   # your code: the mean of the last row": "    return A[-1].mean()"},
           right={"a one-element list": {"    return ...   # your code: the mean of the last row": "    return [float(np.mean(A[-1]))]"}},
           wrong={"the mean of the diagonal": {"    return ...   # your code: the mean of the last row": "    return np.diag(A).mean()"},
                  "the mean of every entry": {"    return ...   # your code: the mean of the last row": "    return np.nanmean(A)"}}),
        guess("ETA = 2.0", 'my_guess = ...          # "higher" or "lower": STAMP with η_t = ETA against η_t = 1',
              ("higher", "lower"), None),
    ],
    "07": [
        ex("my_T = ...",
           {"my_T = ...": "my_T = 100 // 20", "my_tam_epochs = ...": "my_tam_epochs = R * K * E * sum(range(100 // 20))"},
           wrong={"PAPER's numbers (cpt = 2)": {"my_T = ...": "my_T = T", "my_tam_epochs = ...": "my_tam_epochs = W['tam_epochs']"},
                  "T = the classes per task": {"my_T = ...": "my_T = 20", "my_tam_epochs = ...": "my_tam_epochs = R * K * E * sum(range(20))"},
                  "Σ_t t up to T, one task too many": {"my_T = ...": "my_T = 5", "my_tam_epochs = ...": "my_tam_epochs = R * K * E * sum(range(6))"}}),
        ex("my_comm = ...",
           {"my_comm = ...": "my_comm = 2 * tensor_bytes(float_state(build_model(rc['model'], classes, channels, size))) "
                             "* rc['num_clients'] * rc['rounds_per_task'] * len(first_res['acc_matrix'])"},
           wrong={"one direction only": {"my_comm = ...": "my_comm = tensor_bytes(float_state(build_model(rc['model'], classes, channels, size))) "
                                                          "* rc['num_clients'] * rc['rounds_per_task'] * len(first_res['acc_matrix'])"},
                  "PAPER's model (100 classes, 3×32×32)": {"my_comm = ...": "my_comm = 2 * tensor_bytes(float_state(build_model(PAPER.model, 100, 3, 32))) "
                                                                           "* rc['num_clients'] * rc['rounds_per_task'] * len(first_res['acc_matrix'])"}}),
        guess("ROUNDS_TRY = ", 'my_guess = ...          # "higher", "lower" or "level with"', ("higher", "lower", "level with"), None),
    ],
    "08": [
        ex("my_cross = ...",
           {"my_cross = ...": "my_cross = 0.5 * sum(w[u] * w[v] * (Bs[u] - Bs[v]) @ (As[u] - As[v]) for u in range(U) for v in range(U))"},
           wrong={"without the ½": {"my_cross = ...": "my_cross = sum(w[u] * w[v] * (Bs[u] - Bs[v]) @ (As[u] - As[v]) for u in range(U) for v in range(U))"},
                  "unweighted": {"my_cross = ...": "my_cross = 0.5 * sum((Bs[u] - Bs[v]) @ (As[u] - As[v]) for u in range(U) for v in range(U)) / U**2"}}),
        ex("my_bound = ...",
           {"my_bound = ...": "S = torch.linalg.svdvals(F.target(As.double(), Bs.double(), w.double()))\n"
                              "my_bound = S[r:].pow(2).sum() / S.pow(2).sum()"},
           wrong={"singular values, not their squares": {"my_bound = ...": "S = torch.linalg.svdvals(F.target(As.double(), Bs.double(), w.double()))\n"
                                                                           "my_bound = S[r:].sum() / S.sum()"},
                  "one value too many discarded": {"my_bound = ...": "S = torch.linalg.svdvals(F.target(As.double(), Bs.double(), w.double()))\n"
                                                                     "my_bound = S[r - 1:].pow(2).sum() / S.pow(2).sum()"}}),
        ex("As_same = ...",
           {"As_same = ...           # (U, r, k), every client the same A": "As_same = As[:1].repeat(U, 1, 1)"},
           right={"expanded": {"As_same = ...           # (U, r, k), every client the same A": "As_same = As[0].expand(U, -1, -1)"}},
           wrong={"the clients' own A's": {"As_same = ...           # (U, r, k), every client the same A": "As_same = As.clone()"},
                  "one A, not one per client": {"As_same = ...           # (U, r, k), every client the same A": "As_same = As[0]"}}),
        guess("mild = run(", 'my_guess = ...          # "higher" or "lower"', ("higher", "lower"), None),
    ],
    "09": [
        ex("my_aggregate = ...",
           {"my_aggregate = ...": "my_aggregate = partial(server.aggregate, match=match_per_layer)"},
           wrong={"the library's aggregate, unchanged": {"my_aggregate = ...": "my_aggregate = server.aggregate"},
                  "the library's aggregate with the whole-model GM": {"my_aggregate = ...": "my_aggregate = partial(server.aggregate, match=gradmatch.match)"},
                  "the match function itself": {"my_aggregate = ...": "my_aggregate = match_per_layer"}}),
        ex("damped = ...",
           {"damped = ...": "def damped(model, theta, state, x, y, classes, cfg):\n"
                            "    delta, info = client.client_update(model, theta, state, x, y, classes, cfg)\n"
                            "    return {n: 0.5 * v for n, v in delta.items()}, info"},
           wrong={"the library's update, not halved": {"damped = ...": "def damped(model, theta, state, x, y, classes, cfg):\n"
                                                                       "    return client.client_update(model, theta, state, x, y, classes, cfg)"},
                  "the update without its info": {"damped = ...": "def damped(model, theta, state, x, y, classes, cfg):\n"
                                                                  "    delta, info = client.client_update(model, theta, state, x, y, classes, cfg)\n"
                                                                  "    return {n: 0.5 * v for n, v in delta.items()}"}}),
        ex("my_d = ...",
           {"my_d = ...": "my_d = [a - b for a, b in zip(st.values('stamp, GM per layer'), st.values('stamp'))]"},
           right={"a NumPy array": {"my_d = ...": "my_d = np.array(st.values('stamp, GM per layer')) - np.array(st.values('stamp'))"}},
           wrong={"the other way round": {"my_d = ...": "my_d = [b - a for a, b in zip(st.values('stamp, GM per layer'), st.values('stamp'))]"},
                  "the accuracies, not the differences": {"my_d = ...": "my_d = st.values('stamp, GM per layer')"}}),
        guess("pair = (", "my_guess = ...           # True: higher in every seed; False: not", (True, False), False),
        ex("my_thetas = ...",
           {"my_thetas = ...": "m, th, my_thetas = 0.0, 0.0, []\nfor s in S:\n    m = BETA * m + s\n    th = th + ETA * m\n"
                               "    my_thetas.append(th)"},
           right={"a tensor": {"my_thetas = ...": "m, th, my_thetas = 0.0, 0.0, []\nfor s in S:\n    m = BETA * m + s\n"
                                                  "    th = th + ETA * m\n    my_thetas.append(th)\nmy_thetas = torch.tensor(my_thetas)"}},
           wrong={"FedAdam's average (1 − β) s in m": {"my_thetas = ...": "m, th, my_thetas = 0.0, 0.0, []\nfor s in S:\n"
                                                     "    m = BETA * m + (1 - BETA) * s\n    th = th + ETA * m\n    my_thetas.append(th)"},
                  "the step itself, no momentum": {"my_thetas = ...": "th, my_thetas = 0.0, []\nfor s in S:\n    th = th + ETA * s\n"
                                                   "    my_thetas.append(th)"},
                  "the momentum m, not the weight": {"my_thetas = ...": "m, my_thetas = 0.0, []\nfor s in S:\n    m = BETA * m + s\n"
                                                     "    my_thetas.append(m)"}}),
    ],
    "10": [
        ex("my_verdict = ...",
           {"my_verdict = ...         # def my_verdict(low, high, delta): ...":
            "def my_verdict(low, high, delta):\n    if low > 0:\n        return 'supported'\n"
            "    if high < 0 or -delta < low and high < delta:\n        return 'contradicted'\n    return 'inconclusive'"},
           wrong={"without the (−δ, δ) part": {"my_verdict = ...         # def my_verdict(low, high, delta): ...":
                                              "def my_verdict(low, high, delta):\n"
                                              "    return 'supported' if low > 0 else 'contradicted' if high < 0 else 'inconclusive'"},
                  "the mean's sign alone": {"my_verdict = ...         # def my_verdict(low, high, delta): ...":
                                            "def my_verdict(low, high, delta):\n    return 'supported' if low + high > 0 else 'contradicted'"}}),
        guess('rerun("C4"', 'my_guess = ...           # "supported", "contradicted" or "inconclusive"',
              ("supported", "contradicted", "inconclusive"), None, before="RERUN = True"),
        guess("which = (", 'my_guess = ...           # "supported", "contradicted" or "inconclusive"',
              ("supported", "contradicted", "inconclusive"), None, before="RERUN = True"),
    ],
    "11": [
        ex("my_decide = ...",
           {DECIDE: "def my_decide(parts, seeds):\n    won = any(p['low'] > 0 and p['n'] == seeds for p in parts)\n"
                    "    lost = any(p['high'] < 0 for p in parts)\n"
                    "    return 'mixed' if won and lost else 'beats replay' if won else 'worse' if lost else 'not shown'"},
           right={"with a loop": {DECIDE: "def my_decide(parts, seeds):\n    won = lost = False\n    for p in parts:\n"
                                          "        won = won or (p['low'] > 0 and p['n'] == seeds)\n"
                                          "        lost = lost or p['high'] < 0\n    if won and lost:\n        return 'mixed'\n"
                                          "    return 'beats replay' if won else 'worse' if lost else 'not shown'"}},
           wrong={"a win with a failed seed": {DECIDE: "def my_decide(parts, seeds):\n    won = any(p['low'] > 0 for p in parts)\n"
                                                       "    lost = any(p['high'] < 0 for p in parts)\n    return 'mixed' if won and "
                                                       "lost else 'beats replay' if won else 'worse' if lost else 'not shown'"},
                  "one win is enough, losses ignored": {DECIDE: "def my_decide(parts, seeds):\n    won = any(p['low'] > 0 and "
                                                                "p['n'] == seeds for p in parts)\n    lost = any(p['high'] < 0 for "
                                                                "p in parts)\n    return 'beats replay' if won else 'worse' if lost "
                                                                "else 'not shown'"},
                  "the verdict's 'contradicted' (inside ±δ) as a loss": {
                      DECIDE: "def my_decide(parts, seeds):\n    won = any(p['low'] > 0 and p['n'] == seeds for p in parts)\n"
                              "    lost = any(p['high'] < 0 or (-0.01 < p['low'] and p['high'] < 0.01) for p in parts)\n"
                              "    return 'mixed' if won and lost else 'beats replay' if won else 'worse' if lost else 'not shown'"}}),
    ],
}


def exercise_cell(nb, anchor):
    """The index of the one code cell that contains `anchor`."""
    hits = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and anchor in c.source]
    assert len(hits) == 1, f"{anchor!r} is in code cells {hits}, not in exactly one"
    return hits[0]


def edited(source, edits):
    """The cell's source with every edit applied; each `old` must occur exactly once."""
    for old, new in edits.items():
        assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times in the cell"
        source = source.replace(old, new)
    return source


def solved(key):
    """Notebook `key` ('01' … '11') with the reference answer in every exercise cell (nbformat, no outputs)."""
    import nbformat
    path = next(NOTEBOOKS.glob(f"{key}_*.ipynb"))
    nb = nbformat.read(path, as_version=4)
    for e in KEY[key]:
        cell = nb.cells[exercise_cell(nb, e["cell"])]
        if e["kind"] == "code":
            cell.source = edited(cell.source, e["answer"])
        elif e["answer"] is not None:
            cell.source = edited(cell.source, {e["placeholder"]: predicted(e["placeholder"], e["answer"])})
        if e["before"]:
            cell.source = e["before"] + "    # (the key sets this for the exercise)\n" + cell.source
        cell.outputs, cell.execution_count = [], None
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return path.name, nb


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the course notebooks with every exercise solved (the teachers' key).")
    ap.add_argument("--out", default=str(HERE), help="folder for the solved notebooks (default: notebooks/solutions)")
    ap.add_argument("--execute", action="store_true", help="run each solved notebook in full and list every check "
                                                           "that does not say right")
    ap.add_argument("notebooks", nargs="*", help="which (01 … 11; default: all)")
    args = ap.parse_args(argv)
    import nbformat
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for key in args.notebooks or list(KEY):
        if key not in KEY:
            print(f"error: notebook {key!r}: allowed {', '.join(KEY)}", file=sys.stderr)
            return 2
        name, nb = solved(key)
        if args.execute:
            from nbclient import NotebookClient
            sys.path.insert(0, str(NOTEBOOKS))
            from timings import use_this_interpreter
            NotebookClient(nb, timeout=3600, kernel_name=use_this_interpreter(),
                           resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
            lines = [line for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stdout"
                     for line in o["text"].splitlines() if line.startswith("✘")]
            bad += len(lines)
            print(f"{name}: " + ("every check right" if not lines else "\n  ".join(["not right:"] + lines)))
        nbformat.write(nb, out / name)
        if not args.execute:
            print(f"wrote {out / name}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
