# SPDX-License-Identifier: Apache-2.0
"""The training loop every stage shares: resume, logging, evaluation, checkpoints, early stop.

A stage hands over a `StageSpec`; `train` does the rest. Nothing here knows which objective it optimizes.

    supervised stages (pretrain, cpt, sft, distill, reward): a loss cell and how to fetch micro-batch i; the
        trainer builds one Updater ("model") and feeds it train.grad_accum_steps micro-batches per step.
    stages with several models (PPO: policy and value): the stage builds its Updaters and a `run_step(step,
        micro_index) -> (row, micro-batches consumed)` that does whatever one step is (roll out, score, run each
        updater); the trainer checkpoints every updater's state, every named model and the stage state.
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
from ms_llm.training.metrics import RunLogger, read_metrics
from ms_llm.training.updater import Updater

log = logging.getLogger(__name__)


@dataclass
class StageSpec:
    loss_net: object = None                          # cell: (*batch) -> (numerator, denominator)
    batch_keys: tuple = ()                           # order of the numpy batch fields passed to loss_net
    next_batch: Callable[[int], dict] = None         # micro-batch index (over the run) -> numpy batch
    tokens_per_micro: int = 0                        # for tokens/s
    evaluate: Optional[Callable[[], dict]] = None    # -> {"eval/<name>": value}
    evaluate_at_start: bool = False                  # also at step 0, before any update (logged as step 0)
    params: Optional[list] = None                    # trainable parameters (default: all of loss_net's)
    weights_writer: Optional[Callable] = None        # checkpoint weight export (LoRA: adapter only)
    weights_reader: Optional[Callable] = None        # its inverse on resume: folder -> None
    lr_scales: Optional[list] = None                 # per-parameter lr multipliers
    extra_state: Callable[[], dict] = field(default=lambda: {})   # stage state saved in trainer_state.json
    loss_norm: Optional[float] = None                # typical loss denominator per micro-batch (default: tokens)
    check_resume: Optional[Callable[[dict], None]] = None     # check (raise) and restore stage state on resume
    should_stop: Optional[Callable[[list], bool]] = None       # list of evaluation rows -> stop early?
    step_metrics: Optional[Callable[[int], dict]] = None       # steps done -> extra values for this step's row
    # stages with several models
    updaters: Optional[list] = None                  # the stage's Updaters (default: one over loss_net)
    run_step: Optional[Callable[[int, int], tuple]] = None     # (step, micro_index) -> (row with "loss" and
                                                               # "skipped", micro-batches consumed)
    models: dict = field(default_factory=dict)       # further checkpointed models: {name: (writer, reader)}


@dataclass
class TrainResult:
    steps: int
    metrics: dict
    history: list
    resumed_from: Optional[str] = None
    evals: list = field(default_factory=list)        # [{"step", "eval/...": ...}] in this process
    before: dict = field(default_factory=dict)       # the step-0 evaluation (evaluate_at_start), also after a resume
    stopped_early: bool = False


def default_updater(cfg: ExperimentConfig, model, spec: StageSpec, layout: Layout) -> Updater:
    return Updater("model", cfg, spec.loss_net, model, layout, spec.params, lr_scales=spec.lr_scales,
                   loss_norm=float(spec.loss_norm or spec.tokens_per_micro))


def _to_tensors(batch: dict, keys) -> tuple:
    return tuple(ms.Tensor(np.ascontiguousarray(batch[k])) for k in keys)


def supervised_step(cfg: ExperimentConfig, spec: StageSpec, updater: Updater, layout: Layout):
    """run_step of the one-updater stages: train.grad_accum_steps micro-batches, one update."""
    accum = cfg.train.grad_accum_steps
    tokens_per_step = spec.tokens_per_micro * accum * cfg.parallel.data_parallel

    def run_step(step: int, micro_index: int):
        # built one at a time as the step consumes them (a micro-batch may carry large inputs, e.g. NEFTune
        # noise); the pipeline schedule walks them twice, so it gets a list
        batches = (_to_tensors(spec.next_batch(micro_index + j), spec.batch_keys) for j in range(accum))
        batches = list(batches) if layout.pp is not None else batches
        tic = time.perf_counter()
        out = updater(batches, step)
        dt = time.perf_counter() - tic
        row = {"loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
               "tokens_per_s": tokens_per_step / max(dt, 1e-9), "loss_scale": out["loss_scale"],
               "skipped": not out["finite"]}
        row.update({k: out[k] for k in updater.stat_names})
        return row, accum
    return run_step


def train(cfg: ExperimentConfig, model, spec: StageSpec, run_dir: str, layout: Layout = None) -> TrainResult:
    layout = layout or Layout()
    rank = layout.rank
    t = cfg.train
    updaters = spec.updaters or [default_updater(cfg, model, spec, layout)]
    if len({u.name for u in updaters}) != len(updaters):
        raise MsLlmError(f"updater names must differ: {[u.name for u in updaters]}")
    for u in updaters:
        if u.sharded:
            total = 2 * sum(int(p.size) for p in u.parameters)
            log.info("%s optimizer state sharded over %d ranks: rank %d holds %d of %d moment values (%.1f MB)",
                     u.name, cfg.parallel.data_parallel, rank, u.state_elements(), total, 4 * u.state_elements() / 2**20)
    if (spec.updaters is None) != (spec.run_step is None):
        raise MsLlmError("a stage gives both its updaters and its run_step, or neither")
    run_step = spec.run_step or supervised_step(cfg, spec, updaters[0], layout)
    root = os.path.join(run_dir, "checkpoints")
    resumed, start, micro_index = _resume(cfg, root, model, spec, updaters, layout)
    logger = RunLogger(run_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard)
    logger.truncate_after(start)
    bar = None
    if rank == 0 and t.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=t.max_steps, initial=start, desc=cfg.stage, dynamic_ncols=True)
    history, last, evals, stopped = [], {}, [], False
    nets = [u.loss_net for u in updaters]
    before = _evaluate_at_start(spec, nets, start, logger, run_dir)
    if before and start == 0:
        evals.append({"step": 0, **before})
    _set_train(nets, True)
    try:
        for step in range(start, t.max_steps):
            row, used = run_step(step, micro_index)
            micro_index += used
            history.append(row)
            done = step + 1
            if spec.step_metrics is not None:
                row.update(spec.step_metrics(done))
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "lr", "tokens_per_s", "reward", "kl") if k in row})
            if spec.evaluate and ((t.eval_every and done % t.eval_every == 0) or done == t.max_steps):
                row.update(_evaluate(spec, nets))
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
                _save(cfg, root, done, micro_index, model, spec, updaters, layout)
            if stopped:
                log.info("stopping early at step %d: the evaluation metric converged", done)
                break
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    _set_train(nets, False)
    metrics = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics["optimizer_state_elements"] = sum(u.state_elements() for u in updaters)
    metrics["parameters_on_rank"] = sum(int(p.size) for p in model.get_parameters())
    if history:
        metrics["first_loss"] = history[0]["loss"]
        metrics["skipped_steps"] = sum(bool(h["skipped"]) for h in history)
    steps = (start + len(history)) if history else start
    return TrainResult(steps, metrics, history, resumed, evals, stopped_early=stopped, before=before)


def _evaluate_at_start(spec: StageSpec, nets, start: int, logger: RunLogger, run_dir: str) -> dict:
    """The evaluation before any update, logged as step 0, so one run's metrics.jsonl shows its lift; a resumed
    run reads it back from there instead of evaluating weights it no longer holds."""
    if not (spec.evaluate and spec.evaluate_at_start):
        return {}
    if start == 0:
        row = _evaluate(spec, nets)
        logger.log(0, row)
        return row
    for row in read_metrics(run_dir):
        if row.get("step") == 0:
            return {k: v for k, v in row.items() if k.startswith("eval/")}
    return {}


def _save(cfg: ExperimentConfig, root: str, done: int, micro_index: int, model, spec: StageSpec, updaters, layout):
    # every rank takes part: ZeRO-1 moments, tensor-parallel slices and pipeline stages are gathered
    t = cfg.train
    full = {}
    for u in updaters:
        full.update(u.state_for_checkpoint())
    weights, writer = layout.whole_weights(model), spec.weights_writer
    if weights is not None:
        from ms_llm.models.io import save_state_dict
        writer = lambda d, w=weights: save_state_dict(w, model.config, d)    # noqa: E731
    if not layout.main:
        return
    models = {"model": writer or model}
    models.update({name: w for name, (w, _) in spec.models.items()})
    state = {"step": done, "data_position": micro_index, "seed": t.seed, "world_size": cfg.parallel.data_parallel,
             "micro_batch_size": t.micro_batch_size,
             "consumed_samples": micro_index * t.micro_batch_size * cfg.parallel.data_parallel,
             "updaters": [u.name for u in updaters],
             "loss_scale": {u.name: float(u.loss_scale.scale.asnumpy()) for u in updaters}, **spec.extra_state()}
    ckpt.save_checkpoint(root, done, models, full, state, cfg.checkpoint.keep)


def _resume(cfg: ExperimentConfig, root: str, model, spec: StageSpec, updaters, layout: Layout):
    """Restore weights, every updater's state, the stage state and data position; returns (path, step,
    micro_index)."""
    how = cfg.checkpoint.resume
    if how == "none":
        return None, 0, 0
    path = ckpt.find_resume(root) if how == "auto" else how
    if not path:
        return None, 0, 0
    if how != "auto":
        ckpt.verify(path)
    ts = ckpt.read_trainer_state(path)
    saved = ts.get("updaters", ["model"])
    if saved != [u.name for u in updaters]:
        raise MsLlmError(f"{path}: the checkpoint holds optimizer state for {saved}, this stage trains "
                         f"{[u.name for u in updaters]}")
    if spec.weights_reader is not None:
        spec.weights_reader(path)
    else:
        from ms_llm.models.io import load_weights
        load_weights(model, path, strict=True)
    for name, (_, reader) in spec.models.items():
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise MsLlmError(f"{path}: no '{name}/' model in this checkpoint")
        reader(folder)
    for u in updaters:          # checkpoints written before updaters had names hold one unprefixed state
        ckpt.load_optimizer_state(path, u.local_state(), u.local_state_from if "updaters" in ts else layout.local_optimizer_state)
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


def _set_train(nets, mode: bool):
    for net in nets:
        net.set_train(mode)


def _evaluate(spec: StageSpec, nets) -> dict:
    _set_train(nets, False)
    try:
        return spec.evaluate()
    finally:
        _set_train(nets, True)
