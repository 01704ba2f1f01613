# SPDX-License-Identifier: Apache-2.0
"""Tool-using episodes: a model turn, its tool calls run in the sandbox, their results appended, and again,
until the model answers without a call, a turn limit or the context budget.

    tools = ToolSet.from_file("data/tiny/agent_tools.py")            # Python functions, run only in the sandbox
    episodes = run_episodes(model, tokenizer, records, "chatml", tools, max_turns=4)
    episodes[0].ids, episodes[0].trained                             # every token; 1 on the model's own tokens
    episodes[0].answer, .turns, .calls, .malformed, .tool_errors, .finished

Each record is a prompt with its tools ({"prompt", "tools", "answer"?}, data/readers.py `prompts`). The token
sequence is built as the model saw it: the sampled tokens of each turn (end-of-turn token included) are kept as
sampled, and what follows them (the turn separator, the tool results written as the template writes tool
turns, the next assistant prefix) is encoded piece by piece as `render` encodes it. Tool results carry `trained` 0: they are not the model's, and a loss
over an episode must not learn them. A call whose tool is not among the record's tools, or that raises, returns
"error: ..." as its result; a turn with a malformed call ends the episode (its text is the answer).

Tools run in the sandbox (eval/sandbox.py): one program per turn holds the tools' source and the turn's calls,
and writes the results as one JSON line to its stderr (the sandbox's stdout is /dev/null). A tool that times out
or is killed makes every call of its turn an error.
"""
import json
from dataclasses import dataclass, field

import numpy as np

from ms_llm.data.chat import _encode, get_template, parse_tool_calls, render, stop_token_ids
from ms_llm.data.tools import tool_names
from ms_llm.errors import MsLlmError
from ms_llm.eval.sandbox import run_programs

MARK = "@@ms_llm tool results@@ "


class ToolSet:
    """Tools as Python source: function names -> functions the sandbox runs."""

    def __init__(self, source: str, path: str = "<tools>", timeout: float = 5.0, isolation: str = "namespaces"):
        try:
            compile(source, path, "exec")
        except SyntaxError as e:
            raise MsLlmError(f"{path}:{e.lineno}: the tools' source does not compile ({e.msg})") from None
        self.source, self.path, self.timeout, self.isolation = source, path, timeout, isolation

    @classmethod
    def from_file(cls, path: str, **kw) -> "ToolSet":
        try:
            with open(path, encoding="utf-8") as f:
                return cls(f.read(), path, **kw)
        except OSError as e:
            raise MsLlmError(f"{path}: cannot read the tools' source ({e.strerror})") from None

    def program(self, calls: list) -> str:
        """The sandbox program for one turn's calls [(name, arguments)]."""
        return (f"{self.source}\n\n"
                "def _ms_llm_run_tools(_calls):\n"
                "    import json as _json, sys as _sys\n"
                "    _out = []\n"
                "    for _name, _args in _calls:\n"
                "        _fn = globals().get(_name)\n"
                "        if not callable(_fn) or _name.startswith('_'):\n"
                "            _out.append('error: no tool named ' + _name)\n"
                "            continue\n"
                "        try:\n"
                "            _out.append(str(_fn(**_args)))\n"
                "        except Exception as _e:\n"
                "            _out.append('error: ' + type(_e).__name__ + ': ' + str(_e))\n"
                f"    _sys.stderr.write({MARK!r} + _json.dumps(_out) + '\\n')\n"
                f"_ms_llm_run_tools({json.dumps(calls)})\n")

    def run(self, turns: list) -> list:
        """Results (strings) for each turn's calls; every turn's program runs in its own sandbox."""
        runs = run_programs([self.program(c) for c in turns], timeout=self.timeout, isolation=self.isolation)
        out = []
        for calls, r in zip(turns, runs):
            line = next((ln for ln in reversed(r.stderr.split("\n")) if ln.startswith(MARK)), None)
            if r.status == "passed" and line is not None:
                out.append(json.loads(line[len(MARK):]))
            else:
                out.append([f"error: the tool run ended with status {r.status} ({r.detail})"] * len(calls))
        return out


