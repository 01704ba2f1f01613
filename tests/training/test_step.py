# SPDX-License-Identifier: Apache-2.0
"""Train-step cells: accumulation equals the big batch, AdamW equals torch, fp16 loss scaling skips overflow."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from ms_llm.losses.lm import LMLoss
from ms_llm.models import CausalLM, preset
from ms_llm.ops import backend as B
from ms_llm.training.optim import AdamW, lr_at
from ms_llm.training.step import LossScaleState, TrainStep


def _batch(n=8, s=33, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, 512, (n, s)).astype(np.int32)
    labels = ids[:, 1:].copy()
    labels[0, :10] = -100            # uneven token counts across micro-batches: normalization must still match
    labels[n - 3, 3:20] = -100
    return ids[:, :-1], labels


def _weights(model):
    return {p.name: p.asnumpy().copy() for p in model.get_parameters()}


def _one_update(accum, micro, compute_dtype="float32", scale=None):
    ms.set_seed(0)
    model = CausalLM(preset("tiny", compute_dtype=compute_dtype))
    loss_net = LMLoss(model)
    opt = AdamW(loss_net.trainable_params(), weight_decay=0.1)
    step = TrainStep(loss_net, opt, scale or LossScaleState(False), accum, clip=1.0)
    ids, labels = _batch()
    out = step([(Tensor(ids[i:i + micro]), Tensor(labels[i:i + micro])) for i in range(0, 8, micro)], 1e-3)
    return model, out


def test_accumulation_equals_big_batch(graph_mode):
    big, out_big = _one_update(1, 8)
    acc, out_acc = _one_update(4, 2)
    assert abs(out_big["loss"] - out_acc["loss"]) < 1e-5 and abs(out_big["grad_norm"] - out_acc["grad_norm"]) < 1e-5
    wb, wa = _weights(big), _weights(acc)
    assert max(np.abs(wb[k] - wa[k]).max() for k in wb) <= 1e-5
    ms.set_seed(0)
    init = _weights(CausalLM(preset("tiny")))
    changed = [k for k in wb if not np.array_equal(wb[k], init[k])]
    assert len(changed) == len(wb)              # every trainable parameter moved


@pytest.mark.parametrize("adamw", ["cpu", "reference"])
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_adamw_matches_torch(mode, adamw):
    """Including a learning rate that changes every step (a GRAPH_MODE graph must see each new value); the
    in-place CPU kernel and the composed update alike."""
    import torch
    if mode == "graph":
        ms.set_context(mode=ms.GRAPH_MODE)
    B.configure({"adamw": adamw})
    rng = np.random.RandomState(0)
    w0, x, y = rng.randn(4, 3).astype(np.float32), rng.randn(16, 3).astype(np.float32), rng.randn(16, 4).astype(np.float32)
    b0 = rng.randn(4).astype(np.float32)

    class Lin(nn.Cell):
        def __init__(self):
            super().__init__()
            self.weight = ms.Parameter(Tensor(w0), name="weight")
            self.bias = ms.Parameter(Tensor(b0), name="bias")

        def construct(self, x, y):
            d = ms.ops.matmul(x, self.weight.T) + self.bias - y
            return (d * d).sum(), ms.ops.ones((), ms.float32) * 16

    net = Lin()
    try:
        opt = AdamW(net.trainable_params(), (0.9, 0.99), 1e-8, weight_decay=0.1)
    finally:
        B.configure("auto")
    assert opt.fused == (adamw == "cpu")
    step = TrainStep(net, opt, LossScaleState(False), 1, clip=0.0)
    tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1}, {"params": [tb], "weight_decay": 0.0}],
                             lr=0.05, betas=(0.9, 0.99), eps=1e-8)
    for i in range(6):
        lr = lr_at(i, 0.05, 6, "cosine", 2, 0.1)
        for g in topt.param_groups:
            g["lr"] = lr
        step([(Tensor(x), Tensor(y))], lr)
        topt.zero_grad()
        (((torch.tensor(x) @ tw.T + tb - torch.tensor(y)) ** 2).sum() / 16).backward()
        topt.step()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(net.weight.asnumpy(), tw.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(net.bias.asnumpy(), tb.detach().numpy(), atol=1e-6)   # no decay on the bias


@pytest.mark.parametrize("accum", [1, 2])
def test_adamw_kernel_equals_the_composed_update_bitwise(graph_mode, accum):
    """The in-place kernel against the composed AdamW on a real model: clipping that binds, weight decay on the
    matrices only, per-parameter lr scales (μP), one or two micro-batches; losses, gradient norms, weights,
    moments and the step count bitwise equal after four updates."""
    runs = []
    for adamw in ("cpu", "reference"):
        ms.set_seed(0)
        B.configure({"adamw": adamw})
        try:
            model = CausalLM(preset("tiny"))
            loss_net = LMLoss(model)
            params = loss_net.trainable_params()
            opt = AdamW(params, (0.9, 0.95), 1e-8, weight_decay=0.1,
                        lr_scales=[0.5 if "mlp" in p.name else 1.0 for p in params])
        finally:
            B.configure("auto")
        assert opt.fused == (adamw == "cpu")
        step = TrainStep(loss_net, opt, LossScaleState(False), accum, clip=0.5)
        ids, labels = _batch()
        micro = 8 // accum
        outs = [step([(Tensor(ids[i:i + micro]), Tensor(labels[i:i + micro])) for i in range(0, 8, micro)],
                     2e-3 * (k + 1)) for k in range(4)]
        state = {n: t.asnumpy().copy() for n, t in opt.full_state().items()}
        runs.append((outs, _weights(model), state))
    (o1, w1, s1), (o2, w2, s2) = runs
    assert [(o["loss"], o["grad_norm"]) for o in o1] == [(o["loss"], o["grad_norm"]) for o in o2]
    assert all(o["grad_norm"] > 0.5 for o in o1)                 # the clip bound every step
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1) and int(s1["adam_step"]) == 4
    ms.set_seed(0)
    init = _weights(CausalLM(preset("tiny")))
    assert all(not np.array_equal(w1[k], init[k]) for k in w1)


def test_fp16_loss_scaling_skips_overflow_then_trains(graph_mode):
    """A 2^40 loss scale overflows float16 gradients: those updates are skipped, the scale halves, then it trains."""
    ms.set_seed(0)
    model = CausalLM(preset("tiny", compute_dtype="float16"))
    loss_net = LMLoss(model)
    opt = AdamW(loss_net.trainable_params(), weight_decay=0.0)
    scale = LossScaleState(True, init=2.0 ** 40, factor=2.0, window=1000)
    step = TrainStep(loss_net, opt, scale, 1, clip=1.0)
    ids, labels = _batch(4, 33, seed=1)
    batch = [(Tensor(ids), Tensor(labels))]
    before = _weights(model)
    first = step(batch, 3e-3)
    assert not first["finite"] and first["loss_scale"] == 2.0 ** 39
    after_skip = _weights(model)
    assert all(np.array_equal(before[k], after_skip[k]) for k in before)   # skipped: weights untouched
    assert int(opt.step.asnumpy()) == 0                                     # and Adam's step count too
    outs = [step(batch, 3e-3) for _ in range(60)]
    skipped = sum(not o["finite"] for o in outs)
    assert 5 < skipped < 40 and outs[-1]["finite"]
    assert outs[-1]["loss"] < first["loss"] - 1.0                           # it trains once the scale fits
    assert all(np.isfinite(p.asnumpy()).all() for p in model.get_parameters())


def test_lr_schedules():
    assert lr_at(0, 1.0, 100, "cosine", warmup=10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, "cosine", warmup=10) == pytest.approx(1.0)
    assert lr_at(99, 1.0, 100, "cosine", 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_at(50, 1.0, 100, "linear", 0, 0.0) == pytest.approx(0.5)
    wsd = [lr_at(s, 1.0, 100, "wsd", 10, 0.1, decay_steps=20, decay_shape="linear") for s in range(100)]
    assert wsd[10:80] == [1.0] * 70 and wsd[90] == pytest.approx(0.55) and wsd[99] < wsd[90]


def test_recompute_gives_the_same_update(graph_mode):
    plain, out_plain = _one_update(1, 8)
    ms.set_seed(0)
    model = CausalLM(preset("tiny"))
    for layer in model.model.layers:
        layer.recompute()
    loss_net = LMLoss(model)
    step = TrainStep(loss_net, AdamW(loss_net.trainable_params(), weight_decay=0.1), LossScaleState(False), 1, 1.0)
    ids, labels = _batch()
    out = step([(Tensor(ids), Tensor(labels))], 1e-3)
    assert abs(out["loss"] - out_plain["loss"]) < 1e-6
    wp, wr = _weights(plain), _weights(model)
    assert max(np.abs(wp[k] - wr[k]).max() for k in wp) <= 1e-6


def test_neftune_noise_only_while_training():
    """The noise is U(-1, 1) x alpha / sqrt(S H) on the embeddings, while training only, and a function of
    (seed, sample position): the same for a sample whatever its batch, different across samples."""
    from ms_llm.data.sft import neftune_noise
    ms.set_seed(0)
    model = CausalLM(preset("tiny"))
    ids = Tensor(_batch(2, 17)[0])
    b, s = ids.shape
    h = model.config.hidden_size
    noise = neftune_noise(7, [3, 4], s, h)
    assert noise.shape == (b, s, h) and -1 <= noise.min() < -0.9 and 0.9 < noise.max() <= 1
    np.testing.assert_array_equal(noise[1], neftune_noise(7, [4], s, h)[0])
    assert not np.allclose(noise[0], noise[1]) and not np.allclose(noise, neftune_noise(8, [3, 4], s, h))
    model.set_train(False)
    clean = model(ids).asnumpy()
    model.neftune_alpha = 5.0
    model.set_train(True)
    noisy = model(ids, None, None, None, Tensor(noise)).asnumpy()
    assert not np.allclose(noisy, clean)
    x = Tensor(model.embed(ids).asnumpy() + noise * 5.0 / np.sqrt(s * h))       # the same noise, added by hand
    mask, cos, sin = model.attention_inputs(b, s)
    for layer in model.model.layers:
        x = layer(x, cos, sin, mask)
    np.testing.assert_allclose(noisy, model.logits(model.model.norm(x)).asnumpy(), atol=1e-5)
    model.set_train(False)
    assert np.array_equal(model(ids, None, None, None, Tensor(noise)).asnumpy(), clean)     # none at evaluation
