# SPDX-License-Identifier: Apache-2.0
"""AdamW (with bias correction, as in Loshchilov & Hutter 2019 / torch.optim.AdamW) and LR schedules.

The optimizer is a GRAPH_MODE cell whose state (m, v, step) is ordinary Parameters, so checkpoints hold it
exactly. The learning rate is an input of every call, computed by the trainer from `lr_at(step)`, a pure
function of the step: resuming at step N gives the same lr as never stopping. (It is not a Parameter on
purpose: `Parameter.set_data` between GRAPH_MODE calls did not reach the compiled graph in MindSpore 2.7,
so a Parameter lr silently stayed at its first value.)
"""
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ms_llm.ops import backend as B
from ms_llm.ops import adamw_fused_op, adamw_in_place
from ms_llm.training.collective import ordered_all_reduce
from ms_llm.models.shards import shape_of

_adamw = ops.MultitypeFuncGraph("adamw")


@_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                 "Tensor", "Tensor", "Tensor")
def _adamw_update(beta1, beta2, eps, bc1, bc2, gscale, lr, wd, param, m, v, grad):
    g = grad.astype(ms.float32) * gscale
    m_new = beta1 * m + (1.0 - beta1) * g
    v_new = beta2 * v + (1.0 - beta2) * ops.square(g)
    update = (m_new / bc1) / (ops.sqrt(v_new / bc2) + eps) + wd * param
    ops.assign(m, m_new)
    ops.assign(v, v_new)
    return ops.assign(param, param - lr * update)


@_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                 "Tensor", "Tensor", "Tensor", "Bool")
def _adamw_delta(beta1, beta2, eps, bc1, bc2, gscale, lr, wd, param, m, v, grad, owned):
    """Sharded form: the owner returns lr x update (and updates its moments); other ranks return zeros."""
    if not owned:
        return ops.zeros_like(param)
    g = grad.astype(ms.float32) * gscale
    m_new = beta1 * m + (1.0 - beta1) * g
    v_new = beta2 * v + (1.0 - beta2) * ops.square(g)
    update = (m_new / bc1) / (ops.sqrt(v_new / bc2) + eps) + wd * param
    delta = ops.depend(lr * update, ops.assign(m, m_new))
    return ops.depend(delta, ops.assign(v, v_new))


_adamw_fused = ops.MultitypeFuncGraph("adamw_fused")


@_adamw_fused.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor", "Tensor", "Tensor")
def _adamw_kernel(beta1, beta2, eps, bc1, bc2, gscale, lr, wd, param, m, v, grad):
    """The same update in one pass on the CPU kernel, param, m and v written in place."""
    scalars = ops.stack((lr, beta1, beta2, eps, bc1, bc2, wd, gscale))
    return adamw_in_place(param, m, v, grad, scalars)


_adamw_device = ops.MultitypeFuncGraph("adamw_device")


@_adamw_device.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Tensor", "Tensor", "Tensor")
def _adamw_device_op(beta1, beta2, eps, bc1, bc2, gscale, lr, wd, param, m, v, grad):
    """The same update through MindSpore's fused AdamWeightDecay (Ascend), param, m and v written in place."""
    return adamw_fused_op(param, m, v, grad.astype(ms.float32) * gscale, lr, beta1, beta2, eps, bc1, bc2, wd)


def partition(sizes, world: int) -> list:
    """Owner rank of each parameter: largest first onto the least-loaded rank (deterministic)."""
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + sizes[i]
    return owner


def no_decay(name: str, shape) -> bool:
    """Norm weights, biases and other vectors get no weight decay."""
    return len(shape) < 2 or name.endswith(".bias") or "norm" in name


