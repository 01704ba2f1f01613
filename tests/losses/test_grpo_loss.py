# SPDX-License-Identifier: Apache-2.0
"""The GRPO family's pieces against independent NumPy references (≤ 1e-6): group advantages (group, batch and no
std scaling, groups of one, all-equal groups), DAPO's overlong shaping, every loss aggregation, token and GSPO
sequence ratios with clip-higher and dual-clip, the k3 reference KL; token-mean is the same loss and update over
1 x 8 accumulation; an all-masked batch gives zero loss and leaves weights and Adam state untouched."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

V, S, B = 64, 10, 8


def _ref_advantages(rewards, g, scale, eps=1e-6):
    out = []
    every = list(rewards)
    n = len(every)
    mean_all = sum(every) / n
    batch_std = math.sqrt(sum((x - mean_all) ** 2 for x in every) / (n - 1)) if n > 1 else 0.0
    for k in range(0, n, g):
        grp = every[k:k + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1)) if g > 1 else None
        for x in grp:
            if scale == "none" or std is None:
                out.append(x - mean)
            else:
                out.append((x - mean) / ((std if scale == "group" else batch_std) + eps))
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [1, 4])
def test_group_advantages_match_a_loop_reference(scale, g):
    from ms_llm.losses.grpo import group_advantages
    r = np.random.default_rng(g).normal(size=16)
    r[:g] = 0.5                                            # one group whose rewards are all equal
    got = group_advantages(r, g, scale)
    np.testing.assert_allclose(got, _ref_advantages(r.tolist(), g, scale), atol=1e-6)
    assert np.all(got[:g] == 0)                            # no signal from an all-equal group (or a group of one)


def test_overlong_penalty_matches_dapo_piecewise():
    from ms_llm.losses.grpo import overlong_penalty
    L, buf = 20, 8
    n = np.arange(0, 24)
    want = [0.0 if x <= L - buf else ((L - buf) - x) / buf if x <= L else -1.0 for x in n]
    np.testing.assert_allclose(overlong_penalty(n, L, buf, 1.0), want, atol=1e-12)
    np.testing.assert_allclose(overlong_penalty(n, L, buf, 0.5), 0.5 * np.array(want), atol=1e-12)
    assert overlong_penalty([L], L, buf)[0] == -1.0 and overlong_penalty([L - buf], L, buf)[0] == 0.0


def _batch(seed=0, empty_row=True):
    r = np.random.default_rng(seed)
    ids = r.integers(1, V, (B, S)).astype(np.int32)
    att = np.ones((B, S), np.int32)
    pos = np.tile(np.arange(S, dtype=np.int32), (B, 1))
    tgt = np.roll(ids, -1, 1).astype(np.int32)
    lengths = r.integers(2, S, B)
    lengths[1] = 0 if empty_row else lengths[1]           # a masked (e.g. truncated) completion
    start = 2
    mask = np.zeros((B, S), np.float32)
    for i, n in enumerate(lengths):
        mask[i, start:start + min(n, S - start)] = 1
    sign = np.where(np.arange(B) % 3 == 0, -1.0, 1.0)[:, None]             # both signs among the live rows
    adv = np.repeat(np.abs(r.normal(size=(B, 1))) * sign, S, 1).astype(np.float32)
    return ids, att, pos, tgt, mask, adv, r


def _logps(model, ids, att, pos, tgt):
    from ms_llm.losses.policy import TokenLogps
    return TokenLogps(model)(*(Tensor(x) for x in (ids, att, pos, tgt))).asnumpy().astype(np.float64)


def _ref_loss(logp, old, ref, adv, mask, mode, ratio_kind, eps_low, eps_high, dual, beta, fixed_len):
    """Loop-by-loop NumPy reference of the module docstring."""
    num, den = 0.0, 0.0
    for i in range(logp.shape[0]):
        toks = [t for t in range(logp.shape[1]) if mask[i, t] > 0]
        if not toks:
            continue
        seq = math.exp(sum(logp[i, t] - old[i, t] for t in toks) / len(toks))
        losses = []
        for t in toks:
            rho = seq if ratio_kind == "sequence" else math.exp(logp[i, t] - old[i, t])
            a = adv[i, t]
            l1, l2 = -a * rho, -a * min(max(rho, 1 - eps_low), 1 + eps_high)
            lt = max(l1, l2)
            if dual and a < 0:
                lt = min(lt, -dual * a)
            if beta:
                d = ref[i, t] - logp[i, t]
                lt += beta * (math.exp(d) - d - 1)
            losses.append(lt)
        if mode == "token-mean":
            num, den = num + sum(losses), den + len(toks)
        elif mode == "seq-mean-token-mean":
            num, den = num + sum(losses) / len(toks), den + 1
        else:
            num, den = num + sum(losses) / fixed_len, den + 1
    return num / den


@pytest.mark.parametrize("mode,ratio_kind,eps_high,dual,beta", [
    ("token-mean", "token", 0.28, 0.0, 0.0),              # DAPO: clip-higher, token-mean
    ("seq-mean-token-mean", "token", 0.2, 3.0, 0.04),     # GRPO with dual-clip and a k3 reference KL
    ("seq-mean-token-sum-norm", "token", 0.2, 0.0, 0.0),  # Dr. GRPO
    ("seq-mean-token-mean", "sequence", 4e-4, 0.0, 0.0),  # GSPO
])
def test_grpo_loss_equals_numpy_reference(mode, ratio_kind, eps_high, dual, beta):
    from ms_llm.losses.grpo import GRPOLoss, aggregation_weights
    from ms_llm.models import CausalLM, preset
    ms.set_seed(0)
    model = CausalLM(preset("tiny", vocab_size=V))
    model.set_train(False)
    ids, att, pos, tgt, mask, adv, r = _batch()
    logp = _logps(model, ids, att, pos, tgt)
    spread = 0.02 if ratio_kind == "sequence" else 0.4     # ratios on both sides of both clip bounds
    old = logp + r.normal(0, spread, logp.shape)
    if dual:                                                # ratios near 5 with A < 0: the dual clip binds
        old[(adv < 0) & (np.arange(S)[None, :] % 2 == 0)] -= 1.6
    old = old.astype(np.float32)
    ref = (logp + r.normal(0, 0.3, logp.shape)).astype(np.float32)
    ref[mask == 0] = 100.0          # unscored slots: exp(ref - logp) would overflow if the mask did not guard it
    eps_low = 3e-4 if ratio_kind == "sequence" else 0.2
    w, c = aggregation_weights(mask, mode, S)
    cell = GRPOLoss(model, eps_low, eps_high, dual, beta, ratio=ratio_kind)
    num, den, stats = cell(*(Tensor(x) for x in (ids, att, pos, tgt, mask)), Tensor(w.astype(np.float32)),
                           Tensor(c.astype(np.float32)), Tensor(old), Tensor(ref), Tensor(adv))
    want = _ref_loss(logp, old.astype(np.float64), ref.astype(np.float64), adv, mask, mode, ratio_kind, eps_low,
                     eps_high, dual, beta, S)
    assert float(num.asnumpy()) / float(den.asnumpy()) == pytest.approx(want, abs=1e-6)
    names = dict(zip(GRPOLoss.stat_names, stats.asnumpy().tolist()))
    assert names["policy/tokens"] == mask.sum()
    if ratio_kind == "token":                               # both clip sides were exercised
        assert names["policy/clipfrac_low"] > 0 and names["policy/clipfrac_high"] > 0
    if dual:
        assert names["policy/dual_clipfrac"] > 0            # and the dual clip did trigger


def test_aggregation_weights_and_gspo_ratio_match_loops():
    from ms_llm.losses.grpo import aggregation_weights, sequence_log_ratio
    _, _, _, _, mask, _, r = _batch(3)
    mask = mask.astype(np.float64)
    n = mask.sum(-1)
    w, c = aggregation_weights(mask, "seq-mean-token-mean")
    for i in range(B):
        for t in range(S):
            assert w[i, t] == pytest.approx(mask[i, t] / n[i] if n[i] else 0.0, abs=1e-12)
    assert list(c) == [1.0 if x else 0.0 for x in n]
    w, c = aggregation_weights(mask, "seq-mean-token-sum-norm", 32)
    assert np.allclose(w, mask / 32) and list(c) == [1.0 if x else 0.0 for x in n]
    w, c = aggregation_weights(mask, "token-mean")
    assert np.array_equal(w, mask) and list(c) == list(n)
    lp, old = r.normal(size=(B, S)), r.normal(size=(B, S))
    want = [sum((lp[i, t] - old[i, t]) for t in range(S) if mask[i, t]) / n[i] if n[i] else 0.0 for i in range(B)]
    np.testing.assert_allclose(sequence_log_ratio(lp, old, mask), want, atol=1e-12)


def _updater(tmp_path, model, accum, mode="token-mean"):
    from ms_llm.config import load_config
    from ms_llm.losses.grpo import GRPOLoss
    from ms_llm.training.updater import Updater
    (tmp_path / "c.yaml").write_text("model: {preset: tiny}\ndata: {sources: [{path: x.jsonl}]}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["optim.lr=1e-3", "train.loss_scale=none", "optim.weight_decay=0.1"])
    return Updater("policy", cfg, GRPOLoss(model, 0.2, 0.28), model, accum_steps=accum)


def _inputs(mode, seed=0, empty=False):
    from ms_llm.losses.grpo import aggregation_weights
    ids, att, pos, tgt, mask, adv, r = _batch(seed)
    if empty:
        mask[:] = 0
    w, c = aggregation_weights(mask, mode, S)
    old = r.normal(-4.2, 0.3, (B, S)).astype(np.float32)
    return [ids, att, pos, tgt, mask, w.astype(np.float32), c.astype(np.float32), old,
            np.zeros((B, S), np.float32), adv]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_one_batch_of_8_equals_8_accumulated_micro_batches(tmp_path, graph_mode, mode):
    """The micro-batch normalisation bug: with each micro-batch normalised by itself, 8 x 1 would weight a short
    completion's tokens like a long one's. Here the loss, the reported sums and the weights agree (≤ 1e-5)."""
    from ms_llm.models import CausalLM, preset
    from ms_llm.models.io import load_state_dict, model_state_dict
    ms.set_seed(0)
    start = model_state_dict(CausalLM(preset("tiny", vocab_size=V)))
    x = _inputs(mode)
    results = []
    for accum in (1, 8):
        model = CausalLM(preset("tiny", vocab_size=V))
        load_state_dict(model, start)
        upd = _updater(tmp_path, model, accum, mode)
        parts = np.split(np.arange(B), accum)
        out = upd([tuple(Tensor(a[p]) for a in x) for p in parts], 0)
        results.append((out, model_state_dict(model)))
    (a, wa), (b, wb) = results
    for key in ("loss", "grad_norm", "policy/tokens", "policy/clipfrac_high", "policy/entropy"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    assert max(np.abs(wa[k] - wb[k]).max() for k in wa) <= 1e-5
    assert max(np.abs(wa[k] - start[k]).max() for k in wa) > 1e-4


@pytest.mark.slow
def test_fully_masked_batch_gives_zero_loss_and_leaves_weights_and_adam_alone(tmp_path, graph_mode):
    """After a real step (Adam moments and weight decay would otherwise still move the weights), a batch whose
    every completion is masked (all truncated, overlong filtering): loss 0, weights and optimizer state unchanged."""
    from ms_llm.models import CausalLM, preset
    from ms_llm.models.io import model_state_dict
    ms.set_seed(0)
    model = CausalLM(preset("tiny", vocab_size=V))
    upd = _updater(tmp_path, model, 2)
    x = _inputs("token-mean")
    upd([tuple(Tensor(a[p]) for a in x) for p in np.split(np.arange(B), 2)], 0)
    before = model_state_dict(model)
    state = {k: v.asnumpy().copy() for k, v in upd.local_state().items()}
    x = _inputs("token-mean", seed=1, empty=True)
    out = upd([tuple(Tensor(a[p]) for a in x) for p in np.split(np.arange(B), 2)], 1)
    assert out["loss"] == 0.0 and out["grad_norm"] == 0.0
    after = model_state_dict(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(np.array_equal(state[k], v.asnumpy()) for k, v in upd.local_state().items())


def _torch_loss(logits, tgt, mask, w, c, old, ref, adv, ratio_kind, eps_low, eps_high, dual, beta, ent=0.0):
    """The module docstring's loss, written again in float64 PyTorch (autodiff is the reference)."""
    import torch
    lp_all = torch.log_softmax(logits, -1)
    logp = lp_all.gather(-1, tgt[..., None]).squeeze(-1)
    d = logp - old
    if ratio_kind == "sequence":
        n = mask.sum(-1, keepdim=True).clamp(min=1.0)
        rho = torch.exp(((d * mask).sum(-1, keepdim=True) / n).clamp(-20, 20)).expand_as(d)
    else:
        rho = torch.exp(d.clamp(-20, 20))
    loss = torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps_low, 1 + eps_high))
    if dual:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual * adv), loss)
    if beta:
        r = ((ref - logp) * mask).clamp(-20, 20)
        loss = loss + beta * (torch.exp(r) - r - 1)
    if ent:
        loss = loss + ent * (lp_all.exp() * lp_all).sum(-1)
    return (loss * w).sum() / c.sum()


