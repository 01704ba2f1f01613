# SPDX-License-Identifier: Apache-2.0
"""JSONL readers for every record format the stages consume, normalized to plain dicts.

    text        {"text": str, "domain"?: str}
    alpaca      {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...], "task"?}
    sharegpt    {"conversations": [{"from": human|gpt|function_call|observation, "value"}], "system"?, "tools"?, "task"?}
                (a function_call value is the call as JSON, {"name", "arguments"} or a list of them; without
                "tools", a value that is not JSON stays the assistant's text)
    openai      {"messages": [{"role", "content", "tool_calls"?, "tool_call_id"?}], "tools"?: [schema], "task"?}
    xlam        {"query": str, "tools": [{"name", "description", "parameters": {arg: {"type", ...}}}],
                 "answers": [{"name", "arguments"}]}     (xLAM / APIGen function-calling sets; lists may be JSON text)
    preference  {"prompt": str | [{"role", "content"}], "chosen": str, "rejected": str, "margin"?: number, "tag"?: str}
    prompts     {"prompt": str, "answer"?: str, "task"?: str, "tests"?: str, "tools"?: [schema]}
    unpaired    {"prompt": str | [{"role", "content"}], "completion": str, "label": bool}   (KTO)

Conversational formats become {"messages": [{"role", "content", "tool_calls"?}], "task", "tools"?}; tool calls
are normalized to [{"name", "arguments": dict}] and tools to JSON schemas (data/tools.py). Every record keeps its file
line number as "line". A malformed line raises
MsLlmError naming file:line, or with on_error="skip" is counted in `ReadStats` and left out.
"""
import json
import os
from dataclasses import dataclass, field

from ms_llm.data.tools import check_tools, normalize_call
from ms_llm.errors import MsLlmError
from ms_llm.fileio import numbered_lines, utf8

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "system": "system"}


@dataclass
class ReadStats:
    read: int = 0
    skipped: int = 0
    reasons: list = field(default_factory=list)      # first few "file:line: reason"


def _text(rec):
    if not isinstance(rec.get("text"), str) or not rec["text"]:
        raise ValueError("needs a non-empty string field 'text'")
    return {"text": rec["text"], "domain": rec.get("domain")}


def _need_str(rec, key, optional=False):
    v = rec.get(key)
    if v is None and optional:
        return ""
    if not isinstance(v, str) or (not optional and not v.strip()):
        raise ValueError(f"field '{key}' must be a non-empty string")
    return v


def _alpaca(rec):
    msgs = []
    if rec.get("system"):
        msgs.append({"role": "system", "content": _need_str(rec, "system")})
    for i, pair in enumerate(rec.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"history[{i}] must be a [question, answer] pair of strings")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    inp = _need_str(rec, "input", optional=True)
    prompt = _need_str(rec, "instruction") + ("\n" + inp if inp else "")
    msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _need_str(rec, "output")}]
    return {"messages": msgs, "task": rec.get("task")}


def _sharegpt(rec):
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError("'conversations' must be a non-empty list")
    msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    expect_user = True
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{i}] needs 'from' in {sorted(SHAREGPT_ROLES)} and a string 'value'")
        role = SHAREGPT_ROLES[turn["from"]]
        if role == "system":
            if i != 0 or msgs:
                raise ValueError(f"conversations[{i}]: a system turn may only come first")
            msgs.append({"role": "system", "content": turn["value"]})
            continue
        if (role in ("user", "tool")) != expect_user:
            want = "human/observation" if expect_user else "gpt/function_call"
            raise ValueError(f"conversations[{i}]: roles out of order, expected {want} but got '{turn['from']}'")
        if turn["from"] == "function_call" and (rec.get("tools") or turn["value"].lstrip().startswith(("{", "["))):
            # with tools declared (or JSON given), the value is the call; a free-text one without tools stays text
            calls = _json_field(turn["value"], f"conversations[{i}].value")
            calls = calls if isinstance(calls, list) else [calls]
            msgs.append({"role": "assistant", "content": "",
                         "tool_calls": [normalize_call(c, f"conversations[{i}]") for c in calls]})
        else:
            msgs.append({"role": role, "content": turn["value"]})
        expect_user = not expect_user
    if msgs[-1]["role"] != "assistant":
        raise ValueError("conversation must end with a gpt/function_call turn")
    return {"messages": msgs, "task": rec.get("task"), "tools": _tools(rec.get("tools"))}


