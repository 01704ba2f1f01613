# SPDX-License-Identifier: Apache-2.0
"""A rollout batch on the host (prompts, sampled tokens, behaviour log-probs, the scoring windows the updaters
read) and the scoring of its windows by a cell, shared by PPO and the GRPO family."""
import json
import os

import numpy as np
from mindspore import Tensor

from ms_llm.models.safetensors_io import read_header, read_safetensors, write_safetensors
from ms_llm.rollout.chunks import ChunkPlan


class Rollout:
    """One step's rollout batch, its scores and advantages (host arrays); `windows` feed the updaters."""

    def __init__(self, prompts, tokens, lengths, behaviour, plan: ChunkPlan, pad: int):
        b, p = len(prompts), plan.prompt_len
        self.prompts, self.tokens, self.lengths, self.behaviour = prompts, tokens, lengths, behaviour
        n = plan.max_new
        self.response_mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
        rows = np.full((b, p + n), pad, np.int32)
        row_mask = np.zeros((b, p + n), np.int32)
        for i, pr in enumerate(prompts):
            rows[i, p - len(pr["ids"]):p], row_mask[i, p - len(pr["ids"]):p] = pr["ids"], 1
        rows[:, p:p + tokens.shape[1]] = np.where(self.response_mask[:, :tokens.shape[1]] > 0, tokens, pad)
        row_mask[:, p:] = self.response_mask
        self.windows = plan.windows(rows, row_mask, self.response_mask)


def concat_rows(parts: list):
    """Per-row results of several ranks joined row-wise, in rank order: arrays and lists concatenated, dicts key
    by key, None stays None; anything else (a rank's timing) becomes the list of the ranks' values."""
    first = parts[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    if isinstance(first, list):
        return [x for part in parts for x in part]
    if isinstance(first, dict):
        return {k: concat_rows([part[k] for part in parts]) for k in first}
    if first is None:
        return None
    return list(parts)


def gather_rows(layout, part):
    """This rank's per-row results (`concat_rows` types) joined with every data-parallel rank's: the whole
    batch's, identical on every rank. One process: `part` itself."""
    if layout.data_world == 1:
        return part
    return concat_rows(layout.gather_objects(part))


def widen(a: np.ndarray, n: int, fill=0) -> np.ndarray:
    """[B, m] -> [B, n] (m <= n), new columns `fill`: generation stops when every row of a batch is done, so
    ranks' parts of one batch can come back narrower than the whole batch's."""
    if a.shape[1] >= n:
        return a
    return np.concatenate([a, np.full((a.shape[0], n - a.shape[1]), fill, a.dtype)], 1)


def score_windows(cell, windows: dict, keys, rows: int) -> np.ndarray:
    """Run a scoring cell over the window rows `rows` at a time; [B·K, W] float."""
    out = []
    for i in range(0, len(windows["ids"]), rows):
        args = [Tensor(np.ascontiguousarray(windows[k][i:i + rows])) for k in keys]
        out.append(cell(*args).asnumpy())
    return np.concatenate(out).astype(np.float64)


def dump_rollout(run_dir: str, step: int, arrays: dict, meta: dict) -> str:
    """`<run_dir>/rollouts/step_<step>.safetensors`: one step's batch as the stage fed it to its updaters
    (log.rollouts_every), with `meta` (JSON) in the file's metadata; returns the path."""
    os.makedirs(os.path.join(run_dir, "rollouts"), exist_ok=True)
    path = os.path.join(run_dir, "rollouts", f"step_{step:06d}.safetensors")
    write_safetensors(path, {k: np.asarray(v) for k, v in arrays.items()}, {"meta": json.dumps(meta)})
    return path


def read_rollout(path: str) -> tuple:
    """(arrays, meta) of a dump_rollout file."""
    return read_safetensors(path), json.loads(read_header(path)["__metadata__"]["meta"])


def completion_rows(prompts: list, tokens: np.ndarray, lengths: np.ndarray, seq_len: int, pad: int) -> dict:
    """Sampled completions as rows of a supervised token loss (data/examples.py's layout): input_ids, labels
    (the completion's tokens, -100 elsewhere), attention_mask [B, seq_len]; weights 1/n on a row's n labels and
    row_weight 1, so each row counts once whatever its length. prompt + completion must fit seq_len + 1."""
    b = len(prompts)
    out = {"input_ids": np.full((b, seq_len), pad, np.int32), "labels": np.full((b, seq_len), -100, np.int32),
           "attention_mask": np.zeros((b, seq_len), np.int32), "weights": np.zeros((b, seq_len), np.float32),
           "row_weight": np.zeros(b, np.float32)}
    for i, p in enumerate(prompts):
        ids = list(p["ids"]) + tokens[i, :int(lengths[i])].tolist()
        n, start = len(ids) - 1, len(p["ids"]) - 1
        if n > seq_len:
            raise ValueError(f"prompt ({len(p['ids'])}) + completion ({int(lengths[i])}) tokens exceed {seq_len} + 1")
        out["input_ids"][i, :n], out["attention_mask"][i, :n] = ids[:-1], 1
        out["labels"][i, start:n] = ids[start + 1:]
        if n > start:
            out["weights"][i, start:n] = 1.0 / (n - start)
            out["row_weight"][i] = 1.0
    return out
