# SPDX-License-Identifier: Apache-2.0
"""SFT loss with per-turn normalization (see data/sft.py for the formula and seed 003 for why).

Returns (sum over label tokens of weight x nll, sum of the rows' turn weights); the train step divides the
two after summing over micro-batches and ranks, which gives sum_t w_t l_t/n_t / sum_t w_t.
"""
from mindspore import nn

from ms_llm.losses.lm import label_log_probs


class SFTLoss(nn.Cell):
    def __init__(self, model, ignore_index: int = -100):
        super().__init__(auto_prefix=False)
        self.model, self.ignore_index = model, ignore_index

    def construct(self, input_ids, labels, attention_mask, weights, row_weight, position_ids, segment_ids,
                  embed_noise=None):
        """input_ids, labels, attention_mask, position_ids, segment_ids: [B, S] int32 (data/sft.py KEYS: a packed
        row holds several conversations, each its own segment); weights: [B, S] float32; row_weight: [B] float32;
        embed_noise: [B, S, H] NEFTune noise (optional, see CausalLM.construct)."""
        hidden = self.model.hidden_states(input_ids, attention_mask, position_ids, segment_ids, embed_noise)
        logp, valid = label_log_probs(self.model, hidden, labels, self.ignore_index)
        return -(logp * weights * valid).sum(), row_weight.sum()
