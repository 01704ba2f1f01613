# SPDX-License-Identifier: Apache-2.0
"""Reward-model validation: pairwise accuracy, ROC AUC, per-tag accuracy, calibration (ECE) and Platt scaling.

    ms-llm eval rm --model runs/tiny_reward --data data/tiny/preference_eval.jsonl

AUC treats chosen scores as positives and rejected scores as negatives: the probability that a random chosen
answer outscores a random rejected one (Mann–Whitney U / (n_pos n_neg), ties counted half).

Calibration is of P(chosen ≻ rejected) = sigmoid(a (r_c - r_r) + b). Each pair is counted in both orders
(label 1 for chosen-first, 0 for rejected-first), so the reliability diagram is symmetric and the fitted b is
~0; Platt scaling (Platt 1999) fits a and b by logistic regression on a calibration split.
"""
import numpy as np
from mindspore import Tensor

from ms_llm.errors import MsLlmError


def rank_auc(pos, neg) -> float:
    """ROC AUC of positive vs negative scores from average ranks (ties get their mean rank)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _both_orders(diff):
    d = np.asarray(diff, np.float64)
    return np.concatenate([d, -d]), np.concatenate([np.ones(len(d)), np.zeros(len(d))])


def ece(diff, a: float = 1.0, b: float = 0.0, bins: int = 10) -> float:
    """Expected calibration error of sigmoid(a * diff + b) over both orders of every pair (equal-width bins)."""
    x, y = _both_orders(diff)
    p = _sigmoid(a * x + b)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for k in range(bins):
        sel = idx == k
        if sel.any():
            total += sel.sum() * abs(y[sel].mean() - p[sel].mean())
    return float(total / len(p))


def fit_platt(diff, iters: int = 100, l2: float = 1e-6) -> dict:
    """Logistic regression of the label on (diff, 1) over both orders: Newton's method from (0, 0) with step
    halving, so the negative log-likelihood never rises. Returns {"a", "b"}.

    The targets are Platt's (1999) regularized ones, (n + 1) / (n + 2) and 1 / (n + 2) for n pairs, instead of
    1 and 0: a reward model that orders almost every calibration pair right would otherwise get an ever larger
    slope (the likelihood keeps improving), and an overconfident one on new pairs."""
    x, y = _both_orders(diff)
    if not len(x):
        raise MsLlmError("Platt scaling needs at least one calibration pair")
    n = len(x) // 2
    y = np.where(y > 0, (n + 1.0) / (n + 2.0), 1.0 / (n + 2.0))
    X = np.stack([x, np.ones_like(x)], 1)

    def nll(w):
        z = X @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w @ w)
    w = np.zeros(2)
    for _ in range(iters):
        p = _sigmoid(X @ w)
        grad = X.T @ (p - y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step, t, base = np.linalg.solve(hess, grad), 1.0, nll(w)
        while nll(w - t * step) > base and t > 1e-8:
            t *= 0.5
        w = w - t * step
        if np.abs(t * step).max() < 1e-10:
            break
    return {"a": float(w[0]), "b": float(w[1])}


def pair_metrics(chosen, rejected, tags=None, calibration: dict = None) -> dict:
    """Accuracy, AUC, per-tag accuracy and ECE (raw, and calibrated when `calibration` is given)."""
    c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    diff = c - r
    out = {"accuracy": float((diff > 0).mean()), "auc": rank_auc(c, r), "ece": ece(diff), "pairs": int(len(c)),
           "reward_mean": float(np.concatenate([c, r]).mean()), "margin_mean": float(diff.mean())}
    if calibration is not None:
        out["ece_calibrated"] = ece(diff, calibration["a"], calibration["b"])
    for tag in sorted(set(tags or [])):
        sel = np.asarray([t == tag for t in tags])
        out[f"accuracy/{tag}"] = float((diff[sel] > 0).mean())
    return out


def score_pairs(rm, pairs: list, batch_size: int = 16):
    """(chosen rewards, rejected rewards) of encoded pairs (data/preference.py) under a RewardModel cell.
    The last batch is padded with repeats so every call has one shape (one compiled graph)."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
        ids = np.stack([p["chosen_ids"] for p in rows] + [p["rejected_ids"] for p in rows])
        mask = np.stack([p["chosen_mask"] for p in rows] + [p["rejected_mask"] for p in rows])
        out = rm(Tensor(ids), Tensor(mask)).asnumpy()
        chosen.extend(out[:len(chunk)])
        rejected.extend(out[batch_size:batch_size + len(chunk)])
    return np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)


def split_calibration(n: int, fraction: float, seed: int = 0):
    """(calibration indices, test indices): a seeded random split of n pairs."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return np.sort(order[:k]), np.sort(order[k:])
