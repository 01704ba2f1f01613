# SPDX-License-Identifier: Apache-2.0
"""Preference-optimisation losses: DPO and its family (seed 002 §5.2.2; formulas and sources in docs/rl.md).

Every loss reads sequence log-probabilities of the answer tokens only (prompt and padding excluded):

    π_c, π_r     policy log p(chosen | x), log p(rejected | x)   (sums over answer tokens)
    ρ_c, ρ_r     the same under the frozen reference
    n_c, n_r     answer lengths in tokens
    h = (π_c − ρ_c) − (π_r − ρ_r)        the implicit reward margin, before β

    sigmoid   −(1−ε)·log σ(βh) − ε·log σ(−βh)              DPO (Rafailov et al. 2023); ε > 0 is cDPO
    robust    (−(1−ε)·log σ(βh) + ε·log σ(−βh)) / (1 − 2ε)   unbiased under label noise ε (Chowdhury et al. 2024)
    ipo       (h − 1/(2β))²                                 IPO (Azar et al. 2023), sequence log-ratios
    hinge     max(0, 1 − βh)                                SLiC-HF (Zhao et al. 2023)
    simpo     −log σ(β·π_c/n_c − β·π_r/n_r − γ)             SimPO (Meng et al. 2024), reference-free
    orpo      −π_c/n_c − β·log σ(log odds_c − log odds_r)    ORPO (Hong et al. 2024), reference-free;
              log odds = ℓ − log(1 − e^ℓ) with ℓ = π/n the mean token log-probability

Any paired loss but orpo may add α·(−π_c/n_c), the chosen answer's mean token NLL (`nll_coef`; RPO, Pang et al.
2024 "Iterative Reasoning Preference Optimization"): DPO alone lowers the likelihood of both answers and greedy
generations can drift; the NLL term holds the chosen answers' likelihood up.

KTO (Ethayarajh et al. 2024) takes unpaired completions y with a label (desirable or not):

    r = π(y|x) − ρ(y|x),  z = max(0, mean over the batch of π(y'|x) − ρ(y'|x)), detached,
    where y' is another row's completion (a mismatched pair estimates KL(π‖ρ));
    desirable: λ_D·(1 − σ(β(r − z)))    undesirable: λ_U·(1 − σ(β(z − r)))

Cells return (sum of per-example losses, number of examples, reported sums), so accumulation and data
parallel give the mean over the global batch exactly. `KTOLoss` estimates z on the rows it is given;
`KTOLossAtZ` takes z as an input, which the stage computes over the step's whole batch — every
micro-batch on every data-parallel rank — so z, like the loss, does not depend on how the batch is split (TRL
0.29.1 averages per-device estimates over the devices: the same thing for equal shares, without accumulation).
"""
import mindspore as ms
from mindspore import nn, ops

from ms_llm import ops as F
from ms_llm.config.schema import DPO_LOSSES, REFERENCE_FREE_DPO_LOSSES
from ms_llm.losses.reward import softplus
from ms_llm.models.readout import read_log_probs

LOSSES = DPO_LOSSES
PAIRED = tuple(k for k in LOSSES if k != "kto")
REFERENCE_FREE = REFERENCE_FREE_DPO_LOSSES


def log_sigmoid(x):
    return -softplus(-x)


def sequence_logps(logits, labels, ignore_index: int = -100):
    """(sum of log p(label) over counted positions [N], counted positions [N]) for [N, S, V] logits."""
    valid = labels != ignore_index
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    mask = valid.astype(ms.float32)
    return (F.token_log_probs(logits, safe) * mask).sum(-1), mask.sum(-1)


def model_sequence_logps(model, readout, ids, labels, ignore_index: int = -100):
    """`sequence_logps` of `model` on ids [N, S], read through `readout` (models/readout.py), so the [N, S, V]
    logits never exist."""
    valid = labels != ignore_index
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    mask = valid.astype(ms.float32)
    lp = read_log_probs(model, readout, model.hidden_states(ids), safe)[0]
    return (lp * mask).sum(-1), mask.sum(-1)


