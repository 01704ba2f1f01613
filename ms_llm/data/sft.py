# SPDX-License-Identifier: Apache-2.0
"""Instruction data for SFT: conversations -> weighted, fixed-length examples, sampled by source and task.

Loss normalization follows seed 003's "SFT loss pitfalls" (multi-turn merging): every assistant turn's
loss is averaged over its own tokens, turns are weighted (1.0 for the last, decay^k for the k-th before
it, times the record's task weight) and the weighted turn losses are averaged over the whole global batch:

    loss = sum_turns w_t * (l_t / n_t) / sum_turns w_t

So a long answer does not outweigh a short one, and the value is the same however the global batch is
split into micro-batches, accumulation steps or data-parallel ranks. Per token this is a weight
w_t / n_t; each row also carries its sum of w_t (the loss denominator).

With `packing`, each (source, task) group's conversations are packed into rows first-fit by length
(data/packing.py, document masks and positions per conversation), and the rows are what is sampled: a row's
loss denominator is the sum over its conversations, so the formula above holds per token, unchanged.
"""
import hashlib
import json
import os
import re
from collections import defaultdict

import numpy as np

from ms_llm import storage
from ms_llm.data.cache import building, tokenizer_fingerprint
from ms_llm.data.chat import render
from ms_llm.data.examples import supervised_example
from ms_llm.data.mixture import MixtureSampler
from ms_llm.data.packing import pack_supervised
from ms_llm.data.readers import ReadStats, read_records
from ms_llm.errors import MsLlmError
from ms_llm.fileio import sha256_file

CONVERSATION_FORMATS = ("alpaca", "sharegpt", "openai", "xlam")
THINK = re.compile(r"<think>.*?</think>\s*", re.S)


def preprocess(messages: list, identity: dict, keep_think: bool, max_turns: int) -> list:
    """Substitute {{KEY}} placeholders, optionally strip <think> blocks, keep the last `max_turns` turns."""
    out = []
    for m in messages:
        content = m["content"]
        for key, value in identity.items():
            content = content.replace("{{" + key + "}}", str(value))
        if m["role"] == "assistant" and not keep_think:
            content = THINK.sub("", content)
        out.append({"role": m["role"], "content": content, **({"tool_calls": m["tool_calls"]} if m.get("tool_calls") else {})})
    return drop_oldest_turns(out, max_turns)


def _exchange_starts(rest: list) -> list:
    return [i for i, m in enumerate(rest) if m["role"] == "user" and (i == 0 or rest[i - 1]["role"] == "assistant")]


def drop_oldest_turns(messages: list, keep: int) -> list:
    """Keep the system message and the last `keep` exchanges (a user message and every assistant and tool
    message up to the next one)."""
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    starts = _exchange_starts(rest)
    if len(starts) > keep:
        rest = rest[starts[-keep]:]
    return system + rest


def turn_weights(example: dict, task_weight: float, decay: float) -> tuple:
    """Per-token loss weights [S] (w_t / n_t on turn t's label tokens) and the row's sum of w_t."""
    turn = example["turn"]
    weights = np.zeros(turn.shape, np.float32)
    turns = sorted(set(turn[turn >= 0].tolist()))
    total = 0.0
    for k, t in enumerate(reversed(turns)):          # k = 0 for the last turn
        w = task_weight * decay ** k
        sel = turn == t
        weights[sel] = w / sel.sum()
        total += w
    return weights, np.float32(total)


KEYS = ("input_ids", "labels", "attention_mask", "weights", "row_weight", "position_ids", "segment_ids")


class Rows:
    """One group's examples as columns ({field: array [n, ...]}, memory-mapped from an SFT cache); indexing gives
    one example as a dict, like the lists of dicts groups otherwise are."""

    def __init__(self, columns: dict):
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return {k: v[i] for k, v in self.columns.items()}


CACHE_VERSION = 1
COLUMNS = KEYS + ("tokens", "documents")          # what a cache keeps of each example (those it has)


