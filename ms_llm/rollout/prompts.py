# SPDX-License-Identifier: Apache-2.0
"""Prompts to roll out: prompt or preference JSONL rendered with the chat template's generation prompt."""
from ms_llm.data.chat import render
from ms_llm.data.readers import read_records


def read_prompts(paths_formats: list, tokenizer, template: str, max_len: int, on_error: str = "raise") -> tuple:
    """[{"messages", "tag", "ids"}] from prompt or preference JSONL files, ids rendered with the generation
    prompt and cut from the start to `max_len`; returns (prompts, number cut)."""
    out, cut = [], 0
    for path, fmt in paths_formats:
        for rec in read_records(path, fmt, on_error):
            msgs = rec["messages"] if fmt == "preference" else [{"role": "user", "content": rec["prompt"]}]
            ids = render(msgs, tokenizer, template, add_generation_prompt=True).ids
            if len(ids) > max_len:
                ids, cut = ids[-max_len:], cut + 1
            out.append({"messages": msgs, "tag": rec.get("tag") or rec.get("task") or "all", "ids": ids})
    return out, cut
