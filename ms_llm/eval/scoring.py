# SPDX-License-Identifier: Apache-2.0
"""Log-likelihood scoring of continuations, shared by multiple choice and perplexity."""
import mindspore as ms
import numpy as np


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sequence_logprobs(model, seqs, bucket: int = 64) -> list:
    """Per-token log p(token | prefix) for each id list (first token gets none): list of float arrays.

    Sequences are right-padded to a multiple of `bucket` so GRAPH_MODE compiles few shapes.
    """
    width = max(len(s) for s in seqs)
    width = -(-width // bucket) * bucket
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    model.set_train(False)
    logits = model(ms.Tensor(ids), ms.Tensor(mask)).asnumpy().astype(np.float64)
    out = []
    for i, s in enumerate(seqs):
        lp = _log_softmax(logits[i, :len(s) - 1])
        out.append(lp[np.arange(len(s) - 1), np.asarray(s[1:])])
    return out


def continuation_scores(model, context: list, continuations: list, normalize: bool = False) -> np.ndarray:
    """Sum (or mean, with normalize) of log p(continuation | context) for each continuation."""
    lps = sequence_logprobs(model, [context + c for c in continuations])
    scores = [lp[len(context) - 1:].sum() / (len(c) if normalize else 1) for lp, c in zip(lps, continuations)]
    return np.array(scores)
