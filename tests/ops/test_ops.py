# SPDX-License-Identifier: Apache-2.0
"""Reference primitives against independent NumPy implementations, in PyNative and GRAPH_MODE."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from ms_llm import ops as F

rng = np.random.RandomState(0)


def np_rms(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def np_attention(q, k, v, allowed, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


class _Prims(nn.Cell):
    def construct(self, x, w, q, k, v, mask, cos, sin, logits, labels):
        return (F.rms_norm(x, w, 1e-6), F.attention(q, k, v, mask, 0.25), F.apply_rotary(q, cos, sin),
                F.swiglu(x, w * x), F.cross_entropy(logits, labels)[0])


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_primitives_match_numpy(mode):
    ms.set_context(mode=mode)
    x, w = rng.randn(2, 5, 16).astype(np.float32), rng.rand(16).astype(np.float32) + 0.5
    q, k, v = rng.randn(2, 4, 5, 16).astype(np.float32), rng.randn(2, 2, 5, 16).astype(np.float32), rng.randn(2, 2, 5, 16).astype(np.float32)
    pos = np.tile(np.arange(5), (2, 1)).astype(np.int32)
    valid = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    mask = F.mask_bias(F.causal_mask(Tensor(pos), Tensor(pos), Tensor(valid)))
    inv = F.rope_inv_freq(16, 10000.0)
    cos, sin = F.rope_cos_sin(Tensor(pos), Tensor(inv))
    logits, labels = rng.randn(2, 5, 11).astype(np.float32), np.array([[1, 2, -100, 4, 5], [0, -100, -100, 3, 10]])
    out = _Prims()(Tensor(x), Tensor(w), Tensor(q), Tensor(k), Tensor(v), mask, cos, sin, Tensor(logits), Tensor(labels, ms.int32))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(out[0].asnumpy(), np_rms(x, w, 1e-6), atol=1e-5)
    allowed = (np.tril(np.ones((5, 5), bool))[None] & valid[:, None, :].astype(bool))[:, None]
    np.testing.assert_allclose(out[1].asnumpy()[1], np_attention(q, k, v, allowed, 0.25)[1], atol=1e-5)
    np.testing.assert_allclose(out[1].asnumpy()[0, 1:], np_attention(q, k, v, allowed, 0.25)[0, 1:], atol=1e-5)
    ang = pos[:, :, None] * inv[None, None, :]
    c, s = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = np.concatenate([-q[..., 8:], q[..., :8]], -1)
    np.testing.assert_allclose(out[2].asnumpy(), q * c + rot * s, atol=1e-5)
    np.testing.assert_allclose(out[3].asnumpy(), x / (1 + np.exp(-x)) * (w * x), atol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    keep = labels != -100
    nll = lse[keep] - np.take_along_axis(logits, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep]
    np.testing.assert_allclose(out[4].asnumpy(), nll.mean(), rtol=1e-5)


def test_document_mask_blocks_cross_document_attention():
    pos = Tensor(np.tile(np.arange(6), (1, 1)).astype(np.int32))
    seg = Tensor(np.array([[0, 0, 0, 1, 1, 1]], np.int32))
    m = F.causal_mask(pos, pos, None, seg, seg).asnumpy()[0, 0]
    assert m[4].tolist() == [False, False, False, True, True, False]
    assert m[2].tolist() == [True, True, True, False, False, False]
