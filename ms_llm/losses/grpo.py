# SPDX-License-Identifier: Apache-2.0
"""The GRPO family's objective (seed 004): GRPO, Dr. GRPO, DAPO and GSPO, as named options of one loss.

Host side (numpy, on a rollout batch of groups of G completions of one prompt):

    group advantage      A_i = (r_i − mean_g(r)) / (std_g(r) + ε)   std unbiased (ddof 1); scale:
                             group  std of the completion's own group (GRPO, DAPO)
                             batch  std of every reward in the batch
                             none   no division (Dr. GRPO)
                         a group of one, or one whose rewards are all equal, has A = 0
    overlong shaping     with L = max length, B = buffer (DAPO):  R_len(n) = 0 for n ≤ L − B,
                         (L − B − n) / B for L − B < n ≤ L, −1 beyond; times a penalty factor
    aggregation weights  the loss is Σ_it w_it·ℓ_it / Σ_i c_i, every sum over the whole global batch, so a
                         split into micro-batches or data-parallel ranks changes nothing (training/step.py):
                             token-mean               w = m,          c_i = n_i                 (DAPO)
                             seq-mean-token-mean      w = m / n_i,    c_i = [n_i > 0]           (GRPO)
                             seq-mean-token-sum-norm  w = m / L_fix,  c_i = [n_i > 0]           (Dr. GRPO)
                         m: the token mask (0 on padding and on masked truncated completions), n_i = Σ_t m_it

Device side (`GRPOLoss`, one forward pass), per response token with d_t = log π − log π_old:

    token ratio          ρ_t = exp(d_t)                                          (GRPO, DAPO, Dr. GRPO)
    sequence ratio       s_i = exp(Σ_t m_t·d_t / n_i), the same for every token of the sequence     (GSPO)
                         every exponent (d_t, the sequence mean, r_t below) is clamped to ±20 first
                         (losses/policy.py: safe_exp)
    surrogate            ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)), optional dual-clip (losses/policy.py)
    KL to the reference  ℓ += β·k3,  k3 = exp(r_t) − r_t − 1 with r_t = log π_ref − log π  (β = 0: no reference)
    entropy bonus        ℓ −= c_H·H(π(·|s_t))
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ms_llm.losses.policy import LOG_RATIO_CLAMP, safe_exp, surrogate_of_ratio
from ms_llm.models.readout import read_log_probs

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ADVANTAGE_SCALES = ("group", "batch", "none")
RATIOS = ("token", "sequence")


# ---------------------------------------------------------------- host side (numpy)

def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = 1e-6) -> np.ndarray:
    """A [B] for B = groups × group_size rewards laid out group by group (module docstring)."""
    r = np.asarray(rewards, np.float64)
    if group_size < 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose one of {ADVANTAGE_SCALES}")
    g = r.reshape(-1, group_size)
    centred = g - g.mean(1, keepdims=True)
    if scale == "none" or group_size == 1:
        return centred.reshape(-1)
    if scale == "group":
        std = g.std(1, ddof=1, keepdims=True)
    else:
        std = np.full((g.shape[0], 1), r.std(ddof=1) if r.size > 1 else 0.0)
    return (centred / (std + eps)).reshape(-1)


def group_reward_std(rewards, group_size: int) -> np.ndarray:
    """Unbiased std of each group's rewards [groups] (0 for a group of one)."""
    g = np.asarray(rewards, np.float64).reshape(-1, group_size)
    return g.std(1, ddof=1) if group_size > 1 else np.zeros(g.shape[0])


