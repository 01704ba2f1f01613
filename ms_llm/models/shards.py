# SPDX-License-Identifier: Apache-2.0
"""What a parameter looks like when ZeRO-3 holds only this rank's part of it (training/zero.py).

A shard is a float32 vector of ceil(n / N) elements, the matrix flattened, zero-padded to N equal parts and cut
at this rank's; it carries the whole matrix's shape (`zero_whole_shape`) and its (rank, world)
(`zero_place`). Loading and checkpoint code reads shapes and writes values through these functions, so a whole
tensor on disk fits a shard and a shard's checkpoint entry is the whole tensor.
"""
import numpy as np


def whole_shape(param):
    """The whole matrix's shape of a ZeRO-3 shard; None for a parameter that is not one."""
    return getattr(param, "zero_whole_shape", None)


def shape_of(param) -> tuple:
    """The parameter's logical shape: the whole matrix's for a shard."""
    return tuple(whole_shape(param) or param.shape)


def local_value(param, value: np.ndarray) -> np.ndarray:
    """`value` as `param` holds it: a whole matrix sliced to this rank's part for a shard, else unchanged."""
    shape = whole_shape(param)
    if shape is None or tuple(np.shape(value)) != tuple(shape):
        return value
    rank, world = param.zero_place
    k = int(param.shape[0])
    flat = np.zeros(k * world, np.float32)
    flat[:int(np.prod(shape))] = np.asarray(value, np.float32).reshape(-1)
    return flat[rank * k:(rank + 1) * k]
