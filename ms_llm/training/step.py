# SPDX-License-Identifier: Apache-2.0
"""Train-step cells: the only place gradients are taken.

A loss cell returns (numerator, denominator), e.g. (sum of token losses, number of tokens). Gradients are
taken of `numerator * loss_scale`, summed over micro-batches (and, under data parallel, over ranks) and
divided by the summed denominator and the scale. So the update equals one big batch exactly, however the
global batch is split, and the loss is normalized by the real token count (seed 003's point about loss
normalization under accumulation).

    FusedStep    one micro-batch per update (no accumulation buffers)
    MicroStep    forward + backward of one micro-batch, added into accumulation buffers
    ApplyStep    unscale, overflow check, clip, optimizer, dynamic loss-scale update, zero the buffers

The scaled numerator is also divided by `loss_norm`, a fixed estimate of the denominator (tokens per
micro-batch), and multiplied back at the end: the result is unchanged, but float16 gradients have the
magnitude of a mean loss's, which is what loss-scale values are tuned for, instead of a sum's.

A loss cell may return a third output, a vector of sums to report (its class names them in `stat_names`, e.g.
DPO's chosen and rejected rewards): they are summed like the numerator and divided by the same denominator, so a
reported value is the mean over the whole update however it was split.

A non-finite gradient skips the optimizer entirely (weights, Adam moments and step count untouched) and
shrinks the loss scale by `factor`; `window` clean steps in a row grow it by `factor`. A zero summed
denominator (every token of the global batch masked, e.g. GRPO's all-truncated batch) skips the optimizer too:
there is nothing to learn from, and Adam's momentum or weight decay would still move the weights.
"""
import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops


class LossScaleState(nn.Cell):
    """Dynamic (or fixed) loss scale with its clean-step counter, as Parameters that checkpoints hold."""

    def __init__(self, dynamic: bool, init: float = 65536.0, factor: float = 2.0, window: int = 1000):
        super().__init__(auto_prefix=False)
        self.dynamic = dynamic
        self.scale = Parameter(Tensor(init if dynamic else 1.0, ms.float32), name="loss_scale", requires_grad=False)
        self.good = Parameter(Tensor(0, ms.int32), name="loss_scale_good_steps", requires_grad=False)
        self.factor, self.window = Tensor(factor, ms.float32), window
        self.state_names = ("loss_scale", "loss_scale_good_steps")

    def update(self, finite):
        if not self.dynamic:
            return self.scale
        good = self.good + 1
        grow = ops.logical_and(finite, good >= self.window)
        new_scale = ops.select(finite, ops.select(grow, self.scale * self.factor, self.scale),
                               ops.maximum(self.scale / self.factor, 1.0))
        new_good = ops.select(ops.logical_and(finite, ops.logical_not(grow)), good, ops.zeros_like(good))
        ops.assign(self.good, new_good)
        return ops.assign(self.scale, new_scale)


def _global_norm(grads):
    return ops.sqrt(ops.addn([ops.square(g.astype(ms.float32)).sum() for g in grads]))


class ShardedNorm(nn.Cell):
    """Global gradient norm when some gradients are shards of a whole (tensor-parallel slices, ZeRO-3 shards):
    replicated gradients counted once, the squares of sharded ones summed over the ranks that hold the parts
    (`sharded`: one bool per gradient; `all_reduce`: the sum over those ranks)."""

    def __init__(self, sharded, all_reduce):
        super().__init__(auto_prefix=False)
        self.sharded, self.all_reduce = tuple(sharded), all_reduce

    def construct(self, grads):
        rep, shard = (), ()
        for i in range(len(self.sharded)):
            sq = ops.square(grads[i].astype(ms.float32)).sum()
            if self.sharded[i]:
                shard = shard + (sq,)
            else:
                rep = rep + (sq,)
        total = self.all_reduce(ops.addn(shard))
        if rep:
            total = total + ops.addn(rep)
        return ops.sqrt(total)