def overlong_penalty(lengths, max_len: int, buffer: int, factor: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment [B] (≤ 0) for completions of `lengths` tokens."""
    n = np.asarray(lengths, np.float64)
    if buffer <= 0:
        return np.where(n > max_len, -factor, 0.0)
    start = max_len - buffer
    soft = (start - n) / buffer
    return factor * np.where(n <= start, 0.0, np.where(n <= max_len, soft, -1.0))


def aggregation_weights(mask, mode: str, fixed_len: int = None):
    """(token weights w [B, T], row counts c [B]) of an aggregation mode (module docstring)."""
    m = np.asarray(mask, np.float64)
    n = m.sum(-1)
    live = (n > 0).astype(np.float64)
    if mode == "token-mean":
        return m, n
    if mode == "seq-mean-token-mean":
        return m / np.maximum(n, 1.0)[:, None], live
    if mode == "seq-mean-token-sum-norm":
        length = float(fixed_len or m.shape[1])
        return m / length, live
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}")


def sequence_log_ratio(logp, old_logp, mask) -> np.ndarray:
    """GSPO's log s_i = Σ_t m·(log π − log π_old) / n_i [B] (0 for an empty row)."""
    m = np.asarray(mask, np.float64)
    d = (np.asarray(logp, np.float64) - np.asarray(old_logp, np.float64)) * m
    return d.sum(-1) / np.maximum(m.sum(-1), 1.0)


# ---------------------------------------------------------------- device side (MindSpore)

class GRPOLoss(nn.Cell):
    """The GRPO-family loss over one forward pass.

    Inputs [B, T]: ids, attention_mask, position_ids, targets (int32); loss_mask (1 on tokens that train),
    weights (aggregation weights, 0 where the mask is), old_logps, ref_logps, advantages (the sequence's
    advantage on each of its tokens) float32; counts [B] float32. Returns (Σ w·ℓ, Σ c, reported sums): the
    reported sums are token sums over the mask — `policy/tokens` among them, so the host turns each into a
    per-token mean whatever the aggregation.
    """
    stat_names = ("policy/tokens", "policy/clipfrac_low", "policy/clipfrac_high", "policy/dual_clipfrac",
                  "policy/approx_kl", "policy/entropy", "policy/ref_kl", "policy/ratio")

    def __init__(self, model, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float = 0.0,
                 beta: float = 0.0, ent_coef: float = 0.0, ratio: str = "token", temperature: float = 1.0):
        super().__init__(auto_prefix=False)
        if ratio not in RATIOS:
            raise ValueError(f"unknown ratio {ratio!r}; choose one of {RATIOS}")
        self.model, self.temperature = model, float(temperature)
        self.eps_low, self.eps_high, self.dual_clip = float(eps_low), float(eps_high), float(dual_clip)
        self.beta, self.ent_coef, self.sequence = float(beta), float(ent_coef), ratio == "sequence"
        self.readout = model.readout_cell(self.temperature, entropy=True)

    def construct(self, ids, attention_mask, position_ids, targets, loss_mask, weights, counts, old_logps,
                  ref_logps, advantages):
        hidden = self.model.hidden_states(ids, attention_mask, position_ids)
        logp, entropy = read_log_probs(self.model, self.readout, hidden, targets)
        m = loss_mask
        d = logp - old_logps
        if self.sequence:
            n = ops.maximum(m.sum(-1, keepdims=True), 1.0)
            ratio = safe_exp((d * m).sum(-1, keepdims=True) / n) * ops.ones_like(d)
        else:
            ratio = safe_exp(d)
        loss, _, dual = surrogate_of_ratio(ratio, advantages, self.eps_low, self.eps_high, self.dual_clip)
        ref_kl = ops.zeros_like(loss)
        if self.beta > 0:
            r = (ref_logps - logp) * m          # 0 where nothing trains: exp() of an unscored slot cannot overflow
            r = ops.clip_by_value(r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            ref_kl = ops.exp(r) - r - 1.0
            loss = loss + self.beta * ref_kl
        if self.ent_coef > 0:
            loss = loss - self.ent_coef * entropy
        rho = ops.stop_gradient(ratio)
        low = ops.logical_and(advantages < 0, rho < 1.0 - self.eps_low).astype(ms.float32)
        high = ops.logical_and(advantages > 0, rho > 1.0 + self.eps_high).astype(ms.float32)
        dk = ops.stop_gradient(ops.clip_by_value(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        stats = ops.stack((m.sum(), (low * m).sum(), (high * m).sum(), (dual * m).sum(),
                           ((ops.exp(dk) - 1.0 - dk) * m).sum(), (ops.stop_gradient(entropy) * m).sum(),
                           (ops.stop_gradient(ref_kl) * m).sum(), (rho * m).sum()))
        return (loss * weights).sum(), counts.sum(), stats
