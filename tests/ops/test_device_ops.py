# SPDX-License-Identifier: Apache-2.0
"""The device's own implementation of every fused primitive against MindSpore's reference ops, forward and
gradients, on the shapes Qwen2.5 uses (grouped-query attention, odd sequence lengths), in the training's dtypes.

Here the device is the CPU and its implementation the CPU kernels. On a node, `MS_LLM_TEST_DEVICE=ascend pytest
-m ascend tests/ops` runs the same tests against Ascend's fused ops (tests/conftest.py chooses the device once):
this file is the first thing to run on a new NPU, before any model. Tolerances: float32 inside on CPU; the
Ascend attention and SwiGLU compute in half precision."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from conftest import DEVICE
from ms_llm import ops as F

pytestmark = pytest.mark.ascend
ON_ASCEND = DEVICE == "Ascend"
BACKEND = "ascend" if ON_ASCEND else "cpu"
@pytest.fixture(autouse=True, scope="module")
def _device_kernels():
    if not ON_ASCEND:                              # the CPU kernels are loaded (built once) before the first use
        from ms_llm.ops import kernels
        assert kernels.load() is not None, kernels.unavailable_reason()


TOL = {"rms_norm": 2e-3 if ON_ASCEND else 1e-5, "swiglu": 2e-2 if ON_ASCEND else 1e-5,
       "rotary": 2e-3 if ON_ASCEND else 1e-5, "attention": 3e-2 if ON_ASCEND else 1e-5}


def _both(fn, *inputs):
    """(value, gradients with respect to every input) of fn(backend, *inputs) for the device and the reference,
    the gradients of sum(value * weights) with fixed random weights (so every output element counts)."""
    out = {}
    for backend in (BACKEND, "reference"):
        tensors = [Tensor(x) for x in inputs]
        value = fn(backend, *tensors)
        w = Tensor(np.random.default_rng(7).normal(size=value.shape).astype(np.float32))
        grads = ms.grad(lambda *xs: (fn(backend, *xs).astype(ms.float32) * w).sum(), grad_position=tuple(
            range(len(tensors))))(*tensors)
        out[backend] = (value.astype(ms.float32).asnumpy(), [g.asnumpy() for g in grads])
    return out[BACKEND], out["reference"]


def _close(got, want, tol, what):
    (v, gs), (rv, rgs) = got, want
    np.testing.assert_allclose(v, rv, atol=tol, rtol=tol, err_msg=f"{what}: value")
    for i, (g, rg) in enumerate(zip(gs, rgs)):
        scale = max(1.0, float(np.abs(rg).max()))
        np.testing.assert_allclose(g, rg, atol=tol * scale, rtol=tol, err_msg=f"{what}: gradient of input {i}")


@pytest.mark.parametrize("shape", [(2, 7, 64), (1, 33, 896)])
def test_rms_norm(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    w = (1 + 0.1 * rng.normal(size=shape[-1:])).astype(np.float32)
    got, want = _both(lambda b, x, w: F.rms_norm(x, w, 1e-6, b), x, w)
    _close(got, want, TOL["rms_norm"], "rms_norm")


@pytest.mark.parametrize("shape", [(2, 7, 96), (1, 33, 4864)])
def test_swiglu(shape):
    rng = np.random.default_rng(1)
    gate, up = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    got, want = _both(lambda b, g, u: F.swiglu(g, u, b), gate, up)
    _close(got, want, TOL["swiglu"], "swiglu")


@pytest.mark.parametrize("b,n,s,d", [(2, 4, 9, 64), (1, 14, 33, 64)])
def test_rotary(b, n, s, d):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(b, n, s, d)).astype(np.float32)
    inv = Tensor(F.rope_inv_freq(d, 1e6))
    pos = Tensor(np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy())
    cos, sin = F.rope_cos_sin(pos, inv)
    got, want = _both(lambda bk, x: F.apply_rotary(x, cos, sin, bk), x)
    _close(got, want, TOL["rotary"], "rotary")


@pytest.mark.parametrize("b,n,nkv,s,d,pad,docs", [(2, 4, 4, 9, 16, 0, 1), (2, 14, 2, 33, 64, 5, 1),
                                                   (1, 28, 4, 64, 128, 0, 1), (2, 14, 2, 200, 64, 0, 3),
                                                   (1, 28, 4, 300, 128, 0, 4)])
def test_grouped_query_attention(b, n, nkv, s, d, pad, docs):
    """Causal attention with n query heads over nkv key/value heads (Qwen2.5-0.5B: 14 over 2; 7B: 28 over 4),
    the last `pad` keys of the first row padding; with docs > 1 each row is that many packed documents of uneven
    lengths under a block-diagonal mask (data/packing.py), long enough for whole key blocks to be hidden."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(b, n, s, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, nkv, s, d)).astype(np.float32) for _ in range(2))
    pos = Tensor(np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy())
    valid = np.ones((b, s), bool)
    valid[0, s - pad:] = False
    cuts = np.sort(rng.choice(np.arange(1, s), size=(b, docs - 1), replace=False), axis=1)
    seg = Tensor(np.stack([np.searchsorted(c, np.arange(s), side="right") for c in cuts]).astype(np.int32))
    bias = F.mask_bias(F.causal_mask(pos, pos, Tensor(valid), seg, seg))
    got, want = _both(lambda bk, q, k, v: F.attention(q, k, v, bias, d ** -0.5, ms.float32, bk), q, k, v)
    if pad:                       # rows that are padding attend nowhere useful: compare the real queries only
        keep = np.ones((b, s), bool)
        keep[0, s - pad:] = False
        got = (got[0][keep], got[1])
        want = (want[0][keep], want[1])
    _close(got, want, TOL["attention"], "attention")


def test_a_half_precision_train_step_lowers_the_loss():
    """A tiny grouped-query model trained in the device's half precision (bfloat16 on Ascend, through its fused
    ops; float16 on CPU, where bfloat16 does not compute and half precision takes the reference ops), float16 with
    a dynamic loss scale: 12 steps on one batch lower the loss by a fifth, every loss finite."""
    from ms_llm.losses.lm import LMLoss
    from ms_llm.models import CausalLM, preset
    from ms_llm.training.layout import Layout
    from ms_llm.training.optim import AdamW
    from ms_llm.training.step import LossScaleState
    half = "bfloat16" if ON_ASCEND else "float16"
    ms.set_seed(0)
    model = CausalLM(preset("tiny", vocab_size=300, compute_dtype=half, num_attention_heads=4, num_key_value_heads=2))
    loss_net = LMLoss(model)
    step = Layout().train_step(model, loss_net, AdamW(loss_net.trainable_params()), LossScaleState(half == "float16"),
                               1, 1.0, 64.0)
    ids = np.random.default_rng(4).integers(3, 300, (4, 17)).astype(np.int32)
    batch = [(Tensor(ids[:, :-1]), Tensor(ids[:, 1:]))]
    losses = [float(step(batch, 3e-3)["loss"]) for _ in range(12)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
