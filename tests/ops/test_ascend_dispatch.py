# SPDX-License-Identifier: Apache-2.0
"""What only Ascend's backend does, on an Ascend NPU (`MS_LLM_TEST_DEVICE=ascend pytest -m ascend`; the device is
chosen once, in tests/conftest.py); elsewhere these are skipped. What they pin: a float32 model's attention goes
through the fused op in bfloat16 and comes back float32; the one-token decode step, whose B*N exceeds 8*S, takes
the reference rotary instead of the fused op that refuses it; AdamW takes the fused AdamWeightDecay.
(tests/ops/test_device_ops.py checks every fused
primitive's values and gradients on whichever device runs the tests.)"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import DEVICE
from ms_llm import ops as F

pytestmark = [pytest.mark.ascend,
              pytest.mark.skipif(DEVICE != "Ascend", reason="needs an Ascend NPU: MS_LLM_TEST_DEVICE=ascend")]


def test_float32_attention_runs_fused_in_bfloat16():
    rs = np.random.RandomState(0)
    b, n, s, d = 2, 8, 128, 64
    q, k, v = (Tensor(rs.randn(b, n, s, d).astype(np.float32)) for _ in range(3))
    pos = Tensor(np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy())
    bias = F.mask_bias(F.causal_mask(pos, pos))
    fused = F.attention(q, k, v, bias, d ** -0.5, ms.float32, "ascend")
    ref = F.attention(q, k, v, bias, d ** -0.5, ms.float32, "reference")
    assert fused.dtype == ms.float32
    np.testing.assert_allclose(fused.asnumpy(), ref.asnumpy(), atol=2e-2)      # bfloat16 inside


def test_decode_step_rotary_and_generation_match_reference():
    from ms_llm.generation import generate
    from ms_llm.models import CausalLM, preset
    from ms_llm.ops import backend as B
    ms.set_seed(0)
    B.configure("reference")
    ref = CausalLM(preset("tiny", vocab_size=300))
    B.configure("auto")
    fused = CausalLM(preset("tiny", vocab_size=300))
    from ms_llm.models.io import load_state_dict
    load_state_dict(fused, {n: p.asnumpy() for n, p in ref.parameters_and_names()}, strict=True, source="test")
    prompts = [[5, 6, 7, 8], [9, 10]] * 4                     # B*N > 8*S on every decode step
    a = generate(ref, prompts, max_new_tokens=8, temperature=0)
    b = generate(fused, prompts, max_new_tokens=8, temperature=0)
    assert (a.tokens == b.tokens).mean() > 0.9                  # bfloat16 attention may flip a near tie


def test_adamw_updates_through_the_fused_op_and_follows_the_composed_update():
    """On Ascend the optimizer of unsharded float32 weights takes AdamWeightDecay (ops/table.py); a few steps on
    the NPU match the composed update there (its CPU arithmetic: tests/training/test_optim_fused.py)."""
    from mindspore import Parameter
    from ms_llm.training.optim import AdamW
    rs = np.random.RandomState(1)
    w0 = rs.randn(64, 32).astype(np.float32)
    grads = [rs.randn(64, 32).astype(np.float32) for _ in range(4)]
    got = {}
    for kind in (None, "composed"):
        p = Parameter(Tensor(w0.copy()), name="layers.0.mlp.up_proj.weight")
        opt = AdamW([p], weight_decay=0.1, kind=kind)
        got[kind or opt.kind] = p
        for g in grads:
            opt((Tensor(g),), Tensor(1e-3, ms.float32), Tensor(1.0, ms.float32))
    assert set(got) == {"device", "composed"}
    np.testing.assert_allclose(got["device"].asnumpy(), got["composed"].asnumpy(), atol=1e-6, rtol=1e-6)
