# SPDX-License-Identifier: Apache-2.0
"""The pipeline-parallel train step: GPipe's schedule over the stages of models/pipeline.py.

One optimizer step with M micro-batches (train.grad_accum_steps):

    forward phase    for m in 1..M: stage s receives m's hidden states from s-1, runs its layers and sends the
                     result to s+1. The last stage computes the loss and, at once, the gradients of its
                     parameters and of its input.
    backward phase   for m in 1..M: stage s receives d(loss)/d(output) from s+1, recomputes its forward from the
                     stored input and takes the vector-Jacobian product: its parameters' gradients are added
                     into the accumulation buffers, the input's gradient is sent to s-1.
    update           ApplyStep (training/step.py) with a reducer that sums the loss numerator and denominator
                     over the stages, the tied embedding's two gradients, and (data parallel) everything over
                     the replicas; the clipping norm adds every stage's squares once.

A stage keeps only its inputs between the two phases (one [B, S, H] tensor per micro-batch) and recomputes its
activations in the backward pass, as GPipe does. Gradients are those of the whole model's loss, so the
update equals a one-process run's with the same global batch.

Transfers are AllReduce(sum) over a two-rank group in which the receiver contributes zeros: MindSpore's CPU
backend has no Send/Receive kernels and broadcasts only over the world group, while AllReduce works on any
group and on every backend. Adding zeros is exact. Each pair of neighbours runs its transfers in one fixed
order (M forward, then M backward), which is what keeps blocking collectives from pairing the wrong tensors.
The bubble is GPipe's: (P − 1) / (M + P − 1) of each step per stage.
"""
import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ms_llm.losses.lm import label_log_probs
from ms_llm.models.pipeline import EMBED, PPGroup, StageModel
from ms_llm.training.step import ApplyStep, LossScaleState


class _Transfer(nn.Cell):
    def __init__(self, group):
        super().__init__(auto_prefix=False)
        self.all_reduce = PPGroup.all_reduce(group)

    def construct(self, x):
        return self.all_reduce(x)


class Link:
    """A blocking channel between two neighbouring stages: `send(x)` on one side, `recv(shape)` on the other."""

    def __init__(self, group):
        self.transfer = _Transfer(group)
        self.zeros = {}

    def send(self, x):
        self.transfer(x)

    def recv(self, shape, dtype=np.float32):
        key = (tuple(shape), np.dtype(dtype).str)
        if key not in self.zeros:
            self.zeros[key] = Tensor(np.zeros(shape, dtype))
        return self.transfer(self.zeros[key])


class _Forward(nn.Cell):
    def __init__(self, stage: StageModel):
        super().__init__(auto_prefix=False)
        self.stage = stage

    def construct(self, x, *extra):
        return self.stage.stage_forward(x, *extra)


def stage_nll(stage: StageModel, x, labels, *extra):
    """The last stage's (sum of -log p(label), counted positions): the same readout as LMLoss (one process)."""
    logp, valid = label_log_probs(stage, stage.stage_forward(x, *extra), labels)
    return -(logp * valid).sum(), valid.sum()


class _Loss(nn.Cell):
    """Last stage, no gradient: (loss numerator, denominator)."""

    def __init__(self, stage: StageModel):
        super().__init__(auto_prefix=False)
        self.stage = stage

    def construct(self, x, labels, *extra):
        return stage_nll(self.stage, x, labels, *extra)


class _Buffers(nn.Cell):
    """Gradient, loss-numerator and denominator accumulators (what ApplyStep reads as `micro`)."""

    def __init__(self, optimizer, loss_norm: float):
        super().__init__(auto_prefix=False)
        self.accum = optimizer.parameters.clone(prefix="accum", init="zeros")
        self.num = Parameter(Tensor(0.0, ms.float32), name="accum_num", requires_grad=False)
        self.den = Parameter(Tensor(0.0, ms.float32), name="accum_den", requires_grad=False)
        self.stats = Parameter(Tensor(np.zeros(1, np.float32)), name="accum_stats", requires_grad=False)
        self.loss_norm, self.n_stats = loss_norm, 0          # the LM loss of a pipeline reports no sums


class _LastGrad(nn.Cell):
    """Last stage: loss, gradients of its parameters (accumulated) and of its input (returned)."""

    def __init__(self, stage: StageModel, optimizer, loss_scale: LossScaleState, buffers: _Buffers):
        super().__init__(auto_prefix=False)
        self.stage, self.loss_scale, self.acc = stage, loss_scale, buffers
        self.grad_fn = ms.value_and_grad(self._scaled, 0, optimizer.parameters, has_aux=True)
        self.map = ops.HyperMap()

    def _scaled(self, x, labels, *extra):
        num, den = stage_nll(self.stage, x, labels, *extra)
        return num * (self.loss_scale.scale / self.acc.loss_norm), num, den

    def construct(self, x, labels, *extra):
        (_, num, den), (dx, grads) = self.grad_fn(x, labels, *extra)
        ops.assign_add(self.acc.num, num)
        ops.assign_add(self.acc.den, den)
        return ops.depend(dx, self.map(ops.assign_add, self.acc.accum, grads))


class _StageGrad(nn.Cell):
    """Other stages: the vector-Jacobian product of the stage's forward with the gradient of its output."""

    def __init__(self, stage: StageModel, optimizer, buffers: _Buffers):
        super().__init__(auto_prefix=False)
        self.stage, self.acc, self.first = stage, buffers, stage.first
        position = None if self.first else 0          # token ids have no gradient
        self.grad_fn = ms.grad(self._dot, position, optimizer.parameters)
        self.map = ops.HyperMap()

    def _dot(self, x, dy, *extra):
        return (self.stage.stage_forward(x, *extra) * dy).sum()

    def construct(self, x, dy, *extra):
        if self.first:
            grads = self.grad_fn(x, dy, *extra)
            return ops.depend(dy, self.map(ops.assign_add, self.acc.accum, grads))
        dx, grads = self.grad_fn(x, dy, *extra)
        return ops.depend(dx, self.map(ops.assign_add, self.acc.accum, grads))


