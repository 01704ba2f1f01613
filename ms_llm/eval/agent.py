# SPDX-License-Identifier: Apache-2.0
"""Held-out tool-call accuracy: does the model call the right tool with the right arguments?

    ms-llm eval tools --model DIR --data data/tiny/agent_eval.jsonl [--template chatml]

Records are tool-use conversations (any conversational format with tools; data/readers.py). The prompt is
the conversation up to its first assistant message, rendered with the record's tools; the model's greedy
answer is read by the template's tool-call parser (data/chat.py:parse_tool_calls). It is right when its calls
equal the first assistant message's calls (same names, in order, and equal arguments; 7 equals 7.0), or, when
that message calls nothing, when the answer calls nothing either. `tool_choice` counts only the names (the
right tools in the right order, or none where none is wanted), the first thing a model learns.
"""
from collections import defaultdict

import numpy as np

from ms_llm.data.chat import parse_tool_calls
from ms_llm.data.tools import normalize_call


def first_turn(record: dict) -> tuple:
    """(prompt messages, reference calls) of a tool-use record."""
    msgs = record["messages"]
    k = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:k], [normalize_call(c) for c in msgs[k].get("tool_calls") or []]


def calls_equal(got: list, want: list) -> bool:
    return len(got) == len(want) and all(g.name == w.name and g.arguments == w.arguments for g, w in zip(got, want))


def tool_call_accuracy(model, tokenizer, records: list, template: str = "chatml", max_new_tokens: int = 96,
                       batch_size: int = 16) -> dict:
    """Accuracy overall and per task, the share of answers with a malformed call, and every output."""
    # MindSpore-backed: the parser and the comparison above import without it
    from ms_llm.eval.generative import chat_answers
    turns = [first_turn(r) for r in records]
    texts = chat_answers(model, tokenizer, [p for p, _ in turns], template, max_new_tokens, batch_size,
                         tools=[r.get("tools") for r in records])
    hits, names, per_task, malformed, outputs = [], [], defaultdict(list), 0, []
    for r, (_, want), text in zip(records, turns, texts):
        parsed = parse_tool_calls(text, template)
        ok = parsed.ok and calls_equal(parsed.calls, want)
        hits.append(ok)
        names.append(parsed.ok and [c.name for c in parsed.calls] == [c.name for c in want])
        per_task[r.get("task") or "all"].append(ok)
        malformed += bool(parsed.errors)
        outputs.append({"output": text, "calls": [[c.name, c.arguments] for c in parsed.calls],
                        "want": [[c.name, c.arguments] for c in want], "correct": ok})
    return {"accuracy": float(np.mean(hits)) if hits else 0.0, "tool_choice": float(np.mean(names)) if names else 0.0,
            "tasks": {t: float(np.mean(h)) for t, h in sorted(per_task.items())},
            "malformed": malformed / len(hits) if hits else 0.0, "n": len(hits), "outputs": outputs}
