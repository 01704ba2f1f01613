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
