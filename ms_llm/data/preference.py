# SPDX-License-Identifier: Apache-2.0
"""Preference pairs for reward models (and the DPO family): chosen and rejected answers to one prompt.

    {"prompt": str | [{"role", "content"}, ...], "chosen": str, "rejected": str, "margin"?: float, "tag"?: str}

Each side is the prompt conversation plus one assistant answer, rendered through the chat template into a
fixed-length row (right-padded; the reward is read at the last real token). Rules for bad pairs, each
named `file:line` (or, with `data.on_error: skip`, counted in `stats`):

  * identical chosen and rejected: a pair that teaches nothing;
  * a prompt that alone fills `seq_len`: no room for an answer;
  * too long otherwise: the prompt loses tokens from its start (the answer is never cut), counted in
    `stats.truncated_prompts`.

Hard-example mixing (seed 000 §1.2.5.4.1): pairs are grouped by `tag` and drawn with `MixtureSampler`,
the named tags at fixed shares (safety_boundary 25%, logical_contradiction 15%) and every other tag sharing
what is left in proportion to its size.
"""
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ms_llm.data.chat import render
from ms_llm.data.mixture import MixtureSampler
from ms_llm.data.readers import ReadStats, read_records
from ms_llm.errors import MsLlmError

UNTAGGED = "untagged"
KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "margin")


@dataclass
class PairStats(ReadStats):
    truncated_prompts: int = 0


def encode_side(messages: list, answer: str, tokenizer, template: str, seq_len: int):
    """(ids [seq_len] int32, mask [seq_len] int32, prompt tokens cut) or None when the prompt alone fills
    seq_len. The prompt is cut from its start; the answer is kept whole."""
    prompt = render(messages, tokenizer, template, add_generation_prompt=True).ids
    full = render(list(messages) + [{"role": "assistant", "content": answer}], tokenizer, template).ids
    assert full[:len(prompt)] == prompt, "the template renders a prompt differently with an answer after it"
    answer_ids = full[len(prompt):]
    room = seq_len - len(answer_ids)
    if room < 1 or len(prompt) >= seq_len:
        return None
    cut = max(0, len(prompt) - room)
    ids = prompt[cut:] + answer_ids
    row = np.full(seq_len, tokenizer.pad_id or 0, np.int32)
    row[:len(ids)] = ids
    mask = np.zeros(seq_len, np.int32)
    mask[:len(ids)] = 1
    return row, mask, cut


def encode_pair(rec: dict, tokenizer, template: str, seq_len: int, where: str):
    """One record -> {chosen_ids, chosen_mask, rejected_ids, rejected_mask, margin, tag, truncated}.
    Raises ValueError (message without the location) for a pair that cannot be used."""
    if rec["chosen"] == rec["rejected"]:
        raise ValueError("chosen and rejected are identical")
    sides = [encode_side(rec["messages"], rec[k], tokenizer, template, seq_len) for k in ("chosen", "rejected")]
    if any(s is None for s in sides):
        raise ValueError(f"the prompt (or an answer) alone is longer than data.seq_len={seq_len}")
    (ci, cm, cc), (ri, rm, rc) = sides
    return {"chosen_ids": ci, "chosen_mask": cm, "rejected_ids": ri, "rejected_mask": rm,
            "margin": np.float32(rec.get("margin") or 0.0), "tag": rec.get("tag") or UNTAGGED,
            "truncated": bool(cc or rc)}


def read_pairs(path: str, tokenizer, template: str, seq_len: int, on_error: str = "raise",
               stats: PairStats = None) -> list:
    """Encoded pairs of one preference JSONL file (see the module docstring for the rules)."""
    stats = stats if stats is not None else PairStats()
    out = []
    for rec in read_records(path, "preference", on_error, stats):
        where = f"{path}:{rec['line']}"
        try:
            pair = encode_pair(rec, tokenizer, template, seq_len, where)
        except ValueError as e:
            if on_error != "skip":
                raise MsLlmError(f"{where}: {e} (fix the record, or set data.on_error: skip)") from None
            stats.skipped += 1
            if len(stats.reasons) < 20:
                stats.reasons.append(f"{where}: {e}")
            continue
        stats.truncated_prompts += pair.pop("truncated")
        out.append(pair)
    return out


def tag_weights(sizes: dict, shares: dict) -> dict:
    """Sampling weight per tag: the named shares as given, the rest split by size. A named tag with no pairs
    is an error (its share cannot be met)."""
    missing = [t for t, s in shares.items() if s > 0 and not sizes.get(t)]
    if missing:
        raise MsLlmError(f"reward.tag_shares names {missing}, but the data has no pairs with that tag "
                         f"(tags present: {sorted(sizes)})")
    fixed = sum(shares.get(t, 0.0) for t in sizes)
    if fixed > 1.0 + 1e-9:
        raise MsLlmError(f"reward.tag_shares add up to {fixed:.3f}; they must leave room (at most 1)")
    rest = {t: n for t, n in sizes.items() if t not in shares}
    if not rest and abs(fixed - 1.0) > 1e-9:
        raise MsLlmError(f"reward.tag_shares name every tag in the data ({sorted(sizes)}) but add up to {fixed:.3f}, "
                         "not 1: there is no other tag to take the rest")
    total_rest = sum(rest.values())
    weights = {t: shares[t] for t in sizes if t in shares}
    for t, n in rest.items():
        weights[t] = (1.0 - fixed) * n / total_rest
    return weights


class PreferenceData:
    """Encoded preference pairs grouped by tag and sampled by share; deterministic and resumable."""

    def __init__(self, sources, tokenizer, template: str, seq_len: int, shares: dict, seed: int = 0,
                 on_error: str = "raise"):
        self.stats = PairStats()
        groups = defaultdict(list)
        for src in sources:
            if src.format != "preference":
                raise MsLlmError(f"data.sources: {src.path} has format '{src.format}'; this stage reads preference")
            for pair in read_pairs(src.path, tokenizer, template, seq_len, on_error, self.stats):
                groups[pair.pop("tag")].append(pair)
        if not groups:
            raise MsLlmError("data.sources hold no usable preference pairs")
        self.tags = sorted(groups)
        self.groups = [groups[t] for t in self.tags]
        weights = tag_weights({t: len(groups[t]) for t in self.tags}, shares)
        self.sampler = MixtureSampler([len(g) for g in self.groups], [weights[t] for t in self.tags], seed)
        self.shares = {t: float(p) for t, p in zip(self.tags, self.sampler.p)}

    def batch(self, micro_index: int, micro_batch: int, rank: int = 0, world: int = 1) -> dict:
        base = micro_index * micro_batch * world + rank * micro_batch
        rows = [self.groups[g][i] for g, i in (self.sampler.lookup(base + j) for j in range(micro_batch))]
        return {k: np.stack([r[k] for r in rows]) for k in KEYS}

    def realised_shares(self, samples: int) -> dict:
        """Share of each tag among the first `samples` pairs the run drew."""
        counts = np.bincount([self.sampler.lookup(k)[0] for k in range(samples)], minlength=len(self.tags))
        return {t: float(c) / max(samples, 1) for t, c in zip(self.tags, counts)}
