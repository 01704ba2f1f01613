# SPDX-License-Identifier: Apache-2.0
"""AMP levels: which matmuls run in half precision, and O2 fp16 training tracks fp32 within 2%."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ms_llm.losses.lm import LMLoss
from ms_llm.models import CausalLM, preset
from ms_llm.models.amp import apply_amp
from ms_llm.training.optim import AdamW
from ms_llm.training.step import LossScaleState, TrainStep


def _model(level):
    ms.set_seed(0)
    return apply_amp(CausalLM(preset("tiny", tie_word_embeddings=False)), level, "float16")


def test_levels_set_cell_dtypes():
    o1, o2 = _model("O1"), _model("O2")
    assert o1.model.layers[0].self_attn.q_proj.compute_dtype == ms.float16 and o1.lm_head.compute_dtype == ms.float32
    assert o2.lm_head.compute_dtype == ms.float16
    assert all(p.dtype == ms.float32 for p in o2.get_parameters())          # master weights stay float32
    ids = Tensor(np.random.RandomState(0).randint(0, 512, (2, 16)).astype(np.int32))
    ref = _model("O0")(ids).asnumpy()
    d1, d2 = np.abs(o1(ids).asnumpy() - ref).max(), np.abs(o2(ids).asnumpy() - ref).max()
    assert 0 < d1 < 1e-2 and 0 < d2 < 1e-2


def _curve(level, steps=30):
    model = _model(level)
    loss_net = LMLoss(model)
    step = TrainStep(loss_net, AdamW(loss_net.trainable_params(), weight_decay=0.0),
                     LossScaleState(level != "O0", 2.0 ** 12, 2.0, 1000), 1, 1.0, loss_norm=256.0)
    rng = np.random.RandomState(0)
    base = rng.randint(0, 64, 200)
    losses = []
    for s in range(steps):
        ids = np.stack([np.roll(base, -(s * 8 + i))[:33] for i in range(8)]).astype(np.int32)  # a learnable stream
        losses.append(step([(Tensor(ids[:, :-1]), Tensor(ids[:, 1:]))], 3e-3)["loss"])
    return np.array(losses)


@pytest.mark.slow
def test_o2_fp16_loss_curve_within_2_percent_of_fp32(graph_mode):
    fp32, o2 = _curve("O0"), _curve("O2")
    assert o2[-1] < 0.8 * o2[0]                                          # it trains
    assert np.abs(o2 - fp32).max() / fp32.min() < 0.02
