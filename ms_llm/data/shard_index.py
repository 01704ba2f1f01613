# SPDX-License-Identifier: Apache-2.0
"""A tokenized shard index with a domain tag on every shard (seed 000 §1.2.5.2.2).

    ms-llm data index --tokenizer TOK --out data/index science.jsonl code.jsonl:code web.jsonl:general

    <out>/index.json                      tokenizer fingerprint, per-domain totals, one entry per shard
    <out>/<domain>/shard_00000/           tokens.bin (int32), offsets.npy, index.json — the TokenCache layout

Each record goes to the domain named by its `domain` field, else the `:DOMAIN` given with its file, else
"general"; a domain's documents are cut into shards of about `shard_tokens` tokens (documents are never
split). The index is built under `.tmp_<out>_<pid>` and renamed when complete, so a crash leaves no half index.
Training reads it with `data.index: <out>`: the sampler opens the shards of the domains the run samples,
each as one source tagged with its domain and weighted by its token count within the domain.
"""
import json
import os
import time

import numpy as np
from tqdm import tqdm

from ms_llm import storage
from ms_llm.data.cache import CACHE_VERSION, TokenCache, tokenizer_fingerprint
from ms_llm.data.readers import ReadStats, read_records
from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_json, sha256_file

INDEX_VERSION = 1
DOMAIN_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-.")


def parse_input(spec: str) -> tuple:
    """'path' or 'path:domain' -> (path, domain or None)."""
    path, sep, domain = spec.rpartition(":")
    if not sep or os.path.sep in domain or not domain or os.path.isfile(spec):
        return spec, None
    return path, domain


def _check_domain(domain: str, where: str) -> str:
    if not domain or not set(domain.lower()) <= DOMAIN_CHARS:
        raise MsLlmError(f"{where}: domain tag '{domain}' must be letters, digits, '_', '-' or '.'")
    return domain


