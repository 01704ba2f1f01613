# SPDX-License-Identifier: Apache-2.0
"""Domain-mixture curriculum for continual pretraining (seed 000 §1.2.5.2.2).

The mixture is a function of the number of tokens consumed: a list of phases, each with domain weights and
the token count where it ends, blended linearly over `smoothing_tokens` around each switch; an optional
anneal mixture from a given token count on (set when the WSD decay starts); and multipliers the forgetting
monitor adds at run time, each from a sample index on. Sample k's source is drawn with the weights at
token k x tokens_per_sample, with a generator seeded by (seed, block): so the order depends only on the
seed, k and that (checkpointed) history, and a resumed run continues exactly where it was.
"""
from dataclasses import dataclass, field

import numpy as np

from ms_llm.data.mixture import MixtureSampler

BLOCK = 1024


@dataclass
class Phase:
    name: str
    until_tokens: float            # phase ends here (the last phase: inf)
    weights: dict                  # domain -> weight


@dataclass
class Schedule:
    phases: list
    smoothing_tokens: float = 0.0
    anneal_weights: dict = None
    anneal_from_tokens: float = None           # set at run time when the learning-rate decay starts
    boosts: list = field(default_factory=list)  # [(from_sample, domain, factor)]

    def domain_weights(self, tokens: float, sample: int = None) -> dict:
        """Normalized domain weights at `tokens` consumed (and, for boosts, at sample index `sample`)."""
        if self.anneal_weights and self.anneal_from_tokens is not None and tokens >= self.anneal_from_tokens:
            w = dict(self.anneal_weights)
        else:
            w = self._phase_weights(tokens)
        for start, domain, factor in self.boosts:
            if sample is None or sample >= start:
                w[domain] = w.get(domain, 0.0) * factor
        total = sum(w.values())
        return {d: v / total for d, v in w.items()} if total > 0 else w

    def _phase_weights(self, tokens: float) -> dict:
        half = self.smoothing_tokens / 2
        for i, ph in enumerate(self.phases):
            if tokens < ph.until_tokens - half or i == len(self.phases) - 1:
                return dict(ph.weights)
            if tokens < ph.until_tokens + half:           # blend into the next phase
                a = (tokens - (ph.until_tokens - half)) / max(self.smoothing_tokens, 1e-9)
                nxt = self.phases[i + 1].weights
                return {d: (1 - a) * ph.weights.get(d, 0.0) + a * nxt.get(d, 0.0) for d in set(ph.weights) | set(nxt)}
        return dict(self.phases[-1].weights)

    def phase_at(self, tokens: float) -> str:
        if self.anneal_weights and self.anneal_from_tokens is not None and tokens >= self.anneal_from_tokens:
            return "anneal"
        return next((ph.name for ph in self.phases if tokens < ph.until_tokens), self.phases[-1].name)

    def state(self) -> dict:
        return {"anneal_from_tokens": self.anneal_from_tokens, "boosts": [list(b) for b in self.boosts]}

    def load_state(self, state: dict):
        self.anneal_from_tokens = state.get("anneal_from_tokens")
        self.boosts = [tuple(b) for b in state.get("boosts", [])]


class CurriculumSampler(MixtureSampler):
    """lookup(k) -> (source, item) under a Schedule; sources carry a domain and a weight within it.

    Only the choice of source differs from MixtureSampler (per-sample weights from the schedule); items
    within a source are walked the same way."""
    block = BLOCK

    def __init__(self, sizes, domains, source_weights, schedule: Schedule, tokens_per_sample: int, seed: int = 0):
        self.sizes, self.domains = [int(s) for s in sizes], list(domains)
        self.source_weights = np.asarray(source_weights, np.float64)
        self.schedule, self.tokens_per_sample, self.seed = schedule, tokens_per_sample, seed
        known = set(self.domains)
        for ph in schedule.phases:
            missing = [d for d, w in ph.weights.items() if w > 0 and d not in known]
            if missing:
                raise ValueError(f"phase '{ph.name}' weights domain(s) {missing} that no data source has "
                                 f"(sources' domains: {sorted(known)})")
        self._blocks = {}
        self._perms = {}

    def reset(self, from_sample: int = 0):
        """Forget cached blocks that reach `from_sample` or later (the schedule changed from there on)."""
        self._blocks = {b: v for b, v in self._blocks.items() if (b + 1) * self.block <= from_sample}

    def source_probs(self, k: int) -> np.ndarray:
        w = self.schedule.domain_weights(k * self.tokens_per_sample, k)
        p = np.zeros(len(self.sizes))
        for d in set(self.domains):
            idx = [i for i, x in enumerate(self.domains) if x == d]
            within = self.source_weights[idx] / self.source_weights[idx].sum()
            p[idx] = w.get(d, 0.0) * within
        return p / p.sum()

    def _block(self, b: int):
        if b not in self._blocks:
            n = len(self.sizes)
            before = np.zeros(n, np.int64) if b == 0 else self._block(b - 1)[1] + np.bincount(
                self._block(b - 1)[0], minlength=n)
            u = np.random.default_rng([self.seed, b, 13]).random(self.block)
            ks = range(b * self.block, (b + 1) * self.block)
            cum = np.cumsum(np.stack([self.source_probs(k) for k in ks]), 1)
            choices = np.minimum((u[:, None] >= cum).sum(1), n - 1)
            self._blocks[b] = (choices, before)
        return self._blocks[b]
