# SPDX-License-Identifier: Apache-2.0
"""Offline teacher logits: top-k log-probs per token in sharded safetensors files with a manifest.

    ms-llm distill cache-teacher configs/tiny/distill.yaml distill.cache_dir=runs/teacher_cache

Each shard `shard_00000.safetensors` holds, for `count` consecutive examples (in SFTData.examples() order):
    topk_ids  int32   [n, S, k]  student token ids (teacher ids mapped by string; ids the student lacks merged
                                 into its unknown token; merged slots padded with id 0 and log-prob -inf)
    topk_logp float32 [n, S, k]  the teacher's log-probs at the configured temperature
    tail_logp float32 [n, S]     log of the teacher's mass outside the k tokens, computed in float64 from the
                                 full distribution (-inf when nothing is left)
MANIFEST.json lists every file's sha256 plus what the cache is valid for (teacher hash, temperature, k,
seq_len, the dataset fingerprint); loading checks all of them and names what does not match.
"""
import os

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from ms_llm import storage
from ms_llm.errors import MsLlmError
from ms_llm.manifest import verify, write_manifest
from ms_llm.training.layout import Layout

FORMAT = "ms_llm.teacher_cache.v1"


def _log_softmax64(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def topk_from_logits(logits: np.ndarray, k: int, temperature: float, t2s=None, unk_id: int = 0):
    """(topk_ids, topk_logp, tail_logp) for logits [..., Vt]; t2s maps teacher id -> student id (-1: none)."""
    logp = _log_softmax64(logits / temperature)
    k = min(k, logp.shape[-1])
    idx = np.argpartition(-logp, k - 1, axis=-1)[..., :k]
    top = np.take_along_axis(logp, idx, -1)
    order = np.argsort(-top, -1)
    idx, top = np.take_along_axis(idx, order, -1), np.take_along_axis(top, order, -1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1.0 - np.exp(top).sum(-1), 0.0, None))
        tail = np.where(tail < -700, -np.inf, tail)
    if t2s is not None:
        idx, top = _to_student(idx, top, t2s, unk_id)
    return idx.astype(np.int32), top.astype(np.float32), tail.astype(np.float32)


def _to_student(idx, top, t2s, unk_id):
    """Teacher ids -> student ids; several teacher tokens landing on the unknown token share one slot."""
    sid = t2s[idx]
    sid = np.where(sid < 0, unk_id, sid)
    flat_ids, flat_lp = sid.reshape(-1, sid.shape[-1]), top.reshape(-1, top.shape[-1]).copy()
    for r in range(flat_ids.shape[0]):
        row = flat_ids[r]
        if len(np.unique(row)) == len(row):
            continue
        seen = {}
        for j, v in enumerate(row):
            if v in seen:
                flat_lp[r, seen[v]] = np.logaddexp(flat_lp[r, seen[v]], flat_lp[r, j])
                flat_lp[r, j], row[j] = -np.inf, 0
            else:
                seen[v] = j
    return flat_ids.reshape(sid.shape), flat_lp.reshape(top.shape)


def teacher_inputs(ids: np.ndarray, vocab_map, teacher_unk: int) -> np.ndarray:
    """Student token ids -> the teacher ids of the same strings (the teacher reads the student's tokenization)."""
    if vocab_map is None:
        return ids
    s2t = np.asarray([t if t is not None else teacher_unk for t in vocab_map], np.int32)
    return s2t[ids]


def inverse_map(vocab_map, teacher_size: int):
    if vocab_map is None:
        return None
    t2s = np.full(teacher_size, -1, np.int64)
    for s, t in enumerate(vocab_map):
        if t is not None:
            t2s[t] = s
    return t2s


def write_cache(cache_dir: str, teacher, examples: list, info: dict, k: int, temperature: float, vocab_map=None,
                student_unk: int = 0, teacher_unk: int = 0, batch_size: int = 8, shard_examples: int = 1024,
                progress: bool = True, layout=None) -> dict:
    """Run the teacher over `examples` (dicts with input_ids, attention_mask) once and write the cache.

    `layout` (distributed.init_model_groups; None: one process, one group): the job's ranks form groups, each
    holding the teacher split by tensor parallel; group g scores shards g, g + G, ... and its first rank writes
    them, all into the folder rank 0 made, which rank 0 completes with the manifest once every group is done. The
    files are those one process writes. Returns the manifest (on every rank)."""
    layout = layout or Layout()
    if layout.main:
        with storage.writing_dir(cache_dir, "teacher cache") as tmp:
            return _score_shards(tmp, cache_dir, layout, teacher, examples, k, temperature, vocab_map, info,
                                 student_unk, teacher_unk, batch_size, shard_examples, progress)
    return _score_shards(None, cache_dir, layout, teacher, examples, k, temperature, vocab_map, info, student_unk,
                         teacher_unk, batch_size, shard_examples, False)