def stat_count(loss_net) -> int:
    """How many reported sums the loss cell returns after (numerator, denominator)."""
    return len(getattr(loss_net, "stat_names", ()))


class _Apply:
    """Shared tail of FusedStep and ApplyStep (a plain mixin; the cells call it inside construct)."""

    def _reduce(self, grads, num, den, stats):
        """Sum over data-parallel ranks; reported sums travel with the denominator in one collective."""
        if not self.n_stats:
            grads, num, den = self.reducer(grads, num, den)
            return grads, num, den, stats
        grads, num, packed = self.reducer(grads, num, ops.concat((den.reshape((1,)), stats)))
        return grads, num, packed[0], packed[1:]

    def _finish(self, grads, denom, lr):
        """Unscale, clip and update. The clipping factor is not applied as a tensor map: the optimizer multiplies
        each gradient by it as it reads it (one fewer parameter-sized temporary per parameter, same rounding)."""
        scale = self.loss_scale.scale
        inv = self.loss_norm / (scale * ops.maximum(denom, 1e-12))
        grads = self.map(ops.partial(ops.mul, inv), grads)
        norm = _global_norm(grads) if self.tp_norm is None else self.tp_norm(grads)
        finite = ops.isfinite(norm)          # any inf/nan gradient makes the norm inf/nan
        factor = ops.ones((), ms.float32)
        if self.clip > 0:
            factor = ops.minimum(1.0, self.clip / (norm + 1e-6))
        if ops.logical_and(finite, denom > 0):           # nothing to learn from (all masked): no step at all
            self.optimizer(grads, lr, factor)
        new_scale = self.loss_scale.update(finite)
        return norm, finite, new_scale


class FusedStep(nn.Cell, _Apply):
    """forward + backward + update for one micro-batch. Returns (loss, grad_norm, finite, loss_scale)."""

    def __init__(self, loss_net, optimizer, loss_scale: LossScaleState, clip: float = 1.0, reducer=None,
                 loss_norm: float = 1.0, tp_norm=None):
        super().__init__(auto_prefix=False)
        self.loss_net, self.optimizer, self.loss_scale, self.clip = loss_net, optimizer, loss_scale, clip
        self.tp_norm = tp_norm
        self.grad_fn = ms.value_and_grad(self._scaled, None, optimizer.parameters, has_aux=True)
        self.map, self.reducer, self.loss_norm = ops.HyperMap(), reducer, loss_norm
        self.n_stats = stat_count(loss_net)

    def _scaled(self, *batch):
        out = self.loss_net(*batch)
        num = out[0]
        return num * (self.loss_scale.scale / self.loss_norm), num, out[1], (out[2] if self.n_stats else num)

    def construct(self, lr, *batch):
        (_, num, den, stats), grads = self.grad_fn(*batch)
        if self.reducer is not None:
            grads, num, den, stats = self._reduce(grads, num, den, stats)
        norm, finite, scale = self._finish(grads, den, lr)
        d = ops.maximum(den, 1e-12)
        return num / d, norm, finite, scale, stats / d


class MicroStep(nn.Cell):
    """forward + backward of one micro-batch; adds gradients, numerator and denominator into buffers."""

    def __init__(self, loss_net, optimizer, loss_scale: LossScaleState, accum, loss_norm: float = 1.0):
        super().__init__(auto_prefix=False)
        self.loss_net, self.loss_scale, self.accum, self.loss_norm = loss_net, loss_scale, accum, loss_norm
        self.grad_fn = ms.value_and_grad(self._scaled, None, optimizer.parameters, has_aux=True)
        self.num = Parameter(Tensor(0.0, ms.float32), name="accum_num", requires_grad=False)
        self.den = Parameter(Tensor(0.0, ms.float32), name="accum_den", requires_grad=False)
        self.n_stats = stat_count(loss_net)
        self.stats = Parameter(Tensor(np.zeros(max(self.n_stats, 1), np.float32)), name="accum_stats", requires_grad=False)
        self.map = ops.HyperMap()

    def _scaled(self, *batch):
        out = self.loss_net(*batch)
        num = out[0]
        return num * (self.loss_scale.scale / self.loss_norm), num, out[1], (out[2] if self.n_stats else num)

    def construct(self, *batch):
        (_, num, den, stats), grads = self.grad_fn(*batch)
        ops.assign_add(self.num, num)
        ops.assign_add(self.den, den)
        if self.n_stats:
            ops.assign_add(self.stats, stats)
        return ops.depend(num / ops.maximum(den, 1e-12), self.map(ops.assign_add, self.accum, grads))


