# SPDX-License-Identifier: Apache-2.0
"""Verifiable rewards: exact match with answer extraction, the <think> format check, code that must pass its tests
in the sandbox (a passing, a failing, a hanging and an escaping completion), weights and unknown names."""
import numpy as np
import pytest

from ms_llm.errors import MsLlmError
from ms_llm.rollout.verifiable import VerifiableRewards, code_reward, exact_match_reward, format_reward


def test_exact_match_extracts_the_answer_the_way_the_eval_harness_does():
    recs = [{"answer": "42"}, {"answer": "42"}, {"answer": "#### 1,234"}, {"answer": "xjoe"}, {"answer": "xjoe"}]
    texts = ["so 40 + 2 = 42. The answer is 42.", "The answer is 41.", "#### 1234", "xjoe", "xjoe xjoe"]
    assert exact_match_reward(texts, recs).tolist() == [1, 0, 1, 1, 0]
    assert exact_match_reward(["7 + 5 = 12"], [{"answer": "12"}], "number").tolist() == [1]
    assert exact_match_reward(["The answer is 42"], [{"answer": "42"}], "text").tolist() == [0]   # first line only


def test_format_reward_wants_a_think_block_then_an_answer():
    texts = ["<think>4 + 4 is 8</think> 8", "<think>\nhm\n</think>\nThe answer is 8", "8", "<think>8</think>",
             "<think>unclosed 8"]
    assert format_reward(texts).tolist() == [1, 1, 0, 0, 0]


@pytest.mark.slow
def test_code_reward_runs_the_tests_in_the_sandbox():
    from ms_llm.eval.sandbox import isolation_problem
    if isolation_problem():
        pytest.fail(f"this machine cannot isolate: {isolation_problem()}")
    recs = [{"answer": "def add_3(x):\n    return x + 3", "task": "code"}] * 2 + [
        {"tests": "assert double(4) == 8\nassert double(-1) == -2", "task": "code"}] * 3
    texts = ["```python\ndef add_3(x):\n    return x + 3\n```", "def add_3(x):\n    return x + 4",
             "def double(x):\n    return 2 * x", "def double(x):\n    while True:\n        pass",
             "import sys\ndef double(x):\n    sys.exit(0)\ndouble(1)"]
    got = code_reward(texts, recs, timeout=2.0)
    assert got.tolist() == [1, 0, 1, 0, 0]          # a hang times out; exiting early is not passing


def test_weighted_total_and_unknown_names():
    r = VerifiableRewards({"exact_match": 1.0, "format": 0.5}, answer_style="number")
    got = r(["<think>x</think> The answer is 8", "8", "9"], [{"answer": "8"}] * 3)
    np.testing.assert_allclose(got["total"], [1.5, 1.0, 0.0])
    assert got["parts"]["format"].tolist() == [1, 0, 0]
    with pytest.raises(MsLlmError, match="exact"):
        VerifiableRewards({"exact": 1.0})
    with pytest.raises(MsLlmError, match="grpo.reward_model"):
        VerifiableRewards({"reward_model": 1.0})
