# SPDX-License-Identifier: Apache-2.0
"""KV-cache generation: same tokens as full recomputation, log-probs equal a forward pass, resumable state."""
import mindspore as ms
import numpy as np
import pytest

from ms_llm.generation import generate, sample_next, SamplingParams
from ms_llm.models import CausalLM, preset

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 4, 5, 6]]


@pytest.fixture
def model():
    ms.set_seed(1)
    m = CausalLM(preset("tiny", qk_norm=True, qkv_bias=True))   # exercise every optional branch
    m.set_train(False)
    return m


def _forward_logprobs(model, prompt, gen):
    seq = np.array([prompt + list(gen)], np.int32)
    logits = model(ms.Tensor(seq)).asnumpy()[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return np.array([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(gen)])


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_cached_greedy_equals_recomputation(model, mode):
    if mode == "graph":
        ms.set_context(mode=ms.GRAPH_MODE)
    cached = generate(model, PROMPTS, 24, temperature=0, eos_token_id=-1)
    full = generate(model, PROMPTS, 24, temperature=0, eos_token_id=-1, use_cache=False)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    if mode == "graph":   # one graph for the prompt, one for every generated token: no per-token recompiles
        assert len(model._decode_step.compile_cache) == 2
    assert np.array_equal(cached.tokens, full.tokens)
    assert np.abs(cached.logprobs - full.logprobs).max() <= 1e-5
    assert len(set(cached.tokens[0].tolist())) > 1          # not a degenerate repeat of one token


def test_logprobs_match_a_forward_pass(model):
    out = generate(model, PROMPTS, 16, temperature=0, eos_token_id=-1)
    for i, p in enumerate(PROMPTS):                           # unpadded single-row forward as the reference
        ref = _forward_logprobs(model, p, out.tokens[i])
        assert np.abs(out.logprobs[i] - ref).max() <= 1e-5


def test_sampled_logprobs_match_forward_at_temperature_one(model):
    out = generate(model, PROMPTS, 12, temperature=1.0, top_p=1.0, seed=7, eos_token_id=-1)
    for i, p in enumerate(PROMPTS):
        assert np.abs(out.logprobs[i] - _forward_logprobs(model, p, out.tokens[i])).max() <= 1e-5


def test_continue_from_state_equals_one_call(model):
    whole = generate(model, PROMPTS, 20, temperature=0, eos_token_id=-1, cache_len=64)
    first = generate(model, PROMPTS, 8, temperature=0, eos_token_id=-1, cache_len=64)
    rest = generate(model, None, 12, temperature=0, eos_token_id=-1, state=first.state)
    assert np.array_equal(np.concatenate([first.tokens, rest.tokens], 1), whole.tokens)
    np.testing.assert_allclose(np.concatenate([first.logprobs, rest.logprobs], 1), whole.logprobs, atol=1e-6)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    a = generate(model, PROMPTS, 16, temperature=0.9, top_k=20, top_p=0.9, seed=3, eos_token_id=-1)
    b = generate(model, PROMPTS, 16, temperature=0.9, top_k=20, top_p=0.9, seed=3, eos_token_id=-1)
    c = generate(model, PROMPTS, 16, temperature=0.9, top_k=20, top_p=0.9, seed=4, eos_token_id=-1)
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)


def test_a_row_seeded_by_its_index_samples_the_same_tokens_in_any_batch_split(model):
    """rows=: each row's generator is seeded by (seed, row), so splitting a batch over ranks (or generating one
    row alone) gives every row the tokens it gets in the whole batch; the rows still differ from each other."""
    prompts = PROMPTS + [[5, 6, 7, 8, 9, 10, 11], [7, 8]]
    kw = dict(temperature=1.0, top_p=0.95, seed=[3, 7919, 2], eos_token_id=-1, prompt_width=8)
    whole = generate(model, prompts, 14, rows=range(5), **kw)
    halves = [generate(model, prompts[a:b], 14, rows=range(a, b), **kw) for a, b in ((0, 3), (3, 5))]
    assert np.array_equal(np.concatenate([h.tokens for h in halves]), whole.tokens)
    assert np.abs(np.concatenate([h.logprobs for h in halves]) - whole.logprobs).max() <= 1e-5
    alone = generate(model, [prompts[3]], 14, rows=[3], **kw)
    assert np.array_equal(alone.tokens[0], whole.tokens[3])
    assert not np.array_equal(whole.tokens[0], whole.tokens[3])   # same prompt, other row: other draws
    moved = generate(model, [prompts[3]], 14, rows=[4], **kw)
    assert not np.array_equal(moved.tokens[0], whole.tokens[3])
    with pytest.raises(Exception, match="rows gives 2 row indices for 5 prompts"):
        generate(model, prompts, 4, rows=[0, 1], **kw)


