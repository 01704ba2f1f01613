# SPDX-License-Identifier: Apache-2.0
"""Logit distillation (Hinton et al. 2015; seed 000 §1.2.5.1.3), computed chunk by chunk over the sequence.

Per label token t (the same tokens and weights as SFT, data/sft.py):

    l_t = alpha * tau^2 * D(P_t, Q_t) + beta * CE_t

P_t is the teacher's distribution at temperature tau, Q_t the student's at tau, CE_t the student's
cross-entropy on the hard label at temperature 1. D is one of
    forward_kl  KL(P || Q)                      (Hinton; the default)
    reverse_kl  KL(Q || P)                      (mode seeking; MiniLLM, Gu et al. 2024)
    jsd         b*KL(P || M) + (1-b)*KL(Q || M), M = b*P + (1-b)*Q   (generalized JSD; GKD, Agarwal et al. 2024)
The stage returns (sum_t w_t l_t, sum of row weights), so normalization is SFT's per-turn normalization.

Where P comes from:
  * online: the teacher runs inside the step (frozen, no gradient); with `vocab_map` the teacher's probability
    of each student token is read at the teacher id of the same string, and the mass of teacher tokens the
    student lacks goes to the student's unknown token (seed 000 §1.2.5.1.1).
  * cached top-k: `topk_ids` [B, S, k] (student ids, unique per position; padding has log-prob -inf),
    `topk_logp` [B, S, k] the teacher's log-probs at tau and `tail_logp` [B, S] the log of the teacher's mass
    outside its top-k. The divergence is then taken over k+1 buckets: the k tokens and one tail bucket holding
    the rest of each distribution (teacher: the cached tail; student: 1 - its probability of those tokens). That is exactly the divergence between the two
    distributions coarsened to those buckets, so no mass is dropped or renormalized away.

Memory: the student's final hidden states go through lm_head one chunk of `chunk_size` positions at a time,
with a hand-written backward that recomputes the chunk (ChunkedDistillHead), so neither the student's nor
the teacher's fp32 [B, S, V] logits, probabilities or their gradients exist whole
(bench: `ms-llm bench distill-memory`). Letting autodiff see the chunks does not do this on MindSpore's CPU
runtime: with or without `Cell.recompute()` the chunked graph measured more memory than the whole-sequence one.
"""
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ms_llm.ops import graph as G
from ms_llm.ops import linear_distill

TINY = 1e-30
KINDS = ("forward_kl", "reverse_kl", "jsd")
_zeros_like, _gather, _matmul, _matmul_tn = G.zeros_like, G.gather, G.matmul, G.matmul_tn
_scatter_add, _maximum, _wide, _matmul_nt = G.scatter_add, G.maximum, G.wide, G.matmul_nt


@dataclass
class DistillLossConfig:
    alpha: float = 0.8
    beta: float = 0.2
    temperature: float = 1.0
    kind: str = "forward_kl"
    jsd_beta: float = 0.5
    chunk_size: int = 128


def _safe_log(x):
    return ops.log(_maximum(x, TINY))


def divergence(p, logp, q, logq, kind: str, jsd_beta: float = 0.5):
    """Per-row divergence over the last axis between distributions p (teacher) and q (student).

    p, q: probabilities (zeros allowed: those entries contribute nothing); logp, logq: their logs, which must
    be finite where the probability is 0 (callers clamp; 0 x finite = 0). Written without ops.where: on
    MindSpore's CPU runtime a Select inside the chunk loop kept one [B, c, V] buffer per chunk alive.
    Returns [...] float32. (Scaling by 1/tau is written as a multiplication everywhere in this module: a
    tensor divided by a Python float kept a [B, c, V] buffer per chunk alive on the CPU runtime.)
    """
    if kind == "forward_kl":
        out = (p * (logp - logq)).sum(-1)
    elif kind == "reverse_kl":
        out = (q * (logq - logp)).sum(-1)
    else:
        logm = _safe_log(jsd_beta * p + (1.0 - jsd_beta) * q)
        out = jsd_beta * (p * (logp - logm)).sum(-1) + (1.0 - jsd_beta) * (q * (logq - logm)).sum(-1)
    return out


def teacher_dense(t_logits, temperature: float):
    """The teacher's distribution at `temperature` when the vocabularies are identical: (p, logp) [..., V]."""
    logp = ops.log_softmax(t_logits.astype(ms.float32) * (1.0 / temperature), -1)
    return ops.exp(logp), logp


