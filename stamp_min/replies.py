"""What comes back from Flower clients, checked by the server before it uses any of it.

A reply is trusted for nothing it says about itself. The server knows which client it sent each
message to (Flower links a reply to its message by `reply_to_message_id`, and the SuperLink takes
a reply only from the node the message went to), the size of every client's task-t data (the
scenario is built from the seed on every machine), and θ. So:

    query     (which client a SuperNode is)  "client" and "num-partitions" ints, the rules' names
              text; the clients 0..K-1 once each, with one set of rules
    train     the client is the one the message went to ("client", if it says, must agree);
              "num_examples" equals that client's task size, which is also the weight the server
              uses; the update has exactly θ's names, shapes and dtypes and finite values
              (untrusted.tensors_like) and a norm below MAX_NORM; "loss" is a finite number and
              every other metric a number; an optional "info" record (what a client rule sends
              the server besides Δ, rules.py) holds finite float32 tensors, at most MAX_INFO of θ's
              size in all; nothing else in the reply
    train.end_task  the same client; "memory_bytes" a non-negative int

A client's error reply or a missing reply stops the run (`by_client`). A reply that fails a check
raises `Refused`, a UserError whose one line names the client, the task and round, and what was
wrong; the strategy (flower_app.py) then stops the run or goes on without that reply, as the
operator's `bad-replies` setting says (limits.py).
"""

import math

import torch

from . import UserError
from .untrusted import Bad, number, tensors_like


MAX_NORM = 1e18          # no honest update is this large; beyond it the server's float32 arithmetic nears overflow
MAX_INFO = 4             # a reply's info tensors hold at most 4 θ's worth of numbers (SCAFFOLD sends one)


class Refused(UserError):
    """A client reply that failed the server's checks."""


def by_client(replies, sent, timeout, where=""):
    """([(client k, reply)] in client order, [Refused for each stray reply]) for the messages
    `sent` ({message id: client k}). An error reply or a missing one stops the run (UserError); a
    reply to no sent message, or a second reply to one, is a stray. where: "in task t round r"."""
    out, seen, strays = [], set(), []
    for m in replies:
        k = sent.get(m.metadata.reply_to_message_id)
        if k is None or k in seen:
            strays.append(Refused(f"a reply from node {m.metadata.src_node_id} {where} answers no message of this round "
                                  f"(or one already answered)"))
            continue
        seen.add(k)
        if m.has_error():
            raise UserError(f"a client failed (client {k}): {m.error.reason}")
        out.append((k, m))
    if len(out) < len(sent):
        missing = sorted(set(sent.values()) - seen)
        raise UserError(f"{len(sent) - len(out)} of {len(sent)} clients did not reply within {timeout:.0f} s "
                        f"(clients {missing[:10]}); allowed: every SuperNode of the run connected and running, or a "
                        f"larger reply-timeout")
    return sorted(out, key=lambda p: p[0]), strays


def metrics(m, k, keys, where, optional=()):
    """The reply's metrics as a dict, after the checks every reply gets: only the records `keys`
    (and `optional` ones), and the client it names (if any) is k."""
    content = m.content
    if not set(keys) <= set(content.keys()) <= set(keys) | set(optional):
        raise Refused(f"client {k}'s reply {where} holds the records {sorted(content.keys())}; allowed: {sorted(keys)}"
                      + (f" and {sorted(optional)}" if optional else ""))
    info = dict(content["metrics"])
    if "client" in info and info["client"] != k:
        raise Refused(f"client {k}'s reply {where} says it is client {info['client']!r:.20}; allowed: the client the "
                      f"message went to ({k})")
    return info


