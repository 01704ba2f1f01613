# SPDX-License-Identifier: Apache-2.0
"""Packing for pretraining: documents (each ending in eos) laid back to back and cut into windows.

Window j of a source is tokens[j*L : j*L + L + 1] of its token stream (inputs are the first L, labels the
last L). With `document_mask`, each window also gets segment ids (attention stays inside a document),
positions restarting at every document, and no loss on predicting across a document boundary.
"""
import numpy as np

from ms_llm.data.cache import TokenCache

IGNORE = -100


class PackedSource:
    """Fixed-length training windows over one TokenCache."""

    def __init__(self, cache: TokenCache, seq_len: int, document_mask: bool = True):
        self.cache, self.seq_len, self.document_mask = cache, seq_len, document_mask
        total = len(cache.tokens)
        self.num_windows = max(0, (total - 1) // seq_len)

    def __len__(self):
        return self.num_windows

    def window(self, j: int) -> dict:
        L = self.seq_len
        start = j * L
        toks = np.asarray(self.cache.tokens[start:start + L + 1], np.int32)
        inputs, labels = toks[:-1].copy(), toks[1:].copy()
        out = {"input_ids": inputs, "labels": labels}
        if self.document_mask:
            doc = np.searchsorted(self.cache.offsets, np.arange(start, start + L + 1), side="right") - 1
            seg = (doc - doc[0]).astype(np.int32)
            labels[seg[1:] != seg[:-1]] = IGNORE               # the next document is not predictable
            first = np.maximum(self.cache.offsets[doc[:-1]], start)
            out["segment_ids"] = seg[:-1]
            out["position_ids"] = (np.arange(start, start + L) - first).astype(np.int32)
        return out
