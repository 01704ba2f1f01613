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


def split_side(messages: list, answer: str, tokenizer, template: str):
    """(prompt ids ending with the generation prompt, answer ids) through the chat template."""
    prompt = render(messages, tokenizer, template, add_generation_prompt=True).ids
    full = render(list(messages) + [{"role": "assistant", "content": answer}], tokenizer, template).ids
    assert full[:len(prompt)] == prompt, "the template renders a prompt differently with an answer after it"
    return prompt, full[len(prompt):]


def pack(prompt: list, answer: list, seq_len: int, pad_id: int):
    """(ids [seq_len] int32, mask [seq_len] int32, prompt tokens cut, index of the first answer token) or None
    when the prompt alone fills seq_len. The prompt is cut from its start; the answer is kept whole."""
    room = seq_len - len(answer)
    if room < 1 or len(prompt) >= seq_len:
        return None
    cut = max(0, len(prompt) - room)
    ids = prompt[cut:] + answer
    row = np.full(seq_len, pad_id, np.int32)
    row[:len(ids)] = ids
    mask = np.zeros(seq_len, np.int32)
    mask[:len(ids)] = 1
    return row, mask, cut, len(prompt) - cut


def encode_side(messages: list, answer: str, tokenizer, template: str, seq_len: int):
    """`pack` of one conversation and its answer."""
    return pack(*split_side(messages, answer, tokenizer, template), seq_len, tokenizer.pad_id or 0)


def answer_labels(ids, mask, start):
    """Next-token labels of the answer only: labels[t] = ids[t + 1] where t + 1 is an answer token, −100
    elsewhere (prompt and padding). ids, mask: [B, S]; start: [B] index of each row's first answer token."""
    ids, mask, start = np.asarray(ids), np.asarray(mask), np.asarray(start)
    s = ids.shape[1]
    nxt = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], 1)
    nxt_real = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], 1) > 0
    t = np.arange(s)[None, :]
    return np.where(nxt_real & (t + 1 >= start[:, None]), nxt, -100).astype(np.int32)


def encode_pair(rec: dict, tokenizer, template: str, seq_len: int, where: str):
    """One record -> {chosen_ids, chosen_mask, rejected_ids, rejected_mask, margin, tag, truncated}.
    Raises ValueError (message without the location) for a pair that cannot be used."""
    if rec["chosen"] == rec["rejected"]:
        raise ValueError("chosen and rejected are identical")
    sides = [encode_side(rec["messages"], rec[k], tokenizer, template, seq_len) for k in ("chosen", "rejected")]
    if any(s is None for s in sides):
        raise ValueError(f"the prompt (or an answer) alone is longer than data.seq_len={seq_len}")
    (ci, cm, cc, cs), (ri, rm, rc, rs) = sides
    return {"chosen_ids": ci, "chosen_mask": cm, "rejected_ids": ri, "rejected_mask": rm,
            "margin": np.float32(rec.get("margin") or 0.0), "tag": rec.get("tag") or UNTAGGED,
            "chosen_start": np.int32(cs), "rejected_start": np.int32(rs), "truncated": bool(cc or rc)}


def read_pairs(path: str, tokenizer, template: str, seq_len: int, on_error: str = "raise",
               stats: PairStats = None, keep_messages: bool = False) -> list:
    """Encoded pairs of one preference JSONL file (see the module docstring for the rules); with
    `keep_messages` each keeps its prompt conversation under "messages"."""
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
        if keep_messages:
            pair["messages"] = rec["messages"]
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
        self.offsets = np.cumsum([0] + [len(g) for g in self.groups])[:-1]
        self.flat = [(g, i) for g, grp in enumerate(self.groups) for i in range(len(grp))]
        weights = tag_weights({t: len(groups[t]) for t in self.tags}, shares)
        self.sampler = MixtureSampler([len(g) for g in self.groups], [weights[t] for t in self.tags], seed)
        self.shares = {t: float(p) for t, p in zip(self.tags, self.sampler.p)}

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def batch(self, micro_index: int, micro_batch: int, rank: int = 0, world: int = 1) -> dict:
        """The fields of KEYS, each pair's answer starts, and `pair_index` (its position in `rows()`)."""
        base = micro_index * micro_batch * world + rank * micro_batch
        picks = [self.sampler.lookup(base + j) for j in range(micro_batch)]
        return self._stack([self.groups[g][i] for g, i in picks], [self.offsets[g] + i for g, i in picks])

    def rows(self, start: int, count: int) -> dict:
        """Pairs start .. start + count − 1 in a fixed order (tag by tag), stacked like `batch`."""
        index = list(range(start, min(start + count, len(self))))
        return self._stack([self.groups[g][i] for g, i in (self.flat[k] for k in index)], index)

    @staticmethod
    def _stack(rows: list, index: list) -> dict:
        out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        out["pair_index"] = np.asarray(index, np.int64)
        return out

    def realised_shares(self, samples: int) -> dict:
        """Share of each tag among the first `samples` pairs the run drew."""
        counts = np.bincount([self.sampler.lookup(k)[0] for k in range(samples)], minlength=len(self.tags))
        return {t: float(c) / max(samples, 1) for t, c in zip(self.tags, counts)}