def paired_loss(kind: str, pc, pr, rc, rr, nc, nr, beta: float, eps: float = 0.0, gamma: float = 0.0):
    """Per-pair loss [B] of `kind` (module docstring); rc, rr are ignored by the reference-free kinds."""
    if kind == "simpo":
        return -log_sigmoid(beta * pc / nc - beta * pr / nr - gamma)
    if kind == "orpo":
        lc, lr = pc / nc, pr / nr
        log_odds = (lc - _log1mexp(lc)) - (lr - _log1mexp(lr))
        return -lc - beta * log_sigmoid(log_odds)
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        return -(1.0 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if kind == "robust":
        return (-(1.0 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    if kind == "ipo":
        return ops.square(h - 1.0 / (2.0 * beta))
    if kind == "hinge":
        return ops.relu(1.0 - beta * h)
    raise ValueError(f"unknown paired loss {kind!r}")


def _log1mexp(x):
    """log(1 − e^x) for x < 0, accurate at both ends (Mächler 2012)."""
    return ops.where(x > -0.6931472, ops.log(-ops.expm1(x)), ops.log1p(-ops.exp(x)))


def implicit_rewards(kind: str, pc, pr, rc, rr, nc, nr, beta: float):
    """What the metrics call rewards: β·(π − ρ), or β·π/n for the reference-free kinds."""
    if kind in REFERENCE_FREE:
        return beta * pc / nc, beta * pr / nr
    return beta * (pc - rc), beta * (pr - rr)


class PreferenceLoss(nn.Cell):
    """Paired losses over one forward pass of the 2B rows (chosen then rejected).

    Inputs: chosen_ids, chosen_labels, rejected_ids, rejected_labels [B, S] int32 (labels: the next answer token,
    −100 elsewhere); ref_chosen, ref_rejected [B] float32 (reference log-probs; zeros for reference-free kinds).
    """
    stat_names = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
                  "logps/rejected")

    def __init__(self, model, kind: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, nll_coef: float = 0.0):
        super().__init__(auto_prefix=False)
        if kind not in PAIRED:
            raise ValueError(f"dpo.loss {kind!r} is not a paired loss {PAIRED}")
        self.model, self.kind, self.beta = model, kind, float(beta)
        self.eps, self.gamma = float(label_smoothing), float(simpo_gamma)
        self.nll_coef = float(nll_coef) if kind != "orpo" else 0.0          # orpo has its own NLL term
        self.readout = model.readout_cell()

    def logps(self, chosen_ids, chosen_labels, rejected_ids, rejected_labels):
        """(π_c, π_r, n_c, n_r), each [B]."""
        b = chosen_ids.shape[0]
        lp, n = model_sequence_logps(self.model, self.readout, ops.concat((chosen_ids, rejected_ids), 0),
                                     ops.concat((chosen_labels, rejected_labels), 0))
        return lp[:b], lp[b:], n[:b], n[b:]

    def construct(self, chosen_ids, chosen_labels, rejected_ids, rejected_labels, ref_chosen, ref_rejected):
        pc, pr, nc, nr = self.logps(chosen_ids, chosen_labels, rejected_ids, rejected_labels)
        nc, nr = ops.maximum(nc, 1.0), ops.maximum(nr, 1.0)
        loss = paired_loss(self.kind, pc, pr, ref_chosen, ref_rejected, nc, nr, self.beta, self.eps, self.gamma)
        if self.nll_coef:
            loss = loss - self.nll_coef * pc / nc
        wc, wr = implicit_rewards(self.kind, pc, pr, ref_chosen, ref_rejected, nc, nr, self.beta)
        wc, wr = ops.stop_gradient(wc), ops.stop_gradient(wr)
        won = (wc > wr).astype(ms.float32) + 0.5 * (wc == wr).astype(ms.float32)       # a tie counts half
        stats = ops.stack((wc.sum(), wr.sum(), (wc - wr).sum(), won.sum(),
                           ops.stop_gradient(pc).sum(), ops.stop_gradient(pr).sum()))
        return loss.sum(), ops.ones_like(pc).sum(), stats


def kto_loss(r, r_kl, desirable, beta: float, w_desirable: float = 1.0, w_undesirable: float = 1.0):
    """Per-example KTO loss [B] (module docstring); r_kl: the mismatched rows' log-ratios [B]."""
    z = ops.stop_gradient(ops.maximum(r_kl.mean(), 0.0))
    return kto_loss_at(r, z, desirable, beta, w_desirable, w_undesirable), z


def kto_loss_at(r, z, desirable, beta: float, w_desirable: float = 1.0, w_undesirable: float = 1.0):
    """Per-example KTO loss [B] at the reference point z (a scalar or [B])."""
    good = w_desirable * (1.0 - ops.sigmoid(beta * (r - z)))
    bad = w_undesirable * (1.0 - ops.sigmoid(beta * (z - r)))
    return ops.where(desirable > 0.5, good, bad)


class KTOLoss(nn.Cell):
    """KTO over rows and their mismatched partners in one forward pass; z from those partners.

    Inputs: ids, labels, kl_ids, kl_labels [B, S] int32; ref_logps, ref_kl_logps [B] float32; desirable [B]
    float32 (1 or 0).
    """
    stat_names = ("kto/kl", "rewards/mean", "kto/desirable_share")

    def __init__(self, model, beta: float = 0.1, w_desirable: float = 1.0, w_undesirable: float = 1.0):
        super().__init__(auto_prefix=False)
        self.model, self.beta = model, float(beta)
        self.wd, self.wu = float(w_desirable), float(w_undesirable)
        self.readout = model.readout_cell()

    def construct(self, ids, labels, kl_ids, kl_labels, ref_logps, ref_kl_logps, desirable):
        b = ids.shape[0]
        lp, _ = model_sequence_logps(self.model, self.readout, ops.concat((ids, kl_ids), 0),
                                     ops.concat((labels, kl_labels), 0))
        r, r_kl = lp[:b] - ref_logps, lp[b:] - ref_kl_logps
        loss, z = kto_loss(r, r_kl, desirable, self.beta, self.wd, self.wu)
        return self._out(loss, r, z, desirable)

    def _out(self, loss, r, z, desirable):
        w = ops.stop_gradient(self.beta * r)
        stats = ops.stack((z * r.shape[0], w.sum(), desirable.sum()))
        return loss.sum(), ops.ones_like(r).sum(), stats


class KTOLossAtZ(KTOLoss):
    """KTO at a given reference point: ids, labels [B, S] int32; ref_logps, desirable, z [B] float32 (z the same
    in every row: the stage's estimate over the whole step's batch, on every rank)."""

    def construct(self, ids, labels, ref_logps, desirable, z):
        lp, _ = model_sequence_logps(self.model, self.readout, ids, labels)
        r = lp - ref_logps
        z = ops.stop_gradient(z)
        return self._out(kto_loss_at(r, z, desirable, self.beta, self.wd, self.wu), r, z.mean(), desirable)
