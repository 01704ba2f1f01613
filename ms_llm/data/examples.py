# SPDX-License-Identifier: Apache-2.0
"""Conversations -> fixed-length supervised examples: labels are -100 on everything but assistant output.

    r = render(messages, tokenizer, "qwen")
    ex = supervised_example(r, seq_len=512, pad_id=tokenizer.pad_id)
    ex["input_ids"], ex["labels"], ex["attention_mask"], ex["turn"]     # each [seq_len]

Labels are aligned with the inputs (labels[t] is the target after input t), as the loss cells expect.
`turn[t]` is the assistant turn (0-based) that label t belongs to, -1 where there is no label, so a
multi-turn loss can weight and normalize per turn.
"""
import numpy as np

from ms_llm.data.packing import IGNORE


def supervised_example(rendered, seq_len: int, pad_id: int) -> dict:
    """Shift, mask, truncate (keeping the beginning) and right-pad one rendered conversation."""
    ids = np.asarray(rendered.ids[:seq_len + 1], np.int32)
    mask = np.asarray(rendered.assistant_mask[:seq_len + 1], bool)
    turn = np.asarray(rendered.turn[:seq_len + 1], np.int32)
    n = len(ids) - 1
    out = {"input_ids": np.full(seq_len, pad_id, np.int32), "labels": np.full(seq_len, IGNORE, np.int32),
           "attention_mask": np.zeros(seq_len, np.int32), "turn": np.full(seq_len, -1, np.int32)}
    if n > 0:
        out["input_ids"][:n] = ids[:-1]
        out["labels"][:n] = np.where(mask[1:], ids[1:], IGNORE)
        out["attention_mask"][:n] = 1
        out["turn"][:n] = np.where(mask[1:], turn[1:], -1)
    out["truncated"] = len(rendered.ids) > seq_len + 1
    return out
