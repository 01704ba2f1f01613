# SPDX-License-Identifier: Apache-2.0
"""Chunk-wise rollouts: chunked generation equals one call, a paused rollout saved to disk continues exactly,
and the chunk scoring windows equal full-context scoring when the overlap covers the context."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ms_llm.generation import generate
from ms_llm.losses.policy import TokenLogps
from ms_llm.models import CausalLM, load_pretrained, preset, save_pretrained
from ms_llm.rollout import ChunkPlan, StateCache, generate_chunked

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 4, 5, 6]]


@pytest.fixture
def model():
    ms.set_seed(1)
    m = CausalLM(preset("tiny"))
    m.set_train(False)
    return m


def test_chunked_greedy_generation_equals_one_call(model):
    whole = generate(model, PROMPTS, 30, temperature=0, eos_token_id=-1)
    out, done = generate_chunked(model, PROMPTS, 30, 8, temperature=0, eos_token_id=-1)
    assert done and np.array_equal(out.tokens, whole.tokens)
    assert np.abs(out.logprobs - whole.logprobs).max() <= 1e-5
    assert len(set(whole.tokens[0].tolist())) > 1


@pytest.mark.slow
@pytest.mark.parametrize("per_row", [False, True])
def test_paused_sampled_rollout_resumes_from_disk_and_equals_an_uninterrupted_one(model, tmp_path, per_row):
    kw = dict(temperature=0.9, top_p=0.95, eos_token_id=-1, seed=11, prompt_width=8)
    if per_row:                                               # one generator per row (RowRandom), saved per row
        kw["rows"] = range(len(PROMPTS))
    whole, _ = generate_chunked(model, PROMPTS, 28, 6, **kw)
    first, done = generate_chunked(model, PROMPTS, 28, 6, stop_after=2, **kw)
    assert not done and first.tokens.shape[1] == 12
    cache = StateCache()
    cache.put("round0", first.state)
    cache.save(str(tmp_path / "state"))
    save_pretrained(model, str(tmp_path / "model"))
    reloaded = load_pretrained(str(tmp_path / "model"))       # another model object, same weights
    later = StateCache.load(str(tmp_path / "state"), reloaded)
    cont = {k: v for k, v in kw.items() if k in ("temperature", "top_p", "eos_token_id")}   # same sampling
    rest, done = generate_chunked(reloaded, None, 28, 6, state=later.pop("round0"), generated=12, **cont)
    assert done
    assert np.array_equal(np.concatenate([first.tokens, rest.tokens], 1), whole.tokens)
    assert np.abs(np.concatenate([first.logprobs, rest.logprobs], 1) - whole.logprobs).max() <= 1e-5
    other, _ = generate_chunked(model, PROMPTS, 28, 6, **dict(kw, seed=12))
    assert not np.array_equal(other.tokens, whole.tokens)     # the RNG really is in the state


def _rows(prompts, responses, p, n, pad=0):
    b = len(prompts)
    rows, row_mask, resp = np.full((b, p + n), pad, np.int32), np.zeros((b, p + n), np.int32), np.zeros((b, n))
    for i, (pr, rs) in enumerate(zip(prompts, responses)):
        rows[i, p - len(pr):p], row_mask[i, p - len(pr):p] = pr, 1
        rows[i, p:p + len(rs)], row_mask[i, p:p + len(rs)], resp[i, :len(rs)] = rs, 1, 1
    return rows, row_mask, resp


def _reference_logps(model, prompts, responses):
    """log p(response token) under the full context, one row at a time, no padding."""
    out = []
    for pr, rs in zip(prompts, responses):
        logits = model(Tensor(np.array([pr + rs], np.int32))).asnumpy()[0].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        out.append([logp[len(pr) - 1 + j, tok] for j, tok in enumerate(rs)])
    return out


def test_scoring_windows_equal_full_context_when_the_overlap_covers_it(model):
    r = np.random.default_rng(0)
    p, n = 8, 20
    responses = [list(r.integers(1, 500, k)) for k in (20, 13, 5)]
    rows, row_mask, resp = _rows(PROMPTS, responses, p, n)
    want = _reference_logps(model, PROMPTS, responses)
    scorer = TokenLogps(model)
    for plan in (ChunkPlan(p, n, 6, p + n, exact=False), ChunkPlan(p, n, 6, 0, exact=True)):
        w = plan.windows(rows, row_mask, resp)
        assert w["ids"].shape == (3 * plan.n_windows, plan.width)
        got = scorer(*(Tensor(w[k]) for k in ("ids", "attention_mask", "position_ids", "targets"))).asnumpy()
        logps = plan.to_response(got, w["index"])
        for i, rs in enumerate(responses):
            assert np.abs(logps[i, :len(rs)] - want[i]).max() <= 1e-5
            assert (logps[i, len(rs):] == 0).all()
        # every response token trains in exactly one window
        assert w["loss_mask"].sum() == sum(len(x) for x in responses)
        back = plan.to_windows(plan.to_response(w["index"].astype(np.float64), w["index"]), w["index"])
        assert np.array_equal(back, np.where(w["index"] >= 0, w["index"], 0))


def test_a_short_overlap_is_an_approximation_with_bounded_width(model):
    r = np.random.default_rng(1)
    p, n = 8, 24
    responses = [list(r.integers(1, 500, n)) for _ in PROMPTS]
    rows, row_mask, resp = _rows(PROMPTS, responses, p, n)
    want = np.array(_reference_logps(model, PROMPTS, responses))
    plan = ChunkPlan(p, n, 6, 4)
    w = plan.windows(rows, row_mask, resp)
    assert plan.width == 10 and plan.n_windows == 4
    got = plan.to_response(TokenLogps(model)(*(Tensor(w[k]) for k in ("ids", "attention_mask", "position_ids",
                                                                       "targets"))).asnumpy(), w["index"])
    err = np.abs(got - want)
    assert err.max() > 1e-4                                   # context is really cut ...
    assert np.abs(got[:, :1] - want[:, :1]).max() < err.max()  # ... the first tokens see most of their prompt


def test_completion_rows_put_the_loss_on_the_sampled_tokens_only():
    """Loop reference of the supervised layout: input t predicts label t; labels are the completion's tokens
    (EOS included) and -100 elsewhere; each row's weights sum to 1 whatever its length."""
    from ms_llm.rollout.batch import completion_rows
    prompts = [{"ids": [5, 6, 7]}, {"ids": [9]}]
    tokens = np.array([[11, 12, 2, 0], [13, 14, 15, 16]])
    lengths = np.array([3, 4])
    rows = completion_rows(prompts, tokens, lengths, seq_len=8, pad=0)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        seq = p["ids"] + tokens[i, :n].tolist()
        for t in range(8):
            inside = t < len(seq) - 1
            assert rows["input_ids"][i, t] == (seq[t] if inside else 0)
            assert rows["attention_mask"][i, t] == int(inside)
            target = seq[t + 1] if inside and t + 1 >= len(p["ids"]) else -100
            assert rows["labels"][i, t] == target
            assert rows["weights"][i, t] == pytest.approx(1.0 / n if target != -100 else 0.0)
        assert rows["row_weight"][i] == 1.0
    with pytest.raises(ValueError, match="exceed"):
        completion_rows(prompts, tokens, lengths, seq_len=4, pad=0)


@pytest.mark.parametrize("over,needle", [
    (("distill.on_policy.prompts=null",), "distill.on_policy.prompts"),
    (("distill.on_policy.async_rollout=true", "distill.on_policy.student_share=0.5"), "needs student_share 1"),
    (("distill.on_policy.max_new_tokens=40",), "do not fit data.seq_len 64"),
    (("distill.iterative.every=50",), "does not combine"),
])
def test_bad_on_policy_configs_are_refused_naming_the_key(over, needle):
    import os
    from ms_llm.config import load_config
    from ms_llm.errors import MsLlmError
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with pytest.raises(MsLlmError) as e:
        load_config(os.path.join(root, "configs", "tiny", "distill_on_policy.yaml"), list(over))
    assert needle in str(e.value) and "distill_on_policy.yaml" in str(e.value)