class ApplyStep(nn.Cell, _Apply):
    """Apply the accumulated gradients. Returns (loss over the whole update, grad_norm, finite, loss_scale)."""

    def __init__(self, micro: MicroStep, optimizer, loss_scale: LossScaleState, clip: float = 1.0, reducer=None,
                 tp_norm=None):
        super().__init__(auto_prefix=False)
        self.micro, self.optimizer, self.loss_scale, self.clip = micro, optimizer, loss_scale, clip
        self.tp_norm = tp_norm
        self.loss_norm = micro.loss_norm
        self.accum, self.map, self.reducer = micro.accum, ops.HyperMap(), reducer
        self.n_stats = micro.n_stats

    def construct(self, lr):
        grads, num, den, stats = self.accum, self.micro.num * 1.0, self.micro.den * 1.0, self.micro.stats * 1.0
        if self.reducer is not None:
            grads, num, den, stats = self._reduce(grads, num, den, stats)
        norm, finite, scale = self._finish(grads, den, lr)
        d = ops.maximum(den, 1e-12)
        loss = num / d
        zeroed = self.map(ops.assign, self.accum, self.map(ops.zeros_like, self.accum))
        loss = ops.depend(loss, zeroed)
        loss = ops.depend(loss, ops.assign(self.micro.num, ops.zeros_like(num)))
        loss = ops.depend(loss, ops.assign(self.micro.den, ops.zeros_like(den)))
        loss = ops.depend(loss, ops.assign(self.micro.stats, ops.zeros_like(self.micro.stats)))
        return loss, norm, finite, scale, stats / d


class TrainStep:
    """What the trainer calls: `step(micro_batches, lr)` -> dict of loss, grad_norm, finite, loss_scale.
    `micro_batches` is any iterable of batch tuples (consumed once, in order)."""

    def __init__(self, loss_net, optimizer, loss_scale: LossScaleState, accum_steps: int = 1, clip: float = 1.0,
                 reducer=None, loss_norm: float = 1.0, tp_norm: ShardedNorm = None):
        self.accum_steps = accum_steps
        self.stat_names = tuple(getattr(loss_net, "stat_names", ()))
        if accum_steps == 1:
            self.fused = FusedStep(loss_net, optimizer, loss_scale, clip, reducer, loss_norm, tp_norm)
        else:
            buffers = optimizer.parameters.clone(prefix="accum", init="zeros")
            self.micro = MicroStep(loss_net, optimizer, loss_scale, buffers, loss_norm)
            self.apply = ApplyStep(self.micro, optimizer, loss_scale, clip, reducer, tp_norm)

    def __call__(self, micro_batches, lr: float) -> dict:
        lr = Tensor(lr, ms.float32)
        if self.accum_steps == 1:
            loss, norm, finite, scale, stats = self.fused(lr, *next(iter(micro_batches)))
        else:
            for batch in micro_batches:
                self.micro(*batch)
            loss, norm, finite, scale, stats = self.apply(lr)
        out = {"loss": float(loss.asnumpy()), "grad_norm": float(norm.asnumpy()),
               "finite": bool(finite.asnumpy()), "loss_scale": float(scale.asnumpy())}
        if self.stat_names:
            out.update(zip(self.stat_names, stats.asnumpy().tolist()))
        return out
