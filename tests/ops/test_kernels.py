# SPDX-License-Identifier: Apache-2.0
"""The CPU kernels (kernels/cpu) against the reference ops, forward and gradients, in GRAPH_MODE, on odd shapes:
sizes that are no multiple of any block, grouped-query heads, left padding (rows that see no key at all),
packed documents, one-token decode against a cache; then whole models with kernels against the reference
backend, and the fallback when the kernels cannot be built; last, the decoding kernels against NumPy (a KV cache
written in place, the one-token-per-row products, bitwise batch-invariant)."""
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from ms_llm import ops as F
from ms_llm.ops import backend as B
from ms_llm.ops import kernels

FWD, GRAD = 1e-5, 1e-4          # relative to the largest magnitude of the reference


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module", autouse=True)
def _graph():
    assert kernels.load() is not None, kernels.unavailable_reason()
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


class Weighted(nn.Cell):
    """sum(f(*inputs)[0] * cotangent): its gradient is f's vector-Jacobian product with a random cotangent."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, cot, *inputs):
        return (self.fn(*inputs) * cot).sum()


def check(fn_ref, fn_cpu, inputs, grad_of, seed=0):
    """Forward ≤ FWD and the gradients w.r.t. inputs[grad_of] ≤ GRAD, relative."""
    want, got = fn_ref(*inputs), fn_cpu(*inputs)
    assert rel(got.asnumpy(), want.asnumpy()) <= FWD
    cot = Tensor(np.random.RandomState(seed).randn(*want.shape).astype(np.float32))
    g_ref = ms.grad(Weighted(fn_ref), tuple(i + 1 for i in grad_of))(cot, *inputs)
    g_cpu = ms.grad(Weighted(fn_cpu), tuple(i + 1 for i in grad_of))(cot, *inputs)
    for a, b in zip(g_cpu, g_ref):
        assert rel(a.asnumpy(), b.asnumpy()) <= GRAD
    return want, got


class Fn(nn.Cell):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def construct(self, *args):
        return self.f(*args)


def _t(*shape, scale=1.0, seed=0):
    return Tensor((np.random.RandomState(seed).randn(*shape) * scale).astype(np.float32))


@pytest.mark.parametrize("m", [37, 3])                  # 3 rows: a decode step (the columns are split instead)
def test_linear(m):
    for frozen in (False, True):
        check(Fn(lambda x, w: F.linear(x, w)), Fn(lambda x, w: F.linear(x, w, backend="cpu", frozen=frozen)),
              (_t(m, 53), _t(291, 53, seed=1)), (0,) if frozen else (0, 1))
    # the lm_head product: bitwise the same logits for the first tokens whatever the vocabulary size
    x, w = _t(m, 64), _t(700, 64, seed=2)
    head = Fn(lambda x, w: F.linear(x, w, backend="cpu", head=True))
    small = head(x, w[:256]).asnumpy()
    for n in (264, 272, 513, 700):
        assert np.array_equal(head(x, w[:n]).asnumpy()[:, :256], small)
    check(Fn(lambda x, w: F.linear(x, w)), head, (x, w[:513]), (0, 1))


def test_frozen_linear_gives_no_weight_gradient():
    fn = Weighted(Fn(lambda x, w: F.linear(x, w, backend="cpu", frozen=True)))
    gw = ms.grad(fn, 2)(_t(5, 7), _t(5, 9), _t(7, 9, seed=1))
    assert not np.any(gw.asnumpy())


def test_rms_norm_swiglu_rotary():
    w = Tensor(np.random.RandomState(3).rand(45).astype(np.float32) + 0.5)
    check(Fn(lambda x, w: F.rms_norm(x, w, 1e-6)), Fn(lambda x, w: F.rms_norm(x, w, 1e-6, "cpu")),
          (_t(3, 7, 45, scale=3.0), w), (0, 1))
    check(Fn(lambda g, u: F.swiglu(g, u)), Fn(lambda g, u: F.swiglu(g, u, "cpu")),
          (_t(5, 77, scale=4.0), _t(5, 77, seed=1)), (0, 1))
    pos = Tensor(np.random.RandomState(4).randint(0, 300, (2, 11)).astype(np.int32))
    cos, sin = F.rope_cos_sin(pos, Tensor(F.rope_inv_freq(18, 10000.0)))
    check(Fn(lambda x, c, s: F.apply_rotary(x, c, s)), Fn(lambda x, c, s: F.apply_rotary(x, c, s, "cpu")),
          (_t(2, 3, 11, 18), cos, sin), (0,))


def _bias(b, sq, sk, valid=None, seg=None, q_slots=None):
    q_slots = np.broadcast_to(np.arange(sk - sq, sk, dtype=np.int32), (b, sq)) if q_slots is None else q_slots
    k_slots = np.broadcast_to(np.arange(sk, dtype=np.int32), (b, sk))
    mask = F.causal_mask(Tensor(q_slots.copy()), Tensor(k_slots.copy()),
                         None if valid is None else Tensor(valid),
                         None if seg is None else Tensor(seg[:, sk - sq:].copy()), None if seg is None else Tensor(seg))
    return F.mask_bias(mask)


@pytest.mark.parametrize("b,n,nkv,sq,sk,d", [(2, 6, 2, 150, 150, 24),     # GQA, 150 = no multiple of 64 or 128
                                             (1, 4, 4, 1, 41, 16),        # one-token decode over a cache
                                             (2, 4, 1, 7, 300, 8)])       # a chunk of queries after a long prefix
def test_flash_attention(b, n, nkv, sq, sk, d):
    valid = np.ones((b, sk), np.int32)
    valid[-1, :min(17, sk - 1)] = 0                      # left padding: the first rows of that sequence see no key
    seg = np.zeros((b, sk), np.int32)
    seg[0, sk // 2:] = 1                                 # two packed documents in the first sequence
    seg[0, sk - max(sq // 5, 3):] = 2
    bias = _bias(b, sq, sk, valid, seg)
    q, k, v = _t(b, n, sq, d, seed=6), _t(b, nkv, sk, d, seed=7), _t(b, nkv, sk, d, seed=8)
    scale = d ** -0.5
    check(Fn(lambda q, k, v, m: F.attention(q, k, v, m, scale)),
          Fn(lambda q, k, v, m: F.attention(q, k, v, m, scale, backend="cpu")), (q, k, v, bias), (0, 1, 2))


def test_flash_attention_matches_numpy_softmax_where_rows_see_keys():
    """Independent of the reference op: a direct NumPy softmax over the visible keys."""
    b, n, nkv, s, d = 1, 4, 2, 70, 16
    q, k, v = _t(b, n, s, d, seed=9), _t(b, nkv, s, d, seed=10), _t(b, nkv, s, d, seed=11)
    out = Fn(lambda q, k, v, m: F.attention(q, k, v, m, 0.3, backend="cpu"))(q, k, v, _bias(b, s, s)).asnumpy()
    kk, vv = np.repeat(k.asnumpy(), 2, 1), np.repeat(v.asnumpy(), 2, 1)
    sc = q.asnumpy() @ kk.transpose(0, 1, 3, 2) * 0.3 + np.where(np.tril(np.ones((s, s))) > 0, 0, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ vv
    np.testing.assert_allclose(out, want.transpose(0, 2, 1, 3).reshape(b, s, n * d), rtol=1e-5, atol=1e-6)


def test_fused_lm_head_log_probs():
    t, h, v = 300, 40, 517                              # 300 rows: a whole 256-row chunk and a partial one
    hid, w = _t(2, t // 2, h), _t(v, h, scale=0.3, seed=1)
    tgt = Tensor(np.random.RandomState(2).randint(0, v, (2, t // 2)).astype(np.int32))
    for scale in (1.0, 0.7):
        check(Fn(lambda x, w: F.linear_log_probs(x, w, tgt, scale=scale)),
              Fn(lambda x, w: F.linear_log_probs(x, w, tgt, backend="cpu", scale=scale)), (hid, w), (0, 1))


def _models(**over):
    from ms_llm.models import CausalLM, preset
    cfg = preset("tiny", vocab_size=300, num_key_value_heads=2, **over)
    ms.set_seed(0)
    B.configure("reference")
    ref = CausalLM(cfg)
    B.configure("auto")
    fast = CausalLM(cfg)
    from ms_llm.models.io import load_state_dict
    load_state_dict(fast, {n: p.asnumpy() for n, p in ref.parameters_and_names()}, strict=True, source="test")
    assert ref.model.layers[0].self_attn.backend == "reference" and fast.model.layers[0].self_attn.backend == "cpu"
    return ref, fast


@pytest.mark.parametrize("tied", [False, True])
def test_model_with_kernels_equals_reference(tied):
    """Logits, the LM loss and every parameter's gradient, with padding and packed documents."""
    from ms_llm.losses.lm import LMLoss
    ref, fast = _models(tie_word_embeddings=tied)
    rs = np.random.RandomState(12)
    ids = Tensor(rs.randint(0, 300, (2, 37)).astype(np.int32))
    labels = rs.randint(0, 300, (2, 37)).astype(np.int32)
    labels[0, :5] = -100
    seg = np.zeros((2, 37), np.int32)
    seg[1, 20:] = 1
    assert rel(fast(ids, None, None, Tensor(seg)).asnumpy(), ref(ids, None, None, Tensor(seg)).asnumpy()) <= FWD
    grads = []
    for model in (ref, fast):
        loss = LMLoss(model)
        fn = ms.value_and_grad(lambda i, l, s: loss(i, l, None, s)[0], None, loss.trainable_params())
        grads.append(fn(ids, Tensor(labels), Tensor(seg)))
    assert abs(grads[1][0].asnumpy() - grads[0][0].asnumpy()) <= 1e-5 * abs(grads[0][0].asnumpy())
    for a, b in zip(grads[1][1], grads[0][1]):
        assert rel(a.asnumpy(), b.asnumpy()) <= GRAD


