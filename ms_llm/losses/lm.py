# SPDX-License-Identifier: Apache-2.0
"""Next-token language-modelling loss (pretraining and continual pretraining).

Returns (sum of token negative log-likelihoods, number of counted tokens) so the train step can normalize
by the true token count across micro-batches and ranks. Labels are already aligned with the inputs
(labels[t] is the token after input t); -100 marks positions without loss.
"""
import mindspore as ms
from mindspore import nn, ops

from ms_llm import ops as F


class LMLoss(nn.Cell):
    def __init__(self, model, ignore_index: int = -100):
        super().__init__(auto_prefix=False)
        self.model, self.ignore_index = model, ignore_index

    def construct(self, input_ids, labels, position_ids=None, segment_ids=None):
        """input_ids, labels: [B, S] int32; position_ids, segment_ids: [B, S] (packed documents)."""
        return nll_sum(self.model(input_ids, None, position_ids, segment_ids), labels, self.ignore_index)


def nll_sum(logits, labels, ignore_index: int = -100):
    """(sum of -log p(label) over counted positions, number of counted positions) for [B, S, V] logits."""
    valid = labels != ignore_index
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    nll = -F.token_log_probs(logits, safe) * valid.astype(ms.float32)
    return nll.sum(), valid.astype(ms.float32).sum()
