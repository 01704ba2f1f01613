# SPDX-License-Identifier: Apache-2.0
"""The training loop every stage shares: optimizer, mixed precision, resume, logging, checkpoints, eval.

A stage hands over a `StageSpec` (its loss cell, how to fetch micro-batch i, and an optional evaluation);
`train` does the rest. Nothing here knows which objective it is optimizing.
"""
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mindspore as ms
import numpy as np

from ms_llm.config import ExperimentConfig
from ms_llm.errors import MsLlmError
from ms_llm.training import checkpoint as ckpt
from ms_llm.training.layout import Layout
from ms_llm.training.metrics import RunLogger
from ms_llm.training.optim import AdamW, lr_at
from ms_llm.training.step import LossScaleState

log = logging.getLogger(__name__)


@dataclass
class StageSpec:
    loss_net: object                                 # cell: (*batch) -> (numerator, denominator)
    batch_keys: tuple                                # order of the numpy batch fields passed to loss_net
    next_batch: Callable[[int], dict]                # micro-batch index (over the run) -> numpy batch
    tokens_per_micro: int                            # for tokens/s
    evaluate: Optional[Callable[[], dict]] = None    # -> {"eval/<name>": value}
    params: Optional[list] = None                    # trainable parameters (default: all of loss_net's)
    weights_writer: Optional[Callable] = None        # checkpoint weight export (LoRA: adapter only)
    weights_reader: Optional[Callable] = None        # its inverse on resume: folder -> None
    lr_scales: Optional[list] = None                 # per-parameter lr multipliers
    extra_state: Callable[[], dict] = field(default=lambda: {})   # stage state saved in trainer_state.json
    loss_norm: Optional[float] = None                # typical loss denominator per micro-batch (default: tokens)
    check_resume: Optional[Callable[[dict], None]] = None     # raise if a checkpoint's trainer_state does not fit
    should_stop: Optional[Callable[[list], bool]] = None       # list of evaluation rows -> stop early?
    step_metrics: Optional[Callable[[int], dict]] = None       # steps done -> extra values for this step's row


@dataclass
class TrainResult:
    steps: int
    metrics: dict
    history: list
    resumed_from: Optional[str] = None
    evals: list = field(default_factory=list)        # [{"step", "eval/...": ...}] in this process
    stopped_early: bool = False


def uses_loss_scaling(cfg: ExperimentConfig) -> bool:
    t = cfg.train
    if t.loss_scale == "auto":
        return t.amp_level != "O0" and t.compute_dtype == "float16"
    return t.loss_scale == "dynamic"


def build_optimizer(cfg: ExperimentConfig, spec: StageSpec, model=None, rank: int = 0):
    params = spec.params if spec.params is not None else spec.loss_net.trainable_params()
    o = cfg.optim
    scales = spec.lr_scales
    if scales is None and cfg.mup.enabled and model is not None:
        from ms_llm.models import mup
        scales = mup.lr_scales(model, params, cfg.mup)
    world = cfg.parallel.data_parallel
    shard = (rank, world) if cfg.parallel.optimizer_shard and world > 1 else None
    return AdamW(params, (o.beta1, o.beta2), o.eps, o.weight_decay, scales, shard)


def optimizer_state(opt: AdamW, scale: LossScaleState, full: bool = False) -> dict:
    """{name: tensor} of the optimizer and loss-scale state: this rank's share (to load a checkpoint into) or,
    with `full`, everything (to write one)."""
    state = opt.full_state() if full else opt.state_tensors()
    state.update(zip(scale.state_names, (scale.scale, scale.good)))
    return state


def _to_tensors(batch: dict, keys) -> tuple:
    return tuple(ms.Tensor(np.ascontiguousarray(batch[k])) for k in keys)


