# SPDX-License-Identifier: Apache-2.0
"""Policy-gradient pieces of PPO-RLHF (seed 000 §1.2.5.4.2; formulas and the dual-clip reading in docs/rl.md).

Host side (numpy, on a rollout batch), per response token t of a row with response length n:

    KL estimators of KL(π‖π_ref) from one sample, with d = log π(y_t) − log π_ref(y_t) (Schulman 2020):
        k1 = d            k2 = d² / 2            k3 = e^(−d) − 1 + d
    per-token reward   r_t = −β·k(t)  (+ the sequence score at t = n − 1)
        moving the policy away from the reference raises k and lowers the reward (the sign MindRLHF has wrong)
    GAE (Schulman et al. 2016)   δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  V_n = A_n = 0
    returns            R_t = A_t + V_t
    whitening          A ← (A − mean) / (std + 1e-8) over the valid tokens of the whole rollout batch

Device side (loss cells, summed over tokens; the Updater divides by the summed token count, so micro-batches
and ranks equal one big batch — the token-mean of the whole mini-batch):

    ratio ρ = exp(clamp(log π − log π_old, −20, 20))     (the clamp, as verl and OpenRLHF do: a log-ratio past ~88
                                                           overflows exp, and inf·0 on a clipped token is a NaN
                                                           gradient)
    clipped surrogate  L = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))       (asymmetric bounds: DAPO)
    dual-clip          L ← min(L, −c·A) where A < 0, c > 1                      (Ye et al. 2020)
    entropy bonus      L ← L − ent_coef·H(π(·|s_t))
    value loss         ½·vf_coef·max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²)
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ms_llm.models.readout import read_log_probs

KL_ESTIMATORS = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0


def safe_exp(log_ratio):
    """exp of a log-ratio clamped to ±LOG_RATIO_CLAMP, so neither the value nor its gradient overflows."""
    return ops.exp(ops.clip_by_value(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


# ---------------------------------------------------------------- host side (numpy)

def kl_estimate(logp: np.ndarray, ref_logp: np.ndarray, kind: str = "k1") -> np.ndarray:
    """Per-token estimate of KL(π‖π_ref) from the sampled tokens' log-probs under each model."""
    d = np.asarray(logp, np.float64) - np.asarray(ref_logp, np.float64)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return np.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_ESTIMATORS}")


def token_rewards(scores: np.ndarray, kl: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """r [B, T]: −β·kl on every response token, plus each row's score on its last response token."""
    mask = np.asarray(mask, bool)
    r = np.where(mask, -beta * np.asarray(kl, np.float64), 0.0)
    lengths = mask.sum(-1)
    rows = np.nonzero(lengths > 0)[0]
    r[rows, lengths[rows] - 1] += np.asarray(scores, np.float64)[rows]
    return r


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float = 1.0, lam: float = 0.95):
    """(advantages, returns) [B, T] for responses that occupy the first mask.sum(-1) positions of each row;
    positions after a row's end hold 0."""
    mask = np.asarray(mask, np.float64)
    r, v = np.asarray(rewards, np.float64) * mask, np.asarray(values, np.float64) * mask
    adv = np.zeros_like(r)
    running = np.zeros(r.shape[0])
    next_v = np.zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
        next_v = v[:, t]
    return adv, (adv + v) * mask


def whiten(x: np.ndarray, mask: np.ndarray, shift_mean: bool = True) -> np.ndarray:
    """(x − mean) / (std + 1e-8) over the masked entries (population std); 0 elsewhere."""
    mask = np.asarray(mask, bool)
    vals = np.asarray(x, np.float64)[mask]
    if vals.size == 0:
        return np.zeros_like(x, np.float64)
    mean, std = vals.mean(), vals.std()
    out = (np.asarray(x, np.float64) - (mean if shift_mean else 0.0)) / (std + 1e-8)
    return np.where(mask, out, 0.0)


def explained_variance(values: np.ndarray, returns: np.ndarray, mask: np.ndarray) -> float:
    """1 − Var(R − V) / Var(R) over the masked tokens (1: the critic predicts the returns)."""
    mask = np.asarray(mask, bool)
    v, r = np.asarray(values, np.float64)[mask], np.asarray(returns, np.float64)[mask]
    var = r.var()
    return float(1.0 - (r - v).var() / var) if var > 0 else float("nan")


# ---------------------------------------------------------------- device side (MindSpore)

def clipped_surrogate(logp, old_logp, adv, eps_low: float, eps_high: float, dual_clip: float):
    """(per-token loss, clipped?, dual-clipped?) — the module docstring's L before the entropy bonus."""
    return surrogate_of_ratio(safe_exp(logp - old_logp), adv, eps_low, eps_high, dual_clip)