@dataclass
class Episode:
    ids: list                       # prompt + every turn, as the model saw it
    trained: list                   # 1 on the model's sampled tokens, 0 on the prompt and tool results
    prompt_len: int
    messages: list = field(default_factory=list)    # the turns as chat messages (assistant tool_calls, tool results)
    answer: str = ""                # the last model turn's text outside calls
    turns: int = 0
    calls: int = 0
    malformed: int = 0
    tool_errors: int = 0
    finished: bool = False          # ended by an answer (not by the turn limit, the budget or a cut turn)
    done: bool = False              # nothing more to generate (finished or stopped)
    logps: list = field(default_factory=list)       # per token after the prompt: the sampler's log-prob (0: tool)
    versions: list = field(default_factory=list)    # per token after the prompt: the step that sampled it (-1: tool)


def start_episodes(tokenizer, records: list, template: str) -> list:
    """One fresh episode per record: its prompt ("ids" as read_tasks rendered it, else rendered here with the
    record's tools and the generation prompt)."""
    tpl = get_template(template)
    out = []
    for r in records:
        ids = r.get("ids") or render([{"role": "user", "content": r["prompt"]}], tokenizer, tpl,
                                     add_generation_prompt=True, tools=r.get("tools")).ids
        out.append(Episode(list(ids), [0] * len(ids), len(ids), messages=[{"role": "user", "content": r["prompt"]}]))
    return out


def advance_episodes(model, tokenizer, episodes: list, records: list, template: str, tools: "ToolSet",
                     turns: int, max_turns: int = 4, max_new_tokens: int = 96, max_total_tokens: int = 2048,
                     max_response_tokens: int = 0, seed=0, rows=None, version: int = 0, **sampling):
    """Up to `turns` more model turns (each with its tool calls) of the episodes not done, in one batch per turn.

    A turn starts only where its `max_new_tokens` fit the context budget: `max_total_tokens` in all, and with
    `max_response_tokens` that many after the prompt. Turn t of row r samples from the generator seeded by
    (seed, t) and r (`rows`: each episode's row, default its index), so an episode does not depend on the episodes
    beside it nor on how its turns are split between calls. `version` is recorded on the tokens sampled here;
    `sampling`: generate's temperature, top_k, top_p."""
    # MindSpore-backed: the episode bookkeeping above imports without it
    from ms_llm.generation import generate
    tpl = get_template(template)
    stops = stop_token_ids(template, tokenizer)
    rows = list(range(len(episodes))) if rows is None else list(rows)
    seed = list(seed) if isinstance(seed, (list, tuple)) else [seed]

    def limit(ep):
        return min(max_total_tokens, ep.prompt_len + max_response_tokens) if max_response_tokens \
            else max_total_tokens

    for _ in range(turns):
        for ep in episodes:
            if not ep.done and (ep.turns >= max_turns or len(ep.ids) + max_new_tokens > limit(ep)):
                ep.done = True                              # the turn limit or the context budget is reached
        active = [i for i, ep in enumerate(episodes) if not ep.done]
        if not active:
            break
        turn = episodes[active[0]].turns                   # every episode still going has taken as many turns
        out = generate(model, [episodes[i].ids for i in active], max_new_tokens, eos_token_id=stops,
                       pad_token_id=tokenizer.pad_id or 0, seed=seed + [turn], rows=[rows[i] for i in active],
                       **sampling)
        calling = []
        for j, i in enumerate(active):
            ep = episodes[i]
            n = int(out.lengths[j])
            toks = out.tokens[j, :n].tolist()
            ep.ids += toks
            ep.trained += [1] * n
            ep.logps += out.logprobs[j, :n].astype(float).tolist()
            ep.versions += [version] * n
            ep.turns += 1
            ended = bool(toks) and toks[-1] in stops
            text = tokenizer.decode(toks[:-1] if ended else toks)
            parsed = parse_tool_calls(text, tpl)
            ep.malformed += len(parsed.errors)
            if not ended or parsed.errors or not parsed.calls:
                ep.answer, ep.finished = parsed.content if not parsed.errors else text, ended and not parsed.errors
                ep.messages.append({"role": "assistant", "content": text})
                ep.done = True
                continue
            ep.calls += len(parsed.calls)
            ep.messages.append({"role": "assistant", "content": parsed.content, "tool_calls": [
                {"name": c.name, "arguments": c.arguments} for c in parsed.calls]})
            if ep.turns >= max_turns:                  # the last turn allowed: no turn would read the results
                ep.done = True
                continue
            calling.append((i, parsed.calls))
        results = _call_tools(tools, [(calls, records[i].get("tools")) for i, calls in calling])
        for (i, _), res in zip(calling, results):
            ep = episodes[i]
            ep.tool_errors += sum(x.startswith("error:") for x in res)
            ep.messages += [{"role": "tool", "content": x} for x in res]
            tail = _tool_turn(tpl, tokenizer, res)
            if len(ep.ids) + len(tail) + max_new_tokens > limit(ep):
                ep.done = True                             # no room for another turn: the episode ends here
                continue
            ep.ids += tail
            ep.trained += [0] * len(tail)
            ep.logps += [0.0] * len(tail)
            ep.versions += [-1] * len(tail)
    return episodes


