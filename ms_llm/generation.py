# SPDX-License-Identifier: Apache-2.0
"""Batched sampling with a fixed-size KV cache, for rollouts, distillation data and evaluation.

    out = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0)
    out.tokens      # [B, N] int32, pad_token_id after a row's eos
    out.logprobs    # [B, N] float32, log p(token) under the model at `temperature` (0 after eos)
    more = generate(model, None, max_new_tokens=32, state=out.state)   # continue (chunked rollouts)

A continued call samples from the state's random generator, so generating N tokens in chunks gives the tokens
one call of N would (`seed` only seeds a new generation). `rollout.StateCache` keeps states between chunks
and writes them to disk.

    out = generate(model, prompts, 32, seed=[0, 7919, step], rows=[8, 9, 10, 11])

With `rows` (each prompt's index in the whole batch), every row draws from its own generator seeded by
(seed, row): a row samples the same tokens whichever rows share its batch, so a batch split over
data-parallel ranks samples what one process would (`RowRandom`).

    out = generate(model, prompts, 256, rows=range(len(prompts)), generation_batch_size=16)

With `generation_batch_size` smaller than the batch, at most that many rows decode at once: when a row finishes,
the next prompt is prefilled into its cache row (continuous batching). Each prompt's tokens are those of
generating it alone (greedy or with per-row generators; `rows` defaults to the prompts' indices).

Prompts are left-padded into one batch. The cache has a fixed capacity, so in GRAPH_MODE the step compiles
once for the prompt shape and once for the one-token shape, never per generated token. On the CPU kernels a
step writes its keys and values into the cache in place and attends to each row's filled slots only
(kernels/cpu/decode.cc): its cost follows the tokens, not the capacity. Other backends write whole new caches
and attend over every slot, masked (`ops.kv_attend`). One host transfer per step: the last position's logits;
sampling (temperature, top-k, top-p, repetition penalty) runs on the host in numpy with seeded generators.
"""
import weakref
from dataclasses import dataclass, field
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ms_llm.errors import MsLlmError