class AdamW(nn.Cell):
    """Decoupled-weight-decay Adam over `params`; call with a tuple of gradients.

    With `shard=(rank, world)` (ZeRO stage 1 over data-parallel ranks) each parameter's moments live on one
    rank only (`partition`): the owner computes lr x update, every rank contributes zeros for the parameters
    it does not own, and one AllReduce(sum) of those deltas gives every rank the same new weights — exactly
    the unsharded result, since adding zeros is exact. Moments of parameters a rank does not own are
    1-element placeholders, so each rank holds about 1/world of the optimizer state.

    Unsharded float32 parameters update on the CPU kernel `AdamWUpdate` (backend op "adamw"): one in-place pass
    per parameter with the composed version's float32 operations in the same order, so the results agree
    bitwise; the composed version makes about ten parameter-sized temporaries each. On Ascend they update
    through MindSpore's fused AdamWeightDecay with the bias corrections folded into its inputs
    (`ops.adamw_fused_op`): equal to the composed update within float32 rounding, not bitwise
    (tests/training/test_optim_fused.py states the tolerance).
    """

    def __init__(self, params, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0, lr_scales=None,
                 shard=None, kind: str = None):
        super().__init__(auto_prefix=False)
        self.parameters = ParameterTuple(params)
        rank, world = shard or (0, 1)
        self.sharded = world > 1
        owners = partition([int(p.size) for p in self.parameters], world) if self.sharded else [0] * len(self.parameters)
        self.owned = tuple(o == rank for o in owners)
        self.m = self._moments("adam_m")
        self.v = self._moments("adam_v")
        self.step = Parameter(Tensor(0, ms.int32), name="adam_step", requires_grad=False)
        scales = lr_scales or [1.0] * len(self.parameters)
        self.lr_scales = tuple(Tensor(s, ms.float32) for s in scales)    # per-parameter lr multipliers (μP)
        # (a ZeRO-3 shard is a vector: the decision follows the whole matrix's shape)
        self.wd = tuple(Tensor(0.0 if no_decay(p.name, shape_of(p)) else weight_decay, ms.float32)
                        for p in self.parameters)
        self.beta1, self.beta2 = Tensor(betas[0], ms.float32), Tensor(betas[1], ms.float32)
        self.eps = Tensor(eps, ms.float32)
        self.map = ops.HyperMap()
        # unsharded float32 parameters update in place: on the CPU kernel, or on Ascend through MindSpore's fused
        # AdamWeightDecay ("device"); `kind` forces one (tests run the device op on CPU, where it exists too)
        if kind not in (None, "cpu", "device", "composed"):
            raise ValueError(f"AdamW kind must be None, 'cpu', 'device' or 'composed', not {kind!r}")
        plain = not self.sharded and all(p.dtype == ms.float32 for p in self.parameters)
        backend = B.choose("adamw")
        self.kind = kind or ("cpu" if plain and backend == "cpu" else
                             "device" if plain and backend == "ascend" else "composed")
        if self.kind != "composed" and not plain:
            raise ValueError(f"AdamW kind {self.kind!r} updates unsharded float32 parameters only")
        self.fused = self.kind == "cpu"
        # state names fixed now: MindSpore may rewrite Parameter.name when a graph with frozen params compiles
        self.state_names = tuple(p.name for p in (*self.m, *self.v, self.step))
        self.shapes = tuple(tuple(p.shape) for p in self.parameters)
        if self.sharded:
            self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)
            self.gather = _GatherMoments(self)

    def _moments(self, prefix: str) -> ParameterTuple:
        moments = []
        for p, own in zip(self.parameters, self.owned):
            m = Parameter(Tensor(np.zeros(p.shape if own else (1,), np.float32)), name=f"{prefix}.{p.name}",
                          requires_grad=False)
            if hasattr(p, "zero_whole_shape"):         # a ZeRO-3 shard's moments are shards of the same whole
                m.zero_whole_shape, m.zero_place = p.zero_whole_shape, p.zero_place
            moments.append(m)
        return ParameterTuple(moments)

    def construct(self, grads, lr, grad_scale):
        """grads: tuple matching `parameters`; lr: float32 scalar Tensor; grad_scale: float32 scalar each
        gradient is multiplied by as it is read (the train step's clipping factor)."""
        step = self.step + 1
        ops.assign(self.step, step)
        t = step.astype(ms.float32)
        bc1, bc2 = 1.0 - ops.pow(self.beta1, t), 1.0 - ops.pow(self.beta2, t)
        lrs = self.map(ops.partial(ops.mul, lr), self.lr_scales)
        if self.kind != "composed":
            update = _adamw_fused if self.kind == "cpu" else _adamw_device
            return self.map(ops.partial(update, self.beta1, self.beta2, self.eps, bc1, bc2, grad_scale), lrs,
                            self.wd, self.parameters, self.m, self.v, grads)
        if not self.sharded:
            return self.map(ops.partial(_adamw, self.beta1, self.beta2, self.eps, bc1, bc2, grad_scale), lrs,
                            self.wd, self.parameters, self.m, self.v, grads)
        deltas = self.map(ops.partial(_adamw, self.beta1, self.beta2, self.eps, bc1, bc2, grad_scale), lrs, self.wd,
                          self.parameters, self.m, self.v, grads, self.owned)
        return self.map(ops.assign_sub, self.parameters, ordered_all_reduce(self.all_reduce, deltas))

    def state_tensors(self) -> dict:
        """{name: Parameter} of the optimizer state this rank holds (what a checkpoint is loaded into)."""
        pairs = [(n, p) for n, p, own in zip(self.state_names, (*self.m, *self.v), self.owned * 2) if own]
        return dict(pairs + [(self.state_names[-1], self.step)])

    def full_state(self) -> dict:
        """{name: tensor} of the whole optimizer state, for a checkpoint. Sharded: a collective — every rank
        must call it at the same step."""
        if not self.sharded:
            return dict(zip(self.state_names, (*self.m, *self.v, self.step)))
        return dict(zip(self.state_names, (*self.gather(), self.step)))

    def state_elements(self) -> int:
        """Number of moment values this rank holds."""
        return sum(int(p.size) for p in (*self.m, *self.v))


