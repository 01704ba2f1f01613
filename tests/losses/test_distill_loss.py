"""Distillation loss against an independent float64 NumPy reference, and its gradients against finite
differences of that reference."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from ms_llm.losses.distill import DistillLoss, DistillLossConfig, divergence, teacher_dense, teacher_mapped, topk_buckets
from ms_llm.models import CausalLM, ModelConfig


# ---------------------------------------------------------------- reference (float64, plain numpy)
def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(p, q):
    """KL(p || q) over the last axis, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0).sum(-1)


def ref_divergence(p, q, kind, b=0.5):
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, np.maximum(p, 1e-30))
    m = b * p + (1 - b) * q
    return b * kl(p, m) + (1 - b) * kl(q, m)


def ref_teacher_probs(t_logits, tau, vocab_map=None, unk=0):
    p = np.exp(log_softmax(t_logits / tau))
    if vocab_map is None:
        return p
    out = np.zeros(p.shape[:-1] + (len(vocab_map),))
    for j, t in enumerate(vocab_map):
        if t is not None:
            out[..., j] = p[..., t]
    out[..., unk] += 1 - out.sum(-1)
    return out


def ref_tail(logp_t, topk_ids):
    """log of the teacher's probability outside the cached tokens (-inf when nothing is left)."""
    p = np.exp(logp_t)
    np.put_along_axis(p, topk_ids, 0.0, -1)
    with np.errstate(divide="ignore"):
        return np.log(p.sum(-1))


def ref_topk_buckets(topk_ids, topk_logp, tail_logp, s_logits, tau):
    """Coarsen both distributions to {the cached tokens} + {everything else}."""
    q = np.exp(log_softmax(s_logits / tau))
    valid = np.isfinite(topk_logp)
    pk = np.where(valid, np.exp(np.where(valid, topk_logp, 0)), 0)
    qk = np.where(valid, np.take_along_axis(q, topk_ids, -1), 0)
    p = np.concatenate([pk, np.exp(tail_logp)[..., None]], -1)
    qb = np.concatenate([qk, 1 - qk.sum(-1, keepdims=True)], -1)
    return p, qb


def ref_loss(s_logits, labels, weights, tau, alpha, beta, kind, p=None, buckets=None, b=0.5):
    valid = labels >= 0
    ce = -np.take_along_axis(log_softmax(s_logits), np.where(valid, labels, 0)[..., None], -1)[..., 0]
    if buckets is not None:
        d = ref_divergence(*buckets, kind, b)
    else:
        d = ref_divergence(p, np.exp(log_softmax(s_logits / tau)), kind, b)
    return float(((alpha * tau * tau * d + beta * ce) * weights * valid).sum())


