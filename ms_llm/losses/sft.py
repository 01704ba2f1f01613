# SPDX-License-Identifier: Apache-2.0
"""SFT loss with per-turn normalization (see data/sft.py for the formula and seed 003 for why).

Returns (sum over label tokens of weight x nll, sum of the rows' turn weights); the train step divides the
two after summing over micro-batches and ranks, which gives sum_t w_t l_t/n_t / sum_t w_t.
"""
import mindspore as ms
from mindspore import nn, ops

from ms_llm import ops as F


class SFTLoss(nn.Cell):
    def __init__(self, model, ignore_index: int = -100):
        super().__init__(auto_prefix=False)
        self.model, self.ignore_index = model, ignore_index

    def construct(self, input_ids, labels, attention_mask, weights, row_weight, embed_noise=None):
        """input_ids, labels, attention_mask: [B, S] int32; weights: [B, S] float32; row_weight: [B] float32;
        embed_noise: [B, S, H] NEFTune noise (optional, see CausalLM.construct)."""
        logits = self.model(input_ids, attention_mask, None, None, embed_noise)
        valid = labels != self.ignore_index
        safe = ops.where(valid, labels, ops.zeros_like(labels))
        nll = -F.token_log_probs(logits, safe)
        return (nll * weights * valid.astype(ms.float32)).sum(), row_weight.sum()