class SFTData:
    """Tokenized SFT examples per (source, task) group, sampled by weight; deterministic and resumable.

    packing: None, or "documents" (rows of whole conversations, attention within each) or "concatenated"
    (conversations one after another, attending across). The sampled items (`sample`, `examples`) are then
    the packed rows, drawn so that each conversation is seen as often as unpacked (`_row_weights`).

    cache_dir: encode (and pack) once into `<cache_dir>/sft.<key>/`, one .npy per group and field, and read it
    memory-mapped: ranks that start together encode once per node (the first takes the folder's lock, the
    others wait and read; `built_here` says which), and share the pages. The key hashes the sources' bytes,
    formats and weights, the tokenizer (its files and its bos/eos/pad ids), the template, seq_len, packing,
    on_error, the SFT settings that shape examples and the code that makes them, so a change to any of them
    encodes again; the key is also `identity`, what a checkpoint records of the data it was trained on.
    """

    def __init__(self, sources, tokenizer, template: str, seq_len: int, sft_cfg, seed: int = 0,
                 on_error: str = "raise", packing: str = None, cache_dir: str = None):
        if packing not in (None, "documents", "concatenated"):
            raise ValueError(f"packing must be None, 'documents' or 'concatenated', not {packing!r}")
        self.seq_len, self.pad_id, self.seed, self.packing = seq_len, tokenizer.pad_id, seed, packing
        self.stats = ReadStats()
        for src in sources:
            if src.format not in CONVERSATION_FORMATS:
                raise MsLlmError(f"data.sources: {src.path} has format '{src.format}'; SFT reads "
                                 f"{', '.join(CONVERSATION_FORMATS)}")
            if not os.path.isfile(src.path):
                raise MsLlmError(f"{src.path}: data file not found")
        encode = (lambda: self._encode(sources, tokenizer, template, sft_cfg, on_error))
        self.built_here, self.identity = True, None
        if cache_dir is None:
            weights = encode()
        else:
            self.identity = _cache_key(sources, tokenizer, template, seq_len, sft_cfg, packing, on_error)
            folder = os.path.join(cache_dir, "sft." + self.identity)
            done = os.path.join(folder, "index.json")
            self.built_here = False
            if not os.path.isfile(done):
                with building(folder, "the SFT data"):
                    if not os.path.isfile(done):           # (else another process wrote it while this one waited)
                        self._write(folder, encode())
                        self.built_here = True
            weights = self._read(folder)
        self.weights = list(weights)
        self.sampler = MixtureSampler([len(g) for g in self.groups], self._row_weights(), seed)

    def _row_weights(self) -> list:
        """Each group's weight per sampled item: its configured weight (a share of conversations) times rows per
        conversation, so that packed or not, every conversation of a group is drawn equally often (a group whose
        conversations pack densely would otherwise bring more of them per draw)."""
        return [w * len(g) / max(n, 1) for w, g, n in zip(self.weights, self.groups, self.group_conversations)]

    def _encode(self, sources, tokenizer, template, sft_cfg, on_error) -> list:
        """Read, render and pack every source into self.keys / self.groups; returns the groups' weights."""
        groups, weights = defaultdict(list), {}
        for si, src in enumerate(sources):
            records = read_records(src.path, src.format, on_error, self.stats)
            for rec in records:
                ex = self._example(rec, tokenizer, template, sft_cfg, src.path, rec["line"], on_error)
                if ex is not None:
                    groups[(si, rec.get("task") or "default")].append(ex)
            n_src = sum(len(v) for (s, _), v in groups.items() if s == si)
            for (s, task), items in groups.items():
                if s == si:
                    weights[(s, task)] = src.weight * sft_cfg.task_sampling.get(task, 1.0) * len(items) / max(n_src, 1)
        if not groups:
            raise MsLlmError("data.sources hold no usable SFT examples")
        self.keys = sorted(groups)
        self.group_conversations = [len(groups[k]) for k in self.keys]
        self.conversations = sum(self.group_conversations)
        self.groups = [self._pack(groups[k]) for k in self.keys]
        return [weights[k] for k in self.keys]

    def _write(self, folder: str, weights: list):
        with storage.writing_dir(folder, "SFT data cache", replace=False) as tmp:
            for g, group in enumerate(self.groups):
                for field in COLUMNS:
                    if field in group[0]:
                        np.save(os.path.join(tmp, f"group{g}.{field}.npy"), np.stack([ex[field] for ex in group]))
            with open(os.path.join(tmp, "index.json"), "w") as f:
                json.dump({"version": CACHE_VERSION, "seq_len": self.seq_len, "packing": self.packing,
                           "groups": [{"source": si, "task": task, "weight": w, "items": len(group), "conversations": n}
                                      for (si, task), w, group, n in zip(self.keys, weights, self.groups,
                                                                         self.group_conversations)],
                           "conversations": self.conversations, "read": self.stats.read,
                           "skipped": self.stats.skipped, "skip_reasons": self.stats.reasons}, f, indent=1)

    def _read(self, folder: str) -> list:
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        self.keys = [(g["source"], g["task"]) for g in index["groups"]]
        self.groups = []
        for g in range(len(index["groups"])):
            columns = {field: np.load(os.path.join(folder, f"group{g}.{field}.npy"), mmap_mode="r")
                       for field in COLUMNS if os.path.isfile(os.path.join(folder, f"group{g}.{field}.npy"))}
            self.groups.append(Rows(columns))
        self.group_conversations = [g["conversations"] for g in index["groups"]]
        self.conversations = index["conversations"]
        self.stats = ReadStats(index["read"], index["skipped"], list(index["skip_reasons"]))
        return [g["weight"] for g in index["groups"]]

    def _example(self, rec, tokenizer, template, cfg, path, lineno, on_error):
        msgs = preprocess(rec["messages"], cfg.identity, cfg.keep_think, cfg.max_turns)
        while True:
            r = render(msgs, tokenizer, template, tools=rec.get("tools"))
            if len(r.ids) <= self.seq_len + 1:
                break
            n = _n_exchanges(msgs)
            shorter = drop_oldest_turns(msgs, n - 1) if n > 1 else None
            if shorter is None:
                reason = (f"{path}:{lineno}: the last turn alone is {len(r.ids)} tokens, over data.seq_len="
                          f"{self.seq_len}")
                if on_error != "skip":
                    raise MsLlmError(reason + " (raise data.seq_len or set data.on_error: skip)")
                self.stats.skipped += 1
                self.stats.reasons.append(reason)
                return None
            msgs = shorter
        ex = supervised_example(r, self.seq_len, self.pad_id)
        ex["weights"], ex["row_weight"] = turn_weights(ex, cfg.task_weights.get(rec.get("task"), 1.0), cfg.turn_decay)
        ex.pop("truncated")
        ex["tokens"] = int(ex["attention_mask"].sum())
        return ex

    def _pack(self, examples: list) -> list:
        if self.packing is None:
            return examples
        return pack_supervised(examples, self.seq_len, self.pad_id, self.packing == "documents")

    def sample(self, k: int) -> dict:
        g, i = self.sampler.lookup(k)
        return self.groups[g][i]

    def flat_index(self, k: int) -> int:
        """Position of sample k in `examples()` order (what per-example side data, e.g. a teacher cache, keys on)."""
        g, i = self.sampler.lookup(k)
        return sum(len(x) for x in self.groups[:g]) + i

    def examples(self):
        """Every example, group by group (a stable order for caches and fingerprints)."""
        for group in self.groups:
            yield from group

    def fingerprint(self) -> str:
        """sha256 over every example's input ids, labels and weights in `examples()` order."""
        h = hashlib.sha256(str(self.seq_len).encode())
        for ex in self.examples():
            for key in ("input_ids", "labels", "weights"):
                h.update(np.ascontiguousarray(ex[key]).tobytes())
        return h.hexdigest()

    def add_group(self, key, examples: list, weight: float):
        """Append a group (e.g. hard examples found during distillation) sampled with `weight`; k -> example stays
        deterministic given the groups added so far."""
        if not examples:
            return
        self.weights = [w / sum(self.weights) for w in self.weights] + [weight]   # (the old groups' shares keep
        self.keys.append(key)                                                       # their sum, as before)
        self.conversations += len(examples)
        self.group_conversations.append(len(examples))
        self.groups.append(self._pack(examples))
        self.sampler = MixtureSampler([len(g) for g in self.groups], self._row_weights(), self.seed)

    def batch_indices(self, micro_index: int, micro_batch: int, rank: int = 0, world: int = 1) -> list:
        base = micro_index * micro_batch * world + rank * micro_batch
        return [base + i for i in range(micro_batch)]

    def batch(self, micro_index: int, micro_batch: int, rank: int = 0, world: int = 1) -> dict:
        """The micro-batch's `KEYS` (unpacked rows get positions 0.. and one segment) plus `tokens`, the real
        (non-padding) tokens it holds."""
        rows = [self.sample(k) for k in self.batch_indices(micro_index, micro_batch, rank, world)]
        out = {k: np.stack([r[k] for r in rows]) for k in KEYS if k in rows[0]}
        if self.packing is None:
            out["position_ids"] = np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), (len(rows), self.seq_len))
            out["segment_ids"] = np.zeros((len(rows), self.seq_len), np.int32)
        out["tokens"] = sum(r["tokens"] for r in rows)
        return out

    def encode_records(self, records, tokenizer, template, sft_cfg, path: str) -> list:
        """Records (conversations, as read_records returns them) -> examples, bad ones skipped and counted."""
        out = []
        for rec in records:
            ex = self._example(rec, tokenizer, template, sft_cfg, path, rec.get("line", 0), "skip")
            if ex is not None:
                out.append(ex)
        return out