# ---------------------------------------------------------------- pure functions
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_matches_reference(kind):
    r = np.random.default_rng(0)
    t, s = r.normal(size=(3, 5, 40)) * 3, r.normal(size=(3, 5, 40)) * 3
    p, logp = teacher_dense(ms.Tensor(t, ms.float32), 2.0)
    logq = ops.log_softmax(ms.Tensor(s / 2.0, ms.float32), -1)
    got = divergence(p, logp, ops.exp(logq), logq, kind, 0.3).asnumpy()
    want = ref_divergence(np.exp(log_softmax(t / 2)), np.exp(log_softmax(s / 2)), kind, 0.3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_vocab_map_moves_missing_mass_to_unk():
    r = np.random.default_rng(1)
    t = r.normal(size=(2, 4, 30)) * 2
    vocab_map = [None, 5, 7, 9, None, 0, 29, 3, 12, None]          # student id -> teacher id
    index = ms.Tensor([v if v is not None else 0 for v in vocab_map], ms.int32)
    valid = ms.Tensor([v is not None for v in vocab_map], ms.float32)
    onehot = ms.Tensor(np.eye(10, dtype=np.float32)[0])
    p, logp = teacher_mapped(ms.Tensor(t, ms.float32), 1.5, index, valid, onehot)
    want = ref_teacher_probs(t, 1.5, vocab_map, unk=0)
    np.testing.assert_allclose(p.asnumpy(), want, atol=1e-5)
    np.testing.assert_allclose(p.asnumpy().sum(-1), 1.0, atol=1e-6)
    assert want[..., 4].max() == 0 and want[..., 0].min() > 0.3       # unmapped: 0; unk: everything unmatched


def test_topk_buckets_keep_tail_mass():
    r = np.random.default_rng(2)
    t, s = r.normal(size=(2, 3, 50)) * 2, r.normal(size=(2, 3, 50)) * 2
    logp_t = log_softmax(t / 2.0)
    ids = np.argsort(-logp_t, -1)[..., :6].astype(np.int32)
    topk = np.take_along_axis(logp_t, ids, -1)
    tail = ref_tail(logp_t, ids)
    topk[0, 0, 4:] = -np.inf                                          # merged/padded slots
    ids[0, 0, 4:] = 0
    p, logp, q, logq = topk_buckets(ms.Tensor(ids), ms.Tensor(topk, ms.float32), ms.Tensor(tail, ms.float32),
                                    ops.log_softmax(ms.Tensor(s / 2.0, ms.float32), -1))
    want_p, want_q = ref_topk_buckets(ids, topk, tail, s, 2.0)
    np.testing.assert_allclose(p.asnumpy(), want_p, atol=1e-5)
    np.testing.assert_allclose(q.asnumpy(), want_q, atol=1e-5)
    np.testing.assert_allclose(p.asnumpy()[0, 1:].sum(-1), 1.0, atol=1e-6)   # rows without padding
    np.testing.assert_allclose(divergence(p, logp, q, logq, "forward_kl").asnumpy(), kl(want_p, want_q), atol=1e-5)


# ---------------------------------------------------------------- gradients: finite differences of the reference
class _OnLogits(nn.Cell):
    """The loss with the student's logits as the trainable input (so finite differences are cheap)."""

    def __init__(self, s_logits, kind, tau, cached):
        super().__init__()
        self.s = ms.Parameter(ms.Tensor(s_logits, ms.float32), name="s")
        self.kind, self.tau, self.cached = kind, tau, cached

    def construct(self, teacher, labels, ids, tail):
        logq1 = ops.log_softmax(self.s, -1)
        ce = -ops.gather_elements(logq1, -1, labels.expand_dims(-1)).squeeze(-1)
        logq = ops.log_softmax(self.s / self.tau, -1)
        if self.cached:
            p, logp, q, lq = topk_buckets(ids, teacher, tail, logq)
        else:
            p, logp = teacher_dense(teacher, self.tau)
            q, lq = ops.exp(logq), logq
        d = divergence(p, logp, q, lq, self.kind, 0.5)
        return (0.8 * self.tau * self.tau * d + 0.2 * ce).sum()


@pytest.mark.parametrize("kind,cached", [("forward_kl", False), ("reverse_kl", False), ("jsd", False),
                                         ("forward_kl", True)])
def test_gradient_matches_finite_differences(kind, cached):
    r = np.random.default_rng(3)
    t, s = r.normal(size=(1, 2, 12)), r.normal(size=(1, 2, 12))
    labels = r.integers(0, 12, size=(1, 2))
    tau = 2.0
    if cached:
        logp_t = log_softmax(t / tau)
        ids = np.argsort(-logp_t, -1)[..., :4].astype(np.int32)
        teacher = np.take_along_axis(logp_t, ids, -1)
        tail = ref_tail(logp_t, ids)
    else:
        ids, teacher, tail = np.zeros((1, 2, 4), np.int32), t, np.zeros((1, 2))

    def f(x):
        if cached:
            return ref_loss(x, labels, np.ones((1, 2)), tau, 0.8, 0.2, kind, buckets=ref_topk_buckets(ids, teacher, tail, x, tau))
        return ref_loss(x, labels, np.ones((1, 2)), tau, 0.8, 0.2, kind, p=ref_teacher_probs(t, tau))

    net = _OnLogits(s, kind, tau, cached)
    args = (ms.Tensor(teacher, ms.float32), ms.Tensor(labels, ms.int32), ms.Tensor(ids), ms.Tensor(tail, ms.float32))
    np.testing.assert_allclose(float(net(*args)), f(s), rtol=1e-5)
    grad = ms.grad(net, grad_position=None, weights=net.trainable_params())(*args)[0].asnumpy()
    eps, fd = 1e-6, np.zeros_like(s)
    for i in np.ndindex(s.shape):
        up, down = s.copy(), s.copy()
        up[i] += eps
        down[i] -= eps
        fd[i] = (f(up) - f(down)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=2e-5)


# ---------------------------------------------------------------- the chunked loss on real models
def tiny(vocab, hidden=32, seed=0):
    ms.set_seed(seed)
    np.random.seed(seed)
    return CausalLM(ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def batch(vocab, b=2, s=10, seed=4):
    r = np.random.default_rng(seed)
    ids = r.integers(3, vocab, size=(b, s)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((b, 1), -100)], 1).astype(np.int32)
    labels[0, :3] = -100                                           # prompt tokens carry no loss
    weights = r.uniform(0.5, 1.5, size=(b, s)).astype(np.float32)
    return ids, labels, np.ones((b, s), np.int32), weights, np.array([1.0, 1.5], np.float32)


def as_ms(arrays):
    return [ms.Tensor(a) for a in arrays]


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "composed"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_online_loss_equals_reference(kind, fused):
    student, teacher = tiny(40, seed=0), tiny(40, hidden=48, seed=1)
    ids, labels, mask, w, rw = batch(40)
    cfg = DistillLossConfig(alpha=0.8, beta=0.2, temperature=2.0, kind=kind, jsd_beta=0.3, chunk_size=3)
    loss = DistillLoss(student, cfg, teacher=teacher, fused=fused)
    assert loss.fused == fused
    num, den = loss(*as_ms((ids, labels, mask, w, rw)))
    s_logits = student(ms.Tensor(ids)).asnumpy().astype(np.float64)
    t_logits = teacher(ms.Tensor(ids)).asnumpy().astype(np.float64)
    want = ref_loss(s_logits, labels, w, 2.0, 0.8, 0.2, kind, p=ref_teacher_probs(t_logits, 2.0), b=0.3)
    np.testing.assert_allclose(float(num), want, rtol=1e-5)
    assert float(den) == pytest.approx(2.5)


def test_chunked_loss_with_vocab_map_equals_reference():
    student, teacher = tiny(20, seed=0), tiny(40, hidden=48, seed=1)
    vocab_map = [None if j % 7 == 3 else (j * 3) % 40 for j in range(20)]
    ids, labels, mask, w, rw = batch(20)
    cfg = DistillLossConfig(temperature=1.0, chunk_size=4)
    num, _ = DistillLoss(student, cfg, teacher=teacher, vocab_map=vocab_map, unk_id=1, teacher_unk=2)(
        *as_ms((ids, labels, mask, w, rw)))
    s_logits = student(ms.Tensor(ids)).asnumpy().astype(np.float64)
    s2t = np.array([2 if t is None else t for t in vocab_map], np.int32)   # the teacher reads teacher ids
    t_logits = teacher(ms.Tensor(s2t[ids])).asnumpy().astype(np.float64)
    want = ref_loss(s_logits, labels, w, 1.0, 0.8, 0.2, "forward_kl", p=ref_teacher_probs(t_logits, 1.0, vocab_map, 1))
    np.testing.assert_allclose(float(num), want, rtol=1e-5)


def test_cached_topk_loss_equals_reference_and_full_k_equals_online():
    student, teacher = tiny(40, seed=0), tiny(40, hidden=48, seed=1)
    ids, labels, mask, w, rw = batch(40)
    t_logits = teacher(ms.Tensor(ids)).asnumpy().astype(np.float64)
    logp_t = log_softmax(t_logits / 2.0)
    s_logits = student(ms.Tensor(ids)).asnumpy().astype(np.float64)
    cfg = DistillLossConfig(temperature=2.0, chunk_size=4)
    for k in (5, 40):
        top = np.argsort(-logp_t, -1)[..., :k].astype(np.int32)
        top_logp = np.take_along_axis(logp_t, top, -1).astype(np.float32)
        tail = ref_tail(logp_t, top).astype(np.float32)
        num, _ = DistillLoss(student, cfg)(*as_ms((ids, labels, mask, w, rw, top, top_logp, tail)))
        want = ref_loss(s_logits, labels, w, 2.0, 0.8, 0.2, "forward_kl",
                        buckets=ref_topk_buckets(top, top_logp.astype(np.float64), tail, s_logits, 2.0))
        np.testing.assert_allclose(float(num), want, rtol=1e-5)
    online, _ = DistillLoss(student, cfg, teacher=teacher)(*as_ms((ids, labels, mask, w, rw)))
    np.testing.assert_allclose(float(num), float(online), rtol=1e-5)   # k = V: nothing left in the tail


@pytest.mark.parametrize("kind,source", [("forward_kl", "online"), ("reverse_kl", "online"), ("jsd", "online"),
                                         ("forward_kl", "composed"), ("reverse_kl", "composed"), ("jsd", "composed"),
                                         ("forward_kl", "mapped"), ("forward_kl", "cached"), ("reverse_kl", "cached"),
                                         ("jsd", "cached")])
def test_chunked_backward_equals_autodiff_of_the_whole_sequence(graph_mode, kind, source):
    """The hand-written chunk backward against MindSpore's autodiff of the unchunked loss (same forward math,
    itself checked against the reference above), on every parameter of a real student. "online" runs the
    fused CPU kernel, "composed" the same online teacher through ChunkedDistillHead."""
    vs = 20 if source == "mapped" else 40
    student, teacher = tiny(vs, seed=0), tiny(40, hidden=48, seed=1)
    data = batch(vs)
    kw, extra = {"teacher": teacher}, ()
    if source == "mapped":
        kw.update(vocab_map=[None if j % 7 == 3 else (j * 3) % 40 for j in range(20)], unk_id=1)
    if source == "cached":
        kw = {}
        logp_t = log_softmax(teacher(ms.Tensor(data[0])).asnumpy().astype(np.float64) / 2.0)
        top = np.argsort(-logp_t, -1)[..., :5].astype(np.int32)
        extra = (top, np.take_along_axis(logp_t, top, -1).astype(np.float32), ref_tail(logp_t, top).astype(np.float32))
    grads = []
    if source == "composed":
        kw["fused"] = False
    for chunked in (True, False):
        loss = DistillLoss(student, DistillLossConfig(temperature=2.0, kind=kind, jsd_beta=0.3, chunk_size=3),
                           chunked=chunked, **kw)
        assert loss.fused == (chunked and source == "online")
        params = student.trainable_params()

        def first(*a):
            return loss(*a)[0]
        value, g = ms.value_and_grad(first, None, params)(*as_ms(data + extra))
        grads.append((float(value), [x.asnumpy() for x in g]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        if source == "online":
            # the kernel's float32 sums run in another order than MindSpore's (as the composed chunks' do: both
            # sit about 2e-6 from the whole-sequence gradient of the 0.97-sized embedding), so it is held to
            # its per-parameter scale: 1e-5 of the largest reference value (measured worst 2.6e-6)
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
        else:
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    assert all(np.abs(g).sum() > 0 for g in grads[0][1])
    if source != "cached":
        assert all(not p.requires_grad for p in teacher.get_parameters())


def test_fused_kernel_on_odd_shapes_equals_reference_and_composed(graph_mode):
    """The fused kernel where its own blocks matter: 300 positions (a 256-row chunk and a remainder), vocab 517
    (a partial column panel), an untied student beside a tied teacher of another width, masked positions and a
    temperature; loss against the float64 reference, gradients against the composed chunks."""
    ms.set_seed(3)
    student = CausalLM(ModelConfig(vocab_size=517, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=320,
                                   tie_word_embeddings=False))
    teacher = tiny(517, hidden=40, seed=5)
    data = batch(517, s=300, seed=6)
    data[1][1, 250:] = -100
    cfg = DistillLossConfig(alpha=0.7, beta=0.3, temperature=1.5, kind="jsd", jsd_beta=0.4, chunk_size=64)
    out = []
    for fused in (True, False):
        loss = DistillLoss(student, cfg, teacher=teacher, fused=fused)
        params = student.trainable_params()

        def first(*a):
            return loss(*a)[0]
        value, g = ms.value_and_grad(first, None, params)(*as_ms(data))
        out.append((float(value), [x.asnumpy() for x in g]))
    ids, labels, _, w, _ = data
    s_logits = student(ms.Tensor(ids)).asnumpy().astype(np.float64)
    t_logits = teacher(ms.Tensor(ids)).asnumpy().astype(np.float64)
    want = ref_loss(s_logits, labels, w, 1.5, 0.7, 0.3, "jsd", p=ref_teacher_probs(t_logits, 1.5), b=0.4)
    assert out[0][0] == pytest.approx(want, rel=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    assert all(np.abs(g).sum() > 0 for g in out[0][1])


def test_fused_kernel_only_where_it_applies():
    """The kernel reads the teacher's head with the student's vocabulary size: another vocabulary (with or without a
    map) or a cached teacher takes the composed chunks, and asking for the kernel there is refused."""
    student = tiny(40, seed=0)
    assert DistillLoss(student, DistillLossConfig(), teacher=tiny(40, seed=1)).fused
    assert not DistillLoss(student, DistillLossConfig()).fused                       # cached top-k
    other = tiny(48, seed=1)
    assert not DistillLoss(student, DistillLossConfig(), teacher=other).fused
    with pytest.raises(ValueError, match="student's vocabulary"):
        DistillLoss(student, DistillLossConfig(), teacher=other, fused=True)
