# SPDX-License-Identifier: Apache-2.0
"""Every primitive and every CPU kernel, declared once.

`PRIMITIVES` are the choices `context.kernels` makes (one backend per primitive: "reference", "cpu", "ascend").
`KERNELS` are the C++ entry points of `kernels/cpu` behind the "cpu" backend: for each, the primitive that
chooses it, its output shapes and dtypes (MindSpore's `ops.Custom` infer functions), its backward kernel and
the bprop that calls it, and the dotted path of its reference version. `ms_llm.ops.backend` takes its
primitive list and which primitives Ascend fuses from here; `ms_llm.ops.kernels` builds `kernels.OPS.<name>`
from here; `tests/ops/test_kernel_table.py` checks the table against the compiled library and the C++ sources.

Adding a kernel: its C++ source (an `MS_LLM_AOT` entry point), one `Kernel` here, and the `backend == "cpu"`
branch of its function in `ms_llm/ops/core.py`, which every caller goes through.
"""
from dataclasses import dataclass
from typing import Callable, Optional

from mindspore import ops


@dataclass(frozen=True)
class Primitive:
    """One choice of `context.kernels`: what each backend runs for it."""
    name: str
    reference: str            # the composed MindSpore version
    cpu: str                  # the CPU kernels (names in KERNELS)
    ascend: Optional[str]     # MindSpore's fused Ascend op; None: Ascend runs the reference version


@dataclass(frozen=True)
class Backward:
    symbol: str
    shape: Callable
    dtype: Callable


@dataclass(frozen=True)
class Kernel:
    """One forward entry point of kernels/cpu, exposed as `kernels.OPS.<name>`."""
    name: str
    primitive: str            # the Primitive whose "cpu" backend runs it
    symbol: str               # the C++ entry point (MS_LLM_AOT)
    shape: Callable           # out_shape(*input shapes)
    dtype: Callable           # out_dtype(*input dtypes)
    reference: str            # dotted path of what computes the same on the reference backend
    backward: Optional[Backward] = None
    bprop: Optional[Callable] = None      # bprop(backward primitive) -> the forward's bprop
    in_place: bool = False    # writes its inputs (a side effect the graph must keep and order)


PRIMITIVES = (
    Primitive("linear", "MatMul", "linear, linear_frozen, head, head_frozen, linear_rows, linear_rows_frozen, "
              "linear_rows3, swiglu_rows: OpenBLAS sgemm, forward + backward; one token per row (decoding): W streamed "
              "once for every row, q/k/v and gate/up/SwiGLU fused", None),
    Primitive("attention", "scores + softmax + matmul", "attention, kv_attend: flash attention, online softmax; "
              "decoding over a KV cache written in place", "flash_attention_score"),
    Primitive("rms_norm", "composed", "rms_norm: one pass, forward + backward", "rms_norm"),
    Primitive("swiglu", "composed", "swiglu: one pass, forward + backward", "swiglu"),
    Primitive("rotary", "composed", "rope: one pass, forward + backward", "rotary_position_embedding"),
    Primitive("lm_head_loss", "logits + log_softmax + gather (distillation: ChunkedDistillHead)",
              "linear_xent, linear_distill: chunked lm_head + log-softmax / + distillation", None),
    Primitive("adamw", "composed (training/optim.py)", "adamw: one in-place pass per parameter", "AdamWeightDecay"),
)


def _same(*shapes):
    return shapes[0]


def _rows_out(x, w):
    return x[:-1] + [w[0]]


def _linear_bprop(bwd):
    def bprop(x, w, out, dout):
        return bwd(x, w, dout)
    return bprop


def _rms_norm_bprop(bwd):
    def bprop(x, w, eps, out, dout):
        dx, dw = bwd(x, w, out[1], dout[0])
        return dx, dw, ops.zeros_like(eps)
    return bprop


def _swiglu_bprop(bwd):
    def bprop(g, u, out, dout):
        return bwd(g, u, dout)
    return bprop


def _rope_bprop(bwd):
    def bprop(x, cos, sin, out, dout):
        return bwd(cos, sin, dout), ops.zeros_like(cos), ops.zeros_like(sin)
    return bprop


def _attention_bprop(bwd):
    def bprop(q, k, v, bias, scale, out, dout):
        dq, dk, dv = bwd(q, k, v, bias, scale, out[0], out[1], dout[0])
        return dq, dk, dv, ops.zeros_like(bias), ops.zeros_like(scale)
    return bprop


def _linear_xent_bprop(bwd):
    def bprop(h, w, targets, scale, out, dout):
        dh, dw = bwd(h, w, targets, scale, out[1], dout[0])
        return dh, dw, ops.zeros_like(targets), ops.zeros_like(scale)
    return bprop


def _linear_distill_bprop(bwd):
    def bprop(h, w, ht, wt, targets, prm, out, dout):
        dh, dw = bwd(h, w, ht, wt, targets, prm, out[2], dout[0], dout[1])
        return dh, dw, ops.zeros_like(ht), ops.zeros_like(wt), ops.zeros_like(targets), ops.zeros_like(prm)
    return bprop


_LINEAR_BWD = Backward("LinearBwd", lambda x, w, dy: (x, w), lambda x, w, dy: (x, x))
_LINEAR_BWD_FROZEN = Backward("LinearBwdFrozen", lambda x, w, dy: (x, w), lambda x, w, dy: (x, x))

