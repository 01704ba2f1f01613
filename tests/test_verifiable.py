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


def test_math_style_agrees_with_the_hand_written_extraction_and_accepts_equivalent_forms():
    """answer_style math (math-verify) gives the hand-written verdicts on the exact-match cases above, and accepts
    equal values written differently, which the hand-written extraction rejects."""
    recs = [{"answer": "42"}, {"answer": "42"}, {"answer": "#### 1,234"}, {"answer": "xjoe"}, {"answer": "xjoe"},
            {"answer": "12"}, {"answer": None}]
    texts = ["so 40 + 2 = 42. The answer is 42.", "The answer is 41.", "#### 1234", "xjoe", "xjoe xjoe", "7 + 5 = 12",
             "42"]
    assert exact_match_reward(texts, recs, "math").tolist() == exact_match_reward(texts, recs, "number").tolist() \
        == [1, 0, 1, 1, 0, 1, 0]
    equivalent = [(r"$\frac{1}{2}$", "The answer is 0.5."), ("0.5", r"so the answer is \boxed{\frac{1}{2}}"),
                  ("1/2", "The answer is 0.5"), (r"$\sqrt{4}$", "The answer is 2."), (r"$\{1, 2\}$", r"$\{2, 1\}$")]
    recs, texts = [{"answer": a} for a, _ in equivalent], [t for _, t in equivalent]
    assert exact_match_reward(texts, recs, "math").tolist() == [1] * 5
    assert exact_match_reward(texts, recs, "auto").sum() == 0
    # and it still says no to a different value
    assert exact_match_reward(["The answer is 0.49"], [{"answer": r"$\frac{1}{2}$"}], "math").tolist() == [0]


def test_math_style_in_the_exact_match_reward_runs_off_the_main_thread():
    # math-verify's own timeout uses SIGALRM, which only the main thread may set; a caller in a thread still works
    import threading
    out = {}
    t = threading.Thread(target=lambda: out.update(r=exact_match_reward(["x = 0.5"], [{"answer": r"\frac{1}{2}"}], "math")))
    t.start()
    t.join()
    assert out["r"].tolist() == [1]
