# SPDX-License-Identifier: Apache-2.0
"""The chunked log-prob readout (models/readout.py): values and gradients against NumPy in float64, and every
loss that reads log-probs giving the same values and gradients chunked as with whole logits."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from ms_llm.losses.lm import LMLoss
from ms_llm.losses.policy import PolicyLoss, TokenLogps
from ms_llm.models import CausalLM, preset
from ms_llm.models.readout import make_readout
from ms_llm.ops import backend as B
from ms_llm.peft import LoRAConfig, apply_lora
from ms_llm.peft.lora import AdapterDisabled


@pytest.fixture
def readout_setting():
    """Set the kernels and loss_chunk_tokens for models built next; restored after the test."""
    saved = dict(B._settings)

    def setting(kernels="reference", chunk=0):
        B.configure(kernels)
        B.set_loss_chunk_tokens(chunk)
    yield setting
    B._settings.clear()
    B._settings.update(saved)


def np_readout(h, w, t, tau, a, e):
    """(sum a·log p_t + e·H, d/dh, d/dw) in float64, written from the definitions (not the module's rearranged
    backward): u = h W^T / tau, p = softmax(u)."""
    u = h @ w.T / tau
    u = u - u.max(-1, keepdims=True)
    logp = u - np.log(np.exp(u).sum(-1, keepdims=True))
    p = np.exp(logp)
    lp_t = np.take_along_axis(logp, t[..., None], -1)[..., 0]
    ent = -(p * logp).sum(-1)
    onehot = np.eye(w.shape[0])[t]
    du = a[..., None] * (onehot - p) - e[..., None] * p * (logp + ent[..., None])
    dz = du / tau
    return (a * lp_t + e * ent).sum(), dz @ w, np.einsum("bsv,bsh->vh", dz, h), lp_t, ent


class _Weighted(nn.Cell):
    def __init__(self, readout):
        super().__init__()
        self.readout = readout

    def construct(self, h, w, t, a, e):
        lp, ent = self.readout(h, w, t)
        return (lp * a).sum() + (ent * e).sum()


@pytest.mark.parametrize("tau,entropy,chunk", [(1.0, False, 6), (0.7, True, 6), (1.0, True, 4), (0.7, False, 64)])
def test_chunked_readout_equals_numpy_values_and_gradients(graph_mode, tau, entropy, chunk):
    """Uneven chunks (B 2 x S 7 with 3 or 2 positions per chunk), temperature, entropy on and off."""
    r = np.random.default_rng(0)
    b, s, hdim, v = 2, 7, 8, 50
    h = r.standard_normal((b, s, hdim))
    w = r.standard_normal((v, hdim)) * 0.5
    t = r.integers(0, v, (b, s)).astype(np.int32)
    a = r.standard_normal((b, s))
    e = r.standard_normal((b, s)) if entropy else np.zeros((b, s))
    readout = make_readout("chunked", tau, entropy, chunk_tokens=chunk)
    args = [Tensor(x.astype(np.float32)) for x in (h, w)] + [Tensor(t)] + [Tensor(x.astype(np.float32)) for x in (a, e)]
    lp, ent = readout(*args[:3])
    value, (dh, dw) = ms.value_and_grad(_Weighted(readout), (0, 1))(*args)
    want, want_dh, want_dw, want_lp, want_ent = np_readout(h, w, t, tau, a, e)
    np.testing.assert_allclose(lp.asnumpy(), want_lp, rtol=1e-5, atol=1e-5)
    if entropy:
        np.testing.assert_allclose(ent.asnumpy(), want_ent, rtol=1e-5, atol=1e-5)
    else:
        assert not ent.asnumpy().any()
    assert abs(float(value) - want) <= 1e-5 * abs(want) + 1e-5
    for got, ref in ((dh, want_dh), (dw, want_dw)):      # float32 against float64: 3e-5 of the largest entry
        assert np.abs(ref).max() > 1e-2
        np.testing.assert_allclose(got.asnumpy(), ref, atol=3e-5 * np.abs(ref).max())


class _First(nn.Cell):
    """A loss cell's first output (the summed loss)."""

    def __init__(self, loss):
        super().__init__(auto_prefix=False)
        self.loss = loss

    def construct(self, *x):
        return self.loss(*x)[0]


def _lm_grads(ids, chunk, readout_setting, seed=0):
    readout_setting("reference", chunk)
    ms.set_seed(seed)
    model = CausalLM(preset("tiny", vocab_size=300, tie_word_embeddings=False))
    loss = LMLoss(model)
    fn = ms.value_and_grad(_First(loss), None, model.trainable_params())
    value, grads = fn(Tensor(ids[:, :-1]), Tensor(ids[:, 1:]))
    return model.lm_readout.mode, float(value), [g.asnumpy() for g in grads]


