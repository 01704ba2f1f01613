# SPDX-License-Identifier: Apache-2.0
"""Bradley–Terry reward-model loss (Ouyang et al. 2022, "Training language models to follow instructions
with human feedback", eq. 1), with two options:

    loss_i = -log sigmoid(r_chosen - r_rejected - m_i)  +  c * (r_chosen + r_rejected)^2

  * m_i: a per-pair margin (Llama 2, Touvron et al. 2023, §3.2.2): the chosen answer must win by at least m;
  * c: reward centering (Eisenstein et al. 2023, "Helping or Herding?"): keeps rewards near zero mean,
    since the BT loss only sees differences (c = 0.01 when on).

Returns (sum over pairs, number of pairs): the train step sums both over micro-batches and ranks before
dividing, so the loss is the mean over the global batch however it is split.
"""
import mindspore as ms
from mindspore import nn, ops


def softplus(x):
    """log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|)."""
    return ops.maximum(x, 0.0) + ops.log1p(ops.exp(-ops.abs(x)))


class RewardLoss(nn.Cell):
    def __init__(self, reward_model, center_coef: float = 0.0):
        super().__init__(auto_prefix=False)
        self.rm, self.center_coef = reward_model, float(center_coef)

    def rewards(self, chosen_ids, chosen_mask, rejected_ids, rejected_mask):
        """(r_chosen [B], r_rejected [B]) from one forward pass over the 2B rows."""
        b = chosen_ids.shape[0]
        r = self.rm(ops.concat((chosen_ids, rejected_ids), 0), ops.concat((chosen_mask, rejected_mask), 0))
        return r[:b], r[b:]

    def construct(self, chosen_ids, chosen_mask, rejected_ids, rejected_mask, margin):
        """ids, masks: [B, S] int32; margin: [B] float32 (0 where the data has none)."""
        rc, rr = self.rewards(chosen_ids, chosen_mask, rejected_ids, rejected_mask)
        loss = softplus(-(rc - rr - margin))
        if self.center_coef:
            loss = loss + self.center_coef * ops.square(rc + rr)
        return loss.sum(), ops.ones_like(margin).sum().astype(ms.float32)