def train(cfg: ExperimentConfig, model, spec: StageSpec, run_dir: str, layout: Layout = None) -> TrainResult:
    layout = layout or Layout()
    rank = layout.rank
    t = cfg.train
    opt = build_optimizer(cfg, spec, model, rank)
    if opt.sharded:
        total = 2 * sum(int(p.size) for p in opt.parameters)
        log.info("optimizer state sharded over %d ranks: rank %d holds %d of %d moment values (%.1f MB)",
                 cfg.parallel.data_parallel, rank, opt.state_elements(), total, 4 * opt.state_elements() / 2**20)
    scale = LossScaleState(uses_loss_scaling(cfg), t.loss_scale_init, t.loss_scale_factor, t.loss_scale_window)
    loss_norm = float(spec.loss_norm or spec.tokens_per_micro)
    step_fn = layout.train_step(model, spec.loss_net, opt, scale, t.grad_accum_steps, t.clip_grad_norm, loss_norm)
    state = optimizer_state(opt, scale)
    root = os.path.join(run_dir, "checkpoints")
    resumed, start, micro_index = _resume(cfg, root, model, spec, state, layout)
    logger = RunLogger(run_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard)
    logger.truncate_after(start)
    bar = None
    if rank == 0 and t.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=t.max_steps, initial=start, desc=cfg.stage, dynamic_ncols=True)
    s = cfg.lr_schedule
    history, last, evals, stopped = [], {}, [], False
    tokens_per_step = spec.tokens_per_micro * t.grad_accum_steps * cfg.parallel.data_parallel
    spec.loss_net.set_train(True)
    try:
        for step in range(start, t.max_steps):
            lr = lr_at(step, cfg.optim.lr, t.max_steps, s.type, s.warmup_steps, s.min_lr_ratio, s.decay_steps,
                       s.decay_shape)
            # built one at a time as the step consumes them (a micro-batch may carry large inputs, e.g. NEFTune
            # noise); the pipeline schedule walks them twice, so it gets a list
            batches = (_to_tensors(spec.next_batch(micro_index + j), spec.batch_keys) for j in range(t.grad_accum_steps))
            batches = list(batches) if layout.pp is not None else batches
            tic = time.perf_counter()
            out = step_fn(batches, lr)
            dt = time.perf_counter() - tic
            micro_index += t.grad_accum_steps
            row = {"loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
                   "tokens_per_s": tokens_per_step / max(dt, 1e-9), "loss_scale": out["loss_scale"],
                   "skipped": not out["finite"]}
            history.append(row)
            done = step + 1
            if spec.step_metrics is not None:
                row.update(spec.step_metrics(done))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if spec.evaluate and ((t.eval_every and done % t.eval_every == 0) or done == t.max_steps):
                row.update(_evaluate(spec))
                since = history[len(history) - (done - (evals[-1]["step"] if evals else start)):]
                row["eval/train_loss"] = float(np.mean([h["loss"] for h in since if not h["skipped"]] or [row["loss"]]))
                evals.append({"step": done, **{k: v for k, v in row.items() if k.startswith("eval/")}})
                if spec.should_stop:       # it may annotate the evaluation (e.g. gate results): keep those too
                    stop = spec.should_stop(evals)
                    row.update({k: v for k, v in evals[-1].items() if k.startswith("eval/")})
                    stopped = bool(stop and done != t.max_steps)
            if done % t.log_every == 0 or done == t.max_steps or row["skipped"] or any(k.startswith("eval/") for k in row):
                logger.log(done, row)
            last = row
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == t.max_steps or stopped:
                # every rank takes part: ZeRO-1 moments, tensor-parallel slices and pipeline stages are gathered
                full = layout.whole_optimizer_state(optimizer_state(opt, scale, full=True), model)
                weights, writer = layout.whole_weights(model), spec.weights_writer
                if weights is not None:
                    from ms_llm.models.io import save_state_dict
                    writer = lambda d, w=weights: save_state_dict(w, model.config, d)    # noqa: E731
                if rank == 0:
                    ckpt.save_checkpoint(root, done, model, full,
                                         {"step": done, "data_position": micro_index, "seed": t.seed,
                                          "world_size": cfg.parallel.data_parallel, "micro_batch_size": t.micro_batch_size,
                                          "consumed_samples": micro_index * t.micro_batch_size * cfg.parallel.data_parallel,
                                          "loss_scale": float(scale.scale.asnumpy()), **spec.extra_state()},
                                         cfg.checkpoint.keep, writer)
            if stopped:
                log.info("stopping early at step %d: the evaluation metric converged", done)
                break
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    spec.loss_net.set_train(False)
    metrics = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics["optimizer_state_elements"] = opt.state_elements()
    metrics["parameters_on_rank"] = sum(int(p.size) for p in model.get_parameters())
    if history:
        metrics["first_loss"] = history[0]["loss"]
        metrics["skipped_steps"] = sum(h["skipped"] for h in history)
    steps = (start + len(history)) if history else start
    return TrainResult(steps, metrics, history, resumed, evals, stopped)


def _resume(cfg: ExperimentConfig, root: str, model, spec: StageSpec, state: dict, layout: Layout):
    """Restore weights, optimizer/loss-scale state and data position; returns (path, step, micro_index)."""
    how = cfg.checkpoint.resume
    if how == "none":
        return None, 0, 0
    path = ckpt.find_resume(root) if how == "auto" else how
    if not path:
        return None, 0, 0
    if how != "auto":
        ckpt.verify(path)
    if spec.weights_reader is not None:
        spec.weights_reader(path)
    else:
        from ms_llm.models.io import load_weights
        load_weights(model, path, strict=True)
    ckpt.load_optimizer_state(path, state, layout.local_optimizer_state)
    ts = ckpt.read_trainer_state(path)
    if spec.check_resume is not None:
        spec.check_resume(ts)
    log.info("resumed from %s at step %d", path, ts["step"])
    return path, ts["step"], _data_position(cfg, ts, path)


def _data_position(cfg: ExperimentConfig, ts: dict, path: str) -> int:
    """Micro-batch index to continue from; re-split when the world size changed and resharding is allowed."""
    world, mbs = cfg.parallel.data_parallel, cfg.train.micro_batch_size
    old_world, old_mbs = ts.get("world_size", 1), ts.get("micro_batch_size", mbs)
    if (old_world, old_mbs) == (world, mbs):
        return ts["data_position"]
    if not cfg.checkpoint.reshard:
        raise MsLlmError(f"{path} was written with data_parallel={old_world}, micro_batch_size={old_mbs}; this run "
                         f"has {world} and {mbs}. Resume with the same layout, or set checkpoint.reshard: true")
    consumed = ts["consumed_samples"]
    if consumed % (world * mbs):
        raise MsLlmError(f"{path}: {consumed} consumed samples do not split into micro-batches of "
                         f"{mbs} x {world} ranks; choose sizes that divide it")
    return consumed // (world * mbs)


def _evaluate(spec: StageSpec) -> dict:
    spec.loss_net.set_train(False)
    try:
        return spec.evaluate()
    finally:
        spec.loss_net.set_train(True)