def test_eos_stops_a_row_and_pads_after(model):
    greedy = generate(model, PROMPTS, 10, temperature=0, eos_token_id=-1)
    eos = int(greedy.tokens[1, 3])
    out = generate(model, PROMPTS, 10, temperature=0, eos_token_id=eos, pad_token_id=0)
    row = out.tokens[1]
    stop = int(np.nonzero(row == eos)[0][0])
    assert out.lengths[1] == stop + 1
    assert (row[stop + 1:] == 0).all() and (out.logprobs[1, stop + 1:] == 0).all()


def test_sampling_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = [sample_next(logits, SamplingParams(1.0, top_k=2), rng)[0][0] for _ in range(300)]
    assert set(draws) == {0, 1}
    draws = [sample_next(logits, SamplingParams(1.0, top_p=0.7), rng)[0][0] for _ in range(300)]
    assert set(draws) == {0, 1}                      # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep two
    tok, lp = sample_next(logits, SamplingParams(0.0, repetition_penalty=2.0), rng, history=[[0]])
    assert tok[0] == 1                               # penalised log(0.5)*2 < log(0.3)


def test_continuous_batching_gives_each_prompt_its_own_tokens(model):
    """generation_batch_size 2 for 6 prompts: a finished row's cache row takes the next prompt. With per-row
    generators every prompt samples what it samples in the whole batch (and alone, greedy), rows finishing at
    different times (an eos some rows emit early)."""
    prompts = PROMPTS + [[7, 8, 9], [20, 21, 22, 23, 24], [9]]
    kw = dict(temperature=1.0, top_p=0.95, seed=[5, 1], prompt_width=8, pad_token_id=0)
    probe = generate(model, prompts, 12, rows=range(6), eos_token_id=-1, **kw)
    eos = int(probe.tokens[1, 2])                            # prompt 1 stops after 3 tokens, others vary
    whole = generate(model, prompts, 12, rows=range(6), eos_token_id=eos, **kw)
    assert len(set(whole.lengths.tolist())) > 1
    cont = generate(model, prompts, 12, rows=range(6), eos_token_id=eos, generation_batch_size=2, **kw)
    assert cont.state is None
    assert np.array_equal(cont.tokens, whole.tokens) and np.array_equal(cont.lengths, whole.lengths)
    assert np.array_equal(cont.finished, whole.finished) and whole.finished.any() and not whole.finished.all()
    assert np.abs(cont.logprobs - whole.logprobs).max() <= 1e-6
    # without rows, a generation batch still gives every prompt its own generator: any batch size samples alike
    by = [generate(model, prompts, 12, eos_token_id=eos, generation_batch_size=n, **kw).tokens for n in (3, 6)]
    assert np.array_equal(by[0], by[1])
    greedy = generate(model, prompts, 12, temperature=0, eos_token_id=eos, prompt_width=8, generation_batch_size=4)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], 12, temperature=0, eos_token_id=eos, prompt_width=8)
        assert np.array_equal(alone.tokens[0], greedy.tokens[i]) and alone.lengths[0] == greedy.lengths[i]


def test_a_paused_state_survives_other_generations_and_the_cache_capacity_does_not_matter(model):
    """Caches are written in place and reused once no state holds them: generating other prompts between two
    chunks must not touch the paused one. A cache of 2048 slots gives what one of 64 gives."""
    whole = generate(model, PROMPTS, 20, temperature=0, eos_token_id=-1, cache_len=64)
    first = generate(model, PROMPTS, 8, temperature=0, eos_token_id=-1, cache_len=64)
    for _ in range(2):                                       # same shape: would take a free pooled cache
        generate(model, [[30, 31, 32], [33], [34, 35]], 8, temperature=0, eos_token_id=-1, cache_len=64)
    rest = generate(model, None, 12, temperature=0, eos_token_id=-1, state=first.state)
    assert np.array_equal(np.concatenate([first.tokens, rest.tokens], 1), whole.tokens)
    big = generate(model, PROMPTS, 20, temperature=0, eos_token_id=-1, cache_len=2048)
    assert np.array_equal(big.tokens, whole.tokens)
    assert np.abs(big.logprobs - whole.logprobs).max() <= 1e-6
