# SPDX-License-Identifier: Apache-2.0
"""Batches for the trainer: sources -> tokenized cache -> packed windows -> weighted, resumable order.

Sample k of the run is fully determined by (data.shuffle_seed, k), and micro-batch m of data-parallel rank
r takes samples [m*G + r*B, m*G + (r+1)*B) where B is the micro-batch and G = B x ranks. So the position in
the data is just the number of micro-batches consumed, which the checkpoint stores.
"""
import os

import numpy as np

from ms_llm.data.cache import build_text_cache
from ms_llm.data.mixture import MixtureSampler
from ms_llm.data.packing import PackedSource
from ms_llm.data.shard_index import open_index
from ms_llm.errors import MsLlmError


class PretrainData:
    """Packed next-token data over a weighted mixture of text sources, with a held-out split."""

    def __init__(self, sources, tokenizer, seq_len: int, cache_dir: str, document_mask: bool = True,
                 seed: int = 0, eval_fraction: float = 0.0, on_error: str = "raise", index: str = None,
                 index_domains=None):
        """`index`: a shard index (data/shard_index.py) whose shards join `sources`, each tagged with its
        domain and weighted by its tokens; `index_domains` limits which domains' shards are opened."""
        self.seq_len, self.document_mask = seq_len, document_mask
        self.packed, self.names, self.weights, self.domains = [], [], [], []
        for src in sources:
            if src.format != "text":
                raise MsLlmError(f"data.sources: {src.path} has format '{src.format}'; pretraining reads 'text'")
            cache = build_text_cache(src.path, tokenizer, cache_dir, on_error)
            packed = PackedSource(cache, seq_len, document_mask)
            if len(packed) < 1:
                raise MsLlmError(f"{src.path}: {cache.index['num_tokens']} tokens is less than one sequence of "
                                 f"data.seq_len={seq_len} + 1")
            self._add(packed, os.path.basename(src.path), src.weight,
                      src.domain or (cache.index["domains"] or ["general"])[0])
        if index:
            shards = open_index(index, tokenizer, index_domains)
            for cache, domain, rel in shards:
                packed = PackedSource(cache, seq_len, document_mask)
                if len(packed) >= 1:            # a domain's last shard may hold less than one sequence
                    self._add(packed, rel, float(cache.index["num_tokens"]), domain)
            empty = sorted({d for _, d, _ in shards} - set(self.domains))
            if empty:
                raise MsLlmError(f"data.index: domain(s) {empty} of {index} hold less than one sequence of "
                                 f"data.seq_len={seq_len} + 1 tokens")
        self.skipped = sum(p.cache.index["skipped"] for p in self.packed)
        self.n_eval = [int(len(p) * eval_fraction) for p in self.packed]
        self.n_train = [len(p) - e for p, e in zip(self.packed, self.n_eval)]
        if any(n < 1 for n in self.n_train):
            raise MsLlmError("data.eval_fraction leaves a source without training sequences")
        self.sampler = MixtureSampler(self.n_train, self.weights, seed)

    def _add(self, packed, name: str, weight: float, domain: str):
        self.packed.append(packed)
        self.names.append(name)
        self.weights.append(weight)
        self.domains.append(domain)

    def sample(self, k: int) -> dict:
        src, item = self.sampler.lookup(k)
        return self.packed[src].window(item)

    def batch(self, micro_index: int, micro_batch: int, rank: int = 0, world: int = 1) -> dict:
        """Micro-batch `micro_index` (counted over the whole run) for one data-parallel rank."""
        base = micro_index * micro_batch * world + rank * micro_batch
        return _stack([self.sample(base + i) for i in range(micro_batch)])

    def eval_batches(self, micro_batch: int, max_batches: int = 8):
        """Held-out windows of every source (the last eval_fraction of each), in fixed order."""
        items = [(s, len(p) - e + i) for s, (p, e) in enumerate(zip(self.packed, self.n_eval)) for i in range(e)]
        for b in range(min(max_batches, len(items) // micro_batch)):
            chunk = items[b * micro_batch:(b + 1) * micro_batch]
            yield _stack([self.packed[s].window(i) for s, i in chunk])

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len


def _stack(samples) -> dict:
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