def _json_field(value, where):
    """A field that holds JSON, or JSON written as a string (ShareGPT and xLAM sets store both)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"'{where}' is not JSON ({e.msg})") from None
    return value


def _tools(value, where="tools"):
    if value is None or value == "" or value == []:
        return None
    return check_tools(_json_field(value, where), where)


def _openai(rec):
    raw = rec.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ValueError("'messages' must be a non-empty list")
    msgs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}] needs a role (system, user, assistant, tool)")
        content = m.get("content")
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] needs a string 'content'")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
        msg = {"role": m["role"], "content": content}
        if m.get("tool_calls"):
            if m["role"] != "assistant" or not isinstance(m["tool_calls"], list):
                raise ValueError(f"messages[{i}]: 'tool_calls' must be a list on an assistant message")
            msg["tool_calls"] = [normalize_call(c, f"messages[{i}].tool_calls[{k}]")
                                 for k, c in enumerate(m["tool_calls"])]
        msgs.append(msg)
    if msgs[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant message")
    if not any(m["role"] == "user" for m in msgs):
        raise ValueError("the conversation has no user message")
    return {"messages": msgs, "task": rec.get("task"), "tools": _tools(rec.get("tools"))}


def _xlam(rec):
    query = _need_str(rec, "query")
    tools = _json_field(rec.get("tools"), "tools")
    answers = _json_field(rec.get("answers"), "answers")
    if not isinstance(tools, list) or not tools:
        raise ValueError("'tools' must be a non-empty list")
    if not isinstance(answers, list):
        raise ValueError("'answers' must be a list of calls")
    schemas = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}] needs a string 'name' and an object 'parameters'")
        props = t.get("parameters", {})
        if props.get("type") == "object" and isinstance(props.get("properties"), dict):
            params = props                         # already a JSON schema
        else:                                      # xLAM's {arg: {"type", "description", "default"?}}
            required = [k for k, v in props.items() if isinstance(v, dict) and "default" not in v
                        and "optional" not in str(v.get("type", ""))]
            params = {"type": "object", "properties": props, "required": required}
        schemas.append({"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                         "parameters": params}})
    calls = [normalize_call(c, f"answers[{k}]") for k, c in enumerate(answers)]
    msgs = [{"role": "user", "content": query}]
    if calls:
        msgs.append({"role": "assistant", "content": "", "tool_calls": calls})
    else:
        raise ValueError("'answers' is empty: the record has no call to learn")
    return {"messages": msgs, "task": rec.get("task"), "tools": schemas}


def _prompt_messages(rec):
    prompt = rec.get("prompt")
    if isinstance(prompt, list):
        for i, m in enumerate(prompt):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool")
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"prompt[{i}] needs a role (system, user, assistant, tool) and a string content")
        if not prompt or prompt[-1]["role"] not in ("user", "tool"):
            raise ValueError("a multi-turn prompt must end with a user (or tool) message")
        msgs = prompt
    else:
        msgs = [{"role": "user", "content": _need_str(rec, "prompt")}]
    return msgs


def _preference(rec):
    msgs = _prompt_messages(rec)
    margin, tag = rec.get("margin"), rec.get("tag")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ValueError("field 'margin' must be a number")
    if tag is not None and not isinstance(tag, str):
        raise ValueError("field 'tag' must be a string")
    return {"messages": msgs, "chosen": _need_str(rec, "chosen"), "rejected": _need_str(rec, "rejected"),
            "task": rec.get("task"), "margin": margin, "tag": tag}


def _prompts(rec):
    ans = rec.get("answer")
    if ans is not None and not isinstance(ans, (str, int, float)):
        raise ValueError("field 'answer' must be a string or number")
    tests = rec.get("tests")
    if tests is not None and not isinstance(tests, str):
        raise ValueError("field 'tests' must be a string (Python run after a code answer)")
    return {"prompt": _need_str(rec, "prompt"), "answer": None if ans is None else str(ans), "task": rec.get("task"),
            "tests": tests, "tools": _tools(rec.get("tools"))}


def _unpaired(rec):
    if not isinstance(rec.get("label"), bool):
        raise ValueError("field 'label' must be true (desirable) or false (undesirable)")
    return {"messages": _prompt_messages(rec), "completion": _need_str(rec, "completion"), "label": rec["label"],
            "task": rec.get("task")}


PARSERS = {"text": _text, "alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai, "xlam": _xlam,
           "preference": _preference, "prompts": _prompts, "unpaired": _unpaired}


def read_records(path: str, fmt: str, on_error: str = "raise", stats: ReadStats = None) -> list:
    """All records of a JSONL file in `fmt`, normalized (see module docstring)."""
    if fmt not in PARSERS:
        raise MsLlmError(f"data format '{fmt}' is not one of {sorted(PARSERS)}")
    if not os.path.isfile(path):
        raise MsLlmError(f"{path}: data file not found")
    stats = stats if stats is not None else ReadStats()
    out = []
    for lineno, raw, offset in numbered_lines(path):
        if not raw.strip():
            continue
        try:
            rec = json.loads(utf8(raw, offset))
            if not isinstance(rec, dict):
                raise ValueError("a record must be a JSON object")
            out.append({**PARSERS[fmt](rec), "line": lineno})
            stats.read += 1
        except ValueError as e:
            reason = f"{path}:{lineno}: {'malformed JSON: ' + e.msg if isinstance(e, json.JSONDecodeError) else e}"
            if on_error != "skip":
                raise MsLlmError(reason + " (set data.on_error: skip to skip such lines)") from None
            stats.skipped += 1
            if len(stats.reasons) < 20:
                stats.reasons.append(reason)
    return out
