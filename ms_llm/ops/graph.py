# SPDX-License-Identifier: Apache-2.0
"""Primitive instances and helpers for cells with a hand-written backward (custom bprop) that loop over chunks.

Primitives, not their functional wrappers: a wrapper with Python control flow inside (ops.zeros_like,
ops.one_hot, ...) that is reached from both a construct and a custom bprop fails to compile in MindSpore 2.7
("func graph is empty"). Used by the chunked distillation head (losses/distill.py) and the chunked log-prob
readout (models/readout.py).
"""
import mindspore as ms
from mindspore import ops

zeros_like = ops.ZerosLike()
cast = ops.Cast()          # (Tensor.astype with a dtype held by the cell failed to compile inside a custom bprop)
gather = ops.Gather()
matmul = ops.MatMul()
matmul_tn = ops.MatMul(transpose_a=True)
matmul_nt_prim = ops.MatMul(transpose_b=True)
scatter_add = ops.TensorScatterElements(axis=-1, reduction="add")
segment_sum = ops.UnsortedSegmentSum()
# ops.maximum's wrapper, compiled as its own sub-graph, intermittently failed MindSpore 2.7's static analysis
# ("Fail to get eval result ... maximum", program_specialize.cc) in processes that had compiled many graphs
maximum = ops.Maximum()


def wide(x, like):
    """x broadcast to like's shape explicitly. On MindSpore 2.7's CPU runtime an implicitly broadcast operand
    ([B, c, 1] or [V] against [B, c, V]) in a graph kept one [B, c, V] buffer per use alive until the graph
    ended (measured: 1.2 GB instead of 0.2 GB over 8 chunks); broadcast_to first does not."""
    return ops.broadcast_to(x, like.shape)


def matmul_nt(a, b, dtype=ms.float32):
    """a [N, K] x b [M, K]^T -> [N, M], computed in `dtype`."""
    return matmul_nt_prim(cast(a, dtype), cast(b, dtype))
