# SPDX-License-Identifier: Apache-2.0
"""The tiny agent task's data and the tool-call accuracy's comparison."""
import json

import pytest

from ms_llm.data.readers import read_records
from ms_llm.data.synthetic import AGENT_TOOLS, agent_task, agent_tool
from ms_llm.data.tools import ToolCall
from ms_llm.eval.agent import calls_equal, first_turn


def test_agent_task_conversations_state_what_their_tool_returned(tmp_path):
    import random
    rows = [agent_task(random.Random(i)) for i in range(300)]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    records = read_records(str(path), "openai")
    kinds = {"multiply": 0, "convert": 0, "no_tool": 0}
    for rec, raw in zip(records, rows):
        kinds[rec["task"]] += 1
        assert rec["tools"] == AGENT_TOOLS
        prompt, calls = first_turn(rec)
        assert [m["role"] for m in prompt] == ["user"]
        if rec["task"] == "no_tool":
            assert calls == [] and rec["messages"][-1]["content"].endswith(f"The answer is {raw['answer']}.")
            continue
        (call,) = calls
        assert call.name == rec["task"]
        assert rec["messages"][2] == {"role": "tool", "content": agent_tool(call.name, call.arguments)}
        assert rec["messages"][3]["content"] == f"The answer is {raw['answer']}." and raw["answer"] == rec["messages"][2]["content"]
        numbers = [str(v) for v in call.arguments.values() if isinstance(v, int)]
        assert all(n in prompt[0]["content"] for n in numbers)       # the call copies the question's numbers
    assert min(kinds.values()) > 30
    assert agent_tool("multiply", {"a": 12, "b": 13}) == "156" and agent_tool("convert", {"value": 3, "unit": "h", "to": "min"}) == "180"
    with pytest.raises(ValueError, match="cannot convert km to g"):
        agent_tool("convert", {"value": 3, "unit": "km", "to": "g"})


def test_calls_compare_by_name_order_and_argument_values():
    a = [ToolCall("multiply", {"a": 7, "b": 8})]
    assert calls_equal(a, [ToolCall("multiply", {"b": 8.0, "a": 7})])           # 7 == 7.0, key order free
    assert not calls_equal(a, [ToolCall("multiply", {"a": 7, "b": 9})])
    assert not calls_equal(a, [ToolCall("convert", {"a": 7, "b": 8})])
    assert not calls_equal(a + a, a) and calls_equal([], [])
    two = [ToolCall("f", {}), ToolCall("g", {})]
    assert not calls_equal(two, two[::-1])


def test_tools_run_only_in_the_sandbox_and_report_errors_as_results(tmp_path):
    from ms_llm.data.synthetic import AGENT_TOOL_SOURCE
    from ms_llm.errors import MsLlmError
    from ms_llm.rollout.agent import ToolSet, _call_tools
    source = AGENT_TOOL_SOURCE + ("\nimport os\n\ndef where():\n    return f'{os.getpid()} {os.getuid()} {os.getcwd()}'\n\n"
                                  "def hang():\n    while True:\n        pass\n")
    offered = AGENT_TOOLS + [{"type": "function", "function": {"name": n, "parameters": {}}} for n in ("where", "hang")]
    turns = [([ToolCall("multiply", {"a": 12, "b": 13}), ToolCall("where", {}), ToolCall("os", {})], offered),
             ([ToolCall("convert", {"value": 2, "unit": "km", "to": "g"}), ToolCall("hang", {})], AGENT_TOOLS),
             ([ToolCall("convert", {"value": 2, "unit": "h", "to": "min"})], offered)]
    (first, second, third) = _call_tools(ToolSet(source, timeout=2), turns)
    # pid 2 under the sandbox's own init, the sandbox's unprivileged uid, its private /tmp
    assert first == ["156", "2 65534 /tmp", "error: no tool named os"]
    # a tool the record did not offer never runs; a raising tool is an error result
    assert second == ["error: ValueError: cannot convert km to g", "error: no tool named hang"]
    assert third == ["120"]
    (timed_out,) = _call_tools(ToolSet(source, timeout=1), [([ToolCall("hang", {}), ToolCall("multiply", {"a": 1, "b": 2})], offered)])
    assert timed_out == ["error: the tool run ended with status timeout (exceeded 1 s)"] * 2
    bad = tmp_path / "tools.py"
    bad.write_text("def f(:\n    pass\n")
    with pytest.raises(MsLlmError, match=r"tools.py:1: the tools' source does not compile"):
        ToolSet.from_file(str(bad))
