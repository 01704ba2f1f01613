# SPDX-License-Identifier: Apache-2.0
"""Chunk-wise rollout (seed 000 §1.2.5.4.3): generate a response `chunk` tokens at a time, and score it chunk by
chunk so the training pass's memory is bounded by the chunk, not the response.

Generation. `generate_chunked` calls `generation.generate` for `chunk` tokens at a time and keeps the state
(KV cache, finished flags, RNG) between calls; it can stop after some chunks and continue later from the state
(or from a `StateCache` written to disk). The tokens equal one uninterrupted call's.

Scoring. A rollout row is [prompt, left-padded to P | response, N slots]. `ChunkPlan` cuts the response into
K = ceil(N / chunk) windows; window k trains response tokens [k·chunk, (k+1)·chunk) and feeds the model the
`overlap` tokens before its first input (the token just before the chunk) as context, absolute positions kept, so
every window has the same width W = chunk + overlap. Tokens further back are not seen: with
overlap < P + k·chunk − 1 the log-probs are an approximation, whose error docs/rl.md measures. `exact=True`
makes one window of the whole row (full context, memory growing with N) for comparison.
"""
from dataclasses import dataclass

import numpy as np

from ms_llm.errors import MsLlmError
from ms_llm.generation import GenerationOutput, generate