def teacher_mapped(t_logits, temperature: float, map_index, map_valid, unk_onehot):
    """The teacher's distribution moved onto the student vocabulary: (p, logp) [..., Vs].

    `map_index` [Vs] holds the teacher id of each student token (any id where `map_valid` [Vs] is 0); the
    mass left over (tokens the student lacks) goes to the student's unknown token, `unk_onehot` [Vs].
    """
    p = _gather(ops.exp(ops.log_softmax(t_logits.astype(ms.float32) * (1.0 / temperature), -1)), map_index, -1)
    p = p * _wide(map_valid, p)
    p = p + _wide(_maximum(1.0 - p.sum(-1, keepdims=True), 0.0), p) * _wide(unk_onehot, p)
    return p, _safe_log(p)


def topk_buckets(topk_ids, topk_logp, tail_logp, s_logq):
    """k+1 buckets from the cached teacher top-k and the student's log-probs s_logq [..., Vs].

    topk_ids [..., k] int32 (unique per row; padding slots have log-prob -inf), topk_logp [..., k], tail_logp
    [...] the teacher's log-mass outside the top-k, computed when the cache was written (not 1 - sum, which
    rounding makes noisy exactly when the tail is small). Returns (p, logp, q, logq) [..., k+1], tail last.
    """
    neg = -1e30
    valid = (topk_logp > neg).astype(ms.float32)
    p_k = ops.exp(topk_logp) * valid
    logq_k = ops.gather_elements(s_logq, -1, topk_ids)
    q_k = ops.exp(logq_k) * valid
    tail = tail_logp.expand_dims(-1)
    p_tail = ops.exp(tail) * (tail > neg).astype(ms.float32)
    q_tail = _maximum(1.0 - q_k.sum(-1, keepdims=True), 0.0)
    p = ops.concat((p_k, p_tail), -1)
    q = ops.concat((q_k, q_tail), -1)
    logp = ops.concat((_maximum(topk_logp, neg), _maximum(tail, neg)), -1)
    logq = ops.concat((logq_k, _safe_log(q_tail)), -1)
    return p, logp, q, logq


def freeze_teacher(teacher):
    """Eval mode, no gradients, and parameter names under `teacher.` so they cannot collide with the student's."""
    teacher.set_train(False)
    for p in teacher.get_parameters():
        p.requires_grad = False
        if not p.name.startswith("teacher."):
            p.name = "teacher." + p.name


def lm_head_weight(model):
    """The [V, H] matrix of a model's output projection (the embedding when tied)."""
    return model.model.embed_tokens.weight if model.tied else model.lm_head.weight


