# SPDX-License-Identifier: Apache-2.0
"""The DPO family against independent NumPy references (float64), on random log-probs and with masks."""
import math
import zlib

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn

from ms_llm.losses.dpo import KTOLoss, KTOLossAtZ, PAIRED, PreferenceLoss, kto_loss, paired_loss, sequence_logps


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_paired(kind, pc, pr, rc, rr, nc, nr, beta, eps, gamma):
    if kind == "simpo":
        return -np_log_sigmoid(beta * pc / nc - beta * pr / nr - gamma)
    if kind == "orpo":
        lc, lr = pc / nc, pr / nr
        odds = (lc - np.log(1 - np.exp(lc))) - (lr - np.log(1 - np.exp(lr)))
        return -lc - beta * np_log_sigmoid(odds)
    h = (pc - rc) - (pr - rr)
    return {"sigmoid": -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h),
            "robust": (-(1 - eps) * np_log_sigmoid(beta * h) + eps * np_log_sigmoid(-beta * h)) / (1 - 2 * eps),
            "ipo": (h - 1 / (2 * beta)) ** 2,
            "hinge": np.maximum(0.0, 1 - beta * h)}[kind]


def random_logps(rng, b=64):
    """Sums of token log-probs over 1-40 answer tokens, on a 1/256 grid: differences of such float32 values
    are exact, so the comparison measures the formula, not the rounding of its inputs."""
    n = rng.integers(1, 40, (2, b)).astype(np.float32)
    lp = -rng.gamma(2.0, 0.6, (4, b)) * np.concatenate([n, n])
    return (np.round(lp * 256) / 256).astype(np.float32), n


@pytest.mark.parametrize("kind", PAIRED)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_paired_losses_equal_numpy(kind, beta, eps):
    rng = np.random.default_rng(zlib.crc32(f"{kind}{beta}".encode()))
    (pc, pr, rc, rr), (nc, nr) = random_logps(rng)
    pc[:4] = rc[:4] + np.float32(1 / 256)                                  # near the policy = reference point
    got = paired_loss(kind, *(Tensor(v) for v in (pc, pr, rc, rr, nc, nr)), beta, eps, 0.5).asnumpy()
    want = np_paired(kind, *(v.astype(np.float64) for v in (pc, pr, rc, rr, nc, nr)), beta, eps, 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_dpo_is_ln2_when_the_policy_is_the_reference():
    lp = Tensor(np.array([-12.5, -3.0, -40.0], np.float32))
    got = paired_loss("sigmoid", lp, lp * 2, lp, lp * 2, None, None, 0.1).asnumpy()
    np.testing.assert_allclose(got, math.log(2), atol=1e-7)


def test_kto_equals_numpy():
    rng = np.random.default_rng(3)
    r, r_kl = rng.normal(size=32).astype(np.float32), rng.normal(0.3, 1, size=32).astype(np.float32)
    d = (rng.random(32) < 0.5).astype(np.float32)
    for beta, wd, wu in ((0.1, 1.0, 1.0), (0.5, 1.0, 1.33)):
        got, z = kto_loss(Tensor(r), Tensor(r_kl), Tensor(d), beta, wd, wu)
        z_np = max(0.0, r_kl.astype(np.float64).mean())
        sig = lambda x: 1 / (1 + np.exp(-x))                     # noqa: E731
        want = np.where(d > 0.5, wd * (1 - sig(beta * (r - z_np))), wu * (1 - sig(beta * (z_np - r))))
        np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-6, atol=1e-6)
        assert float(z.asnumpy()) == pytest.approx(z_np, abs=1e-6)
    _, z = kto_loss(Tensor(r), Tensor(r_kl - 5.0), Tensor(d), 0.1)
    assert float(z.asnumpy()) == 0.0                             # the reference point is clamped at 0


def np_seq_logps(logits, labels):
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    valid = labels != -100
    picked = np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return (picked * valid).sum(-1), valid.sum(-1)


def masked_labels(rng, b, s, v):
    labels = rng.integers(0, v, (b, s)).astype(np.int32)
    start = rng.integers(1, s - 2, b)
    end = np.minimum(s, start + rng.integers(1, s, b))
    for i in range(b):                                  # prompt before start, padding after end
        labels[i, :start[i]] = -100
        labels[i, end[i]:] = -100
    return labels