def test_cached_generation_with_kernels_equals_reference():
    from ms_llm.generation import generate
    ref, fast = _models()
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    a = generate(ref, prompts, max_new_tokens=12, temperature=0)
    b = generate(fast, prompts, max_new_tokens=12, temperature=0)
    assert np.array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)
    # continuous batching on the reference path (functional caches, cache rows gathered and scattered back)
    more = prompts + [[7, 8, 9], [13]]
    c = generate(ref, more, max_new_tokens=12, temperature=0, generation_batch_size=2)
    d = generate(fast, more, max_new_tokens=12, temperature=0)
    assert np.array_equal(c.tokens, d.tokens)
    np.testing.assert_allclose(c.logprobs, d.logprobs, atol=1e-5)


def test_lora_with_kernels_trains_only_the_adapters():
    from ms_llm.losses.lm import LMLoss
    from ms_llm.peft import LoRAConfig, apply_lora
    models = _models()
    for model in models:
        apply_lora(model, LoRAConfig(4, 8.0, 0.0, ["q_proj", "v_proj"]))
    adapters = {n: p.asnumpy() for n, p in models[0].parameters_and_names() if ".lora_A" in n}
    rs = np.random.RandomState(13)
    grads = []
    for model in models:
        for name, p in model.parameters_and_names():
            if ".lora_A" in name or ".lora_B" in name:     # the same A in both, and a B that is not zero
                value = adapters[name] if "lora_A" in name else rs.randn(*p.shape).astype(np.float32) * 0.1
                p.set_data(Tensor(value))
        rs = np.random.RandomState(13)
        loss = LMLoss(model)
        ids = Tensor(np.arange(60, dtype=np.int32).reshape(2, 30))
        grads.append(ms.grad(lambda i, l: loss(i, l)[0], None, loss.trainable_params())(ids, ids))
    assert len(grads[0]) == len(grads[1]) == 4 * models[0].num_layers     # A and B of q_proj and v_proj
    for a, b in zip(grads[1], grads[0]):
        assert rel(a.asnumpy(), b.asnumpy()) <= GRAD


