# SPDX-License-Identifier: Apache-2.0
"""An updater: one loss cell, its trainable parameters, an AdamW, an LR schedule, a loss scaler and clipping,
compiled into one step.

    policy = Updater("policy", cfg, PolicyLoss(model), model, layout)
    value = Updater("value", cfg, ValueLoss(critic), critic, layout, lr=cfg.ppo.value_lr)
    row = policy(micro_batches, step)        # {"loss", "lr", "grad_norm", "finite", "loss_scale"}

A stage owns one updater (pretrain, sft, ...) or several (PPO: policy and value). Each normalises its own
loss: its cell returns (numerator, denominator), the gradients of the numerators are summed over the
micro-batches and data-parallel ranks it is called with, and divided by the summed denominator
(training/step.py). Two updaters never share parameters or buffers, so one's accumulation cannot leak into
the other's.

Before each micro-batch the updater sets the key of its LoRA dropout (peft/lora.py) from (train.seed, step,
micro-batch, data rank), so the dropped elements depend on where the run is, not on a stream that restarts
with the process.

In a checkpoint every updater's optimizer and loss-scale state is stored under `<name>/` in
optimizer.safetensors (`state_for_checkpoint`, `load_from_checkpoint`); the layout gathers and slices it
as it does the model's weights.
"""
import mindspore as ms
from mindspore import Tensor

from ms_llm.errors import MsLlmError
from ms_llm.models import mup
from ms_llm.peft.lora import dropout_key, noise_key
from ms_llm.training.layout import Layout
from ms_llm.training.optim import AdamW, lr_at
from ms_llm.training.step import LossScaleState


def uses_loss_scaling(cfg) -> bool:
    t = cfg.train
    if t.loss_scale == "auto":
        return t.amp_level != "O0" and t.compute_dtype == "float16"
    return t.loss_scale == "dynamic"


class Updater:
    """`updater(micro_batches, step)` runs one optimizer step at schedule position `step` (0-based).

    params: the trainable parameters (default: every trainable parameter of `loss_net`); lr: this updater's
    peak learning rate (default optim.lr); lr_scales: per-parameter multipliers (μP); loss_norm: a typical
    denominator per micro-batch (only for float16 gradient magnitudes, the result does not depend on it);
    accum_steps: micro-batches per step (default train.grad_accum_steps).
    """

    def __init__(self, name: str, cfg, loss_net, model, layout: Layout = None, params=None, lr: float = None,
                 lr_scales=None, loss_norm: float = 1.0, accum_steps: int = None, clip: float = None):
        if "/" in name:
            raise MsLlmError(f"updater name {name!r} may not contain '/'")
        layout = layout or Layout()
        t, o = cfg.train, cfg.optim
        self.name, self.model, self.loss_net, self.layout = name, model, loss_net, layout
        self.peak_lr = o.lr if lr is None else lr
        self.max_steps, self.schedule = t.max_steps, cfg.lr_schedule
        params = list(params if params is not None else loss_net.trainable_params())
        if not params:
            raise MsLlmError(f"updater {name!r}: no trainable parameters")
        if lr_scales is None and cfg.mup.enabled:
            lr_scales = mup.lr_scales(model, params, cfg.mup)
        if layout.zero is not None:          # ZeRO-3: the model now reads these matrices through gathers
            params = layout.zero.shard(loss_net, params)
        world = cfg.parallel.data_parallel
        shard = (layout.rank, world) if cfg.parallel.optimizer_shard == "zero1" and world > 1 else None
        self.optimizer = AdamW(params, (o.beta1, o.beta2), o.eps, o.weight_decay, lr_scales, shard)
        self.loss_scale = LossScaleState(uses_loss_scaling(cfg), t.loss_scale_init, t.loss_scale_factor,
                                         t.loss_scale_window)
        self.accum_steps = accum_steps or t.grad_accum_steps
        self.noise_key, self.seed = noise_key(loss_net), t.seed
        self.step_fn = layout.train_step(model, loss_net, self.optimizer, self.loss_scale, self.accum_steps,
                                         t.clip_grad_norm if clip is None else clip, float(loss_norm))

    def lr_at(self, step: int) -> float:
        s = self.schedule
        return lr_at(step, self.peak_lr, self.max_steps, s.type, s.warmup_steps, s.min_lr_ratio, s.decay_steps,
                     s.decay_shape)

    def __call__(self, micro_batches, step: int) -> dict:
        lr = self.lr_at(step)
        if self.noise_key is not None:
            micro_batches = self._keyed(micro_batches, step)
        out = self.step_fn(micro_batches, lr)
        return dict(out, lr=lr)

    def _keyed(self, micro_batches, step: int):
        for i, batch in enumerate(micro_batches):
            self.noise_key.set_data(Tensor(dropout_key(self.seed, step, i, self.layout.data_rank), ms.int32))
            yield batch

    @property
    def stat_names(self) -> tuple:
        """Names of the sums the loss cell reports (training/step.py), each in every step's result."""
        return tuple(getattr(self.loss_net, "stat_names", ()))

    @property
    def parameters(self):
        return self.optimizer.parameters

    def local_state(self) -> dict:
        """{name: Parameter} of the optimizer and loss-scale state this rank holds."""
        state = self.optimizer.state_tensors()
        state.update(zip(self.loss_scale.state_names, (self.loss_scale.scale, self.loss_scale.good)))
        return state

    def state_for_checkpoint(self) -> dict:
        """{"<name>/<state>": whole tensor} — gathered over ZeRO shards, tensor slices and pipeline stages, so a
        collective: every rank calls it at the same step."""
        state = self.optimizer.full_state()
        state.update(zip(self.loss_scale.state_names, (self.loss_scale.scale, self.loss_scale.good)))
        state = self.layout.whole_optimizer_state(state, self.model)
        return {f"{self.name}/{k}": v for k, v in state.items()}

    def local_state_from(self, saved: dict) -> dict:
        """This updater's part of a checkpoint's {"<name>/<state>": array}, unprefixed and sliced to this rank."""
        prefix = f"{self.name}/"
        mine = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
        return self.layout.local_optimizer_state(mine)

    def state_elements(self) -> int:
        return self.optimizer.state_elements()

    @property
    def sharded(self) -> bool:
        """The optimizer state is split over ranks (ZeRO-1 or ZeRO-3)."""
        return self.optimizer.sharded or self.layout.zero is not None