def test_sequence_logps_count_only_answer_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 9, 11)).astype(np.float32)
    labels = masked_labels(rng, 6, 9, 11)
    lp, n = sequence_logps(Tensor(logits), Tensor(labels))
    want_lp, want_n = np_seq_logps(logits, labels)
    np.testing.assert_allclose(lp.asnumpy(), want_lp, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(n.asnumpy(), want_n)


@pytest.mark.parametrize("kind,nll", [("sigmoid", 0.0), ("sigmoid", 0.5), ("simpo", 0.0), ("orpo", 0.0)])
def test_preference_cell_equals_numpy_with_masks(kind, nll, logit_table):
    rng = np.random.default_rng(5)
    b, s, v = 4, 10, 13
    logits = rng.normal(size=(2 * b, s, v)).astype(np.float32)
    labels = masked_labels(rng, 2 * b, s, v)
    ref = rng.normal(-10, 2, size=(2, b)).astype(np.float32)
    cell = PreferenceLoss(logit_table(logits), kind, beta=0.2, nll_coef=nll)
    ids = Tensor(np.zeros((b, s), np.int32))
    total, count, stats = cell(ids, Tensor(labels[:b]), ids, Tensor(labels[b:]), Tensor(ref[0]), Tensor(ref[1]))
    lp, n = np_seq_logps(logits, labels)
    want = np_paired(kind, lp[:b], lp[b:], ref[0], ref[1], n[:b], n[b:], 0.2, 0.0, 0.5) - nll * lp[:b] / n[:b]
    assert float(count.asnumpy()) == b
    np.testing.assert_allclose(float(total.asnumpy()), want.sum(), rtol=1e-5)
    wc = 0.2 * (lp[:b] / n[:b] if kind != "sigmoid" else lp[:b] - ref[0])
    wr = 0.2 * (lp[b:] / n[b:] if kind != "sigmoid" else lp[b:] - ref[1])
    won = (wc > wr).sum() + 0.5 * (wc == wr).sum()
    np.testing.assert_allclose(stats.asnumpy(), [wc.sum(), wr.sum(), (wc - wr).sum(), won, lp[:b].sum(),
                                                 lp[b:].sum()], rtol=1e-5, atol=1e-5)


def _kto_inputs(seed: int, b: int = 4, s: int = 8, v: int = 7):
    """Logits and masked labels of b rows and their b mismatched partners, and the reference's log-probs [2, b]."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2 * b, s, v)).astype(np.float32)
    labels = masked_labels(rng, 2 * b, s, v)
    return logits, labels, rng.normal(-8, 1, size=(2, b)).astype(np.float32)


def test_kto_cell_uses_the_mismatched_rows_for_z(logit_table):
    b, s = 4, 8
    logits, labels, ref = _kto_inputs(6)
    d = np.array([1, 0, 1, 1], np.float32)
    ids = Tensor(np.zeros((b, s), np.int32))
    total, count, stats = KTOLoss(logit_table(logits), beta=0.3)(ids, Tensor(labels[:b]), ids, Tensor(labels[b:]),
                                                               Tensor(ref[0]), Tensor(ref[1]), Tensor(d))
    lp, _ = np_seq_logps(logits, labels)
    r, r_kl = lp[:b] - ref[0], lp[b:] - ref[1]
    z = max(0.0, r_kl.mean())
    sig = lambda x: 1 / (1 + np.exp(-x))                         # noqa: E731
    want = np.where(d > 0.5, 1 - sig(0.3 * (r - z)), 1 - sig(0.3 * (z - r)))
    np.testing.assert_allclose(float(total.asnumpy()), want.sum(), rtol=1e-5)
    assert float(count.asnumpy()) == b
    np.testing.assert_allclose(stats.asnumpy(), [z * b, 0.3 * r.sum(), d.sum()], rtol=1e-5, atol=1e-5)


def test_kto_at_a_given_reference_point_equals_numpy_and_the_partnered_cell(logit_table):
    """KTOLossAtZ (z computed by the stage over the whole step) against NumPy at a z from elsewhere; at the z of
    the same mismatched rows it equals KTOLoss."""
    b, s = 4, 8
    logits, labels, ref = _kto_inputs(7)
    d = np.array([0, 1, 1, 0], np.float32)
    lp, _ = np_seq_logps(logits, labels)
    r = lp[:b] - ref[0]
    sig = lambda x: 1 / (1 + np.exp(-x))                         # noqa: E731
    for z in (0.0, 0.7, 3.1):
        total, count, stats = KTOLossAtZ(logit_table(logits[:b]), beta=0.3, w_undesirable=1.5)(
            Tensor(np.zeros((b, s), np.int32)), Tensor(labels[:b]), Tensor(ref[0]), Tensor(d),
            Tensor(np.full(b, z, np.float32)))
        want = np.where(d > 0.5, 1 - sig(0.3 * (r - z)), 1.5 * (1 - sig(0.3 * (z - r))))
        np.testing.assert_allclose(float(total.asnumpy()), want.sum(), rtol=1e-5)
        assert float(count.asnumpy()) == b
        np.testing.assert_allclose(stats.asnumpy(), [z * b, 0.3 * r.sum(), d.sum()], rtol=1e-5, atol=1e-5)
    z = max(0.0, (lp[b:] - ref[1]).mean())
    ids = Tensor(np.zeros((b, s), np.int32))
    partnered = KTOLoss(logit_table(logits), beta=0.3)(ids, Tensor(labels[:b]), ids, Tensor(labels[b:]),
                                                      Tensor(ref[0]), Tensor(ref[1]), Tensor(d))
    at_z = KTOLossAtZ(logit_table(logits[:b]), beta=0.3)(ids, Tensor(labels[:b]), Tensor(ref[0]), Tensor(d),
                                                        Tensor(np.full(b, z, np.float32)))
    for x, y in zip(partnered, at_z):
        np.testing.assert_allclose(x.asnumpy(), y.asnumpy(), rtol=1e-5, atol=1e-6)