class _PipeReducer(nn.Cell):
    """Before the update: sums over data-parallel replicas (`dp`, a SumReducer), the tied embedding's gradient
    over first + last stage, and the loss numerator and denominator over the stages (only the last has them).
    Collectives on the pipeline group are chained so every stage issues them in the same order."""

    def __init__(self, dp, pp: PPGroup, tied_index: int):
        super().__init__(auto_prefix=False)
        self.dp, self.tied_index = dp, tied_index
        self.pp_sum = PPGroup.all_reduce(pp.group)
        self.embed_sum = PPGroup.all_reduce(pp.embed)

    def construct(self, grads, num, den):
        if self.dp is not None:
            grads, num, den = self.dp(grads, num, den)
        i = self.tied_index
        if i >= 0:
            g = self.embed_sum(grads[i])
            out = ()
            for j in range(len(grads)):
                out = out + ((g if j == i else grads[j]),)
            grads = out
            num = ops.depend(num, g)
        num = self.pp_sum(num)
        den = self.pp_sum(ops.depend(den, num))
        return grads, num, den


class _PipeNorm(nn.Cell):
    """Global gradient norm: every stage's squares (the tied copy counted once), summed over the stages."""

    def __init__(self, counted, pp: PPGroup):
        super().__init__(auto_prefix=False)
        self.counted, self.pp_sum = tuple(counted), PPGroup.all_reduce(pp.group)

    def construct(self, grads):
        sq = ()
        for i in range(len(self.counted)):
            if self.counted[i]:
                sq = sq + (ops.square(grads[i].astype(ms.float32)).sum(),)
        return ops.sqrt(self.pp_sum(ops.addn(sq)))


def _split(batch):
    """(input_ids, labels, extra) of an LM batch tuple (input_ids, labels[, position_ids, segment_ids])."""
    return batch[0], batch[1], tuple(batch[2:])


class PipelineLoss:
    """Forward-only pass through the stages: `loss(input_ids, labels, *extra)` -> (numerator, denominator)
    Tensors, the same on every stage (evaluation). A collective: every stage calls it with the same batch."""

    def __init__(self, model: StageModel):
        pp = model.pp
        self.model, self.pp = model, pp
        self.prev = Link(pp.prev) if not pp.first else None
        self.next = Link(pp.next) if not pp.last else None
        self.forward = _Forward(model) if not pp.last else None
        self.loss = _Loss(model) if pp.last else None
        self.total = _Transfer(pp.group)
        self.hidden = model.config.hidden_size

    def input_of(self, ids):
        """This stage's input for a micro-batch: the token ids, or the hidden states from the previous stage."""
        if self.prev is None:
            return ids
        return self.prev.recv((ids.shape[0], ids.shape[1], self.hidden))

    def __call__(self, *batch):
        ids, labels, extra = _split(batch)
        x = self.input_of(ids)
        if self.pp.last:
            num, den = self.loss(x, labels, *extra)
        else:
            self.next.send(self.forward(x, *extra))
            num = den = Tensor(0.0, ms.float32)
        return self.total(num), self.total(den)


class PipelineStep(PipelineLoss):
    """What the trainer calls under pipeline parallelism: `step(micro_batches, lr)` -> dict of loss, grad_norm,
    finite, loss_scale (TrainStep's interface). `dp`: the data-parallel SumReducer or None."""

    def __init__(self, model: StageModel, optimizer, loss_scale: LossScaleState, clip: float = 1.0, dp=None,
                 loss_norm: float = 1.0):
        super().__init__(model)
        names = {id(p): n for n, p in model.parameters_and_names()}
        param_names = [names[id(p)] for p in optimizer.parameters]
        shared = model.tied and (model.first or model.last)
        tied_index = param_names.index(EMBED) if shared and EMBED in param_names else -1
        self.acc = _Buffers(optimizer, loss_norm)
        if model.last:
            self.last_grad = _LastGrad(model, optimizer, loss_scale, self.acc)
        else:
            self.stage_grad = _StageGrad(model, optimizer, self.acc)
        counted = [n in model.owned_names for n in param_names]
        self.apply = ApplyStep(self.acc, optimizer, loss_scale, clip, _PipeReducer(dp, self.pp, tied_index),
                               _PipeNorm(counted, self.pp))

    def __call__(self, micro_batches, lr: float) -> dict:
        kept = []
        for batch in micro_batches:                       # forward phase
            ids, labels, extra = _split(batch)
            x = self.input_of(ids)
            if self.pp.last:
                kept.append(self.last_grad(x, labels, *extra))
            else:
                self.next.send(self.forward(x, *extra))
                kept.append(x)
        for m, batch in enumerate(micro_batches):        # backward phase
            ids, _, extra = _split(batch)
            if self.pp.last:
                dx = kept[m]
            else:
                dy = self.next.recv((ids.shape[0], ids.shape[1], self.hidden))
                dx = self.stage_grad(kept[m], dy, *extra)
            if not self.pp.first:
                self.prev.send(dx)
        loss, norm, finite, scale, _ = self.apply(Tensor(lr, ms.float32))
        return {"loss": float(loss.asnumpy()), "grad_norm": float(norm.asnumpy()),
                "finite": bool(finite.asnumpy()), "loss_scale": float(scale.asnumpy())}
