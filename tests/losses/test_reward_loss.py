# SPDX-License-Identifier: Apache-2.0
"""Reward model and Bradley–Terry loss against independent NumPy references."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ms_llm.losses.reward import RewardLoss
from ms_llm.models import CausalLM, preset
from ms_llm.models.reward import RewardModel, truncate


def _np_softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _np_reward_loss(rc, rr, margin, c):
    """Mean over pairs of -log sigmoid(rc - rr - m) + c (rc + rr)^2, written directly."""
    per = -np.log(1.0 / (1.0 + np.exp(-(rc - rr - margin)))) + c * (rc + rr) ** 2
    return per.sum(), float(len(rc))


def _batch(rng, b=4, s=12, v=512):
    ids = rng.integers(3, v, (2, b, s)).astype(np.int32)
    mask = np.ones((2, b, s), np.int32)
    for k in range(2):
        for i in range(b):
            mask[k, i, rng.integers(4, s + 1):] = 0                  # right padding of varied length
    return ids, mask


@pytest.fixture
def rm():
    ms.set_seed(1)
    return RewardModel(truncate(CausalLM(preset("tiny")), 1), head_hidden=16, activation="tanh")


def test_reward_reads_the_last_real_token_only(rm):
    rng = np.random.default_rng(0)
    ids, mask = _batch(rng)
    base = rm(Tensor(ids[0]), Tensor(mask[0])).asnumpy()
    changed = ids[0].copy()
    changed[mask[0] == 0] = 7                                           # padding content must not matter
    np.testing.assert_allclose(rm(Tensor(changed), Tensor(mask[0])).asnumpy(), base, atol=1e-6)
    # the reward equals the head applied to the backbone's final hidden state at the last real token
    hidden = rm.backbone.hidden_states(Tensor(ids[0]), Tensor(mask[0])).asnumpy()
    last = mask[0].sum(1) - 1
    h = hidden[np.arange(len(last)), last]
    w1, b1 = rm.score_head.dense.weight.asnumpy(), rm.score_head.dense.bias.asnumpy()
    w2, b2 = rm.score_head.out_proj.weight.asnumpy(), rm.score_head.out_proj.bias.asnumpy()
    want = (np.tanh(h @ w1.T + b1) @ w2.T + b2)[:, 0]
    np.testing.assert_allclose(base, want, atol=1e-5)


def test_left_and_right_padding_give_the_same_reward(rm):
    rng = np.random.default_rng(4)
    ids, mask = _batch(rng)
    n = mask[0].sum(1)
    left_ids, left_mask = np.zeros_like(ids[0]), np.zeros_like(mask[0])
    for i, k in enumerate(n):
        left_ids[i, -k:], left_mask[i, -k:] = ids[0][i, :k], 1
    right = rm(Tensor(ids[0]), Tensor(mask[0])).asnumpy()
    np.testing.assert_allclose(rm(Tensor(left_ids), Tensor(left_mask)).asnumpy(), right, atol=1e-5)


@pytest.mark.parametrize("center", [0.0, 0.01])
def test_bradley_terry_loss_matches_numpy(rm, center):
    rng = np.random.default_rng(1)
    ids, mask = _batch(rng)
    margin = np.array([0.0, 0.5, 1.0, 2.0], np.float32)
    for p in rm.score_head.get_parameters():               # make the rewards O(1) so every term matters
        p.set_data(Tensor(p.asnumpy() * 40.0))
    loss = RewardLoss(rm, center)
    num, den = loss(Tensor(ids[0]), Tensor(mask[0]), Tensor(ids[1]), Tensor(mask[1]), Tensor(margin))
    rc = rm(Tensor(ids[0]), Tensor(mask[0])).asnumpy().astype(np.float64)
    rr = rm(Tensor(ids[1]), Tensor(mask[1])).asnumpy().astype(np.float64)
    assert np.abs(rc - rr).max() > 0.1
    want_num, want_den = _np_reward_loss(rc, rr, margin.astype(np.float64), center)
    assert float(den.asnumpy()) == want_den
    assert abs(float(num.asnumpy()) / want_den - want_num / want_den) <= 1e-6


def test_softplus_form_is_stable_where_the_direct_one_overflows():
    from ms_llm.losses.reward import softplus
    x = np.array([-200.0, -30.0, 0.0, 30.0, 200.0], np.float32)
    got = softplus(Tensor(x)).asnumpy()
    np.testing.assert_allclose(got, _np_softplus(x.astype(np.float64)), rtol=1e-6, atol=1e-6)
    assert np.isfinite(got).all()


def test_one_step_moves_rewards_apart(rm):
    """A training step on one pair raises r_chosen - r_rejected (the gradient has the right sign)."""
    from ms_llm.training.optim import AdamW
    from ms_llm.training.step import LossScaleState, TrainStep
    rng = np.random.default_rng(2)
    ids, mask = _batch(rng, b=2)
    batch = (Tensor(ids[0]), Tensor(mask[0]), Tensor(ids[1]), Tensor(mask[1]), Tensor(np.zeros(2, np.float32)))
    loss = RewardLoss(rm)
    before = rm(batch[0], batch[1]).asnumpy() - rm(batch[2], batch[3]).asnumpy()
    opt = AdamW(loss.trainable_params(), (0.9, 0.95), 1e-8, 0.0)
    assert not any("lm_head" in p.name for p in opt.parameters)       # the unused LM head does not train
    step = TrainStep(loss, opt, LossScaleState(False), 1, 1.0, loss_norm=2.0)
    for _ in range(3):
        step([batch], 1e-3)
    after = rm(batch[0], batch[1]).asnumpy() - rm(batch[2], batch[3]).asnumpy()
    assert (after > before).all()
