# SPDX-License-Identifier: Apache-2.0
"""Tool use: JSON-schema tools and tool calls written the way each model family's own template writes them,
and tool calls read back out of a completion.

    msgs = [{"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 3, "b": 4}}]},
            {"role": "tool", "content": "7"},
            {"role": "assistant", "content": "7"}]
    render(msgs, tok, "qwen", tools=[{"type": "function", "function": {"name": "add", ...}}])   # data/chat.py
    parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 3}}\n</tool_call>', "qwen")  # data/chat.py
        -> ToolParse(content="", calls=[ToolCall("add", {"a": 3})], errors=[])

Two formats cover the templates:
  hermes   (qwen, chatml)  the tools' JSON schemas in the system prompt under "# Tools", one
           `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` per call; Qwen2.5 returns results
           as a user turn of `<tool_response>` blocks, consecutive results in one turn.
  llama3   (llama3)        "Environment: ipython" and the knowledge/today dates in the system prompt, the schemas
           (indented JSON) at the head of the first user message, one `{"name": ..., "parameters": {...}}` per
           assistant turn, results under the `ipython` header.
Both equal the Hugging Face chat templates of Qwen2.5-Instruct and Llama-3.2-Instruct token for token
(tests/data/test_tools.py). A tool call is assistant output and carries loss; a tool result never does.
"""
import json
import re
from dataclasses import dataclass, field

from ms_llm.errors import MsLlmError

LLAMA3_DATE = "26 Jul 2024"      # the date Llama 3.1's template writes when the caller gives none

HERMES_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
HERMES_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                     "\"arguments\": <args-json-object>}\n</tool_call>")
LLAMA3_TOOLS_HEAD = ("Given the following functions, please respond with a JSON for a function call with its proper "
                     "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                     "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n")


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ToolParse:
    """A completion read as tool calls: the text outside calls, the well-formed calls, one error per bad call."""
    content: str
    calls: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _json(x, indent=None) -> str:
    # what the chat templates' `tojson` filter writes (transformers: json.dumps, ensure_ascii off)
    return json.dumps(x, ensure_ascii=False, indent=indent)


def normalize_call(call, where: str = "tool_calls") -> ToolCall:
    """{"name", "arguments"} or OpenAI's {"type": "function", "function": {"name", "arguments": str|dict}}."""
    if isinstance(call, ToolCall):
        return call
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a tool call must be an object with 'name' and 'arguments'")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}: a tool call needs a non-empty string 'name'")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: arguments of '{fn['name']}' are not JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}: arguments of '{fn['name']}' must be an object")
    return ToolCall(fn["name"], args)


def check_tools(tools, where: str = "tools") -> list:
    """A list of JSON-schema tools ({"type": "function", "function": {"name", ...}} or the bare function)."""
    if not isinstance(tools, list):
        raise ValueError(f"'{where}' must be a list of tool schemas")
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}[{i}] must be a JSON schema object with a string 'name' "
                             f"(or {{'type': 'function', 'function': {{...}}}})")
    return tools


def tool_names(tools) -> list:
    return [t.get("function", t)["name"] for t in tools or []]


# ----- formats -----------------------------------------------------------------------------------------------
class Hermes:
    """Qwen2.5's tool format (also used with plain chatml)."""
    name = "hermes"

    def system(self, system: str, tools) -> str:
        body = "".join("\n" + _json(t) for t in tools)
        return (system + "\n\n" if system else "") + HERMES_TOOLS_HEAD + body + HERMES_TOOLS_TAIL

    def first_user(self, content: str, tools) -> str:
        return content

    def assistant(self, content: str, calls) -> str:
        text = "".join('\n<tool_call>\n{"name": "' + c.name + '", "arguments": ' + _json(c.arguments) + "}\n</tool_call>"
                       for c in calls)
        return content + text if content else text[1:]

    def parse(self, text: str) -> ToolParse:
        out = ToolParse(content="")
        parts, pos = [], 0
        for m in re.finditer(r"<tool_call>(.*?)</tool_call>", text, re.S):
            parts.append(text[pos:m.start()])
            pos = m.end()
            _add_call(out, m.group(1), "arguments")
        rest = text[pos:]
        if "<tool_call>" in rest:
            parts.append(rest[:rest.index("<tool_call>")])
            out.errors.append("unterminated <tool_call>: the completion ended inside a call")
        else:
            parts.append(rest)
        out.content = "".join(parts).strip()
        return out


