# SPDX-License-Identifier: Apache-2.0
"""Agentic GRPO on the tiny agent task, from the tiny function-call SFT model (conftest.py tiny_sft_agent): every
completion is an episode of model turns and sandboxed tool calls, rewarded by exact match and the tiny reward
model (conftest.py tiny_reward). A run with episodes paused between steps
(grpo.agent.turns_per_step), killed after a checkpoint taken mid-episode, resumes to the uninterrupted run; the
rollouts it trained on give tool results zero loss weight and hold what the tools returned; the tools ran only
in the sandbox. (That agentic GRPO lifts task success: docs/agent.md, from configs/tiny/grpo_agent.yaml.)"""
import json
import os

import numpy as np
import pytest

from conftest import assert_resumed_run_equals, kill_once_written, run_cli

pytestmark = pytest.mark.slow

# multiply also tries to leave a file in the test's work dir: the sandbox (private /tmp, read-only elsewhere)
# must stop it, while the call still returns its product
PROBE = '''

_plain_multiply = multiply


def multiply(a, b):
    try:
        with open({escape!r}, "w") as f:
            f.write("a tool ran outside the sandbox")
    except OSError:
        pass
    return _plain_multiply(a, b)
'''


def _tool_spans(tokens, trained, length):
    """[(start, stop)] of the runs of untrained tokens inside a row's response."""
    spans, start = [], None
    for j in range(length):
        if trained[j] == 0 and start is None:
            start = j
        if trained[j] == 1 and start is not None:
            spans.append((start, j))
            start = None
    return spans + ([(start, length)] if start is not None else [])


def test_agentic_grpo_resumes_mid_episode_and_never_trains_on_tool_results(tiny_sft_agent, tiny_reward):
    """The 400-step SFT model's arguments are mostly wrong, so its answers' exact match is all zeros; the tiny
    reward model's score beside it gives the groups the reward variance that makes the updates real."""
    from ms_llm.data.chat import parse_tool_calls
    from ms_llm.data.synthetic import AGENT_TOOL_SOURCE, agent_tool
    from ms_llm.data.tokenizer import Tokenizer
    from ms_llm.data.chat import get_template
    from ms_llm.rollout.agent import ToolSet, _tool_turn
    from ms_llm.rollout.batch import read_rollout
    work = tiny_sft_agent.parent.parent
    escape = work / "escaped.txt"
    (work / "probe_tools.py").write_text(AGENT_TOOL_SOURCE + PROBE.format(escape=str(escape)))
    args = ["train", "configs/tiny/grpo_agent.yaml", "model.init_from=runs/agent_sft_short",
            "grpo.agent.tools=probe_tools.py", "grpo.agent.turns_per_step=1", "grpo.prompts_per_step=4",
            "grpo.group_size=4", "train.micro_batch_size=8", "optim.lr=1e-3", "train.max_steps=4",
            "checkpoint.every=2", "train.log_every=1", "train.eval_every=4", "grpo.eval_limit=8",
            "log.rollouts_every=1", "train.progress_bar=false", "log.plots=false",
            "grpo.rewards={exact_match: 1.0, reward_model: 1.0}", "grpo.reward_model=runs/tiny_reward",
            "grpo.mini_batch_size=0", "grpo.dynamic_sampling.enabled=false", "grpo.temperature=1.0", "grpo.top_k=2"]
    a, b = work / "runs" / "agent_grpo_a", work / "runs" / "agent_grpo_b"
    run_cli(work, *args, "train.output_dir=runs/agent_grpo_a")
    kill_once_written(work, [*args, "train.output_dir=runs/agent_grpo_b"],
                      b / "checkpoints" / "step_000002" / "MANIFEST.json")
    run_cli(work, *args, "train.output_dir=runs/agent_grpo_b")
    assert_resumed_run_equals(a, b, 4, 2)

    # the step-2 checkpoint was taken mid-episode: episodes with turns taken and more to come
    pending = json.loads((b / "checkpoints" / "step_000002" / "rollout_state" / "pending.json").read_text())
    paused = [ep for batch in pending["episodes"] for ep in batch["episodes"] if not ep["done"]]
    assert paused and all(ep["turns"] == 1 and ep["calls"] >= 1 for ep in paused)
    rows = [json.loads(x) for x in open(a / "metrics.jsonl")]
    trained = [r for r in rows if r["step"] > 0 and not r["skipped"]]
    assert len(trained) == 4 and all(r["grad_norm"] > 0 for r in trained)     # the episodes' rewards varied
    assert all(r["staleness_max"] <= 1 for r in trained)
    assert max(r["staleness_max"] for r in trained) == 1                   # turns sampled by an earlier policy
    assert rows[0]["step"] == 0 and "eval/task_success" in rows[0] and "eval/task_success" in rows[-1]
    for r in trained:
        assert r["agent/episodes"] > 0 and 1 <= r["agent/turns"] <= 3 and r["agent/calls"] >= 0

    # the rollouts as the updates read them (both runs: the resumed run's after the kill equal the uninterrupted)
    for step in (3, 4):
        x, y = (read_rollout(str(r / "rollouts" / f"step_{step:06d}.safetensors"))[0] for r in (a, b))
        assert set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x if k != "old_logps")
    tok, tpl = Tokenizer.load(str(tiny_sft_agent / "final")), get_template("chatml")
    results_seen = multiplied = 0
    for step in range(1, 5):
        path = a / "rollouts" / f"step_{step:06d}.safetensors"
        if not path.exists():                                  # a step with no finished group trains nothing
            continue
        d, _ = read_rollout(str(path))
        np.testing.assert_array_equal(d["loss_mask"], d["response_mask"] * d["trained"])
        for i in range(len(d["tokens"])):
            n = int(d["lengths"][i])
            toks, tr = d["tokens"][i], d["trained"][i]
            assert (d["versions"][i, :n][tr[:n] == 0] == -1).all() and (d["versions"][i, :n][tr[:n] == 1] >= 0).all()
            assert (d["behaviour_logps"][i, :n][tr[:n] == 0] == 0).all()
            for s, e in _tool_spans(toks, tr, n):
                # an untrained span is a tool turn, encoded as render encodes it, holding what the tools return
                # (run here, outside any sandbox) for the calls of the model's turn before it
                calls = parse_tool_calls(tok.decode(_last_turn(toks, tr, s)), "chatml").calls
                want = []
                for c in calls:
                    if c.name not in ("multiply", "convert"):          # not offered: never run
                        want.append(f"error: no tool named {c.name}")
                        continue
                    try:
                        want.append(agent_tool(c.name, c.arguments))
                    except Exception as err:                         # the same error, raised in the sandbox
                        want.append(f"error: {type(err).__name__}: {err}")
                assert calls and toks[s:e].tolist() == _tool_turn(tpl, tok, want), tok.decode(toks[s:e].tolist())
                results_seen += 1
                multiplied += sum(c.name == "multiply" for c in calls)
    assert results_seen > 0 and multiplied > 0
    # multiply ran, and its file never appeared: the tools ran in the sandbox. The same tool outside it leaves it.
    assert not escape.exists()
    assert ToolSet.from_file(str(work / "probe_tools.py"), isolation="none").run([[("multiply", {"a": 3, "b": 4})]]) \
        == [["12"]]
    assert escape.read_text() == "a tool ran outside the sandbox"
    os.remove(escape)


def _last_turn(tokens, trained, stop: int) -> list:
    """The model's tokens of the turn that ends at response position `stop` (its end-of-turn token dropped)."""
    j = stop
    while j > 0 and trained[j - 1] == 1:
        j -= 1
    return tokens[j:stop - 1].tolist()
