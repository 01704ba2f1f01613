# SPDX-License-Identifier: Apache-2.0
"""Chat templates, rendered by one function in training and in inference.

    r = render(messages, tokenizer, "qwen")      # messages: [{"role": "user"|"assistant"|"system"|"tool", "content": str}]
    r.ids            # token ids
    r.assistant_mask # 1 on assistant output (content + end-of-turn token): the tokens that carry loss
    r.turn           # k on tokens of the k-th assistant turn (0-based), -1 elsewhere (multi-turn weighting)

Templates are tables of strings. `{content}` is the message text; `{bos}` / `{eos}` stand for the
tokenizer's bos/eos ids (SentencePiece does not parse "<s>" written as text). Other special tokens such as
<|im_end|> are written literally and must be single tokens of the tokenizer (checked).
"""
from dataclasses import dataclass
from typing import Optional

from ms_llm.data.tools import ToolParse, apply_tools, tool_format
from ms_llm.errors import MsLlmError

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    begin: str                      # once, before everything
    system: str                     # a system message
    user: str                       # a user message
    tool: str                       # a tool/observation message
    assistant_prefix: str           # before assistant content (no loss)
    assistant_suffix: str           # end-of-turn marker (carries loss: the model must learn to stop)
    assistant_sep: str = ""         # after the end-of-turn marker (no loss)
    default_system: Optional[str] = None
    system_in_first_user: bool = False   # Llama-2 folds the system prompt into the first [INST]
    specials: tuple = ()            # literal special tokens the tokenizer must have
    tool_format: Optional[str] = None   # how tools and tool calls are written (data/tools.py): hermes | llama3
    tool_open: str = ""             # consecutive tool results share one turn: open + tool per result + close
    tool_close: str = ""


TEMPLATES = {
    "chatml": ChatTemplate("chatml", "", "<|im_start|>system\n{content}<|im_end|>\n",
                           "<|im_start|>user\n{content}<|im_end|>\n", "<|im_start|>tool\n{content}<|im_end|>\n",
                           "<|im_start|>assistant\n", "<|im_end|>", "\n", specials=("<|im_start|>", "<|im_end|>"),
                           tool_format="hermes"),
    "qwen": ChatTemplate("qwen", "", "<|im_start|>system\n{content}<|im_end|>\n",
                         "<|im_start|>user\n{content}<|im_end|>\n",
                         "\n<tool_response>\n{content}\n</tool_response>",
                         "<|im_start|>assistant\n", "<|im_end|>", "\n", default_system=QWEN_DEFAULT_SYSTEM,
                         specials=("<|im_start|>", "<|im_end|>"), tool_format="hermes",
                         tool_open="<|im_start|>user", tool_close="<|im_end|>\n"),
    "llama3": ChatTemplate("llama3", "<|begin_of_text|>",
                           "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                           "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
                           "<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
                           "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
                           specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                           tool_format="llama3"),
    "llama2": ChatTemplate("llama2", "", "<<SYS>>\n{content}\n<</SYS>>\n\n", "{bos}[INST] {content} [/INST]",
                           "{bos}[INST] {content} [/INST]", " ", " {eos}", system_in_first_user=True),
    "plain": ChatTemplate("plain", "", "{content}\n\n", "User: {content}\n", "Observation: {content}\n",
                          "Assistant: ", "{eos}", "\n"),
}


@dataclass
class Rendered:
    ids: list
    assistant_mask: list
    turn: list

    def __len__(self):
        return len(self.ids)


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise MsLlmError(f"tokenizer.chat_template: '{name}' is not a template; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _encode(tokenizer, text: str) -> list:
    """Encode template text, turning {bos}/{eos} into ids."""
    ids = []
    for i, part in enumerate(text.replace("{eos}", "\0eos\0").replace("{bos}", "\0bos\0").split("\0")):
        if i % 2:
            tid = tokenizer.bos_id if part == "bos" else tokenizer.eos_id
            if tid is None:
                raise MsLlmError(f"the chat template needs a {part} token but the tokenizer has none")
            ids.append(tid)
        elif part:
            ids.extend(tokenizer.encode(part))
    return ids


def check_tokenizer(template: ChatTemplate, tokenizer):
    missing = [t for t in template.specials if tokenizer.token_to_id(t) is None]
    if missing:
        raise MsLlmError(f"chat template '{template.name}' needs special tokens {missing} that the tokenizer "
                         f"({tokenizer.source}) does not have; add them or choose another template")


def render(messages, tokenizer, template="chatml", add_generation_prompt: bool = False,
           use_default_system: bool = True, tools=None, date: str = None) -> Rendered:
    """Token ids and loss mask for a conversation (see module docstring). `tools` (JSON schemas) and assistant
    `tool_calls` are written the way the template's model family writes them (data/tools.py); `date` is the
    "Today Date" of the llama3 tool prompt."""
    tpl = get_template(template) if isinstance(template, str) else template
    check_tokenizer(tpl, tokenizer)
    ids, mask, turn = [], [], []

    def put(text, trainable=False, k=-1):
        new = _encode(tokenizer, text)
        ids.extend(new)
        mask.extend([int(trainable)] * len(new))
        turn.extend([k if trainable else -1] * len(new))

    msgs = list(messages)
    if tpl.default_system and use_default_system and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": tpl.default_system})
    try:
        msgs = apply_tools(tpl, msgs, tools, date)
    except ValueError as e:
        raise MsLlmError(str(e)) from None
    put(tpl.begin)
    pending_system, k = None, 0
    for j, m in enumerate(msgs):
        role, content = m["role"], m["content"]
        if role == "system":
            if tpl.system_in_first_user:
                pending_system = tpl.system.format(content=content)
            else:
                put(tpl.system.format(content=content))
        elif role == "user":
            if pending_system is not None:
                content, pending_system = pending_system + content, None
            put(tpl.user.replace("{content}", content))
        elif role == "tool":
            if j and msgs[j - 1]["role"] == "tool" and (tpl.tool_open or tpl.tool_close):
                continue                # written with the first result of its run
            run = [content]
            while tpl.tool_open or tpl.tool_close:
                if j + len(run) >= len(msgs) or msgs[j + len(run)]["role"] != "tool":
                    break
                run.append(msgs[j + len(run)]["content"])
            put(tpl.tool_open + "".join(tpl.tool.replace("{content}", c) for c in run) + tpl.tool_close)
        elif role == "assistant":
            put(tpl.assistant_prefix)
            put(content, True, k)
            put(tpl.assistant_suffix, True, k)
            put(tpl.assistant_sep)
            k += 1
        else:
            raise MsLlmError(f"chat message role '{role}' is not one of system, user, assistant, tool")
    if add_generation_prompt:
        put(tpl.assistant_prefix)
    return Rendered(ids, mask, turn)


def stop_token_ids(template, tokenizer) -> list:
    """Token ids that end an assistant turn under this template (for generation)."""
    tpl = get_template(template) if isinstance(template, str) else template
    ids = _encode(tokenizer, tpl.assistant_suffix.strip() or "{eos}")
    return sorted(set(ids[-1:]) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set()))


def parse_tool_calls(text: str, template) -> ToolParse:
    """Tool calls in a completion, read in the tool format of `template` (a name or ChatTemplate)."""
    return tool_format(get_template(template) if isinstance(template, str) else template).parse(text)