# Frozen variants and the lm_head product have entry points of their own: GRAPH_MODE merges Custom ops that
# share a function name, and the head's logits must not depend on the vocabulary size.
KERNELS = (
    Kernel("linear", "linear", "LinearFwd", _rows_out, lambda x, w: x, "ms_llm.ops.core.linear", _LINEAR_BWD,
           _linear_bprop),
    Kernel("linear_frozen", "linear", "LinearFwdFrozen", _rows_out, lambda x, w: x, "ms_llm.ops.core.linear",
           _LINEAR_BWD_FROZEN, _linear_bprop),
    Kernel("head", "linear", "HeadFwd", _rows_out, lambda x, w: x, "ms_llm.ops.core.linear", _LINEAR_BWD,
           _linear_bprop),
    Kernel("head_frozen", "linear", "HeadFwdFrozen", _rows_out, lambda x, w: x, "ms_llm.ops.core.linear",
           _LINEAR_BWD_FROZEN, _linear_bprop),
    # one token per row (decoding): every row against W streamed once, rows bitwise batch-invariant (linear.cc)
    Kernel("linear_rows", "linear", "LinearRowsFwd", _rows_out, lambda x, w: x, "ms_llm.ops.core.linear",
           _LINEAR_BWD, _linear_bprop),
    Kernel("linear_rows_frozen", "linear", "LinearRowsFwdFrozen", _rows_out, lambda x, w: x,
           "ms_llm.ops.core.linear", _LINEAR_BWD_FROZEN, _linear_bprop),
    # a decoding step's q, k, v projections, and its gate, up and SwiGLU, in one call each (forward only)
    Kernel("linear_rows3", "linear", "LinearRows3Fwd", lambda x, a, b, c: (_rows_out(x, a), _rows_out(x, b),
                                                                          _rows_out(x, c)),
           lambda x, a, b, c: (x, x, x), "ms_llm.ops.core.linear"),
    Kernel("swiglu_rows", "linear", "SwigluRowsFwd", lambda x, g, u: _rows_out(x, g), lambda x, g, u: x,
           "ms_llm.ops.core.swiglu"),
    Kernel("rms_norm", "rms_norm", "RmsNormFwd", lambda x, w, e: (x, x[:-1]), lambda x, w, e: (x, x),
           "ms_llm.ops.core.rms_norm",
           Backward("RmsNormBwd", lambda x, w, r, dy: (x, w), lambda x, w, r, dy: (x, x)), _rms_norm_bprop),
    Kernel("swiglu", "swiglu", "SwigluFwd", _same, _same, "ms_llm.ops.core.swiglu",
           Backward("SwigluBwd", lambda g, u, dy: (g, g), lambda g, u, dy: (g, g)), _swiglu_bprop),
    Kernel("rope", "rotary", "RopeFwd", _same, _same, "ms_llm.ops.core.apply_rotary",
           Backward("RopeBwd", lambda c, s, dy: dy, lambda c, s, dy: dy), _rope_bprop),
    Kernel("attention", "attention", "FlashAttnFwd", lambda q, k, v, b, s: ([q[0], q[2], q[1] * q[3]], q[:3]),
           lambda q, k, v, b, s: (q, q), "ms_llm.ops.core.attention",
           Backward("FlashAttnBwd", lambda q, k, v, b, s, o, l, do: (q, k, v),
                    lambda q, k, v, b, s, o, l, do: (q, q, q)), _attention_bprop),
    Kernel("linear_xent", "lm_head_loss", "LinearXentFwd", lambda h, w, t, s: (t, t), lambda h, w, t, s: (h, h),
           "ms_llm.ops.core.linear_log_probs",
           Backward("LinearXentBwd", lambda h, w, t, s, l, g: (h, w), lambda h, w, t, s, l, g: (h, h)),
           _linear_xent_bprop),
    Kernel("linear_distill", "lm_head_loss", "LinearDistillFwd", lambda h, w, ht, wt, t, p: (t, t, t + [3]),
           lambda h, w, ht, wt, t, p: (h, h, h), "ms_llm.losses.distill.ChunkedDistillHead",
           Backward("LinearDistillBwd", lambda h, w, ht, wt, t, p, st, gd, gc: (h, w),
                    lambda h, w, ht, wt, t, p, st, gd, gc: (h, h)), _linear_distill_bprop),
    # AdamW in place (kernels/cpu/adamw.cc): writes param, m and v; its [1] output is unused
    Kernel("adamw", "adamw", "AdamWUpdate", lambda p, m, v, g, s: [1], lambda p, m, v, g, s: p,
           "ms_llm.training.optim._adamw_update", in_place=True),
    # decoding attention (kernels/cpu/decode.cc): writes the step's keys and values into the cache in place. Not
    # marked in_place: nothing else in a decoding graph reads the caches it writes, and the mark puts Load and
    # UpdateState nodes around every weight read after it
    Kernel("kv_attend", "attention", "KvAttend", lambda q, k, v, kc, vc, r, sl, st, s: [q[0], q[2], q[1] * q[3]],
           lambda q, k, v, kc, vc, r, sl, st, s: q, "ms_llm.ops.core.kv_attend"),
)

PRIMITIVE_NAMES = tuple(p.name for p in PRIMITIVES)
ASCEND_FUSED = tuple(p.name for p in PRIMITIVES if p.ascend)

