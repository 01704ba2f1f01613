# SPDX-License-Identifier: Apache-2.0
"""Tensor parallelism for the decoder, in the Megatron-LM layout, over a group of `size` ranks.

    q/k/v projections (and their biases), gate/up    column-parallel: rank r holds rows r·n/size ... (heads,
                                                     kv heads and MLP columns split evenly)
    o_proj, down_proj                                row-parallel: rank r holds the matching input columns;
                                                     partial outputs are summed with AllReduce
    embedding, lm_head, norms                        replicated

Two identities of Megatron's paper carry the gradients: `CopyToTP` (forward identity, backward AllReduce)
in front of each column-parallel block, `ReduceFromTP` (forward AllReduce, backward identity) after each
row-parallel one. Every rank of the group then sees the same activations, loss and replicated-parameter
gradients, and sharded gradients stay local. Checkpoints are written whole: `GatherShards` rebuilds each
sharded tensor by AllReduce(sum) of zero-padded slices, so files are identical to a one-process run's, and
`shard_state` cuts them again on load, for any tensor-parallel size.

The Ascend path for large models would be MindSpore's semi-auto parallel with these same strategies; this
explicit form is what runs (and is tested) under msrun on CPU as well.
"""
import re
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ms_llm.errors import MsLlmError

# parameter-name suffix -> axis it is split along (0: output rows, 1: input columns)
_AXES = (("self_attn.q_proj.weight", 0), ("self_attn.k_proj.weight", 0), ("self_attn.v_proj.weight", 0),
         ("self_attn.q_proj.bias", 0), ("self_attn.k_proj.bias", 0), ("self_attn.v_proj.bias", 0),
         ("self_attn.o_proj.weight", 1), ("mlp.gate_proj.weight", 0), ("mlp.up_proj.weight", 0),
         ("mlp.down_proj.weight", 1))
_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


@dataclass
class TPGroup:
    size: int
    rank: int                      # position within the group
    group: str = None              # communication group name (None: the world group)

    def all_reduce(self):
        return ops.AllReduce(ops.ReduceOp.SUM, group=self.group) if self.group else ops.AllReduce(ops.ReduceOp.SUM)


def shard_axis(name: str):
    """Axis a parameter (by Hugging Face name, or an optimizer moment of one) is split along, or None."""
    if not _LAYER.search(name):
        return None
    return next((axis for suffix, axis in _AXES if name.endswith(suffix)), None)


def check_config(cfg, size: int):
    """Raise naming the field when the model cannot be split `size` ways."""
    for field, value in (("num_attention_heads", cfg.num_attention_heads), ("num_key_value_heads", cfg.num_key_value_heads),
                         ("intermediate_size", cfg.intermediate_size)):
        if value % size:
            raise MsLlmError(f"parallel.tensor_parallel={size} must divide model.{field} ({value})")
    if cfg.attention_bias:
        raise MsLlmError("parallel.tensor_parallel: models with an o_proj bias (attention_bias) are not supported")


def local_config(cfg, size: int):
    """The per-rank layer shapes: heads, kv heads and MLP width divided by `size`, head_dim unchanged."""
    check_config(cfg, size)
    return cfg.replace(num_attention_heads=cfg.num_attention_heads // size,
                       num_key_value_heads=cfg.num_key_value_heads // size,
                       intermediate_size=cfg.intermediate_size // size, head_dim=cfg.head_dim)


def shard_state(state: dict, tp: TPGroup) -> dict:
    """This rank's slices of a whole state dict (weights, or optimizer moments named `adam_m.<param>`)."""
    out = {}
    for name, arr in state.items():
        axis = shard_axis(name)
        if axis is None or np.ndim(arr) <= axis:
            out[name] = arr
            continue
        n = arr.shape[axis]
        if n % tp.size:
            raise MsLlmError(f"{name}: dimension {axis} ({n}) does not split {tp.size} ways")
        k = n // tp.size
        out[name] = np.take(arr, np.arange(tp.rank * k, (tp.rank + 1) * k), axis=axis)
    return out


class CopyToTP(nn.Cell):
    """Forward: identity. Backward: AllReduce(sum) of the input gradient over the group."""

    def __init__(self, tp: TPGroup):
        super().__init__()
        self.all_reduce = tp.all_reduce()

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


class ReduceFromTP(nn.Cell):
    """Forward: AllReduce(sum) of the partial outputs over the group. Backward: identity."""

    def __init__(self, tp: TPGroup):
        super().__init__()
        self.all_reduce = tp.all_reduce()

    def construct(self, x):
        return self.all_reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


class GatherShards(nn.Cell):
    """Whole tensors from this rank's slices: (name, local array shape) pairs fix the layout at build time;
    call with the local tensors in that order. Collective: every rank of the group calls it together."""

    def __init__(self, names, shapes, tp: TPGroup):
        super().__init__(auto_prefix=False)
        self.all_reduce = tp.all_reduce()
        self.plan = []            # per tensor: None (replicated) or (axis, pad-before shape, pad-after shape)
        for name, shape in zip(names, shapes):
            axis = shard_axis(name)
            if axis is None or len(shape) <= axis:
                self.plan.append(None)
                continue
            before, after = list(shape), list(shape)
            before[axis], after[axis] = shape[axis] * tp.rank, shape[axis] * (tp.size - 1 - tp.rank)
            self.plan.append((axis, tuple(before), tuple(after)))
        self.plan = tuple(self.plan)

    def construct(self, *tensors):
        out = ()
        prev = None
        for i in range(len(self.plan)):
            step = self.plan[i]
            if step is None:
                out = out + (tensors[i],)
                continue
            axis, before, after = step
            parts = ()
            if before[axis] > 0:
                parts = parts + (ops.zeros(before, ms.float32),)
            parts = parts + (tensors[i].astype(ms.float32),)
            if after[axis] > 0:
                parts = parts + (ops.zeros(after, ms.float32),)
            padded = ops.concat(parts, axis)
            if prev is not None:                  # one collective after another, same order on every rank
                padded = ops.depend(padded, prev)
            prev = self.all_reduce(padded)
            out = out + (prev,)
        return out


_GATHERS = {}


def gather_state(named: dict, tp: TPGroup) -> dict:
    """{name: whole numpy array} from {name: local tensor}; a collective over the group."""
    names = list(named)
    shapes = [tuple(named[n].shape) for n in names]
    key = (tuple(names), tuple(shapes), tp.rank, tp.size, tp.group)
    if key not in _GATHERS:                 # compiled once per layout
        _GATHERS[key] = GatherShards(names, shapes, tp)
    full = _GATHERS[key](*[named[n] for n in names])
    return {n: t.asnumpy() for n, t in zip(names, full)}
