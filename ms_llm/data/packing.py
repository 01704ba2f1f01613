# SPDX-License-Identifier: Apache-2.0
"""Packing: pretraining text cut into windows, and supervised conversations packed into rows.

Pretraining (`PackedSource`): documents (each ending in eos) laid back to back and cut into windows. Window j of a source is tokens[j*L : j*L + L + 1] of its token stream (inputs are the first L, labels the
last L). With `document_mask`, each window also gets segment ids (attention stays inside a document),
positions restarting at every document, and no loss on predicting across a document boundary.

Supervised data (`pack_supervised`): whole examples (an SFT conversation) are never cut; they go into rows of
seq_len first-fit by length, each its own segment with its own positions, so every token's loss and
gradient are those it has alone in a padded row (the attention mask is block-diagonal) while the padding
that would have filled each row is mostly gone.
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


def first_fit(lengths, capacity: int) -> list:
    """First-fit decreasing: documents longest first (ties by index), each into the first bin with room.

    Returns bins as lists of document indices in ascending order. A segment tree over the bins' free space
    finds the first bin that fits in O(log n), so a million documents pack in seconds. Every length must be
    in [1, capacity].
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [capacity] * (2 * size)        # max free space under each node; bins not opened yet are empty
    bins = []
    for i in sorted(range(n), key=lambda j: (-lengths[j], j)):
        need, node = lengths[i], 1
        if not 0 < need <= capacity:
            raise ValueError(f"document {i} has {need} tokens; each must be in [1, {capacity}]")
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return [sorted(b) for b in bins]


def pack_supervised(examples, seq_len: int, pad_id: int, document_mask: bool = True) -> list:
    """Supervised examples (data/examples.py, with `weights` and `row_weight`) -> rows of seq_len tokens.

    Each example keeps its own tokens, labels and per-token weights; a row's `row_weight` is the sum of its
    examples'. With `document_mask` every example is its own segment with positions from 0, and the padding
    at the end of a row is one more segment (real keys only: no query row is left with nothing to attend).
    Without it the examples simply follow one another (positions run on, one segment, padding masked).
    """
    lengths = [int(ex["attention_mask"].sum()) for ex in examples]
    rows = []
    for members in first_fit(lengths, seq_len):
        row = {"input_ids": np.full(seq_len, pad_id, np.int32), "labels": np.full(seq_len, IGNORE, np.int32),
               "attention_mask": np.zeros(seq_len, np.int32), "weights": np.zeros(seq_len, np.float32),
               "position_ids": np.arange(seq_len, dtype=np.int32), "segment_ids": np.zeros(seq_len, np.int32)}
        at, row_weight = 0, np.float32(0.0)
        for seg, i in enumerate(members):
            ex, n = examples[i], lengths[i]
            for key in ("input_ids", "labels", "weights"):
                row[key][at:at + n] = ex[key][:n]
            row["attention_mask"][at:at + n] = 1
            if document_mask:
                row["segment_ids"][at:at + n] = seg
                row["position_ids"][at:at + n] = np.arange(n, dtype=np.int32)
            row_weight += ex["row_weight"]
            at += n
        if document_mask and at < seq_len:
            row["segment_ids"][at:] = len(members)
            row["position_ids"][at:] = np.arange(seq_len - at, dtype=np.int32)
            row["attention_mask"][at:] = 1
        row["row_weight"], row["documents"], row["tokens"] = np.float32(row_weight), len(members), at
        rows.append(row)
    return rows