def _cache_key(sources, tokenizer, template, seq_len, sft_cfg, packing, on_error) -> str:
    settings = {k: getattr(sft_cfg, k) for k in ("identity", "keep_think", "max_turns", "task_weights", "turn_decay",
                                                  "task_sampling")}
    here = os.path.dirname(os.path.abspath(__file__))          # the code that makes examples: a change re-encodes
    code = [sha256_file(os.path.join(here, f)) for f in ("chat.py", "tools.py", "examples.py", "packing.py", "sft.py")]
    specials = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size)
    what = [CACHE_VERSION, [(sha256_file(s.path), s.format, s.weight) for s in sources], tokenizer_fingerprint(tokenizer),
            specials, code, template, seq_len, packing, on_error, settings]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def neftune_noise(seed: int, sample_positions, seq_len: int, hidden: int) -> np.ndarray:
    """NEFTune noise [B, S, H] uniform in [-1, 1], one row per sample position of the run, drawn from
    (seed, position): the same whatever the micro-batch split, the data-parallel rank or a resume."""
    out = np.empty((len(sample_positions), seq_len, hidden), np.float32)
    for i, k in enumerate(sample_positions):
        np.random.default_rng([seed, int(k), 31]).random((seq_len, hidden), dtype=np.float32, out=out[i])
    return out * 2.0 - 1.0


def _n_exchanges(msgs) -> int:
    # counted as drop_oldest_turns counts them: a tool-using exchange holds several assistant messages
    return len(_exchange_starts([m for m in msgs if m["role"] != "system"]))