def build_index(inputs, tokenizer, out_dir: str, shard_tokens: int = 1 << 24, on_error: str = "raise",
                overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize `inputs` [(path, default domain or None)] into domain-tagged shards; returns the index dict."""
    if shard_tokens < 1:
        raise MsLlmError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if os.path.exists(out_dir) and not overwrite:
        raise MsLlmError(f"{out_dir} already exists; pass --overwrite to replace it")
    for path, domain in inputs:
        if not os.path.isfile(path):
            raise MsLlmError(f"{path}: input file not found")
        if domain is not None:
            _check_domain(domain, path)
    with storage.writing_dir(out_dir, "shard index") as tmp:      # nothing half-written stays behind
        return _write_shards(inputs, tokenizer, tmp, shard_tokens, on_error, progress)


def _write_shards(inputs, tokenizer, tmp: str, shard_tokens: int, on_error: str, progress: bool) -> dict:
    writers, sources = {}, []
    bar = None
    if progress:
        bar = tqdm(total=len(inputs), desc="index", unit="file", dynamic_ncols=True)
    eos = tokenizer.eos_id
    for path, default in inputs:
        stats = ReadStats()
        records = read_records(path, "text", on_error, stats)
        for n, rec in enumerate(records):
            domain = _check_domain(rec.get("domain") or default or "general", f"{path}: record {n + 1}")
            w = writers.get(domain) or writers.setdefault(domain, _DomainWriter(tmp, domain, shard_tokens))
            w.add(tokenizer.encode(rec["text"]) + ([eos] if eos is not None else []), path)
        sources.append({"path": os.path.abspath(path), "sha256": sha256_file(path), "read": stats.read,
                        "skipped": stats.skipped, "skip_reasons": stats.reasons})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    shards = [s for w in writers.values() for s in w.close()]
    if not shards:
        raise MsLlmError("data index: the inputs hold no documents")
    domains = {}
    for s in shards:
        d = domains.setdefault(s["domain"], {"shards": 0, "tokens": 0, "docs": 0})
        d["shards"], d["tokens"], d["docs"] = d["shards"] + 1, d["tokens"] + s["num_tokens"], d["docs"] + s["num_docs"]
    index = {"version": INDEX_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "tokenizer": tokenizer_fingerprint(tokenizer), "shard_tokens": shard_tokens,
             "domains": dict(sorted(domains.items())), "shards": shards, "sources": sources}
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index


class _DomainWriter:
    """Collects one domain's documents and writes a shard whenever `shard_tokens` are reached."""

    def __init__(self, root: str, domain: str, shard_tokens: int):
        self.root, self.domain, self.shard_tokens = root, domain, shard_tokens
        self.docs, self.tokens, self.paths, self.written = [], 0, set(), []

    def add(self, ids: list, path: str):
        self.docs.append(np.asarray(ids, np.int32))
        self.tokens += len(ids)
        self.paths.add(os.path.abspath(path))
        if self.tokens >= self.shard_tokens:
            self._flush()

    def _flush(self):
        if not self.docs:
            return
        rel = os.path.join(self.domain, f"shard_{len(self.written):05d}")
        folder = os.path.join(self.root, rel)
        os.makedirs(folder)
        flat = np.concatenate(self.docs)
        flat.tofile(os.path.join(folder, "tokens.bin"))
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in self.docs])]).astype(np.int64)
        np.save(os.path.join(folder, "offsets.npy"), offsets)
        meta = {"version": CACHE_VERSION, "source": rel, "num_docs": len(self.docs), "num_tokens": int(len(flat)),
                "read": len(self.docs), "skipped": 0, "skip_reasons": {}, "domains": [self.domain]}
        with open(os.path.join(folder, "index.json"), "w") as f:
            json.dump(meta, f, indent=1)
        self.written.append({"path": rel, "domain": self.domain, "num_tokens": int(len(flat)),
                             "num_docs": len(self.docs), "sha256": sha256_file(os.path.join(folder, "tokens.bin")),
                             "sources": sorted(self.paths)})
        self.docs, self.tokens, self.paths = [], 0, set()

    def close(self) -> list:
        self._flush()
        return self.written


def open_index(index_dir: str, tokenizer, domains=None, verify: bool = False) -> list:
    """[(TokenCache, domain, shard path)] of the index's shards (only `domains`, when given).

    Refuses an index built with another tokenizer, and a shard whose size (or, with `verify`, SHA256)
    does not match the index."""
    path = os.path.join(index_dir, "index.json")
    if not os.path.isfile(path):
        raise MsLlmError(f"data.index: {path} not found (build it with `ms-llm data index`)")
    index = read_json(path, "the shard index")
    if index.get("version") != INDEX_VERSION or "shards" not in index:
        raise MsLlmError(f"{path}: not a version-{INDEX_VERSION} shard index")
    fp = tokenizer_fingerprint(tokenizer)
    if index.get("tokenizer") != fp:
        raise MsLlmError(f"{path}: built with tokenizer {index.get('tokenizer')}, this run's tokenizer is {fp}; "
                         "rebuild the index with this tokenizer")
    out = []
    for shard in index["shards"]:
        if domains is not None and shard["domain"] not in domains:
            continue
        folder = os.path.join(index_dir, shard["path"])
        tokens = os.path.join(folder, "tokens.bin")
        if not os.path.isfile(tokens) or os.path.getsize(tokens) != 4 * shard["num_tokens"]:
            got = os.path.getsize(tokens) if os.path.isfile(tokens) else "missing"
            raise MsLlmError(f"{tokens}: {got} bytes, the index says {4 * shard['num_tokens']}; the shard is "
                             "truncated or replaced — rebuild the index")
        if verify and sha256_file(tokens) != shard["sha256"]:
            raise MsLlmError(f"{tokens}: SHA256 does not match {path}; the shard is corrupt — rebuild the index")
        out.append((TokenCache(folder), shard["domain"], shard["path"]))
    return out
