# SPDX-License-Identifier: Apache-2.0
"""Deterministic, resumable weighted sampling over several sources.

`MixtureSampler.lookup(k)` maps the k-th sample of the run to (source, item) using only the seed and k:
sources are drawn in blocks with a generator seeded by (seed, block), and each source walks a fresh
permutation of its items every epoch. Resuming at sample k therefore reproduces the exact same order,
whatever happened before the crash.
"""
import numpy as np

BLOCK = 4096


class MixtureSampler:
    block = BLOCK              # samples per block of source draws

    def __init__(self, sizes, weights, seed: int = 0):
        self.sizes = [int(s) for s in sizes]
        w = np.asarray(weights, np.float64)
        if len(w) != len(self.sizes) or (w < 0).any() or w.sum() <= 0 or any(s <= 0 for s, x in zip(self.sizes, w) if x > 0):
            raise ValueError("each weighted source needs items and a non-negative weight; weights must not all be 0")
        self.p = w / w.sum()
        self.seed = seed
        self._blocks = {}          # block -> (choices, per-source counts before this block)
        self._perms = {}

    def _block(self, b: int):
        if b not in self._blocks:
            before = np.zeros(len(self.sizes), np.int64) if b == 0 else self._block(b - 1)[1] + np.bincount(
                self._block(b - 1)[0], minlength=len(self.sizes))
            rng = np.random.default_rng([self.seed, b, 7])
            choices = rng.choice(len(self.sizes), size=self.block, p=self.p) if len(self.sizes) > 1 else np.zeros(self.block, np.int64)
            self._blocks[b] = (choices, before)
        return self._blocks[b]

    def _perm(self, src: int, epoch: int):
        key = (src, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, src, epoch, 11]).permutation(self.sizes[src])
            if len(self._perms) > 64:
                self._perms.pop(next(iter(self._perms)))
        return self._perms[key]

    def lookup(self, k: int):
        """(source index, item index) of the k-th sample."""
        b, i = divmod(int(k), self.block)
        choices, before = self._block(b)
        src = int(choices[i])
        n = int(before[src] + np.count_nonzero(choices[:i] == src))     # samples of this source before k
        epoch, j = divmod(n, self.sizes[src])
        return src, int(self._perm(src, epoch)[j])