class ChunkedDistillHead(nn.Cell):
    """sum_t w_t l_t from hidden states and the lm_head matrices, one chunk of positions at a time.

    The backward pass is written out (custom bprop) and recomputes each chunk's logits, so what lives between
    forward and backward is the hidden states, never [B, S, V]; chunks run strictly one after another
    (ops.depend), so only one chunk's [B, c, V] tensors exist at a time. With D's gradient w.r.t. the bucket
    probabilities g and h = q * g (per bucket; tail bucket t), the gradient w.r.t. the student's logits u/tau is

        dD/du_j = [j in K] h_j - q_j sum_b h_b + [j not in K] q_j h_t / q_t

    (dense case: K = everything, no tail). h is -p (forward KL), q (log q - log p + 1) (reverse KL) and
    (1 - b) q (log q - log m) (JSD). The tests check it against finite differences of a NumPy reference.
    """

    def __init__(self, cfg: DistillLossConfig, cached: bool, vocab_map=None, unk_id: int = 0):
        super().__init__(auto_prefix=False)
        self.cfg, self.cached, self.chunk_size = cfg, cached, max(1, cfg.chunk_size)
        self.has_map = vocab_map is not None
        if self.has_map:
            self.map_index = ms.Tensor(np.asarray([t if t is not None else 0 for t in vocab_map], np.int32))
            self.map_valid = ms.Tensor(np.asarray([t is not None for t in vocab_map], np.float32))
            onehot = np.zeros(len(vocab_map), np.float32)
            onehot[unk_id] = 1.0
            self.unk_onehot = ms.Tensor(onehot)

    # ---- one chunk -----------------------------------------------------------------------------------
    def _teacher(self, t_in, w_t, topk_ids, tail_logp, s_logq):
        """(p, logp, q, logq) over buckets (cached) or over the student vocabulary (online)."""
        if self.cached:
            return topk_buckets(topk_ids, t_in, tail_logp, s_logq)
        b, c, _ = t_in.shape
        t_logits = _matmul_nt(t_in.reshape(b * c, -1), w_t).reshape(b, c, -1)
        if self.has_map:
            p, logp = teacher_mapped(t_logits, self.cfg.temperature, self.map_index, self.map_valid, self.unk_onehot)
        else:
            p, logp = teacher_dense(t_logits, self.cfg.temperature)
        return p, logp, ops.exp(s_logq), s_logq

    def _common(self, h, w, t_in, w_t, labels, weights, topk_ids, tail_logp):
        b, c, _ = h.shape
        z = _matmul_nt(h.reshape(b * c, -1), w).reshape(b, c, -1)
        valid = labels >= 0
        wv = weights * valid.astype(ms.float32)
        safe = labels * valid.astype(labels.dtype)
        logq1 = ops.log_softmax(z, -1)
        tau = self.cfg.temperature
        s_logq = logq1 if tau == 1.0 else ops.log_softmax(z * (1.0 / tau), -1)
        p, logp, q, logq = self._teacher(t_in, w_t, topk_ids, tail_logp, s_logq)
        return z, wv, safe, logq1, s_logq, p, logp, q, logq

    def _chunk_loss(self, h, w, t_in, w_t, labels, weights, topk_ids, tail_logp):
        cfg, tau = self.cfg, self.cfg.temperature
        _, wv, safe, logq1, _, p, logp, q, logq = self._common(h, w, t_in, w_t, labels, weights, topk_ids, tail_logp)
        ce = -ops.gather_elements(logq1, -1, safe.expand_dims(-1)).squeeze(-1)
        d = divergence(p, logp, q, logq, cfg.kind, cfg.jsd_beta)
        return ((cfg.alpha * tau * tau * d + cfg.beta * ce) * wv).sum()

    def _chunk_grad(self, h, w, t_in, w_t, labels, weights, topk_ids, tail_logp, dout):
        """dout x d(chunk loss)/d(student logits) [B, c, V].

        No implicit broadcasting against [B, c, V] here (see _wide)."""
        cfg, tau = self.cfg, self.cfg.temperature
        z, wv, safe, logq1, s_logq, p, logp, q, logq = self._common(h, w, t_in, w_t, labels, weights, topk_ids,
                                                                     tail_logp)
        # h_b = q_b * dD/dq_b per bucket
        if cfg.kind == "forward_kl":
            hb = p * -1.0
        elif cfg.kind == "reverse_kl":
            hb = q * (logq - logp + 1.0)
        else:
            logm = _safe_log(cfg.jsd_beta * p + (1.0 - cfg.jsd_beta) * q)
            hb = q * (logq - logm) * (1.0 - cfg.jsd_beta)
        total_h = hb.sum(-1, keepdims=True)
        s_q = ops.exp(s_logq) if self.cached else q         # online: q is already exp(s_logq) over the vocabulary
        if self.cached:
            k = topk_ids.shape[-1]
            slot_valid = (t_in > -1e30).astype(ms.float32)
            in_k = _scatter_add(s_q * 0.0, topk_ids, slot_valid)
            h_vocab = _scatter_add(s_q * 0.0, topk_ids, hb[..., :k] * slot_valid)
            h_t, q_t = hb[..., k:], q[..., k:]
            du = h_vocab - s_q * _wide(total_h, s_q) + (s_q - s_q * in_k) * _wide(h_t / _maximum(q_t, TINY), s_q)
        else:
            du = hb - s_q * _wide(total_h, s_q)
        scale = _wide(wv.expand_dims(-1) * dout, s_q)
        ce_grad = _scatter_add(ops.exp(logq1), safe.expand_dims(-1), ops.ones(safe.shape + (1,), ms.float32) * -1.0)
        return (du * (cfg.alpha * tau) + ce_grad * cfg.beta) * scale

    # ---- forward and its hand-written backward -------------------------------------------------------
    def construct(self, hidden, w, t_in, w_t, labels, weights, topk_ids, tail_logp):
        total = ops.zeros((), ms.float32)
        s, c = hidden.shape[1], self.chunk_size
        for a in range(0, s, c):
            e = a + c if a + c < s else s
            h = ops.depend(hidden[:, a:e], total)                    # one chunk at a time: every input
            t = ops.depend(t_in[:, a:e], total)                      # of chunk i waits for chunk i-1
            total = total + self._chunk_loss(h, w, t, w_t, labels[:, a:e], weights[:, a:e],
                                             topk_ids[:, a:e], tail_logp[:, a:e])
        return total

    def bprop(self, hidden, w, t_in, w_t, labels, weights, topk_ids, tail_logp, out, dout):
        dw = _zeros_like(w).astype(ms.float32)
        dh = ()
        s, c = hidden.shape[1], self.chunk_size
        for a in range(0, s, c):
            e = a + c if a + c < s else s
            h = ops.depend(hidden[:, a:e], dw)
            t = ops.depend(t_in[:, a:e], dw)
            dz = self._chunk_grad(h, w, t, w_t, labels[:, a:e], weights[:, a:e], topk_ids[:, a:e],
                                  tail_logp[:, a:e], dout)
            rows = dz.shape[0] * dz.shape[1]
            flat = dz.reshape(rows, dz.shape[2])
            dh = dh + (_matmul(flat, w.astype(ms.float32)).reshape(h.shape).astype(hidden.dtype),)
            dw = dw + _matmul_tn(flat, h.reshape(rows, -1).astype(ms.float32))
        return (ops.concat(dh, 1), dw.astype(w.dtype), _zeros_like(t_in), _zeros_like(w_t), _zeros_like(labels),
                _zeros_like(weights), _zeros_like(topk_ids), _zeros_like(tail_logp))