class Llama3:
    """Llama 3.1/3.2's JSON tool calls (custom tools in the first user message, the template's default)."""
    name = "llama3"

    def __init__(self, date: str = LLAMA3_DATE):
        self.date = date

    def system(self, system: str, tools) -> str:
        return f"Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: {self.date}\n\n" + system.strip()

    def first_user(self, content: str, tools) -> str:
        return LLAMA3_TOOLS_HEAD + "".join(_json(t, indent=4) + "\n\n" for t in tools) + content.strip()

    def assistant(self, content: str, calls) -> str:
        if len(calls) != 1:
            raise ValueError(f"the llama3 tool format writes one tool call per assistant turn, this one has {len(calls)}")
        return '{"name": "' + calls[0].name + '", "parameters": ' + _json(calls[0].arguments) + "}"

    def parse(self, text: str) -> ToolParse:
        s = text.strip()
        if s.startswith("<|python_tag|>"):
            s = s[len("<|python_tag|>"):].lstrip()
        if not s.startswith("{"):
            return ToolParse(content=text.strip())
        out, dec, pos = ToolParse(content=""), json.JSONDecoder(), 0
        while pos < len(s):
            try:
                obj, end = dec.raw_decode(s, pos)
            except json.JSONDecodeError as e:
                out.errors.append(f"malformed tool call at character {pos}: {e.msg}")
                break
            _add_call(out, obj, "parameters")
            pos = end
            while pos < len(s) and s[pos] in " \t\r\n;":
                pos += 1
        return out


def _add_call(out: ToolParse, body, args_key: str):
    """Append the call in `body` (JSON text or a decoded object) to out.calls, or say why it is not one."""
    if isinstance(body, str):
        try:
            body = json.loads(body.strip())
        except json.JSONDecodeError as e:
            out.errors.append(f"tool call {len(out.calls) + len(out.errors)} is not JSON ({e.msg})")
            return
    k = len(out.calls) + len(out.errors)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
        out.errors.append(f"tool call {k} has no string 'name'")
        return
    args = body.get(args_key, body.get("arguments", body.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        out.errors.append(f"tool call {k} ('{body['name']}'): '{args_key}' must be an object")
        return
    out.calls.append(ToolCall(body["name"], args))


FORMATS = {"hermes": Hermes, "llama3": Llama3}


def tool_format(template) -> object:
    kind = getattr(template, "tool_format", None)
    if kind is None:
        raise MsLlmError(f"chat template '{template.name}' has no tool-call format; use qwen, chatml or llama3")
    return FORMATS[kind]()


def apply_tools(template, messages: list, tools=None, date: str = None) -> list:
    """Messages with tools and tool calls written into plain text the way `template`'s family writes them.

    The system message (after any default system) gains the tool schemas, or the first user message does
    (llama3); an assistant message's `tool_calls` become its text; tool results keep the role "tool"."""
    calls_present = any(m.get("tool_calls") for m in messages)
    if not tools and not calls_present:
        return messages
    fmt = tool_format(template)
    if date is not None and isinstance(fmt, Llama3):
        fmt.date = date
    out = [dict(m) for m in messages]
    if tools:
        check_tools(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = fmt.system(out[0]["content"], tools)
        else:
            out.insert(0, {"role": "system", "content": fmt.system("", tools)})
        first = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
        if isinstance(fmt, Llama3):
            if first is None:
                raise ValueError("the llama3 tool format puts the tools in the first user message, and there is none")
            out[first]["content"] = fmt.first_user(out[first]["content"], tools)
    for i, m in enumerate(out):
        if isinstance(fmt, Llama3) and m["role"] in ("user", "assistant") and isinstance(m.get("content"), str):
            m["content"] = m["content"].strip()      # Llama 3's template trims every message but tool results
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [normalize_call(c, f"messages[{i}].tool_calls") for c in m["tool_calls"]]
            out[i] = {"role": "assistant", "content": fmt.assistant(m.get("content") or "", calls)}
        elif m["role"] == "tool" and (isinstance(fmt, Llama3) or not isinstance(m.get("content"), str)):
            # Llama 3's template writes every result through `tojson` (a string counts as iterable there)
            out[i] = {"role": "tool", "content": _json(m.get("content"))}
    return out
