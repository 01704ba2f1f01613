# SPDX-License-Identifier: Apache-2.0
"""Collectives issued in a fixed order on every rank.

MindSpore's runtime launches a kernel as soon as its inputs are ready, so a tuple of AllReduce ops can run in
a different order on two ranks: when one rank's gradients arrive in another order (ranks whose graphs differ,
or kernels whose timing differs), the ring pairs up tensors of different sizes and the job dies
("Memcpy error ... dest size is 128, src size is 65536"). Chaining each input on the previous result fixes
the order to the tuple's.

Gradients go in buckets (`parallel.bucket_mb`): consecutive tensors of one dtype are flattened into one buffer
and summed by one AllReduce, in the same fixed order on every rank. Each element is summed over the same ranks
as it would be alone, so two ranks give the per-tensor result bit for bit, and every run the same.
"""
import pickle

import numpy as np
from mindspore import ops


def ordered_all_reduce(all_reduce, tensors, after=None):
    """all_reduce applied to each tensor in tuple order (the first after `after`, when given)."""
    out = ()
    prev = after
    for i in range(len(tensors)):
        x = tensors[i] if prev is None else ops.depend(tensors[i], prev)
        prev = all_reduce(x)
        out = out + (prev,)
    return out


def bucket_plan(shapes, dtypes, bucket_bytes: int):
    """The buckets of tensors of these shapes and dtypes, last tensor first (the order a backward pass makes
    gradients in): ((indices, sizes, shapes), ...) with consecutive tensors of one dtype together up to
    `bucket_bytes` (a larger tensor alone), and for each tensor its position among the buckets' pieces."""
    buckets, current, size, kind = [], [], 0, None
    for i in reversed(range(len(shapes))):
        n = int(np.prod(shapes[i], dtype=np.int64))
        nbytes = n * np.dtype(dtypes[i]).itemsize
        if current and (dtypes[i] != kind or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size, kind = size + nbytes, dtypes[i]
    if current:
        buckets.append(current)
    plan = tuple((tuple(b), tuple(int(np.prod(shapes[i], dtype=np.int64)) for i in b), tuple(tuple(shapes[i]) for i in b))
                 for b in buckets)
    order = [i for b in buckets for i in b]
    where = tuple(order.index(i) for i in range(len(shapes)))
    return plan, where


def bucketed_all_reduce(all_reduce, tensors, plan, where, after=None):
    """all_reduce of `tensors` bucket by bucket (bucket_plan's `plan` and `where`), in the plan's order, the first
    after `after`; the sums come back in the tensors' order and shapes."""
    pieces = ()
    prev = after
    for b in range(len(plan)):
        index, sizes, shapes = plan[b]
        flat = ()
        for j in range(len(index)):
            flat = flat + (tensors[index[j]].reshape((-1,)),)
        x = ops.concat(flat) if len(index) > 1 else flat[0]
        prev = all_reduce(x if prev is None else ops.depend(x, prev))
        start = 0
        for j in range(len(index)):
            pieces = pieces + (prev[start:start + sizes[j]].reshape(shapes[j]),)
            start = start + sizes[j]
    out = ()
    for i in range(len(tensors)):
        out = out + (pieces[where[i]],)
    return out


def _encode(obj) -> tuple:
    """A picklable object as float32 values, two bytes each (every value exact), and its byte count: MindSpore's
    CPU AllReduce sums float32 and float16 only."""
    raw = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    padded = raw + b"\0" * (len(raw) % 2)
    return np.frombuffer(padded, np.uint16).astype(np.float32), len(raw)


def _decode(values: np.ndarray, nbytes: int):
    return pickle.loads(np.asarray(values).astype(np.uint16).tobytes()[:nbytes])


def _split(n: int) -> list:
    return [float(n >> 20), float(n & (2 ** 20 - 1))]         # (float32 holds integers below 2^24 exactly)


def _join(hi: float, lo: float) -> int:
    return (int(hi) << 20) + int(lo)


def sum_gather_objects(reduce, obj, index: int, count: int) -> list:
    """Every member's `obj` in member order, through a sum over the group (`reduce`: float32 array -> the group's
    sum): each member writes its bytes into its own slot of a zero buffer, so the sum is every member's bytes.
    MindSpore's CPU AllGather and Broadcast take only the world group; AllReduce takes any group."""
    values, nbytes = _encode(obj)
    sizes = np.zeros(2 * count, np.float32)
    sizes[2 * index:2 * index + 2] = _split(nbytes)
    sizes = reduce(sizes)
    lengths = [_join(sizes[2 * i], sizes[2 * i + 1]) for i in range(count)]
    width = max(-(-n // 2) for n in lengths)
    buf = np.zeros((count, width), np.float32)
    buf[index, :values.size] = values
    buf = reduce(buf.reshape(-1)).reshape(count, width)
    return [_decode(buf[i], lengths[i]) for i in range(count)]


def sum_send_object(reduce, obj, root: bool):
    """`obj` of the root member to every member (the others pass None), through a sum over the group."""
    values, nbytes = _encode(obj) if root else (None, 0)
    head = reduce(np.asarray(_split(nbytes) + _split(values.size if root else 0), np.float32))
    nbytes, size = _join(head[0], head[1]), _join(head[2], head[3])
    got = reduce(values if root else np.zeros(size, np.float32))
    return obj if root else _decode(got, nbytes)