def surrogate_of_ratio(ratio, adv, eps_low: float, eps_high: float, dual_clip: float):
    """`clipped_surrogate` for a given ratio (a token's, or GSPO's sequence ratio spread over its tokens)."""
    pg1 = -adv * ratio
    pg2 = -adv * ops.clip_by_value(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = ops.maximum(pg1, pg2)
    clipped = (pg2 > pg1).astype(ms.float32)
    if dual_clip > 0:
        bound = -dual_clip * adv
        negative = adv < 0
        dual = ops.logical_and(negative, loss > bound)
        loss = ops.where(dual, bound, loss)
        return loss, clipped, dual.astype(ms.float32)
    return loss, clipped, ops.zeros_like(clipped)


def clipped_value_loss(values, old_values, returns, clip: float):
    """(½·max of the plain and the clipped squared error per token, clipped?)."""
    plain = ops.square(values - returns)
    if clip <= 0:
        return 0.5 * plain, ops.zeros_like(plain)
    clipped_v = old_values + ops.clip_by_value(values - old_values, -clip, clip)
    other = ops.square(clipped_v - returns)
    return 0.5 * ops.maximum(plain, other), (other > plain).astype(ms.float32)


class TokenLogps(nn.Cell):
    """(ids, attention_mask, position_ids, targets) [B, T] -> log π(target) [B, T] at `temperature`; no gradients
    (old-policy and reference scoring)."""

    def __init__(self, model, temperature: float = 1.0):
        super().__init__(auto_prefix=False)
        self.model, self.temperature = model, float(temperature)
        self.readout = model.readout_cell(self.temperature)

    def construct(self, ids, attention_mask, position_ids, targets):
        hidden = self.model.hidden_states(ids, attention_mask, position_ids)
        return read_log_probs(self.model, self.readout, hidden, targets)[0]


class PolicyLoss(nn.Cell):
    """PPO's clipped surrogate with dual-clip and an entropy bonus over one forward pass.

    Inputs [B, T]: ids, attention_mask, position_ids, targets (the next token) int32; loss_mask (1 on the
    response tokens this row trains), old_logps, advantages float32. Returns (sum of per-token losses,
    tokens, reported sums).
    """
    stat_names = ("policy/clipfrac", "policy/dual_clipfrac", "policy/approx_kl", "policy/entropy",
                  "policy/ratio_fluctuation", "policy/pg_loss")

    def __init__(self, model, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float = 3.0,
                 ent_coef: float = 0.0, temperature: float = 1.0):
        super().__init__(auto_prefix=False)
        self.model, self.temperature = model, float(temperature)
        self.eps_low, self.eps_high, self.dual_clip = float(eps_low), float(eps_high), float(dual_clip)
        self.ent_coef = float(ent_coef)
        self.readout = model.readout_cell(self.temperature, entropy=True)

    def construct(self, ids, attention_mask, position_ids, targets, loss_mask, old_logps, advantages):
        hidden = self.model.hidden_states(ids, attention_mask, position_ids)
        logp, entropy = read_log_probs(self.model, self.readout, hidden, targets)
        pg, clipped, dual = clipped_surrogate(logp, old_logps, advantages, self.eps_low, self.eps_high,
                                              self.dual_clip)
        loss = pg - self.ent_coef * entropy
        m = loss_mask
        d = ops.stop_gradient(ops.clip_by_value(logp - old_logps, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        ratio = ops.exp(d)
        stats = ops.stack(((clipped * m).sum(), (dual * m).sum(), ((ratio - 1.0 - d) * m).sum(),
                           (ops.stop_gradient(entropy) * m).sum(), (ops.abs(ratio - 1.0) * m).sum(),
                           (ops.stop_gradient(pg) * m).sum()))
        return (loss * m).sum(), m.sum(), stats


class ValueLoss(nn.Cell):
    """The critic's clipped value loss. Inputs [B, T]: ids, attention_mask, position_ids int32; loss_mask,
    old_values, returns float32."""
    stat_names = ("value/clipfrac", "value/mean", "value/error")

    def __init__(self, value_model, clip: float = 0.2, vf_coef: float = 0.5):
        super().__init__(auto_prefix=False)
        self.value_model, self.clip, self.vf_coef = value_model, float(clip), float(vf_coef)

    def construct(self, ids, attention_mask, position_ids, loss_mask, old_values, returns):
        values = self.value_model(ids, attention_mask, position_ids)
        loss, clipped = clipped_value_loss(values, old_values, returns, self.clip)
        m = loss_mask
        v = ops.stop_gradient(values)
        stats = ops.stack(((clipped * m).sum(), (v * m).sum(), (ops.square(v - returns) * m).sum()))
        return (self.vf_coef * loss * m).sum(), m.sum(), stats
