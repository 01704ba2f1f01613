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

Prompts are left-padded into one batch. The cache has a fixed length, so in GRAPH_MODE the step compiles
once for the prompt shape and once for the one-token shape, never per generated token. Sampling
(temperature, top-k, top-p, repetition penalty) runs on the host in numpy with a seeded generator.
"""
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

    def construct(self, input_ids, position_ids, slot_ids, key_valid, place, write, caches):
        return self.model.step(input_ids, position_ids, slot_ids, key_valid, place, write, caches)


@dataclass
class GenerationState:
    """Everything needed to continue decoding: caches, which slots hold tokens, and per-row bookkeeping."""
    caches: tuple
    key_valid: np.ndarray            # [B, Smax] int32
    pads: np.ndarray                 # [B] left-padding per row (position = slot - pad)
    next_slot: int                   # slot of the next token to feed
    next_tokens: np.ndarray          # [B] sampled but not yet fed
    finished: np.ndarray             # [B] bool
    history: list = field(default_factory=list)   # per-row token ids seen (repetition penalty)
    rng: object = None               # the sampler's numpy Generator: a continued call draws what one call would


@dataclass
class GenerationOutput:
    tokens: np.ndarray               # [B, N] int32
    logprobs: np.ndarray             # [B, N] float32
    lengths: np.ndarray              # [B] tokens generated per row, eos included
    state: Optional[GenerationState] = None


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


def _one_hot_place(smax: int, slots: np.ndarray):
    place = np.zeros((smax, len(slots)), np.float32)
    place[slots, np.arange(len(slots))] = 1.0
    return Tensor(place), Tensor(place.sum(1))


def _prefill(model, prompts, cache_len, pad_id, prompt_width=None):
    lengths = np.array([len(p) for p in prompts])
    if (lengths == 0).any():
        raise MsLlmError("generate: every prompt needs at least one token")
    width = max(int(lengths.max()), prompt_width or 0)
    b = len(prompts)
    ids = np.full((b, width), pad_id, np.int32)
    pads = width - lengths
    for i, p in enumerate(prompts):
        ids[i, pads[i]:] = p
    slots = np.arange(width, dtype=np.int32)
    key_valid = np.zeros((b, cache_len), np.int32)
    for i in range(b):
        key_valid[i, pads[i]:width] = 1
    place, write = _one_hot_place(cache_len, slots)
    pos = np.maximum(slots[None, :] - pads[:, None], 0).astype(np.int32)
    logits, caches = _steppers(model)(Tensor(ids), Tensor(pos), Tensor(np.tile(slots, (b, 1))),
                                      Tensor(key_valid), place, write, ms.mutable(model.empty_cache(b, cache_len)))
    return logits.asnumpy(), GenerationState(caches, key_valid, pads, width, None, np.zeros(b, bool),
                                             [list(p) for p in prompts])


def _feed(model, state: GenerationState):
    s = state.next_slot
    b = len(state.pads)
    state.key_valid[:, s] = 1
    place, write = _one_hot_place(state.key_valid.shape[1], np.array([s]))
    pos = (s - state.pads).reshape(b, 1).astype(np.int32)
    logits, state.caches = _steppers(model)(Tensor(state.next_tokens.reshape(b, 1)), Tensor(pos),
                                            Tensor(np.full((b, 1), s, np.int32)), Tensor(state.key_valid),
                                            place, write, ms.mutable(state.caches))
    state.next_slot = s + 1
    return logits.asnumpy()


def generate(model, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, eos_token_id=None, pad_token_id: int = 0, seed: int = 0,
             cache_len: Optional[int] = None, state: Optional[GenerationState] = None,
             use_cache: bool = True, prompt_width: Optional[int] = None, rows=None) -> GenerationOutput:
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
    """
    was_training = model.training
    model.set_train(False)
    try:
        return _generate(model, prompts, max_new_tokens, SamplingParams(temperature, top_k, top_p, repetition_penalty),
                         eos_token_id, pad_token_id, seed, cache_len, state, use_cache, prompt_width, rows)
    finally:
        model.set_train(was_training)


def _generate(model, prompts, max_new_tokens, params, eos_token_id, pad_token_id, seed, cache_len, state, use_cache,
              prompt_width=None, rows=None):
    eos = set(model.config.eos_ids if eos_token_id is None else
              (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]))
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
        if state.next_slot + max_new_tokens > state.key_valid.shape[1]:
            raise MsLlmError(f"generate: the cache has {state.key_valid.shape[1] - state.next_slot} free slots, "
                             f"{max_new_tokens} requested; start with a larger cache_len")
        state.rng = rng
        logits = _feed(model, state)
    b = len(state.pads)
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
    return GenerationOutput(tokens, logps, lengths, state)


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
    return GenerationOutput(tokens, logps, lengths, None)
