# SPDX-License-Identifier: Apache-2.0
"""Verifiable rewards for GRPO-family training, pluggable by name and weighted (grpo.rewards: {name: weight}).

Each function maps the decoded completions and their prompt records to a score per completion:

    exact_match   1 when the answer extracted from the completion (eval/generative.py:extract_answer: GSM8K
                  '#### x', 'the answer is x', the last number with answer_style number, else the first line)
                  equals the record's "answer" extracted the same way, else 0; with answer_style math,
                  Hugging Face's math-verify judges equivalence (\\frac{1}{2} = 0.5) wherever it reads the answer
    code          1 when the completion's code passes the record's tests in the sandbox (eval/sandbox.py):
                  the record's "tests" (Python run after the code), or, when its "answer" is a reference
                  function, agreement with it on inputs -5..5; 0 otherwise (failure, timeout, refusal)
    format        1 when the completion is a <think>…</think> block followed by a non-empty answer, else 0
    reward_model  the reward model's raw score of (prompt, completion) (grpo.reward_model)

The total is Σ weight·score; every part is logged as reward/<name>.
"""
import re

import numpy as np

from ms_llm.config.schema import GRPO_REWARDS
from ms_llm.errors import MsLlmError
from ms_llm.eval.generative import answers_agree, extract_code, functional_program, math_equal
from ms_llm.eval.sandbox import run_programs

THINK = re.compile(r"^\s*<think>.*?</think>\s*\S", re.S)


def exact_match_reward(texts: list, records: list, style: str = "auto") -> np.ndarray:
    """1 where the answers agree (eval/generative.py:answers_agree); 0 for a record without an answer."""
    return np.array([float(r.get("answer") is not None and answers_agree(t, r["answer"], style))
                     for t, r in zip(texts, records)])


def format_reward(texts: list, records: list = None) -> np.ndarray:
    return np.array([float(bool(THINK.match(t))) for t in texts])


def code_program(text: str, record: dict):
    """The program that checks one completion, or None when the record gives nothing to check against."""
    if record.get("tests"):
        return f"{extract_code(text)}\n\n{record['tests']}\n"
    return functional_program(text, str(record.get("answer", "")))


def code_reward(texts: list, records: list, timeout: float = 3.0, isolation: str = "namespaces") -> np.ndarray:
    programs = [code_program(t, r) for t, r in zip(texts, records)]
    todo = [i for i, p in enumerate(programs) if p is not None]
    out = np.zeros(len(texts))
    if todo:
        runs = run_programs([programs[i] for i in todo], timeout=timeout, isolation=isolation)
        out[todo] = [float(r.status == "passed") for r in runs]
    return out


REWARDS = GRPO_REWARDS


class VerifiableRewards:
    """reward(texts, records) -> {"total": [B], "parts": {name: [B]}} for weights {name: weight}."""

    def __init__(self, weights: dict, answer_style: str = "auto", code_timeout: float = 3.0,
                 isolation: str = "namespaces", reward_model=None):
        unknown = sorted(set(weights) - set(REWARDS))
        if unknown or not weights:
            raise MsLlmError(f"grpo.rewards: {unknown or 'nothing'} given; name one or more of {list(REWARDS)}")
        if "reward_model" in weights and reward_model is None:
            raise MsLlmError("grpo.rewards names reward_model: set grpo.reward_model")
        if answer_style == "math":
            math_equal("1", "1")            # fails here, before any rollout, when math-verify is not installed
        self.weights, self.style, self.timeout, self.isolation = dict(weights), answer_style, code_timeout, isolation
        self.reward_model = reward_model

    def part(self, name: str, texts: list, records: list) -> np.ndarray:
        if name == "exact_match":
            return exact_match_reward(texts, records, self.style)
        if name == "format":
            return format_reward(texts)
        if name == "code":
            return code_reward(texts, records, self.timeout, self.isolation)
        return np.asarray(self.reward_model.score([r["messages"] for r in records], texts).raw, np.float64)

    def __call__(self, texts: list, records: list) -> dict:
        parts = {name: self.part(name, texts, records) for name in self.weights}
        total = sum(w * parts[name] for name, w in self.weights.items())
        return {"total": np.asarray(total, np.float64), "parts": parts}