def test_lm_loss_chunked_equals_whole_logits(graph_mode, readout_setting):
    """LM/SFT's loss on the reference ops: chunked (8 tokens a chunk) and whole logits give the same loss and
    gradients of every parameter to 1e-5."""
    ids = np.random.RandomState(0).randint(0, 300, (3, 12)).astype(np.int32)
    mode_w, loss_w, grads_w = _lm_grads(ids, 0, readout_setting)
    mode_c, loss_c, grads_c = _lm_grads(ids, 8, readout_setting)
    assert (mode_w, mode_c) == ("whole", "chunked")
    assert abs(loss_w - loss_c) <= 1e-5 * abs(loss_w)
    for gw, gc in zip(grads_w, grads_c):
        np.testing.assert_allclose(gc, gw, atol=1e-5 * max(np.abs(gw).max(), 1e-6))


def _policy_grads(chunk, readout_setting, lora=False):
    readout_setting("reference", chunk)
    ms.set_seed(0)
    model = CausalLM(preset("tiny", vocab_size=300))
    if lora:
        apply_lora(model, LoRAConfig(4, 8, 0.0, ["q_proj", "v_proj"]))
        for name, p in model.parameters_and_names():      # (apply_lora leaves the wrapped layers' short names)
            p.name = name
        r0 = np.random.RandomState(2)
        for p in model.trainable_params():                # adapters that change the model: B starts at zero
            p.set_data(Tensor(r0.normal(0, 0.05, p.shape).astype(np.float32)))
    r = np.random.RandomState(1)
    bsz, s = 2, 10
    ids = r.randint(0, 300, (bsz, s)).astype(np.int32)
    mask = np.ones((bsz, s), np.int32)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (bsz, s)).copy()
    tgt = r.randint(0, 300, (bsz, s)).astype(np.int32)
    lm = (r.uniform(size=(bsz, s)) > 0.3).astype(np.float32)
    old = np.full((bsz, s), -5.7, np.float32)
    adv = r.standard_normal((bsz, s)).astype(np.float32)
    loss = PolicyLoss(model, ent_coef=0.05, temperature=0.8)
    args = [Tensor(x) for x in (ids, mask, pos, tgt, lm, old, adv)]
    fn = ms.value_and_grad(_First(loss), None, model.trainable_params())
    value, grads = fn(*args)
    stats = loss(*args)[2].asnumpy()
    ref = TokenLogps(AdapterDisabled(model) if lora else model, 0.8)(*args[:4]).asnumpy()
    if lora:     # the view's hidden states are the base model's: equal to its logits (adapters off) ...
        z = AdapterDisabled(model)(*args[:3]).asnumpy().astype(np.float64) / 0.8
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        np.testing.assert_allclose(ref, np.take_along_axis(logp, tgt[..., None], -1)[..., 0], atol=2e-5)
        own = TokenLogps(model, 0.8)(*args[:4]).asnumpy()           # ... and not the policy's (adapters on)
        assert np.abs(own - ref).max() > 1e-3
    return loss.readout.mode, float(value), [g.asnumpy() for g in grads], stats, ref


@pytest.mark.parametrize("lora", [False, True])
def test_policy_loss_and_reference_scoring_chunked_equal_whole(graph_mode, readout_setting, lora):
    """PPO's loss (log-probs and entropy at temperature 0.8) and the reference scorer — through the LoRA
    adapter-disabled view when the policy has adapters — agree chunked (4 tokens a chunk) and whole."""
    mode_w, loss_w, grads_w, stats_w, ref_w = _policy_grads(0, readout_setting, lora)
    mode_c, loss_c, grads_c, stats_c, ref_c = _policy_grads(4, readout_setting, lora)
    assert (mode_w, mode_c) == ("whole", "chunked")
    assert abs(loss_w - loss_c) <= 1e-5 * abs(loss_w) + 1e-6
    np.testing.assert_allclose(stats_c, stats_w, rtol=1e-5, atol=1e-5)       # entropy and ratio statistics
    np.testing.assert_allclose(ref_c, ref_w, rtol=1e-5, atol=1e-5)
    assert np.abs(ref_w).max() > 1.0
    assert len(grads_w) == len(grads_c) and len(grads_w) > 0
    for gw, gc in zip(grads_w, grads_c):
        np.testing.assert_allclose(gc, gw, atol=1e-5 * max(np.abs(gw).max(), 1e-6))