@pytest.mark.parametrize("mode,ratio_kind,eps_low,eps_high,dual,beta", [
    ("seq-mean-token-mean", "token", 0.2, 0.28, 3.0, 0.04),      # GRPO, clip-higher, dual-clip, k3 KL
    ("seq-mean-token-mean", "sequence", 3e-4, 4e-4, 3.0, 0.04),  # GSPO with the same extras
    ("token-mean", "token", 0.2, 0.28, 0.0, 0.0),                # DAPO
])
def test_grpo_loss_gradients_equal_float64_autodiff(mode, ratio_kind, eps_low, eps_high, dual, beta, logit_table):
    """Gradients of GRPOLoss with respect to the logits against PyTorch float64 autodiff of the formula: a
    ratio put under stop_gradient, a sign flipped in the k3 term or a dual clip on the wrong side fails here even
    where the loss value still matches."""
    import torch
    from ms_llm.losses.grpo import GRPOLoss, aggregation_weights
    ids, att, pos, tgt, mask, adv, r = _batch(11)
    logits = r.normal(0, 1.5, (B, S, V))
    lp_all = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    logp = np.take_along_axis(lp_all, tgt[..., None], -1)[..., 0]
    spread = 2e-4 if ratio_kind == "sequence" else 0.4
    old = logp + r.normal(0, spread, logp.shape)
    neg = (adv < 0) & (mask > 0)
    some = (np.arange(B)[:, None] % 2 == 0) if ratio_kind == "sequence" else (np.arange(S)[None, :] % 2 == 0)
    old[neg & some] -= 1.6                                          # ratios near 5 with A < 0: the dual clip binds
    ref = logp + r.normal(0, 0.3, logp.shape)
    w, c = aggregation_weights(mask, mode, S)
    model = logit_table(logits.astype(np.float32))   # the loss's gradient w.r.t. the logits
    cell = GRPOLoss(model, eps_low, eps_high, dual, beta, ratio=ratio_kind)
    args = [Tensor(x) for x in (ids, att, pos, tgt, mask)] + [Tensor(x.astype(np.float32)) for x in (w, c, old, ref)] \
        + [Tensor(adv)]

    def loss_fn(*a):
        num, den, _ = cell(*a)
        return num / den
    got = ms.grad(loss_fn, grad_position=None, weights=model.trainable_params())(*args)[0].asnumpy()
    t = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in dict(mask=mask, w=w, c=c, old=old, ref=ref,
                                                                       adv=adv).items()}
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    _torch_loss(x, torch.tensor(tgt, dtype=torch.long), t["mask"], t["w"], t["c"], t["old"], t["ref"], t["adv"],
                ratio_kind, eps_low, eps_high, dual, beta).backward()
    want = x.grad.numpy()
    assert np.abs(want).max() > 1e-3                                # a gradient to compare
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max() + 1e-7, rtol=1e-4)
    _, _, stats = cell(*args)
    names = dict(zip(GRPOLoss.stat_names, stats.asnumpy().tolist()))
    if dual:
        assert names["policy/dual_clipfrac"] > 0                    # the dual clip did trigger
    if ratio_kind == "token":
        assert names["policy/clipfrac_low"] > 0 and names["policy/clipfrac_high"] > 0