def _score_shards(tmp, cache_dir, layout, teacher, examples, k, temperature, vocab_map, info, student_unk,
                  teacher_unk, batch_size, shard_examples, progress) -> dict:
    """Every rank: its group's shards. `tmp`: rank 0's folder (None elsewhere; its pid reaches the others)."""
    pid = layout.world_sum([os.getpid() if tmp else 0])[0]      # (float32: exact for pids below 2^24)
    folder = tmp or storage.tmp_path_for(cache_dir, int(pid))
    n = len(examples)
    shards = [{"file": f"shard_{i:05d}.safetensors", "start": start, "count": min(shard_examples, n - start)}
              for i, start in enumerate(range(0, n, shard_examples))]
    group, groups = layout.data_rank, layout.data_world
    writes = layout.tp is None or layout.tp.rank == 0
    mine = shards[group::groups]
    bar = tqdm(total=sum(s["count"] for s in mine), dynamic_ncols=True,
               desc="cache-teacher" + (f" (group {group + 1} of {groups})" if groups > 1 else "")) \
        if progress else None
    for shard in mine:
        _score_shard(folder if writes else None, shard, teacher, examples, k, temperature, vocab_map, student_unk,
                     teacher_unk, batch_size, bar)
    if bar is not None:
        bar.close()
    layout.world_sum([len(mine)])                               # every group's files are written
    if tmp is None:
        return {"shards": shards, "examples": n}
    return write_manifest(tmp, extra={"format": FORMAT, "top_k": k, "temperature": temperature, "examples": n,
                                      "shards": shards, **info})


def _score_shard(folder, shard, teacher, examples, k, temperature, vocab_map, student_unk, teacher_unk, batch_size,
                 bar):
    """Score one shard's examples; write its file into `folder` (None: score only — a tensor-parallel rank
    whose group's first rank writes)."""
    # MindSpore only when a teacher is scored (reading a cache needs none)
    import mindspore as ms
    t2s = inverse_map(vocab_map, teacher.config.vocab_size)
    teacher.set_train(False)
    part = examples[shard["start"]:shard["start"] + shard["count"]]
    ids_out, lp_out, tail_out = [], [], []
    for b in range(0, len(part), batch_size):
        rows = part[b:b + batch_size]
        ids = np.stack([r["input_ids"] for r in rows])
        mask = np.stack([r["attention_mask"] for r in rows])
        logits = teacher(ms.Tensor(teacher_inputs(ids, vocab_map, teacher_unk)), ms.Tensor(mask)).asnumpy()
        a, lp, tail = topk_from_logits(logits, k, temperature, t2s, student_unk)
        ids_out.append(a)
        lp_out.append(lp)
        tail_out.append(tail)
        if bar is not None:
            bar.update(len(rows))
    if folder is not None:
        save_file({"topk_ids": np.concatenate(ids_out), "topk_logp": np.concatenate(lp_out),
                   "tail_logp": np.concatenate(tail_out)}, os.path.join(folder, shard["file"]))


class TeacherCache:
    """A verified cache in memory; `rows(indices)` returns the arrays for those examples."""

    def __init__(self, cache_dir: str, expect: dict):
        if not os.path.isfile(os.path.join(cache_dir, "MANIFEST.json")):
            raise MsLlmError(f"{cache_dir}: no teacher cache here (MANIFEST.json missing); write one with "
                             "`ms-llm distill cache-teacher CONFIG`")
        try:
            manifest = verify(cache_dir)
        except MsLlmError as e:
            raise MsLlmError(str(e).split(" — ")[0] + " — the teacher cache is corrupt; rewrite it with "
                             "`ms-llm distill cache-teacher`") from None
        if manifest.get("format") != FORMAT:
            raise MsLlmError(f"{cache_dir}/MANIFEST.json: format {manifest.get('format')!r}, expected {FORMAT}")
        for key, want in expect.items():
            got = manifest.get(key)
            if got != want:
                raise MsLlmError(f"{cache_dir}/MANIFEST.json: {key} is {got!r} but this run needs {want!r}; the cache "
                                 "was written for another teacher, temperature or dataset — rewrite it with "
                                 "`ms-llm distill cache-teacher`")
        parts = {"topk_ids": [], "topk_logp": [], "tail_logp": []}
        for shard in manifest["shards"]:
            path = os.path.join(cache_dir, shard["file"])
            try:
                arrays = load_file(path)
            except (SafetensorError, OSError, ValueError) as e:
                raise MsLlmError(f"{path}: unreadable teacher-cache shard ({e})") from None
            for name in parts:
                if name not in arrays or arrays[name].shape[0] != shard["count"]:
                    raise MsLlmError(f"{path}: '{name}' missing or not {shard['count']} examples long")
                parts[name].append(arrays[name])
        self.arrays = {k: np.concatenate(v) for k, v in parts.items()}
        self.manifest = manifest
        if self.arrays["topk_ids"].shape[0] != manifest["examples"]:
            raise MsLlmError(f"{cache_dir}: shards hold {self.arrays['topk_ids'].shape[0]} examples, the manifest says "
                             f"{manifest['examples']}")

    def rows(self, indices) -> dict:
        return {k: v[np.asarray(indices)] for k, v in self.arrays.items()}