class _GatherMoments(nn.Cell):
    """Every parameter's moments on every rank: AllReduce(sum) of the owner's values and the others' zeros."""

    def __init__(self, opt: AdamW):
        super().__init__(auto_prefix=False)
        self.m, self.v, self.owned, self.shapes = opt.m, opt.v, opt.owned, opt.shapes
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self):
        ms_, vs = (), ()
        for i in range(len(self.shapes)):
            if self.owned[i]:
                ms_, vs = ms_ + (self.m[i] * 1.0,), vs + (self.v[i] * 1.0,)
            else:
                ms_, vs = ms_ + (ops.zeros(self.shapes[i], ms.float32),), vs + (ops.zeros(self.shapes[i], ms.float32),)
        return ordered_all_reduce(self.all_reduce, ms_ + vs)


def lr_at(step: int, peak: float, max_steps: int, kind: str = "cosine", warmup: int = 0, min_ratio: float = 0.0,
          decay_steps=None, decay_shape: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based): warmup, then constant / linear / cosine / WSD.

    WSD (warmup-stable-decay, MiniCPM): hold the peak until the last `decay_steps`, then decay to
    min_ratio * peak with the chosen shape (linear, cosine, sqrt = 1 - sqrt(progress), exp).
    """
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * min_ratio
    if kind == "constant":
        return peak
    if kind == "wsd":
        span = decay_steps if decay_steps is not None else max(1, round(0.1 * max_steps))
        start = max_steps - span
        if step < start:
            return peak
        p = min(1.0, (step - start) / max(1, span))
        shape = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "sqrt": 1 - math.sqrt(p),
                 "exp": (min_ratio if min_ratio > 0 else 1e-3) ** p}[decay_shape]
        return floor + (peak - floor) * shape if decay_shape != "exp" else peak * shape
    p = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if kind == "linear":
        return floor + (peak - floor) * (1 - p)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))