class DecodeStep(nn.Cell):
    """GRAPH_MODE wrapper around `CausalLM.step` (compiled once per input shape)."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, position_ids, rows, slots, starts, caches):
        return self.model.step(input_ids, position_ids, rows, slots, starts, caches)


@dataclass
class GenerationState:
    """Everything needed to continue decoding: caches, which slots hold tokens, and per-row bookkeeping. Row i's
    tokens fill the cache slots starts[i] .. slots[i] - 1 (position = slot - start)."""
    caches: tuple
    starts: np.ndarray               # [B] int32 first filled slot (the row's left padding)
    slots: np.ndarray                # [B] int32 slot of the next token to feed
    next_tokens: np.ndarray          # [B] sampled but not yet fed
    finished: np.ndarray             # [B] bool
    history: list = field(default_factory=list)   # per-row token ids seen (repetition penalty)
    rng: object = None               # the sampler's numpy Generator: a continued call draws what one call would

    @property
    def capacity(self) -> int:
        return int(self.caches[0].shape[2])


@dataclass
class GenerationOutput:
    tokens: np.ndarray               # [B, N] int32
    logprobs: np.ndarray             # [B, N] float32
    lengths: np.ndarray              # [B] tokens generated per row, eos included
    state: Optional[GenerationState] = None
    finished: Optional[np.ndarray] = None     # [B] rows that emitted an eos (so far)


@dataclass
class SamplingParams:
    temperature: float = 1.0         # 0 means greedy
    top_k: int = 0                   # 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0


class RowRandom:
    """One numpy generator per row, seeded by (seed…, the row's index in the whole batch). `random((B, 1))` draws
    one number per row, so row i's t-th token uses its generator's t-th draw wherever the row is generated."""

    def __init__(self, seed, rows):
        base = [int(x) for x in np.atleast_1d(seed)]
        self.rows = [int(r) for r in rows]
        self.gens = [np.random.default_rng(base + [r]) for r in self.rows]

    def random(self, size):
        return np.array([g.random() for g in self.gens]).reshape(size)

    def subset(self, index) -> "RowRandom":
        """The generators of rows `index` (positions in this batch), shared, not copied."""
        out = RowRandom.__new__(RowRandom)
        out.rows = [self.rows[i] for i in index]
        out.gens = [self.gens[i] for i in index]
        return out

    def state(self) -> dict:
        return {"rows": self.rows, "states": [g.bit_generator.state for g in self.gens]}

    @classmethod
    def from_state(cls, state: dict) -> "RowRandom":
        out = cls(0, state["rows"])
        for g, st in zip(out.gens, state["states"]):
            g.bit_generator.state = st
        return out


def rng_state(rng):
    """A sampler generator's state as JSON-able data (None for none): a numpy Generator or a RowRandom."""
    if rng is None:
        return None
    if isinstance(rng, RowRandom):
        return {"row_random": rng.state()}
    return rng.bit_generator.state


def rng_from_state(state):
    if state is None:
        return None
    if "row_random" in state:
        return RowRandom.from_state(state["row_random"])
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def _steppers(model):
    """One DecodeStep per model, cached on the model object so repeated calls reuse the compiled graph."""
    if not hasattr(model, "_decode_step"):
        object.__setattr__(model, "_decode_step", DecodeStep(model))
    return model._decode_step



def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sample_next(logits: np.ndarray, params: SamplingParams, rng, history=None):
    """Pick one token per row. Returns (tokens [B] int32, logprobs [B] under logits/temperature)."""
    logits = logits.astype(np.float64)
    if params.repetition_penalty != 1.0 and history is not None:
        for b, seen in enumerate(history):
            idx = np.fromiter(set(seen), dtype=np.int64)
            if idx.size:
                v = logits[b, idx]
                logits[b, idx] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if params.temperature <= 0:
        tok = logits.argmax(-1)
        return tok.astype(np.int32), np.take_along_axis(_log_softmax(logits), tok[:, None], -1)[:, 0].astype(np.float32)
    logp = _log_softmax(logits / params.temperature)
    filtered = logp.copy()
    if params.top_k > 0 and params.top_k < logp.shape[-1]:
        kth = np.sort(logp, -1)[:, -params.top_k][:, None]
        filtered[logp < kth] = -np.inf
    if params.top_p < 1.0:
        order = np.argsort(-filtered, -1)
        sorted_p = np.exp(np.take_along_axis(filtered, order, -1))
        drop = np.cumsum(sorted_p, -1) - sorted_p >= params.top_p     # keep the smallest prefix reaching top_p
        np.put_along_axis(filtered, order, np.where(drop, -np.inf, np.take_along_axis(filtered, order, -1)), -1)
    probs = np.exp(filtered - filtered.max(-1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    tok = np.minimum((cdf < rng.random((cdf.shape[0], 1))).sum(-1), cdf.shape[-1] - 1)
    return tok.astype(np.int32), np.take_along_axis(logp, tok[:, None], -1)[:, 0].astype(np.float32)


class CachePool:
    """KV caches to reuse, per model: allocating (and first touching) a cache of 8192 slots costs more than
    decoding 64 tokens with it. Only where the backend writes caches in place (`CausalLM.kv_in_place`); there a
    reused cache needs no zeroing, since every slot a query reads was written in the same generation. A cache is
    free again once the state that holds it is gone (a weak reference) or released; at most `keep` are kept."""

    def __init__(self, keep: int = 2):
        self.keep, self.entries = keep, []      # [shape, caches, owner weakref or None]

    @staticmethod
    def _free(entry) -> bool:
        return entry[2] is None or entry[2]() is None

    def take(self, model, batch: int, capacity: int):
        shape = (batch, capacity)
        for e in self.entries:
            if e[0] == shape and self._free(e):
                self._forget(e)
                self.entries.append(e)          # most recently used last
                e[2] = _TAKEN
                return e[1]
        caches = model.empty_cache(batch, capacity)
        if len(self.entries) >= self.keep:     # forget a free entry, else the oldest (its state keeps its memory)
            free = [e for e in self.entries if self._free(e)]
            self._forget(free[0] if free else self.entries[0])
        self.entries.append([shape, caches, _TAKEN])
        return caches

    def _forget(self, entry):
        self.entries = [e for e in self.entries if e is not entry]      # (by identity: == on tensors is elementwise)

    def drop_free(self):
        """Forget every cache no state holds (their memory goes back before a phase that needs it)."""
        self.entries = [e for e in self.entries if not self._free(e)]

    def hold(self, caches, owner):
        """`owner` (a GenerationState) now holds `caches`; None gives them back."""
        for e in self.entries:
            if e[1] is caches:
                e[2] = None if owner is None else weakref.ref(owner)


def _TAKEN():                                   # an owner reference that never dies (until hold() replaces it)
    return True


def _pool(model) -> Optional[CachePool]:
    if not model.kv_in_place():
        return None
    if not hasattr(model, "_kv_pool"):
        object.__setattr__(model, "_kv_pool", CachePool())
    return model._kv_pool


def release_caches(model):
    """Free the KV caches kept for reuse that no paused generation holds: between a rollout and the updates that
    follow it, so the two phases do not hold their memory at once (ms_llm/plan.py counts them apart)."""
    pool = getattr(model, "_kv_pool", None)
    if pool is not None:
        pool.drop_free()


def _new_caches(model, batch: int, capacity: int):
    pool = _pool(model)
    return model.empty_cache(batch, capacity) if pool is None else pool.take(model, batch, capacity)


def _release(model, caches, owner=None):
    pool = _pool(model)
    if pool is not None:
        pool.hold(caches, owner)


def _call(model, caches, ids, pos, rows, slots, starts):
    """One DecodeStep call: (logits [B, V] on the host, the caches after it: the same tensors when the backend
    wrote them in place)."""
    logits, new = _steppers(model)(Tensor(ids), Tensor(pos.astype(np.int32)), Tensor(rows.astype(np.int32)),
                                   Tensor(slots.astype(np.int32)), Tensor(starts.astype(np.int32)),
                                   ms.mutable(caches))
    return logits.asnumpy(), (tuple(new) if len(new) else caches)


def _left_pad(prompts, pad_id, width):
    """(ids [B, width] left-padded, pads [B])."""
    lengths = np.array([len(p) for p in prompts])
    if (lengths == 0).any():
        raise MsLlmError("generate: every prompt needs at least one token")
    ids = np.full((len(prompts), width), pad_id, np.int32)
    pads = (width - lengths).astype(np.int32)
    for i, p in enumerate(prompts):
        ids[i, pads[i]:] = p
    return ids, pads


def _prefill_rows(model, caches, prompts, rows, pad_id, width):
    """Prompts into cache rows `rows` (slots 0 .. width-1, left-padded). Returns (logits, caches, pads)."""
    ids, pads = _left_pad(prompts, pad_id, width)
    b = len(prompts)
    slots = np.tile(np.arange(width, dtype=np.int32), (b, 1))
    pos = np.maximum(slots - pads[:, None], 0)
    logits, caches = _call(model, caches, ids, pos, np.asarray(rows), slots, pads)
    return logits, caches, pads


def _prefill(model, prompts, cache_len, pad_id, prompt_width=None):
    b = len(prompts)
    width = max(max(len(p) for p in prompts), prompt_width or 0)
    logits, caches, pads = _prefill_rows(model, _new_caches(model, b, cache_len), prompts, np.arange(b), pad_id,
                                         width)
    state = GenerationState(caches, pads, np.full(b, width, np.int32), None, np.zeros(b, bool),
                            [list(p) for p in prompts])
    _release(model, caches, state)
    return logits, state


def _feed(model, state: GenerationState):
    b = len(state.starts)
    logits, state.caches = _call(model, state.caches, state.next_tokens.reshape(b, 1),
                                 (state.slots - state.starts).reshape(b, 1), np.arange(b), state.slots.reshape(b, 1),
                                 state.starts)
    state.slots = state.slots + 1
    return logits


def generate(model, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, eos_token_id=None, pad_token_id: int = 0, seed: int = 0,
             cache_len: Optional[int] = None, state: Optional[GenerationState] = None,
             use_cache: bool = True, prompt_width: Optional[int] = None, rows=None,
             generation_batch_size: int = 0) -> GenerationOutput:
    """Generate up to `max_new_tokens` per prompt.

    Args:
        model: a CausalLM (in eval mode while generating; the caller's mode is restored after).
        prompts: list of token-id lists (ragged is fine), or None to continue from `state`.
        temperature: 0 for greedy; top_k / top_p / repetition_penalty as in Hugging Face.
        eos_token_id: int or list; a row stops after emitting one (defaults to the model config's).
        cache_len: KV-cache slots (default: longest prompt + max_new_tokens, rounded up to 64).
        state: a previous output's `state` to continue from; its cache must have room.
        use_cache: False recomputes the whole sequence each step (reference path, slow).
        prompt_width: left-pad the prompts to at least this many slots, so batches of other prompt lengths
            reuse one compiled prefill graph (rollouts); the tokens do not depend on it.
        rows: each prompt's index in the whole batch: one generator per row, seeded by (seed, row) (RowRandom),
            so that a row's samples do not depend on the rows beside it.
        generation_batch_size: decode at most this many rows at once, refilling a finished row's cache row with
            the next prompt (continuous batching); 0 or at least the batch: all at once. The output then has no
            state to continue from.
    """
    was_training = model.training
    model.set_train(False)
    try:
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        if generation_batch_size and rows is None and prompts:
            rows = range(len(prompts))       # per-row generators either way: the samples do not depend on the batch
        if generation_batch_size and state is None and use_cache and prompts and max_new_tokens > 0 and \
                generation_batch_size < len(prompts):
            return _generate_continuous(model, prompts, max_new_tokens, params, eos_token_id, pad_token_id, seed,
                                        cache_len, prompt_width, rows, generation_batch_size)
        return _generate(model, prompts, max_new_tokens, params, eos_token_id, pad_token_id, seed, cache_len, state,
                         use_cache, prompt_width, rows)
    finally:
        model.set_train(was_training)


def gathering_cell(model) -> Optional[str]:
    """The name of a cell of `model` that reads a ZeRO-3 shard through a gather (training/zero.py), else None.
    Every product of such a model is a collective: ranks may generate with it only in lockstep (the same
    prompts, greedy), never each its own rows — those generate within `layout.replicated()`."""
    for name, cell in model.cells_and_names():
        if getattr(cell, "zero", None) is not None:
            return name or "the model"
    return None


def _eos_set(model, eos_token_id) -> set:
    return set(model.config.eos_ids if eos_token_id is None else
               (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]))


def _generate(model, prompts, max_new_tokens, params, eos_token_id, pad_token_id, seed, cache_len, state, use_cache,
              prompt_width=None, rows=None):
    eos = _eos_set(model, eos_token_id)
    if state is not None and state.rng is not None:
        rng = state.rng
    elif rows is not None:
        if prompts is None or len(rows) != len(prompts):
            raise MsLlmError(f"generate: rows gives {len(rows)} row indices for {len(prompts or [])} prompts")
        rng = RowRandom(seed, rows)
    else:
        rng = np.random.default_rng(seed)
    if not use_cache:
        return _generate_recompute(model, prompts, max_new_tokens, params, eos, pad_token_id, rng)
    if state is None:
        if not prompts:
            raise MsLlmError("generate: give prompts or a state to continue from")
        need = max(max(len(p) for p in prompts), prompt_width or 0) + max_new_tokens
        cache_len = cache_len or -(-need // 64) * 64
        if cache_len < need:
            raise MsLlmError(f"generate: cache_len {cache_len} < longest prompt + max_new_tokens ({need})")
        logits, state = _prefill(model, prompts, cache_len, pad_token_id, prompt_width)
        state.rng = rng
    else:
        if int(state.slots.max()) + max_new_tokens > state.capacity:
            raise MsLlmError(f"generate: the cache has {state.capacity - int(state.slots.max())} free slots, "
                             f"{max_new_tokens} requested; start with a larger cache_len")
        state.rng = rng
        logits = _feed(model, state)
    b = len(state.starts)
    tokens = np.full((b, max_new_tokens), pad_token_id, np.int32)
    logps = np.zeros((b, max_new_tokens), np.float32)
    lengths = np.zeros(b, np.int64)
    for t in range(max_new_tokens):
        tok, lp = sample_next(logits, params, rng, state.history)
        live = ~state.finished
        tokens[live, t], logps[live, t] = tok[live], lp[live]
        lengths += live
        for i in np.nonzero(live)[0]:
            state.history[i].append(int(tok[i]))
        state.finished |= live & np.isin(tok, list(eos))
        state.next_tokens = np.where(live, tok, pad_token_id).astype(np.int32)
        if state.finished.all() or t == max_new_tokens - 1:
            break
        logits = _feed(model, state)
    return GenerationOutput(tokens, logps, lengths, state, state.finished.copy())


def _generate_continuous(model, prompts, max_new_tokens, params, eos_token_id, pad_id, seed, cache_len, prompt_width,
                         rows, batch):
    """Continuous batching: `batch` cache rows; a finished row's cache row takes the next prompt (prefilled alone,
    so that only two prefill shapes compile). Every prompt draws from its own generator (RowRandom), so its
    tokens are what generating it alone gives."""
    eos = _eos_set(model, eos_token_id)
    n = len(prompts)
    rows = list(range(n)) if rows is None else list(rows)
    if len(rows) != n:
        raise MsLlmError(f"generate: rows gives {len(rows)} row indices for {n} prompts")
    rng = RowRandom(seed, rows)
    width = max(max(len(p) for p in prompts), prompt_width or 0)
    need = width + max_new_tokens
    cache_len = cache_len or -(-need // 64) * 64
    if cache_len < need:
        raise MsLlmError(f"generate: cache_len {cache_len} < longest prompt + max_new_tokens ({need})")
    tokens = np.full((n, max_new_tokens), pad_id, np.int32)
    logps = np.zeros((n, max_new_tokens), np.float32)
    lengths = np.zeros(n, np.int64)
    history = [list(p) for p in prompts]
    owner = np.full(batch, -1)                    # the prompt each cache row decodes (-1: idle)
    starts, slots = np.zeros(batch, np.int32), np.zeros(batch, np.int32)
    next_tok = np.full(batch, pad_id, np.int32)
    finished = np.zeros(n, bool)
    queue = iter(range(n))

    def take(logits, cache_rows):
        """Sample the next token of the prompts in `cache_rows`; returns the cache rows whose prompt finished."""
        who = owner[cache_rows]
        tok, lp = sample_next(logits, params, rng.subset(who), [history[p] for p in who])
        done = []
        for r, p, t, l in zip(cache_rows, who, tok, lp):
            tokens[p, lengths[p]], logps[p, lengths[p]] = t, l
            lengths[p] += 1
            history[p].append(int(t))
            next_tok[r] = t
            finished[p] = int(t) in eos
            if finished[p] or lengths[p] == max_new_tokens:
                done.append(r)
        return done

    def admit(free):
        """Prefill the next prompts into the free cache rows, one at a time, until none is free or none waits."""
        nonlocal caches
        free = list(free)
        while free:
            p = next(queue, None)
            if p is None:
                break
            r = free.pop(0)
            logits, caches, pads = _prefill_rows(model, caches, [prompts[p]], [r], pad_id, width)
            owner[r], starts[r], slots[r] = p, pads[0], width
            free += take(logits, [r])
        for r in free:                            # nothing left to decode here: write slot 0, read slot 0
            owner[r], starts[r], slots[r], next_tok[r] = -1, 0, 0, pad_id

    caches = _new_caches(model, batch, cache_len)
    held = caches
    try:
        first = [next(queue) for _ in range(batch)]
        logits, caches, pads = _prefill_rows(model, caches, [prompts[p] for p in first], np.arange(batch), pad_id,
                                             width)
        owner[:], starts[:], slots[:] = first, pads, width
        admit(take(logits, list(range(batch))))
        while (owner >= 0).any():
            live = np.nonzero(owner >= 0)[0]
            logits, caches = _call(model, caches, next_tok.reshape(batch, 1), (slots - starts).reshape(batch, 1),
                                   np.arange(batch), slots.reshape(batch, 1), starts)
            slots[live] += 1
            admit(take(logits[live], list(live)))
    finally:
        _release(model, held)
    return GenerationOutput(tokens, logps, lengths, None, finished)


def _generate_recompute(model, prompts, max_new_tokens, params, eos, pad_id, rng):
    """Reference path: a full forward over a fixed-width, left-padded buffer for every new token."""
    b = len(prompts)
    width = max(len(p) for p in prompts)
    total = width + max_new_tokens
    ids = np.full((b, total), pad_id, np.int32)
    valid = np.zeros((b, total), np.int32)
    pads = np.array([width - len(p) for p in prompts])
    for i, p in enumerate(prompts):
        ids[i, pads[i]:width], valid[i, pads[i]:width] = p, 1
    pos = np.maximum(np.arange(total)[None, :] - pads[:, None], 0).astype(np.int32)
    tokens = np.full((b, max_new_tokens), pad_id, np.int32)
    logps = np.zeros((b, max_new_tokens), np.float32)
    finished, lengths = np.zeros(b, bool), np.zeros(b, np.int64)
    history = [list(p) for p in prompts]
    for t in range(max_new_tokens):
        out = model(Tensor(ids), Tensor(valid), Tensor(pos)).asnumpy()
        tok, lp = sample_next(out[:, width + t - 1], params, rng, history)
        live = ~finished
        tokens[live, t], logps[live, t] = tok[live], lp[live]
        lengths += live
        for i in np.nonzero(live)[0]:
            history[i].append(int(tok[i]))
        finished |= live & np.isin(tok, list(eos))
        if finished.all() or t == max_new_tokens - 1:
            break
        ids[:, width + t], valid[:, width + t] = np.where(live, tok, pad_id), 1
    return GenerationOutput(tokens, logps, lengths, None, finished)
