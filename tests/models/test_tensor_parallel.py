# SPDX-License-Identifier: Apache-2.0
"""Tensor-parallel slicing (the collective parts run under msrun in tests/test_distributed.py)."""
import numpy as np
import pytest

from ms_llm.errors import MsLlmError
from ms_llm.models import preset
from ms_llm.models.tensor_parallel import TPGroup, local_config, shard_axis, shard_state


def test_slices_of_weights_and_moments_put_back_together_are_the_whole():
    rng = np.random.default_rng(0)
    names = {"model.layers.1.self_attn.q_proj.weight": (8, 6), "adam_v.model.layers.0.mlp.down_proj.weight": (6, 10),
             "model.layers.0.self_attn.k_proj.bias": (4,), "model.embed_tokens.weight": (12, 6),
             "adam_m.model.norm.weight": (6,), "lm_head.weight": (12, 6)}
    whole = {n: rng.normal(size=s).astype(np.float32) for n, s in names.items()}
    parts = [shard_state(whole, TPGroup(2, r)) for r in (0, 1)]
    for name, arr in whole.items():
        axis = shard_axis(name)
        if axis is None:
            assert all(p[name] is arr for p in parts)                 # replicated
        else:
            assert parts[0][name].shape[axis] == arr.shape[axis] // 2
            np.testing.assert_array_equal(np.concatenate([p[name] for p in parts], axis), arr)
    assert [shard_axis(n) for n in names] == [0, 1, 0, None, None, None]


def test_local_shapes_and_bad_splits():
    cfg = local_config(preset("tiny"), 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim) == (2, 1, 88, 16)
    with pytest.raises(MsLlmError, match="must divide model.num_key_value_heads"):
        local_config(preset("tiny"), 4)