def train(m, k, t, r, theta, size):
    """(Δ on θ's device, info) of client k's train reply in task t round r, checked. theta: the θ
    sent ({name: tensor}); size: client k's number of task-t training images."""
    where = f"in task {t + 1} round {r + 1}"
    info = metrics(m, k, ("arrays", "metrics"), where, optional=("info",))
    try:
        if info.get("num_examples") != size or type(info.get("num_examples")) is not int:
            raise Bad(f"num_examples={info.get('num_examples')!r:.30} but the client has {size} images in task {t + 1}")
        number(info.get("loss"), "loss")
        for key, v in info.items():
            if not isinstance(v, list):                               # lists of numbers: what a MetricRecord holds
                number(v, key)
        arrays = m.content["arrays"]
        if set(arrays.keys()) != set(theta):                       # names first: nothing converted yet
            tensors_like(dict.fromkeys(arrays.keys()), theta, "the update")
        try:
            tensors = arrays.to_torch_state_dict()
        except Exception as e:                                     # not an ArrayRecord, or arrays torch cannot take
            raise Bad(f"the update cannot be read as tensors ({type(e).__name__})") from None
        delta = tensors_like({n: v.to(theta[n].device) for n, v in tensors.items()}, theta, "the update")
        norm = sum(float(v.double().square().sum()) for v in delta.values()) ** 0.5
        if not norm < MAX_NORM:                                   # θ + Δ and GM's Gram blocks are float32
            raise Bad(f"the update's norm is {norm:.3g}; allowed: below {MAX_NORM:g}")
        extra = info_tensors(m.content.get("info"), theta, set(info))
    except Bad as e:
        raise Refused(f"client {k}'s reply {where} is refused: {e}") from None
    return delta, {**info, **extra}


def info_tensors(record, theta, taken):
    """The tensors of a reply's "info" record ({name: float32 tensor on the CPU}), checked: finite,
    at most MAX_INFO·numel(θ) numbers in all, names that are not metrics' names too."""
    if record is None:
        return {}
    size = sum(v.numel() for v in theta.values())
    if len(record.keys()) > MAX_INFO * len(theta) + 16 or any(len(n) > 200 or n in taken for n in record.keys()):
        raise Bad(f"its info record has {len(record.keys())} entries or a name used twice or too long; allowed: at most "
                  f"{MAX_INFO * len(theta) + 16} names of up to 200 characters, none a metric's")
    try:
        out = record.to_torch_state_dict()
    except Exception as e:
        raise Bad(f"its info cannot be read as tensors ({type(e).__name__})") from None
    if sum(v.numel() for v in out.values()) > MAX_INFO * size:
        raise Bad(f"its info holds {sum(v.numel() for v in out.values())} numbers; allowed: at most {MAX_INFO * size}")
    for n, v in out.items():
        if v.dtype != torch.float32 or not bool(torch.isfinite(v).all()):
            raise Bad(f"info[{n!r}] is {str(v.dtype)[6:]}{'' if v.dtype != torch.float32 else ' and not finite'}; "
                      f"allowed: finite float32")
    return out


def end_task(m, k, t):
    """The memory_bytes of client k's end-of-task reply for task t, checked."""
    where = f"at the end of task {t + 1}"
    info = metrics(m, k, ("metrics",), where)
    try:
        return number(info.get("memory_bytes"), "memory_bytes", 0, math.inf, int)
    except Bad as e:
        raise Refused(f"client {k}'s reply {where} is refused: {e}") from None


def nodes(replies, K, timeout):
    """({client k: node id}, the clients' rules {keyword: qualified name}, their own rules {keyword:
    short name}) from the query replies of every node; any problem stops the run."""
    found = {}
    for m in replies:
        node = m.metadata.src_node_id
        if m.has_error():
            raise UserError(f"a client failed (node {node}): {m.error.reason}")
        try:
            info, rules, own = (dict(m.content[n]) for n in ("metrics", "rules", "own"))
            k, parts = info["client"], info["num-partitions"]
            if type(k) is not int or type(parts) is not int or not all(
                    type(v) is str for v in (*rules.values(), *own.values())):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise UserError(f"node {node} answers the query without its client id and rules; allowed: the stamp_min "
                            f"ClientApp on every SuperNode") from None
        found.setdefault(k, []).append((node, parts, rules, own))
    ids = sorted(found)
    if ids != list(range(K)) or any(len(v) > 1 for v in found.values()) or {v[0][1] for v in found.values()} - {K, -1}:
        raise UserError(f"the SuperNodes are clients {[k for k in ids for _ in found[k]]} of "
                        f"{sorted({v[1] for vs in found.values() for v in vs})}; allowed: partition-id 0..{K - 1}, once "
                        f"each, num-partitions={K} (= num-clients)")
    names = [found[k][0][2] for k in ids]
    if any(n != names[0] for n in names):
        raise UserError(f"the clients run different rules: {names}; allowed: one ClientApp for every SuperNode")
    return {k: found[k][0][0] for k in ids}, names[0], found[0][0][3]
