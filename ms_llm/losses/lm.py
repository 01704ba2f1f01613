# SPDX-License-Identifier: Apache-2.0
"""Next-token language-modelling loss (pretraining and continual pretraining).

Returns (sum of token negative log-likelihoods, number of counted tokens) so the train step can normalize
by the true token count across micro-batches and ranks. Labels are already aligned with the inputs
(labels[t] is the token after input t); -100 marks positions without loss.
"""
import mindspore as ms
from mindspore import nn, ops


class LMLoss(nn.Cell):
    def __init__(self, model, ignore_index: int = -100):
        super().__init__(auto_prefix=False)
        self.model, self.ignore_index = model, ignore_index

    def construct(self, input_ids, labels, position_ids=None, segment_ids=None):
        """input_ids, labels: [B, S] int32; position_ids, segment_ids: [B, S] (packed documents)."""
        hidden = self.model.hidden_states(input_ids, None, position_ids, segment_ids)
        logp, valid = label_log_probs(self.model, hidden, labels, self.ignore_index)
        return -(logp * valid).sum(), valid.sum()


def label_log_probs(model, hidden, labels, ignore_index: int = -100):
    """(log p(label) [B, S], valid [B, S] float32) from final hidden states; positions whose label is
    `ignore_index` get valid 0 (and a log-prob of some real token: multiply by valid). Goes through
    `model.target_log_probs`, so with the CPU kernels the [B, S, V] logits never exist."""
    valid = labels != ignore_index
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    return model.target_log_probs(hidden, safe), valid.astype(ms.float32)
