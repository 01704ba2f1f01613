# SPDX-License-Identifier: Apache-2.0
"""Collectives issued in a fixed order on every rank.

MindSpore's runtime launches a kernel as soon as its inputs are ready, so a tuple of AllReduce ops can run in
a different order on two ranks: when one rank's gradients arrive in another order (ranks whose graphs differ,
or kernels whose timing differs), the ring pairs up tensors of different sizes and the job dies
("Memcpy error ... dest size is 128, src size is 65536"). Chaining each input on the previous result fixes
the order to the tuple's.
"""
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