def test_without_a_compiler_the_reference_ops_run_and_cpu_is_refused(tmp_path):
    code = """
import warnings
import mindspore as ms
ms.set_device("CPU")
from ms_llm.errors import MsLlmError
from ms_llm.ops import backend, kernels
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    print("auto", backend.choose("linear"))
    print("warned", any("CPU kernels unavailable" in str(x.message) for x in w))
print("reason", kernels.unavailable_reason())
backend.configure("cpu")
try:
    backend.choose("attention")
except MsLlmError as e:
    print("refused", e)
"""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), MS_LLM_KERNEL_CACHE=str(tmp_path / "cache"),
               PATH="/nonexistent")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert "auto reference" in out.stdout and "warned True" in out.stdout, out.stderr[-2000:]
    assert "no-such-g++" in out.stdout and "refused context.kernels: 'attention' set to cpu" in out.stdout
    assert not list((tmp_path / "cache").rglob("*.so"))        # nothing half-written in the cache


def test_backend_table_and_config_key():
    assert set(B.table()) == set(B.OPS) and set(B.table().values()) == {"cpu"}
    B.configure({"attention": "reference"})
    try:
        assert B.choose("attention") == "reference" and B.choose("linear") == "cpu"
        assert B.choose("linear", ms.float16) == "reference"           # the kernels compute in float32
    finally:
        B.configure("auto")
    from ms_llm.errors import MsLlmError
    with pytest.raises(MsLlmError, match="unknown op"):
        B.configure({"matmul": "cpu"})
    with pytest.raises(MsLlmError, match="context.kernels"):
        B.configure("fast")