class DistillLoss(nn.Cell):
    """(sum_t w_t l_t, sum of row weights) for a batch; see the module docstring.

    Call with the SFT batch (input_ids, labels, attention_mask, weights, row_weight) and, in cached mode,
    (topk_ids, topk_logp, tail_logp). `chunked=False` is the naive version: whole-sequence logits through
    automatic differentiation (the reference the memory benchmark compares against). `fused` (default: when
    possible) computes an online teacher with the student's vocabulary on the CPU kernel LinearDistill
    (kernels/cpu/distill.cc: both lm_head products, the divergence, the cross-entropy and their backward
    in C++, chunk by chunk); False keeps ChunkedDistillHead, which also serves cached top-k and vocab maps.
    """

    def __init__(self, student, cfg: DistillLossConfig, teacher=None, vocab_map=None, unk_id: int = 0,
                 chunked: bool = True, teacher_unk: int = 0, fused=None):
        super().__init__(auto_prefix=False)
        if cfg.kind not in KINDS:
            raise ValueError(f"distill loss kind must be one of {KINDS}, got {cfg.kind!r}")
        self.student, self.cfg, self.chunked = student, cfg, chunked
        self.cached = teacher is None
        can_fuse = (chunked and teacher is not None and vocab_map is None
                    and getattr(student, "loss_backend", "reference") == "cpu"
                    and (student.tied or student.lm_head.plain) and teacher.compute_dtype == ms.float32
                    and lm_head_weight(teacher).shape[0] == lm_head_weight(student).shape[0])
        if fused and not can_fuse:
            raise ValueError("the fused distillation kernel needs an online teacher with the student's vocabulary "
                             "and a float32 student on the cpu kernels")
        self.fused = can_fuse if fused is None else bool(fused)
        if self.fused:
            self.kernel_args = ms.Tensor(np.asarray([cfg.temperature, KINDS.index(cfg.kind), cfg.jsd_beta],
                                                    np.float32))
        if teacher is not None:
            freeze_teacher(teacher)
        self.teacher = teacher
        self.head = ChunkedDistillHead(cfg, self.cached, vocab_map, unk_id)
        self.remap = vocab_map is not None and teacher is not None
        if self.remap:          # the teacher reads the student's tokenization, as teacher ids of the same strings
            self.s2t = ms.Tensor(np.asarray([t if t is not None else teacher_unk for t in vocab_map], np.int32))
        self.dummy = ms.Tensor(np.zeros((1, 1), np.float32))
        self.dummy_ids = ms.Tensor(np.zeros((1, 1, 1), np.int32))

    def construct(self, input_ids, labels, attention_mask, weights, row_weight, topk_ids=None, topk_logp=None,
                  tail_logp=None):
        hidden = self.student.readout_input(self.student.hidden_states(input_ids, attention_mask))
        w = self.student.head_weight(hidden)          # a ZeRO-3 shard gathered whole, after the hidden states
        if self.cached:
            t_in, w_t = topk_logp, self.dummy
        else:
            t_ids = _gather(self.s2t, input_ids, 0) if self.remap else input_ids
            t_in = ops.stop_gradient(self.teacher.readout_input(self.teacher.hidden_states(t_ids, attention_mask)))
            w_t = ops.stop_gradient(lm_head_weight(self.teacher))
            topk_ids = ops.zeros(input_ids.shape + (1,), ms.int32)
            tail_logp = ops.zeros(input_ids.shape, ms.float32)
        if self.fused:
            div, ce, _ = linear_distill(hidden, w, t_in, w_t, labels, self.kernel_args)
            wv = weights * (labels >= 0).astype(ms.float32)
            tau = self.cfg.temperature
            loss = ((self.cfg.alpha * tau * tau * div + self.cfg.beta * ce) * wv).sum()
        elif self.chunked:
            loss = self.head(hidden, w, t_in, w_t, labels, weights, topk_ids, tail_logp)
        else:
            loss = self.head._chunk_loss(hidden, w, t_in, w_t, labels, weights, topk_ids, tail_logp)
        return loss, row_weight.sum()
