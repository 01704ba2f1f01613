# SPDX-License-Identifier: Apache-2.0
"""Sequence rewards of PPO rollouts (seed 000 §1.2.5.4.4).

    R_total = R_rm + λ·R_safety,   λ = 0.3 in the seed
    R_safety = −w·match(response) + c·P(safe | prompt, response)

match: occurrences of the phrases of a word-list file (one per line, case-insensitive, '#' comments) in the
response, divided by `saturation` and capped at 1. P(safe): σ of a safety classifier's calibrated score — a
reward model trained on safe (chosen) against unsafe (rejected) answers — when one is configured. Each
component is returned, so the stage logs them separately.
"""
import re

import numpy as np

from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_text


class SensitivePhrases:
    def __init__(self, path: str, saturation: int = 1):
        lines = [x.split("#", 1)[0].strip().lower() for x in read_text(path, "the sensitive-word list").splitlines()]
        self.phrases = [x for x in lines if x]
        if not self.phrases:
            raise MsLlmError(f"{path}: the sensitive-word list is empty")
        self.pattern = re.compile("|".join(r"\b" + re.escape(p) + r"\b" for p in self.phrases))
        self.saturation = max(int(saturation), 1)

    def matches(self, text: str) -> int:
        return len(self.pattern.findall(text.lower()))

    def score(self, texts: list) -> np.ndarray:
        return np.array([min(self.matches(t) / self.saturation, 1.0) for t in texts])


class SafetyReward:
    """R_safety of (prompt, response) texts: {"match": [B], "p_safe": [B] or None, "safety": [B]}."""

    def __init__(self, phrases: SensitivePhrases = None, classifier=None, match_weight: float = 1.0,
                 classifier_weight: float = 1.0):
        self.phrases, self.classifier = phrases, classifier
        self.match_weight, self.classifier_weight = float(match_weight), float(classifier_weight)

    def __call__(self, prompts: list, responses: list) -> dict:
        match = self.phrases.score(responses) if self.phrases else np.zeros(len(responses))
        total = -self.match_weight * match
        p_safe = None
        if self.classifier is not None:
            p_safe = 1.0 / (1.0 + np.exp(-self.classifier.score(prompts, responses).calibrated))
            total = total + self.classifier_weight * p_safe
        return {"match": match, "p_safe": p_safe, "safety": total}
