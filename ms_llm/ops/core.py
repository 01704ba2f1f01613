# SPDX-License-Identifier: Apache-2.0
"""The decoder's primitives: reference MindSpore versions, with dispatch to the CPU kernels and Ascend fused ops.

Precision policy: inputs may arrive in a low-precision compute dtype, but normalization, softmax and rotary
math always run in float32 and the loss is float32. Every function here is graph-mode safe: `backend` is a
Python string ("reference" | "cpu" | "ascend", from ms_llm/ops/backend.py) fixed when the calling cell is
built, so GRAPH_MODE folds the branch away.
"""
import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ms_llm.ops import kernels as K

_NEG = float(np.finfo(np.float32).min)


def linear(x, weight, compute_dtype=ms.float32, backend: str = "reference", frozen: bool = False,
           head: bool = False):
    """x [..., K] times weight [N, K] transposed -> [..., N] in compute_dtype.

    x [B, S, K] holds B sequences; on the CPU kernel each sequence's rows are computed on their own, so a row
    is bitwise the same whatever else is in the batch (a batch equals its accumulated micro-batches). A 2-D x
    holds independent rows. x [B, 1, K] (one token per row: decoding) takes a kernel that streams W once for
    every row, each row still computed on its own (kernels/cpu/linear.cc, LinearRowsFwd). frozen: the weight takes no gradient (LoRA's base layers): the CPU kernel's
    backward skips the dW product. head: the lm_head product (its own kernel entry; its logits are bitwise
    independent of the vocabulary size, as MindSpore's MatMul's are).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    if backend == "cpu" and len(lead) == 2 and lead[1] == 1:
        # one token per row (a decoding step): W streams once for all rows, each row still batch-invariant
        rows = x.astype(ms.float32)
        return K.OPS.linear_rows_frozen(rows, weight) if frozen else K.OPS.linear_rows(rows, weight)
    if backend == "cpu":
        rows = x.reshape(-1, 1, k) if len(lead) == 1 else x.reshape(-1, lead[-1], k)
        rows = rows.astype(ms.float32)
        if head:
            y = K.OPS.head_frozen(rows, weight) if frozen else K.OPS.head(rows, weight)
        else:
            y = K.OPS.linear_frozen(rows, weight) if frozen else K.OPS.linear(rows, weight)
        return y.reshape(lead + (weight.shape[0],))
    y = _mm_nt(x.reshape(-1, k).astype(compute_dtype), weight.astype(compute_dtype))
    return y.reshape(lead + (weight.shape[0],))


def linear_rows3(x, w1, w2, w3):
    """(x W1^T, x W2^T, x W3^T) for x [B, 1, K] in one CPU kernel call (a decoding step's q, k, v; forward only),
    bitwise what three `linear` calls give on the CPU backend."""
    return K.OPS.linear_rows3(x.astype(ms.float32), w1, w2, w3)


def swiglu_rows(x, w_gate, w_up):
    """silu(x Wg^T) * (x Wu^T) for x [B, 1, K] in one CPU kernel call (a decoding step's MLP; forward only),
    bitwise what `linear` twice and `swiglu` give on the CPU backend."""
    return K.OPS.swiglu_rows(x.astype(ms.float32), w_gate, w_up)


def rms_norm(x, weight, eps: float, backend: str = "reference"):
    """RMSNorm over the last axis, computed in float32.

    Args:
        x: [..., H] any float dtype.
        weight: [H] float32.
    Returns:
        [..., H] float32.
    """
    x = x.astype(ms.float32)
    if backend == "cpu":
        return K.OPS.rms_norm(x, weight, K.scalar(eps))[0]
    if backend == "ascend":
        return ops.rms_norm(x, weight, eps)[0]
    var = ops.mean(ops.square(x), -1, keep_dims=True)
    return x * ops.broadcast_to(ops.rsqrt(var + eps), x.shape) * ops.broadcast_to(weight, x.shape)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict = None, seq_len: int = 0,
                  max_position: int = 0) -> np.ndarray:
    """Inverse frequencies in float32 (numpy), with optional linear / dynamic-NTK / llama3 scaling.

    `seq_len` is only used by dynamic NTK: the base grows once the sequence exceeds `max_position`.
    """
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    factor = float((scaling or {}).get("factor", 1.0))
    base = float(theta)
    if kind == "dynamic" and seq_len > max_position:
        base = base * ((factor * seq_len / max_position) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    if kind == "linear":
        inv = inv / factor
    elif kind == "llama3":
        inv = _llama3_scale(inv, scaling)
    return inv.astype(np.float32)


def _llama3_scale(inv: np.ndarray, s: dict) -> np.ndarray:
    """Llama-3.1 frequency scaling: long wavelengths divided by `factor`, short kept, smooth in between."""
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(is_mid, mid, scaled).astype(np.float32)


def rope_cos_sin(position_ids, inv_freq, attention_scaling: float = 1.0):
    """cos/sin tables for the given positions.

    Args:
        position_ids: [B, S] int.
        inv_freq: [D/2] float32 Tensor.
    Returns:
        (cos, sin), each [B, 1, S, D] float32 (duplicated halves, rotate-half layout).
    """
    freqs = position_ids.astype(ms.float32).expand_dims(-1) * inv_freq.reshape(1, 1, -1)
    emb = ops.stop_gradient(ops.concat((freqs, freqs), -1))
    return (ops.cos(emb) * attention_scaling).expand_dims(1), (ops.sin(emb) * attention_scaling).expand_dims(1)


def apply_rotary(x, cos, sin, backend: str = "reference"):
    """Rotary position embedding in the rotate-half layout used by Hugging Face Llama/Qwen.

    Args:
        x: [B, N, S, D]; cos, sin: [B, 1, S, D] float32.
    Returns:
        [B, N, S, D] float32.
    """
    x = x.astype(ms.float32)
    if backend == "cpu":
        return K.OPS.rope(x, cos, sin)
    # Ascend's fused op refuses BNSD when B*N > 8*S: the one-token decode step takes the reference path
    if backend == "ascend" and x.shape[0] * x.shape[1] <= 8 * x.shape[2]:
        return ops.rotary_position_embedding(x, cos, sin, 0)
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    return x * ops.broadcast_to(cos, x.shape) + rotated * ops.broadcast_to(sin, x.shape)


def swiglu(gate, up, backend: str = "reference"):
    """silu(gate) * up, elementwise; float32 internally, returned in the input dtype."""
    dtype = gate.dtype
    if backend == "cpu":
        return K.OPS.swiglu(gate.astype(ms.float32), up.astype(ms.float32)).astype(dtype)
    if backend == "ascend":
        return ops.swiglu(ops.concat((gate, up), -1), -1)
    g = gate.astype(ms.float32)
    return (g * ops.sigmoid(g) * up.astype(ms.float32)).astype(dtype)


def causal_mask(q_pos, k_pos, key_valid=None, q_seg=None, k_seg=None):
    """Boolean 'may attend' mask [B, 1, Sq, Sk].

    Args:
        q_pos: [B, Sq] int, absolute slot of each query.  k_pos: [B, Sk] int, slot of each key.
        key_valid: [B, Sk] bool/int, False for padding keys (optional).
        q_seg, k_seg: [B, Sq] / [B, Sk] document ids; attention only within a document (optional).
    """
    allowed = k_pos.expand_dims(1) <= q_pos.expand_dims(2)
    if key_valid is not None:
        allowed = ops.logical_and(allowed, key_valid.astype(ms.bool_).expand_dims(1))
    if q_seg is not None:
        allowed = ops.logical_and(allowed, q_seg.expand_dims(2) == k_seg.expand_dims(1))
    return allowed.expand_dims(1)


def mask_bias(mask):
    """Boolean 'may attend' mask -> additive float32 bias (0 where allowed, float32 min elsewhere).

    Built once per forward and shared by every layer: adding it is cheaper than a select in both the
    forward and the backward pass.
    """
    bias = ops.select(mask, ops.zeros(mask.shape, ms.float32), ops.fill(ms.float32, mask.shape, _NEG))
    return ops.stop_gradient(bias)     # else autodiff reduces a [B, N, S, S] gradient for it in every layer


class RowSoftmax(nn.Cell):
    """Softmax over the last axis with a hand-written backward.

    dx = y * (dy - sum(dy * y)); the row sum is done as a matmul with a ones vector, because MindSpore's
    CPU ReduceSum over [B, N, S, S] took ~35 ms per layer at S=512 (twice the whole rest of the backward).
    """

    def construct(self, x):
        return ops.softmax(x, -1)

    def bprop(self, x, out, dout):
        n = x.shape[-1]
        row = ops.matmul((dout * out).reshape(-1, n), ops.ones((n, 1), out.dtype))
        return (out * (dout - ops.broadcast_to(row.reshape(x.shape[:-1] + (1,)), x.shape)),)


_row_softmax = RowSoftmax()
_bmm_nt = ops.BatchMatMul(transpose_b=True)
_mm_nt = ops.MatMul(transpose_b=True)


def attention(q, k, v, bias, scale: float, compute_dtype=ms.float32, backend: str = "reference"):
    """Grouped-query scaled dot-product attention; softmax in float32.

    Args:
        q: [B, N, Sq, D]; k, v: [B, Nkv, Sk, D] (N a multiple of Nkv).
        bias: [B, 1, Sq, Sk] float32 from `mask_bias` (0 where attention is allowed).
    Returns:
        [B, Sq, N*D] in compute_dtype.
    """
    b, n, sq, d = q.shape
    nkv = k.shape[1]
    if backend == "cpu":
        out = K.OPS.attention(q.astype(ms.float32), k.astype(ms.float32), v.astype(ms.float32), bias,
                              K.scalar(scale))[0]
        return out.astype(compute_dtype)
    if backend == "ascend":
        # the fused op takes float16/bfloat16 only: a float32 model (teacher, eval) computes it in bfloat16
        half = compute_dtype if compute_dtype in (ms.float16, ms.bfloat16) else ms.bfloat16
        out = ops.flash_attention_score(q.astype(half), k.astype(half), v.astype(half),
                                        n, attn_mask=(bias < 0).astype(ms.uint8),
                                        scalar_value=scale, input_layout="BNSD")
        return out.transpose(0, 2, 1, 3).reshape(b, sq, n * d).astype(compute_dtype)
    if nkv != n:
        rep = n // nkv
        k = ops.broadcast_to(k.expand_dims(2), (b, nkv, rep, k.shape[2], d)).reshape(b, n, k.shape[2], d)
        v = ops.broadcast_to(v.expand_dims(2), (b, nkv, rep, v.shape[2], d)).reshape(b, n, v.shape[2], d)
    scores = _bmm_nt((q * scale).astype(compute_dtype), k.astype(compute_dtype))
    scores = scores.astype(ms.float32) + ops.broadcast_to(bias, scores.shape)
    probs = _row_softmax(scores).astype(compute_dtype)
    out = ops.matmul(probs, v.astype(compute_dtype))
    return out.transpose(0, 2, 1, 3).reshape(b, sq, n * d)


def kv_attend(q, k, v, cache_k, cache_v, rows, slots, starts, scale: float, compute_dtype=ms.float32,
              backend: str = "reference"):
    """One decoding step's attention over a KV cache: the step's keys and values go into their cache slots, then
    each query attends to its row's filled slots.

    Args:
        q: [B, N, T, D]; k, v: [B, Nkv, T, D] (this step's T tokens per row, rotary applied).
        cache_k, cache_v: [Bc, Nkv, C, D] in the compute dtype; query row b uses cache row rows[b].
        rows: [B] int32; slots: [B, T] int32, the slot each token is written to (and where its query sits);
        starts: [B] int32, a row's first filled slot: query t sees the slots starts[b] .. slots[b, t].
    Returns:
        (out [B, T, N*D] in compute_dtype, new cache_k, new cache_v). The CPU kernel writes the caches in place
        and reads only the filled slots (kernels/cpu/decode.cc): it returns (out, None, None). The other
        backends return whole new caches and attend over every slot, masked.
    """
    if backend == "cpu":
        out = K.OPS.kv_attend(q.astype(ms.float32), k.astype(ms.float32), v.astype(ms.float32), cache_k, cache_v,
                              rows, slots, starts, K.scalar(scale))
        return out.astype(compute_dtype), None, None
    cap = cache_k.shape[2]
    b = slots.shape[0]
    all_slots = ops.broadcast_to(ops.arange(cap, dtype=ms.int32).reshape(1, cap, 1), (b, cap, 1))
    place = (all_slots == slots.expand_dims(1)).astype(ms.float32)                  # [B, C, T] one-hot
    keep = (1.0 - place.sum(-1)).reshape(b, 1, cap, 1)
    index = rows.reshape(b, 1)

    def write(cache, new):
        mine = ops.gather(cache, rows, 0).astype(ms.float32)                           # [B, Nkv, C, D]
        mine = mine * keep + ops.matmul(place.expand_dims(1), new.astype(ms.float32))
        mine = mine.astype(cache.dtype)
        return mine, ops.tensor_scatter_update(cache, index, mine)

    mine_k, cache_k = write(cache_k, k)
    mine_v, cache_v = write(cache_v, v)
    key = all_slots.reshape(b, 1, cap)
    visible = ops.logical_and(key >= starts.reshape(b, 1, 1), key <= slots.expand_dims(2))     # [B, T, C]
    out = attention(q, mine_k, mine_v, mask_bias(visible.expand_dims(1)), scale, compute_dtype, backend)
    return out, cache_k, cache_v


def token_log_probs(logits, targets):
    """log p(target) per position, float32.

    Args:
        logits: [B, S, V]; targets: [B, S] int (any value where unused; clamp to a valid id first).
    Returns:
        [B, S] float32.
    """
    # log_softmax has a one-kernel backward; logsumexp's backward on CPU was 11x slower at [2048, 8192]
    logp = ops.log_softmax(logits.astype(ms.float32), -1)
    return ops.gather_elements(logp, -1, targets.astype(ms.int32).expand_dims(-1)).squeeze(-1)


def linear_log_probs(hidden, weight, targets, compute_dtype=ms.float32, backend: str = "reference",
                     scale: float = 1.0):
    """log p(target) under logits = scale * hidden @ weight^T, float32 [B, S].

    On the cpu backend the lm_head product and the log-softmax are fused and chunked: the [B, S, V] logits never
    exist (forward or backward). hidden: [B, S, H]; weight: [V, H]; targets: [B, S] int in [0, V).
    """
    if backend == "cpu":
        return K.OPS.linear_xent(hidden.astype(ms.float32), weight, targets.astype(ms.int32), K.scalar(scale))[0]
    logits = linear(hidden, weight, compute_dtype).astype(ms.float32)
    if scale != 1.0:
        logits = logits * scale
    return token_log_probs(logits, targets)


def linear_distill(hidden, weight, t_hidden, t_weight, labels, params):
    """The fused lm_head + distillation kernel (cpu backend only; `DistillLoss` keeps `ChunkedDistillHead` as its
    reference): both models' lm_head products, the divergence at temperature and the cross-entropy, a chunk of
    rows at a time, so neither [B, S, V] logits tensor exists.

    hidden [B, S, H] and weight [V, H] (student), t_hidden [B, S, Ht] and t_weight [V, Ht] (teacher, no
    gradient), labels [B, S] int (< 0: not counted), params [3] float32 (temperature, divergence kind index,
    JSD beta). Returns (divergence [B, S], cross-entropy [B, S], the log-normalizers the backward reads [B, S, 3]).
    """
    return K.OPS.linear_distill(hidden.astype(ms.float32), weight, t_hidden.astype(ms.float32), t_weight,
                                labels.astype(ms.int32), params)


def adamw_in_place(param, m, v, grad, scalars):
    """One AdamW step of a float32 parameter on the CPU kernel, param, m and v written in place (the composed
    reference is `ms_llm.training.optim._adamw_update`). scalars [8]: lr, beta1, beta2, eps, the two bias
    corrections, weight decay, gradient scale."""
    return K.OPS.adamw(param, m, v, grad.astype(ms.float32), scalars)


_adam_weight_decay = ops.AdamWeightDecay()


def adamw_fused_op(param, m, v, grad, lr, beta1, beta2, eps, bc1, bc2, wd):
    """One AdamW step (bias-corrected, decoupled decay: `ms_llm.training.optim._adamw_update`) through MindSpore's
    fused `AdamWeightDecay`, param, m and v written in place. That op has no bias correction and decays by
    lr x decay, so the step's corrections go into its inputs: lr' = lr sqrt(bc2) / bc1, eps' = eps sqrt(bc2) and
    decay' = wd bc1 / sqrt(bc2) give lr' m / (sqrt(v) + eps') = lr m̂ / (sqrt(v̂) + eps) and lr' decay' = lr wd,
    the same update up to float32 rounding. grad: already scaled, float32."""
    root = ops.sqrt(bc2)
    return _adam_weight_decay(param, m, v, lr * root / bc1, beta1, beta2, eps * root, wd * bc1 / root, grad)


def cross_entropy(logits, labels, ignore_index: int = -100):
    """Mean next-token cross-entropy over positions whose label is not `ignore_index`.

    Args:
        logits: [B, S, V] (already aligned with labels; no shift here).
        labels: [B, S] int.
    Returns:
        (loss scalar float32, number of counted tokens float32).
    """
    valid = labels != ignore_index
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    nll = -token_log_probs(logits, safe) * valid.astype(ms.float32)
    count = valid.astype(ms.float32).sum()
    return nll.sum() / ops.maximum(count, 1.0), count