@dataclass
class Completion:
    prompt: list             # token ids, ending with the generation prompt
    answer: list             # token ids of the completion
    desirable: bool


def read_completions(path: str, fmt: str, tokenizer, template: str, seq_len: int, on_error: str = "raise",
                     stats: PairStats = None) -> list:
    """KTO's unpaired completions: from `unpaired` records, or from `preference` pairs (chosen desirable,
    rejected not). A prompt that leaves no room for its completion is refused (file:line) or counted."""
    stats = stats if stats is not None else PairStats()
    out = []
    for rec in read_records(path, fmt, on_error, stats):
        sides = [(rec["completion"], rec["label"])] if fmt == "unpaired" else [(rec["chosen"], True),
                                                                                (rec["rejected"], False)]
        done = []
        for answer, good in sides:
            prompt, ids = split_side(rec["messages"], answer, tokenizer, template)
            if pack(prompt, ids, seq_len, 0) is None:
                done = None
                break
            stats.truncated_prompts += len(prompt) + len(ids) > seq_len
            done.append(Completion(prompt, ids, bool(good)))
        if done is None:
            where = f"{path}:{rec['line']}"
            if on_error != "skip":
                raise MsLlmError(f"{where}: the prompt (or the completion) alone is longer than data.seq_len={seq_len} "
                                 "(fix the record, or set data.on_error: skip)")
            stats.skipped += 1
            continue
        out += done
    return out


class CompletionData:
    """Unpaired completions for KTO, shuffled per epoch; each micro-batch also carries its mismatched rows
    (prompt i with the completion of the next example in the data stream that answers another prompt), whose
    log-ratios estimate KL(π‖ρ). The partner follows from the example's place in the stream, not from the
    micro-batch it lands in, so every split of a step's batch (micro-batches, ranks) pairs the same rows."""

    def __init__(self, sources, tokenizer, template: str, seq_len: int, seed: int = 0, on_error: str = "raise"):
        self.stats, self.seq_len, self.pad = PairStats(), seq_len, tokenizer.pad_id or 0
        self.rows = []
        for src in sources:
            if src.format not in ("unpaired", "preference"):
                raise MsLlmError(f"data.sources: {src.path} has format '{src.format}'; KTO reads unpaired or "
                                 "preference records")
            self.rows += read_completions(src.path, src.format, tokenizer, template, seq_len, on_error, self.stats)
        if len(self.rows) < 2:
            raise MsLlmError("data.sources hold fewer than 2 usable completions (KTO needs a mismatched partner)")
        self.seed, self._orders = seed, {}

    def _order(self, epoch: int):
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))}
        return self._orders[epoch]

    def _at(self, position: int):
        n = len(self.rows)
        return self.rows[self._order(position // n)[position % n]]

    def batch(self, micro_index: int, micro_batch: int, rank: int = 0, world: int = 1) -> dict:
        base = micro_index * micro_batch * world + rank * micro_batch
        rows, kl, picks = [], [], []
        for p in range(base, base + micro_batch):
            c = self._at(p)
            picks.append(c)
            rows.append(pack(c.prompt, c.answer, self.seq_len, self.pad))
            # the next example answering another prompt (a pair split in two, or a wrapped epoch, repeats prompts;
            # data with one prompt only: the next example)
            q = next((q for q in range(p + 1, p + len(self.rows)) if self._at(q).prompt != c.prompt), p + 1)
            kl.append(pack(c.prompt, self._at(q).answer, self.seq_len, self.pad))
        out = {}
        for name, packed in (("", rows), ("kl_", kl)):
            ids, mask = np.stack([p[0] for p in packed]), np.stack([p[1] for p in packed])
            out[f"{name}ids"] = ids
            out[f"{name}labels"] = answer_labels(ids, mask, np.array([p[3] for p in packed]))
        out["desirable"] = np.array([c.desirable for c in picks], np.float32)
        return out