def test_ascend_rotary_falls_back_on_the_decode_step():
    """MindSpore's fused rotary refuses BNSD when B*N > 8*S (the one-token decode step): that shape takes the
    reference path (which runs here, on CPU, where the fused op does not exist)."""
    x = _t(4, 8, 1, 16)
    pos = Tensor(np.arange(4, dtype=np.int32).reshape(4, 1))
    cos, sin = F.rope_cos_sin(pos, Tensor(F.rope_inv_freq(16, 10000.0)))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        got = F.apply_rotary(x, cos, sin, "ascend").asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert np.array_equal(got, F.apply_rotary(x, cos, sin).asnumpy())


def test_a_row_does_not_depend_on_the_rest_of_the_batch():
    """Bitwise: what makes a batch equal its accumulated micro-batches, and two data-parallel ranks one process."""
    x, w = _t(9, 29, 53), _t(291, 53, seed=1)                  # 9 sequences of 29 rows
    lin = Fn(lambda x, w: F.linear(x, w, backend="cpu"))
    dx = Fn(lambda x, w, c: ms.grad(Weighted(lin), 1)(c, x, w))
    cot = _t(9, 29, 291, seed=2)
    whole, whole_dx = lin(x, w).asnumpy(), dx(x, w, cot).asnumpy()
    for a, b in [(0, 1), (3, 5), (1, 9), (8, 9)]:
        assert np.array_equal(lin(x[a:b], w).asnumpy(), whole[a:b])
        assert np.array_equal(dx(x[a:b], w, cot[a:b]).asnumpy(), whole_dx[a:b])
    hid, v = _t(6, 50, 40), _t(517, 40, scale=0.3, seed=3)
    tgt = Tensor(np.random.RandomState(4).randint(0, 517, (6, 50)).astype(np.int32))
    lp = Fn(lambda h, w, t: F.linear_log_probs(h, w, t, backend="cpu"))
    whole = lp(hid, v, tgt).asnumpy()
    for a, b in [(0, 1), (1, 3), (5, 6)]:
        assert np.array_equal(lp(hid[a:b], v, tgt[a:b]).asnumpy(), whole[a:b])


def test_graph_mode_lora_training_with_kernels_equals_reference():
    """Compiled train steps (GRAPH_MODE merges Custom ops that share a function name: the frozen base layers'
    op must not lend its no-weight-gradient backward to the adapters)."""
    from ms_llm.losses.lm import LMLoss
    from ms_llm.peft import LoRAConfig, apply_lora
    from ms_llm.training.optim import AdamW
    from ms_llm.training.step import LossScaleState, TrainStep
    runs = []
    for model in _models():
        np.random.seed(0)
        apply_lora(model, LoRAConfig(4, 8.0, 0.0, ["q_proj", "v_proj"]))
        loss = LMLoss(model)
        step = TrainStep(loss, AdamW(loss.trainable_params()), LossScaleState(False), 1, 1.0)
        rs = np.random.RandomState(14)
        losses = []
        for _ in range(3):
            ids = rs.randint(0, 300, (2, 17)).astype(np.int32)
            losses.append(step([(Tensor(ids[:, :-1]), Tensor(ids[:, 1:]))], 1e-2)["loss"])
        runs.append((losses, {n: p.asnumpy() for n, p in model.parameters_and_names() if ".lora_B" in n}))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5)
    for name, b in runs[0][1].items():
        assert np.abs(b).max() > 1e-3                                   # the adapters trained
        np.testing.assert_allclose(runs[1][1][name], b, atol=1e-5)


