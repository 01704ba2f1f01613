# SPDX-License-Identifier: Apache-2.0
"""Tokenized cache: a source file tokenized once into an np.memmap token stream plus document offsets.

    <cache_dir>/<key>/tokens.bin     int32, documents back to back, each followed by eos
    <cache_dir>/<key>/offsets.npy    int64 [num_docs + 1], start of each document in tokens.bin
    <cache_dir>/<key>/index.json     source, its SHA256, tokenizer hash, counts, read/skip statistics

The key hashes the source file's bytes, the tokenizer files and the format, so editing any of them
re-tokenizes and nothing stale is read. The directory is written under a temporary name and renamed.

Ranks that start together (msrun) tokenize a source once per node: the first to take `<folder>.lock` (an
exclusive flock) builds the cache, the others wait on the lock and then read what it wrote.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os

import numpy as np

from ms_llm import storage
from ms_llm.data.readers import ReadStats, read_records
from ms_llm.fileio import sha256_file

CACHE_VERSION = 1
log = logging.getLogger(__name__)


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(sha256_file(tokenizer.source).encode())       # content only: the same file anywhere
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())[-64:]).encode())   # added tokens change the tail
    return h.hexdigest()[:16]


class TokenCache:
    """Memory-mapped documents of one source (`built_here`: this process tokenized it)."""

    def __init__(self, folder: str):
        self.folder, self.built_here = folder, False
        with open(os.path.join(folder, "index.json")) as f:
            self.index = json.load(f)
        self.offsets = np.load(os.path.join(folder, "offsets.npy"))
        n = int(self.offsets[-1])
        self.tokens = np.memmap(os.path.join(folder, "tokens.bin"), np.int32, "r", shape=(n,)) if n else np.zeros(0, np.int32)

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def build_text_cache(path: str, tokenizer, cache_dir: str, on_error: str = "raise", text_key=lambda r: r["text"]):
    """Tokenize a `text` JSONL source (each document + eos) unless a matching cache exists; returns TokenCache."""
    src_sha = sha256_file(path)
    key = hashlib.sha256(f"{CACHE_VERSION}|{src_sha}|{tokenizer_fingerprint(tokenizer)}|text".encode()).hexdigest()[:20]
    folder = os.path.join(cache_dir, f"{os.path.basename(path)}.{key}")
    if os.path.isfile(os.path.join(folder, "index.json")):
        return TokenCache(folder)
    with building(folder, path):
        if os.path.isfile(os.path.join(folder, "index.json")):     # another process built it while this one waited
            return TokenCache(folder)
        _tokenize(path, tokenizer, folder, src_sha, on_error, text_key)
    cache = TokenCache(folder)
    cache.built_here = True
    return cache


@contextlib.contextmanager
def building(folder: str, what: str):
    """Hold `<folder>.lock` exclusively while the cache is built: one process builds, the others wait."""
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    with open(folder + ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is tokenizing it; waiting for its cache", what)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:               # storage without flock (Lustre mounted without it, some FUSE mounts)
            log.warning("%s: cannot lock %s (%s); tokenizing without the lock (the first finished copy is kept)",
                        what, f.name, e.strerror or e)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tokenize(path: str, tokenizer, folder: str, src_sha: str, on_error: str, text_key):
    stats = ReadStats()
    records = read_records(path, "text", on_error, stats)
    eos = tokenizer.eos_id
    docs = [tokenizer.encode(text_key(r)) + ([eos] if eos is not None else []) for r in records]
    lengths = np.array([len(d) for d in docs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # (on storage where flock does not reach every node, another node may finish first: its copy is kept)
    with storage.writing_dir(folder, "token cache", replace=False) as tmp:
        flat = np.concatenate([np.asarray(d, np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
        flat.tofile(os.path.join(tmp, "tokens.bin"))
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        domains = [r.get("domain") for r in records]
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump({"version": CACHE_VERSION, "source": os.path.abspath(path), "source_sha256": src_sha,
                       "num_docs": len(docs), "num_tokens": int(offsets[-1]), "read": stats.read,
                       "skipped": stats.skipped, "skip_reasons": stats.reasons,
                       "domains": sorted({d for d in domains if d})}, f, indent=1)
