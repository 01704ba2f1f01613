# SPDX-License-Identifier: Apache-2.0
"""Pipeline stages in one process: the layer split, parameter names, and stages chained by hand computing the
whole model's logits (the msrun schedule itself is tested in tests/test_distributed.py)."""
import numpy as np
import pytest

from ms_llm.errors import MsLlmError
from ms_llm.models import CausalLM, preset
from ms_llm.models.io import model_state_dict
from ms_llm.models.pipeline import PPGroup, build_stage, split_layers


def test_layers_are_shared_out_evenly_earlier_stages_taking_the_remainder():
    assert split_layers(28, 4) == [(0, 7), (7, 14), (14, 21), (21, 28)]
    assert split_layers(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert split_layers(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(MsLlmError, match="at least one decoder layer per stage"):
        split_layers(2, 3)


@pytest.mark.parametrize("tied", [False, True])
def test_three_stages_chained_give_the_whole_models_logits(tied):
    import mindspore as ms
    cfg = preset("tiny", num_hidden_layers=4, tie_word_embeddings=tied)
    ms.set_seed(3)
    whole = CausalLM(cfg)
    stages = [build_stage(whole, PPGroup(3, s, a, b)) for s, (a, b) in enumerate(split_layers(4, 3))]
    # names are the whole model's; together the stages hold every tensor once (the tied copy aside), same values
    state = model_state_dict(whole)
    held = {}
    for st in stages:
        for name, value in model_state_dict(st).items():
            np.testing.assert_array_equal(value, state[name])
            held.setdefault(name, []).append(st.pp.stage)
    assert set(held) == set(state)
    assert held["model.layers.1.mlp.down_proj.weight"] == [0] and held["model.layers.2.input_layernorm.weight"] == [1]
    assert held["model.embed_tokens.weight"] == ([0, 2] if tied else [0])
    assert [n for n in stages[2].owned_names if "embed" in n] == []
    rng = np.random.default_rng(0)
    ids = ms.Tensor(rng.integers(0, cfg.vocab_size, size=(2, 12)).astype(np.int32))
    x = ids
    for st in stages:
        x = st.stage_forward(x)
    got = stages[2].logits(x).asnumpy()
    np.testing.assert_allclose(got, whole(ids).asnumpy(), rtol=1e-5, atol=1e-5)