def generate_chunked(model, prompts, max_new_tokens: int, chunk_size: int, state=None, stop_after: int = None,
                     generated: int = 0, **kw):
    """Generate `max_new_tokens` (in all) `chunk_size` at a time.

    prompts: token-id lists (None when continuing from `state`); generated: tokens already produced in the
    state's earlier chunks; stop_after: pause after this many chunks. Returns (GenerationOutput of the tokens
    this call produced, done) — when not done, continue with state=out.state, generated=generated + produced
    and the same sampling arguments (the state carries the random generator, not the sampling settings).
    Keyword arguments go to `generate` (temperature, top_p, eos_token_id, pad_token_id, seed, cache_len,
    prompt_width, rows; generation_batch_size only to a first call that runs every row to its end).
    """
    if chunk_size < 1:
        raise MsLlmError(f"chunk_size must be at least 1, got {chunk_size}")
    if state is None:
        longest = max(max(len(p) for p in prompts), kw.get("prompt_width") or 0)
        kw.setdefault("cache_len", -(-(longest + max_new_tokens) // 64) * 64)
    batch = kw.pop("generation_batch_size", 0)
    tokens, logps, lengths, chunks = [], [], None, 0
    while generated < max_new_tokens and (stop_after is None or chunks < stop_after):
        n = min(chunk_size, max_new_tokens - generated)
        whole = state is None and n == max_new_tokens - generated      # continuous batching runs rows to the end
        out = generate(model, prompts if state is None else None, n, state=state,
                       generation_batch_size=batch if whole else 0, **kw)
        state = out.state
        tokens.append(out.tokens)
        logps.append(out.logprobs)
        lengths = out.lengths if lengths is None else lengths + out.lengths
        generated += n
        chunks += 1
        if state is None or state.finished.all():     # (None: continuous batching ran every row to its end)
            break
    done = generated >= max_new_tokens or state is None or state.finished.all()
    if not tokens:
        b = len(state.starts)
        return GenerationOutput(np.zeros((b, 0), np.int32), np.zeros((b, 0), np.float32), np.zeros(b, np.int64),
                                state), done
    return GenerationOutput(np.concatenate(tokens, 1), np.concatenate(logps, 1), lengths, state), done


@dataclass
class ChunkPlan:
    """Scoring windows over rollout rows of `prompt_len` + `max_new` slots (module docstring)."""
    prompt_len: int
    max_new: int
    chunk: int
    overlap: int
    exact: bool = False

    def __post_init__(self):
        if self.exact:
            self.chunk, self.overlap = self.max_new, self.prompt_len
        if self.chunk < 1 or self.overlap < 0:
            raise MsLlmError(f"chunk {self.chunk} must be >= 1 and overlap {self.overlap} >= 0")
        self.chunk = min(self.chunk, self.max_new)

    @property
    def n_windows(self) -> int:
        return -(-self.max_new // self.chunk)

    @property
    def width(self) -> int:
        return self.chunk + self.overlap

    def _slots(self):
        """[K, W] row slot fed at each window position (-1: padding), and the response index its next token
        trains (-1: none)."""
        p, w = self.prompt_len, self.width
        feed = np.full((self.n_windows, w), -1, np.int64)
        train = np.full((self.n_windows, w), -1, np.int64)
        for k in range(self.n_windows):
            first, last = k * self.chunk, min((k + 1) * self.chunk, self.max_new)   # response tokens trained
            b = p + last - 1                                    # one past the last input slot
            a = max(0, p + first - 1 - self.overlap)
            n = b - a
            feed[k, w - n:] = np.arange(a, b)
            nxt = np.arange(a, b) + 1 - p                       # response index of each input's next token
            train[k, w - n:] = np.where(nxt >= first, nxt, -1)
        return feed, train

    def windows(self, rows: np.ndarray, row_mask: np.ndarray, response_mask: np.ndarray) -> dict:
        """Model inputs for every window of every row, rows in order, windows within a row in order.

        rows, row_mask: [B, P + N] ids and 1 for real tokens; response_mask: [B, N] 1 for generated tokens.
        Returns [B·K, W] arrays: ids, attention_mask, position_ids, targets (int32), loss_mask (float32), and
        index (int64: response position the next token is, -1 where nothing trains)."""
        b, total = rows.shape
        if total != self.prompt_len + self.max_new:
            raise MsLlmError(f"rollout rows have {total} slots, the plan expects {self.prompt_len + self.max_new}")
        feed, train = self._slots()
        positions = np.maximum(np.cumsum(row_mask, 1) - 1, 0)
        safe = np.maximum(feed, 0)
        real = (feed >= 0)[None]
        ids = np.where(real, rows[:, safe], 0).astype(np.int32)
        att = np.where(real, row_mask[:, safe], 0).astype(np.int32)
        pos = np.where(real, positions[:, safe], 0).astype(np.int32)
        nxt = np.minimum(safe + 1, total - 1)
        targets = np.where(train[None] >= 0, rows[:, nxt], 0).astype(np.int32)
        index = np.where(train[None] >= 0, train[None], -1) * np.ones((b, 1, 1), np.int64)
        trained = np.take_along_axis(response_mask, np.maximum(index, 0).reshape(b, -1), 1).reshape(index.shape)
        index = np.where((index >= 0) & (trained > 0), index, -1)
        k, w = feed.shape
        flat = lambda x: x.reshape(b * k, w)                    # noqa: E731
        return {"ids": flat(ids), "attention_mask": flat(att), "position_ids": flat(pos), "targets": flat(targets),
                "loss_mask": flat((index >= 0).astype(np.float32)), "index": flat(index)}

    def to_windows(self, values: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Per-response-token values [B, N] laid out like the windows [B·K, W] (0 where nothing trains)."""
        b = values.shape[0]
        idx = index.reshape(b, -1)
        out = np.take_along_axis(values, np.maximum(idx, 0), 1)
        return np.where(idx >= 0, out, 0).reshape(index.shape).astype(np.float32)

    def to_response(self, window_values: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Inverse of `to_windows`: [B·K, W] -> [B, N] (each trained response token appears in one window)."""
        b = index.shape[0] // self.n_windows
        out = np.zeros((b, self.max_new), np.float64)
        vals, idx = window_values.reshape(b, -1), index.reshape(b, -1)
        for i in range(b):
            keep = idx[i] >= 0
            out[i, idx[i][keep]] = vals[i][keep]
        return out
