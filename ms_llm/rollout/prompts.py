# SPDX-License-Identifier: Apache-2.0
"""Prompts to roll out: prompt or preference JSONL rendered with the chat template's generation prompt, and
the seeded stream an RL stage draws them from."""
import numpy as np

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


def read_tasks(path: str, tokenizer, template: str, max_len: int, tasks=(), on_error: str = "raise",
               limit: int = 0) -> tuple:
    """Prompt records of a prompts JSONL ({prompt, answer, task[, tests, tools]}) with "messages" and "ids"
    (rendered with the generation prompt and the record's tools, cut from the start to `max_len`), kept when their task is in `tasks` (all when
    empty); returns (records, number cut)."""
    out, cut = [], 0
    for rec in read_records(path, "prompts", on_error):
        if tasks and rec.get("task") not in tasks:
            continue
        msgs = [{"role": "user", "content": rec["prompt"]}]
        ids = render(msgs, tokenizer, template, add_generation_prompt=True, tools=rec.get("tools")).ids
        if len(ids) > max_len:
            ids, cut = ids[-max_len:], cut + 1
        out.append(dict(rec, messages=msgs, ids=ids, tag=rec.get("task") or "all"))
        if limit and len(out) >= limit:
            break
    return out, cut


class PromptStream:
    """Prompts in a fresh seeded order each epoch; `take(n)` advances a cursor that is the stream's only state
    (a stage saves it, or derives it from the step when every step takes the same number)."""

    def __init__(self, prompts: list, seed: int):
        self.prompts, self.seed, self.cursor, self._orders = prompts, seed, 0, {}

    def take(self, n: int) -> list:
        out = []
        for i in range(self.cursor, self.cursor + n):
            epoch, k = divmod(i, len(self.prompts))
            if epoch not in self._orders:
                self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))}
            out.append(self.prompts[self._orders[epoch][k]])
        self.cursor += n
        return out