# -- decoding: attention over a KV cache written in place (kernels/cpu/decode.cc), on the CPU kernel and on the
# reference path every other backend takes; the one-token-per-row products (kernels/cpu/linear.cc)

class Attend(nn.Cell):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def construct(self, q, k, v, ck, cv, rows, slots, starts):
        return F.kv_attend(q, k, v, ck, cv, rows, slots, starts, 0.3, ms.float32, self.backend)


def _numpy_attend(q, k, v, ck, cv, rows, slots, starts, scale=0.3):
    """The cache rows written, then softmax attention of each query over its row's slots start .. own slot."""
    ck, cv = ck.copy(), cv.copy()
    b, n, t, d = q.shape
    nkv = k.shape[1]
    for i in range(b):
        ck[rows[i], :, slots[i]] = k[i].transpose(1, 0, 2)
        cv[rows[i], :, slots[i]] = v[i].transpose(1, 0, 2)
    out = np.zeros((b, t, n, d))
    for i in range(b):
        for h in range(n):
            keys, vals = ck[rows[i], h // (n // nkv)], cv[rows[i], h // (n // nkv)]
            for j in range(t):
                lo, hi = starts[i], slots[i, j] + 1
                if hi <= lo:
                    continue                                  # a padding query: nothing reads its output
                s = keys[lo:hi].astype(np.float64) @ q[i, h, j] * scale
                p = np.exp(s - s.max())
                out[i, j, h] = p @ vals[lo:hi] / p.sum()
    return out.reshape(b, t, n * d), ck, cv


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("t", [1, 5])                    # a decode step; a prefill with causal queries
def test_kv_attend_matches_numpy(backend, t):
    rng = np.random.RandomState(0)
    bc, nkv, cap, d, n = 4, 2, 40, 8, 6
    rows = np.array([2, 0, 3], np.int32)                   # query rows use cache rows out of order, one unused
    starts = np.array([0, 3, 7], np.int32)
    first = np.array([9, 3, 30], np.int32)                 # the slot of each row's first new token
    slots = (first[:, None] + np.arange(t)[None, :]).astype(np.int32)
    if t > 1:
        slots[2] = np.arange(5, 5 + t)                     # row 2: its first two queries are left padding
    b = len(rows)
    q, k, v = rng.randn(b, n, t, d), rng.randn(b, nkv, t, d), rng.randn(b, nkv, t, d)
    ck, cv = rng.randn(bc, nkv, cap, d), rng.randn(bc, nkv, cap, d)      # old contents: must not be read
    q, k, v, ck, cv = (a.astype(np.float32) for a in (q, k, v, ck, cv))
    want, want_k, want_v = _numpy_attend(q, k, v, ck, cv, rows, slots, starts)
    tk, tv = Tensor(ck), Tensor(cv)
    out, new_k, new_v = Attend(backend)(*(Tensor(a) for a in (q, k, v)), tk, tv, Tensor(rows), Tensor(slots),
                                        Tensor(starts))
    if backend == "cpu":                                   # written in place, nothing returned
        assert new_k is None and new_v is None
        new_k, new_v = tk, tv
    got = out.asnumpy()
    live = np.array([[slots[i, j] >= starts[i] for j in range(t)] for i in range(b)])
    assert np.abs(got[live] - want[live]).max() <= 1e-5
    np.testing.assert_array_equal(new_k.asnumpy(), want_k)
    np.testing.assert_array_equal(new_v.asnumpy(), want_v)


def test_kv_attend_refuses_a_slot_outside_the_cache_and_a_cache_row_given_twice():
    z = Tensor(np.zeros((1, 2, 1, 8), np.float32))
    cache = Tensor(np.zeros((1, 2, 16, 8), np.float32))
    with pytest.raises(RuntimeError):
        Attend("cpu")(z, z, z, cache, cache, Tensor(np.array([0], np.int32)), Tensor(np.array([[16]], np.int32)),
                      Tensor(np.array([0], np.int32)))[0].asnumpy()
    z2, cache2 = Tensor(np.zeros((2, 2, 1, 8), np.float32)), Tensor(np.zeros((2, 2, 16, 8), np.float32))
    with pytest.raises(RuntimeError):                      # two query rows on one cache row would race
        Attend("cpu")(z2, z2, z2, cache2, cache2, Tensor(np.array([1, 1], np.int32)),
                      Tensor(np.array([[3], [4]], np.int32)), Tensor(np.array([0, 0], np.int32)))[0].asnumpy()


def test_one_token_rows_products_match_numpy_and_do_not_depend_on_the_batch():
    rng = np.random.RandomState(1)
    x = rng.randn(11, 1, 67).astype(np.float32)             # 11 rows: no multiple of the 4-row block
    wq, wk, wv = (rng.randn(n, 67).astype(np.float32) for n in (65, 17, 17))
    lin = Fn(lambda x, w: F.linear(x, w, backend="cpu"))
    three = Fn(F.linear_rows3)
    swi = Fn(F.swiglu_rows)
    y = lin(Tensor(x), Tensor(wq)).asnumpy()
    assert y.shape == (11, 1, 65)
    np.testing.assert_allclose(y[:, 0], x[:, 0].astype(np.float64) @ wq.T.astype(np.float64), rtol=0, atol=2e-5)
    for a, b in [(0, 1), (3, 5), (4, 11), (10, 11)]:        # a row alone or among others: bitwise the same
        assert np.array_equal(lin(Tensor(x[a:b]), Tensor(wq)).asnumpy(), y[a:b])
    # the fused q/k/v call is bitwise three products, the fused MLP bitwise two products and the SwiGLU kernel
    q, k, v = (o.asnumpy() for o in three(*(Tensor(a) for a in (x, wq, wk, wv))))
    assert np.array_equal(q, y)
    assert np.array_equal(k, lin(Tensor(x), Tensor(wk)).asnumpy())
    assert np.array_equal(v, lin(Tensor(x), Tensor(wv)).asnumpy())
    g, u = lin(Tensor(x), Tensor(wk)), lin(Tensor(x), Tensor(wv))
    fused = swi(Tensor(x), Tensor(wk), Tensor(wv)).asnumpy()
    assert np.array_equal(fused, Fn(lambda g, u: F.swiglu(g, u, "cpu"))(g, u).asnumpy())
    gg = x[:, 0].astype(np.float64) @ wk.T
    np.testing.assert_allclose(fused[:, 0], gg / (1 + np.exp(-gg)) * (x[:, 0].astype(np.float64) @ wv.T),
                               rtol=0, atol=1e-4)
    assert np.array_equal(swi(Tensor(x[3:4]), Tensor(wk), Tensor(wv)).asnumpy(), fused[3:4])


def test_rows_product_gradient_matches_numpy():
    """A one-token-per-row product keeps the linear backward (a value head scoring the last token trains)."""
    rng = np.random.RandomState(2)
    x, w, c = rng.randn(5, 1, 19).astype(np.float32), rng.randn(7, 19).astype(np.float32), rng.randn(5, 1, 7)
    lin = Fn(lambda x, w: F.linear(x, w, backend="cpu"))
    loss = Fn(lambda x, w, c: (lin(x, w) * c).sum())
    gx, gw = ms.grad(loss, (0, 1))(Tensor(x), Tensor(w), Tensor(c.astype(np.float32)))
    np.testing.assert_allclose(gx.asnumpy()[:, 0], c[:, 0] @ w, atol=1e-5)
    np.testing.assert_allclose(gw.asnumpy(), c[:, 0].T @ x[:, 0], atol=1e-5)
