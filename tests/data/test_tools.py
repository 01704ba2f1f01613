# SPDX-License-Identifier: Apache-2.0
"""Tool-use templates against transformers' apply_chat_template(tools=...), and the tool-call parser.

The reference templates in tests/data/templates/ are the `chat_template` strings of Qwen2.5-Instruct's and
Llama-3.2-Instruct's tokenizer_config.json. The tokenizers are byte-level BPEs built here with each family's
pre-tokenizer split and special tokens (no hub access)."""
import json
import os
import random

import numpy as np
import pytest

from ms_llm.data.chat import parse_tool_calls, render
from ms_llm.data.tokenizer import Tokenizer
from ms_llm.data.tools import ToolCall
from ms_llm.errors import MsLlmError

HERE = os.path.dirname(__file__)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current temperature at a place, in °C or °F.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Zürich"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Sum of two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


def _call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _build(tmp_path, name, split, specials, added, bos, eos, template):
    """A byte-level BPE tokenizer.json + tokenizer_config.json with the family's chat template; (ours, HF)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    rnd = random.Random(0)
    words = ("the weather in Zurich Paris is sunny cloudy what temperature degrees celsius add sum of numbers "
             "function call name arguments parameters tools tool response you are a helpful assistant").split()
    corpus = [" ".join(rnd.choice(words) for _ in range(12)) + f' {{"a": {rnd.randint(0, 999)}}}\n' for _ in range(3000)]
    corpus += [json.dumps(WEATHER), json.dumps(ADD, indent=4)] * 50
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos)
    with open(os.path.join(HERE, "templates", template)) as f:
        hf.chat_template = f.read()
    out = tmp_path / name
    hf.save_pretrained(str(out))
    return Tokenizer.load(out), AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("tok"), "qwen", QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  ["<tool_call>", "</tool_call>"], None, "<|im_end|>", "qwen2_5_instruct.jinja")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|python_tag|>"]
    return _build(tmp_path_factory.mktemp("tok"), "llama", LLAMA3_SPLIT, specials, [], "<|begin_of_text|>",
                  "<|eot_id|>", "llama3_2_instruct.jinja")


QWEN_CASES = {
    "parallel calls, two results, a second question": dict(tools=[WEATHER, ADD], gen=False, messages=[
        {"role": "user", "content": "Weather in Zürich and Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Zürich", unit="celsius"),
                                                            _call("get_weather", city="Paris")]},
        {"role": "tool", "content": '{"temperature": 3}'},
        {"role": "tool", "content": '{"temperature": 7}'},
        {"role": "assistant", "content": "Zürich is at 3 °C, Paris at 7 °C."},
        {"role": "user", "content": "And 3 + 7?"},
        {"role": "assistant", "content": "Let me add them.", "tool_calls": [_call("add", a=3, b=7)]},
        {"role": "tool", "content": "10"},
        {"role": "assistant", "content": "10."}]),
    "own system prompt, generation prompt after a result": dict(tools=[ADD], gen=True, messages=[
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "12 + 30?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("add", a=12, b=30)]},
        {"role": "tool", "content": "42"}]),
    "no tools": dict(tools=None, gen=True, messages=[{"role": "user", "content": "Hello there"}]),
}

LLAMA_CASES = {
    "system, call, JSON result, answer": dict(tools=[WEATHER, ADD], gen=False, messages=[
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": " Weather in Zürich? "},
        {"role": "assistant", "tool_calls": [_call("get_weather", city="Zürich", unit="celsius")]},
        {"role": "tool", "content": '{"temperature": 3}'},
        {"role": "assistant", "content": "3 °C."}]),
    "no system, generation prompt": dict(tools=[ADD], gen=True, messages=[{"role": "user", "content": "2 + 2?"}]),
}


def _same_tokens(pair, case, template, **hf_kwargs):
    ours, hf = pair
    want = hf.apply_chat_template(case["messages"], tools=case["tools"], tokenize=True,
                                  add_generation_prompt=case["gen"], **hf_kwargs)
    got = render(case["messages"], ours, template, tools=case["tools"], add_generation_prompt=case["gen"])
    assert hf.decode(got.ids) == hf.decode(want)
    assert got.ids == list(want)
    return got


@pytest.mark.parametrize("case", list(QWEN_CASES))
def test_qwen2_5_tools_equal_the_hf_template_token_for_token(qwen, case):
    got = _same_tokens(qwen, QWEN_CASES[case], "qwen")
    ours = qwen[0]
    trained = ours.decode([t for t, m in zip(got.ids, got.assistant_mask) if m])
    if case.startswith("parallel"):
        # calls are assistant output and carry loss; results never do
        assert trained.count("<tool_call>") == 3 and '"city": "Paris"' in trained
        assert "temperature" not in trained and "<tool_response>" not in trained


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama3_tools_equal_the_hf_template_token_for_token(llama, case):
    got = _same_tokens(llama, LLAMA_CASES[case], "llama3", date_string="26 Jul 2024")
    trained = llama[0].decode([t for t, m in zip(got.ids, got.assistant_mask) if m])
    if case.startswith("system"):
        assert trained.startswith('{"name": "get_weather", "parameters": {"city": "Zürich"')
        assert "temperature" not in trained


def test_llama3_refuses_two_calls_in_one_turn(llama):
    msgs = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": "", "tool_calls": [_call("add", a=1, b=2), _call("add", a=3, b=4)]}]
    with pytest.raises(MsLlmError, match="one tool call per assistant turn"):
        render(msgs, llama[0], "llama3", tools=[ADD])


@pytest.mark.parametrize("template", ["qwen", "chatml"])
def test_hermes_parser(template):
    p = parse_tool_calls("No tool needed: 4.", template)
    assert (p.content, p.calls, p.errors) == ("No tool needed: 4.", [], [])
    p = parse_tool_calls('Checking.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                         '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>',
                         template)
    assert p.ok and p.content == "Checking."
    assert p.calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("get_weather", {"city": "Paris"})]
    # a completion cut inside its second call: the first call stands, the cut one is an error
    p = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><tool_call>\n{"name": "ad',
                         template)
    assert p.calls == [ToolCall("add", {"a": 1})] and p.errors == [
        "unterminated <tool_call>: the completion ended inside a call"]
    p = parse_tool_calls('<tool_call>{"name": add}</tool_call><tool_call>{"arguments": {}}</tool_call>'
                         '<tool_call>{"name": "f", "arguments": [1]}</tool_call><tool_call>{"name": "g"}</tool_call>',
                         template)
    assert p.calls == [ToolCall("g", {})] and len(p.errors) == 3
    assert "not JSON" in p.errors[0] and "no string 'name'" in p.errors[1] and "must be an object" in p.errors[2]


def test_llama3_parser():
    assert parse_tool_calls("It is 4.", "llama3").calls == []
    p = parse_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}', "llama3")
    assert p.ok and p.calls == [ToolCall("add", {"a": 1, "b": 2})] and p.content == ""
    p = parse_tool_calls('<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "neg", "parameters": {"x": 2}}',
                         "llama3")
    assert p.calls == [ToolCall("add", {"a": 1}), ToolCall("neg", {"x": 2})] and p.ok
    p = parse_tool_calls('{"name": "add", "parameters": {"a": 1', "llama3")
    assert p.calls == [] and len(p.errors) == 1 and "malformed tool call" in p.errors[0]


def test_parser_round_trips_what_the_template_writes(qwen, llama):
    for pair, template in ((qwen, "qwen"), (llama, "llama3")):
        msgs = [{"role": "user", "content": "12 + 30?"},
                {"role": "assistant", "content": "", "tool_calls": [_call("add", a=12, b=30)]}]
        r = render(msgs, pair[0], template, tools=[ADD])
        trained = [t for t, m in zip(r.ids, r.assistant_mask) if m][:-1]       # the turn without its end token
        assert parse_tool_calls(pair[0].decode(trained), template).calls == [ToolCall("add", {"a": 12, "b": 30})]


def test_templates_without_a_tool_format_say_so(qwen):
    with pytest.raises(MsLlmError, match="'llama2' has no tool-call format"):
        parse_tool_calls("x", "llama2")


# ----- function-call SFT data ---------------------------------------------------------------------------------
def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_function_call_readers_normalize_three_formats(tmp_path):
    from ms_llm.data.readers import read_records
    tools = [ADD["function"]]
    call = {"name": "add", "arguments": {"a": 1, "b": 2}}
    want = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "", "tool_calls": [ToolCall("add", {"a": 1, "b": 2})]},
            {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3"}]
    share = read_records(_jsonl(tmp_path / "s.jsonl", [{"tools": json.dumps(tools), "conversations": [
        {"from": "human", "value": "1+2?"}, {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": "3"}, {"from": "gpt", "value": "3"}]}]), "sharegpt")[0]
    openai = read_records(_jsonl(tmp_path / "o.jsonl", [{"tools": [ADD], "messages": [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c0", "type": "function", "function": {
            "name": "add", "arguments": json.dumps(call["arguments"])}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "3"}, {"role": "assistant", "content": "3"}]}]), "openai")[0]
    assert share["messages"] == want and openai["messages"] == want
    assert share["tools"] == tools and openai["tools"] == [ADD]
    xlam = read_records(_jsonl(tmp_path / "x.jsonl", [{
        "query": "1+2?", "answers": json.dumps([call, {"name": "neg", "arguments": {"x": 3}}]),
        "tools": json.dumps([{"name": "add", "description": "Sum", "parameters": {
            "a": {"type": "int", "description": "first"}, "b": {"type": "int", "description": "second", "default": 0}}},
            {"name": "neg", "description": "Negate", "parameters": {"x": {"type": "int, optional"}}}])}]), "xlam")[0]
    assert xlam["messages"] == [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "", "tool_calls": [
        ToolCall("add", {"a": 1, "b": 2}), ToolCall("neg", {"x": 3})]}]
    assert xlam["tools"][0]["function"]["parameters"]["required"] == ["a"]
    assert xlam["tools"][1]["function"]["parameters"]["required"] == []


@pytest.mark.parametrize("fmt,row,message", [
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{\"name\": \"f\","}]},
     r"bad.jsonl:2: 'conversations\[1\].value' is not JSON"),
    ("sharegpt", {"tools": "[{\"description\": \"no name\"}]", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, r"bad.jsonl:2: tools\[0\] must be a JSON schema"),
    ("openai", {"messages": [{"role": "user", "content": "q", "tool_calls": []}, {"role": "assistant", "content": "a",
                "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     r"bad.jsonl:2: messages\[1\].tool_calls\[0\]: arguments of 'f' are not JSON"),
    ("openai", {"messages": [{"role": "assistant", "content": "a"}]}, "bad.jsonl:2: the conversation has no user message"),
    ("xlam", {"query": "q", "tools": [{"name": "f", "parameters": {}}], "answers": []},
     "bad.jsonl:2: 'answers' is empty"),
])
def test_function_call_readers_name_the_line(tmp_path, fmt, row, message):
    from ms_llm.data.readers import read_records
    good = {"sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "openai": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "xlam": {"query": "q", "tools": [{"name": "f", "parameters": {}}], "answers": [{"name": "f", "arguments": {}}]}}
    with pytest.raises(MsLlmError, match=message):
        read_records(_jsonl(tmp_path / "bad.jsonl", [good[fmt], row]), fmt)


def test_tool_results_carry_zero_loss_weight_in_sft_data(tmp_path):
    """An SFT example from tool-call data: the call tokens are trained, the tool's result tokens are not."""
    from ms_llm.config.schema import DataSource, SFTSection
    from ms_llm.data.sft import SFTData
    from ms_llm.data.synthetic import synthesize
    synthesize(str(tmp_path / "d"), n_text=50, n_sft=20, n_eval=5)
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer")
    result = "RESULTMARK 12345"
    path = _jsonl(tmp_path / "o.jsonl", [{"tools": [ADD], "messages": [
        {"role": "user", "content": "12000 + 345?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("add", a=12000, b=345)]},
        {"role": "tool", "content": result}, {"role": "assistant", "content": "It is 12345."}]}])
    data = SFTData([DataSource(path=path, format="openai")], tok, "chatml", 1024, SFTSection())
    row = data.groups[0][0]
    ids, labels, weights = (np.asarray(row[k]) for k in ("input_ids", "labels", "weights"))
    trained = tok.decode([int(t) for t, w in zip(labels, weights) if w > 0])
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 12000, "b": 345}}\n</tool_call>' in trained
    assert "It is 12345." in trained and "RESULTMARK" not in trained and "# Tools" not in trained
    assert "RESULTMARK" in tok.decode([int(t) for t in ids])          # the result is in the input, weight 0
    # one exchange holds two assistant messages: too long for seq_len it is refused, not shortened forever
    with pytest.raises(MsLlmError, match="o.jsonl:1: the last turn alone is"):
        SFTData([DataSource(path=path, format="openai")], tok, "chatml", 64, SFTSection())