def run_episodes(model, tokenizer, records: list, template: str, tools: ToolSet, max_turns: int = 4,
                 max_new_tokens: int = 96, max_total_tokens: int = 2048, temperature: float = 0.0,
                 seed: int = 0) -> list:
    """One whole episode per record (see module docstring), the model's turns sampled in one batch per turn."""
    episodes = start_episodes(tokenizer, records, template)
    return advance_episodes(model, tokenizer, episodes, records, template, tools, max_turns, max_turns,
                            max_new_tokens, max_total_tokens, seed=seed, temperature=temperature)


def _call_tools(tools: ToolSet, turns: list) -> list:
    """Results of each turn's calls [(calls, offered tool schemas)]; a tool the record did not offer is an error
    without running anything."""
    todo = [[(c.name, c.arguments) for c in calls if c.name in tool_names(offered)] for calls, offered in turns]
    ran = iter(tools.run([t for t in todo if t]))
    out = []
    for (calls, offered), t in zip(turns, todo):
        got = iter(next(ran) if t else [])
        out.append([next(got) if c.name in tool_names(offered) else f"error: no tool named {c.name}" for c in calls])
    return out


def _tool_turn(tpl, tokenizer, results: list) -> list:
    """What follows an assistant turn that called tools: separator, the results as tool turns, the next prefix,
    each piece encoded as `render` encodes it."""
    ids = _encode(tokenizer, tpl.assistant_sep)
    if tpl.tool_open or tpl.tool_close:
        ids += _encode(tokenizer, tpl.tool_open + "".join(tpl.tool.replace("{content}", x) for x in results)
                       + tpl.tool_close)
    else:
        for x in results:
            ids += _encode(tokenizer, tpl.tool.replace("{content}", x))
    return ids + _encode(tokenizer, tpl.assistant_prefix)


def episode_metrics(episodes: list, records: list, style: str = "auto") -> dict:
    """Task success (the answer states the record's answer), turns, tool calls, malformed calls, tool errors."""
    # MindSpore-backed module (generation): imported where episodes are scored
    from ms_llm.eval.generative import answers_agree
    success = [r.get("answer") is not None and answers_agree(e.answer, r["answer"], style)
               for e, r in zip(episodes, records)]
    n = max(1, len(episodes))
    return {"success": float(np.mean(success)) if success else 0.0,
            "turns": sum(e.turns for e in episodes) / n, "tool_calls": sum(e.calls for e in episodes) / n,
            "malformed": sum(e.malformed for e in episodes) / n, "tool_errors": sum(e.tool_errors for e in episodes) / n,
            "finished": sum(e.finished for e in episodes) / n, "n": len(episodes)}
