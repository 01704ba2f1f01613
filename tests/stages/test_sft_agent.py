# SPDX-License-Identifier: Apache-2.0
"""Function-call SFT on the tiny agent task: a short run from the pretrained model learns to call tools in the
template's format (the right tools, well-formed), where the model before it never calls one. The arguments take
longer; the recipe's figures are in docs/agent.md."""
import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def _tools_eval(workdir, model):
    r = run_cli(workdir, "eval", "tools", "--model", model, "--data", "data/tiny/agent_eval.jsonl", "--limit", "40",
                "--mode", "pynative")
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_agent_sft_learns_to_call_the_right_tools(tiny_pretrained, tiny_sft_agent):
    """(The 400-step run is the shared fixture: conftest.py tiny_sft_agent.)"""
    base = _tools_eval(tiny_pretrained, "runs/tiny_pretrain")
    assert base["n"] == 40 and base["malformed"] == 0.0
    assert base["tasks"].get("multiply", 0.0) == base["tasks"].get("convert", 0.0) == 0.0     # it never calls
    after = _tools_eval(tiny_pretrained, "runs/agent_sft_short")
    logged = [json.loads(line) for line in (tiny_pretrained / "runs" / "agent_sft_short" / "metrics.jsonl").open()
              if "eval/tool_choice" in line][-1]
    # the stage's own evaluation and the CLI's agree (same 40 records, greedy)
    assert logged["eval/tool_choice"] == pytest.approx(after["tool_choice"])
    assert logged["eval/tool_call_accuracy"] == pytest.approx(after["accuracy"])
    assert after["tool_choice"] >= 0.8 > base["tool_choice"] + 0.3
    assert after["malformed"] <= 0.1

    # whole episodes with that model: its calls run in the sandbox, their results come back as tool turns with
    # zero loss weight, and the model answers after them
    import mindspore as ms
    from ms_llm.context import setup_context
    from ms_llm.data.chat import get_template, parse_tool_calls
    from ms_llm.data.readers import read_records
    from ms_llm.data.synthetic import agent_tool
    from ms_llm.data.tokenizer import Tokenizer
    from ms_llm.models import load_pretrained
    from ms_llm.rollout.agent import ToolSet, _tool_turn, episode_metrics, run_episodes
    setup_context("pynative", seed=0)
    run = tiny_pretrained / "runs" / "agent_sft_short"
    model, tok = load_pretrained(run), Tokenizer.load(run / "final")
    records = [r for r in read_records(str(tiny_pretrained / "data/tiny/agent_prompts_eval.jsonl"), "prompts")
               if r["task"] != "no_tool"][:6]
    episodes = run_episodes(model, tok, records, "chatml", ToolSet.from_file(str(tiny_pretrained / "data/tiny/agent_tools.py")),
                            max_turns=3)
    tpl = get_template("chatml")
    called = [e for e in episodes if e.calls]
    assert len(called) >= 4
    for e in called:
        assert len(e.ids) == len(e.trained) and e.trained[:e.prompt_len] == [0] * e.prompt_len
        first = e.messages[1]
        calls = first["tool_calls"]
        results = [m["content"] for m in e.messages[2:2 + len(calls)]]
        for c, res in zip(calls, results):
            try:
                want = agent_tool(c["name"], c["arguments"])
            except Exception as err:                                 # the same error, raised in the sandbox
                want = f"error: {type(err).__name__}: {err}"
            assert res == want
        # the first turn's sampled tokens are trained, the tool turn after them is not, and is what render writes
        k = e.trained.index(0, e.prompt_len)
        turn_text = tok.decode(e.ids[e.prompt_len:k - 1])
        assert [c.name for c in parse_tool_calls(turn_text, "chatml").calls] == [c["name"] for c in calls]
        tail = _tool_turn(tpl, tok, results)
        assert e.ids[k:k + len(tail)] == tail and e.trained[k:k + len(tail)] == [0] * len(tail)
        rest = e.trained[k + len(tail):]
        assert rest and rest[0] == 1                                   # the answer after the results is the model's
    m = episode_metrics(episodes, records)
    assert m["n"] == 6 and m["tool_calls"] == sum(e.calls for e in episodes) / 6 and 1 <= m["turns"] <= 3
    assert all(e.done for e in episodes)
    # one turn allowed: the episodes that call a tool end at that call, done, their tools not run (no turn
    # would read the results) and nothing after the model's tokens
    one = run_episodes(model, tok, records, "chatml", ToolSet.from_file(str(tiny_pretrained / "data/tiny/agent_tools.py")),
                       max_turns=1)
    assert [e.ids for e in one if not e.calls] == [e.ids for e in episodes if not e.calls]
    for e in one:
        assert e.done and e.turns == 1 and e.tool_errors == 0 and set(e.trained[e.prompt_len:]) == {1}
        assert [m["role"] for m in e.messages] == ["user", "assistant"]
    assert sum(e.calls > 0 for e in one) >= 4
