# SPDX-License-Identifier: Apache-2.0
"""Reward-model validation metrics: AUC against a direct Mann–Whitney count, ECE by hand, Platt scaling."""
import numpy as np
import pytest

from ms_llm.eval.reward import ece, fit_platt, pair_metrics, rank_auc, split_calibration


def _mann_whitney(pos, neg):
    """P(pos > neg) + 0.5 P(pos == neg), counted over every cross pair."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_a_mann_whitney_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos = np.round(rng.normal(0.5, 1.0, 57), 1)            # rounding makes ties, within and across groups
    neg = np.round(rng.normal(0.0, 1.0, 43), 1)
    assert rank_auc(pos, neg) == pytest.approx(_mann_whitney(pos, neg), abs=1e-12)
    assert rank_auc([1, 2], [3, 4]) == 0.0 and rank_auc([3, 4], [1, 2]) == 1.0 and rank_auc([1], [1]) == 0.5


def test_ece_by_hand():
    # diff 0 -> p = 0.5 for both orders, labels average 0.5: perfectly calibrated
    assert ece([0.0, 0.0]) == pytest.approx(0.0)
    # one pair with a huge margin: p ~ 1 (label 1) and p ~ 0 (label 0): calibrated. With a = 0 both orders get
    # p = 0.5 in one bin whose labels average 0.5: ECE's blind spot, which is why accuracy and AUC are reported too
    assert ece([50.0]) == pytest.approx(0.0, abs=1e-9)
    assert ece([50.0], a=0.0) == pytest.approx(0.0)
    # diff = ln 3 -> p = 0.75 in one order, 0.25 in the other; both orders right -> |1 - 0.75| = |0 - 0.25| = 0.25
    assert ece([np.log(3.0)]) == pytest.approx(0.25)


def _overconfident_pairs(rng, n, scale):
    """True preference logits z; the chosen side is drawn from sigmoid(z); scores are scale x z."""
    z = rng.normal(0.0, 1.5, n)
    chosen_first = rng.random(n) < 1.0 / (1.0 + np.exp(-z))
    return np.where(chosen_first, z, -z) * scale


def test_platt_scaling_lowers_held_out_ece():
    rng = np.random.default_rng(0)
    diff = _overconfident_pairs(rng, 4000, scale=4.0)
    cal, test = split_calibration(len(diff), 0.5, seed=0)
    assert len(set(cal) & set(test)) == 0 and len(cal) + len(test) == len(diff)
    params = fit_platt(diff[cal])
    assert params["a"] == pytest.approx(0.25, rel=0.15) and abs(params["b"]) < 1e-9   # both orders: b = 0
    before, after = ece(diff[test]), ece(diff[test], **params)
    assert after < 0.5 * before and after < 0.03


def test_platt_fit_is_the_logistic_regression_optimum():
    """At the fitted (a, b) the log-likelihood's gradient vanishes, with Platt's targets (n+1)/(n+2) and
    1/(n+2) (checked with plain NumPy); separable pairs get a finite slope."""
    rng = np.random.default_rng(3)
    diff = rng.normal(1.0, 2.0, 300)
    a, b = fit_platt(diff, l2=0.0).values()
    x = np.concatenate([diff, -diff])
    y = np.concatenate([np.full(300, 301 / 302), np.full(300, 1 / 302)])
    p = 1 / (1 + np.exp(-(a * x + b)))
    assert abs(((p - y) * x).sum()) < 1e-6 and abs((p - y).sum()) < 1e-6
    separable = fit_platt(np.abs(diff) + 0.5, l2=0.0)["a"]
    assert 0 < separable < 20


def test_pair_metrics_per_tag():
    m = pair_metrics([2.0, 1.0, 0.0, 3.0], [1.0, 2.0, -1.0, 0.0], ["a", "a", "b", "b"], {"a": 0.5, "b": 0.0})
    assert m["accuracy"] == 0.75 and m["accuracy/a"] == 0.5 and m["accuracy/b"] == 1.0 and m["pairs"] == 4
    assert m["auc"] == pytest.approx(_mann_whitney([2, 1, 0, 3], [1, 2, -1, 0]))
    assert m["ece_calibrated"] == pytest.approx(ece(np.array([1.0, -1.0, 1.0, 3.0]), 0.5, 0.0))