@pytest.mark.parametrize("ratio_kind", ["token", "sequence"])
def test_a_huge_log_ratio_gives_finite_gradients(ratio_kind, logit_table):
    """Log-ratios of ±200 (a stale behaviour log-prob, a token the old policy all but excluded): exp would overflow
    to inf and inf·0 on a clipped token is NaN; the clamp to ±20 keeps loss and gradients finite."""
    from ms_llm.losses.grpo import GRPOLoss, aggregation_weights
    ids, att, pos, tgt, mask, adv, r = _batch(12)
    logits = r.normal(0, 1.0, (B, S, V))
    old = np.full((B, S), -1.0)
    old[:, ::2] = -250.0                                            # log-ratio ≈ +250
    old[:, 1::3] = 200.0                                            # log-ratio ≈ −200
    ref = np.where(mask > 0, 150.0, 0.0)                            # k3's exponent ≈ +150
    w, c = aggregation_weights(mask, "token-mean", S)
    model = logit_table(logits.astype(np.float32))   # the loss's gradient w.r.t. the logits
    cell = GRPOLoss(model, 0.2, 0.28, 3.0, 0.04, ratio=ratio_kind)
    args = [Tensor(x) for x in (ids, att, pos, tgt, mask)] + [Tensor(x.astype(np.float32)) for x in (w, c, old, ref)] \
        + [Tensor(adv)]

    def loss_fn(*a):
        num, den, _ = cell(*a)
        return num / den
    value = float(loss_fn(*args).asnumpy())
    grads = ms.grad(loss_fn, grad_position=None, weights=model.trainable_params())(*args)[0].asnumpy()
    assert np.isfinite(value) and np.isfinite(grads).all()
