# SPDX-License-Identifier: Apache-2.0
"""The training loop every stage shares: resume, logging, evaluation, checkpoints, early stop.

`train(cfg, stage, run_dir)` drives a `training.stage.Stage`: it calls `stage.step` max_steps times, evaluates
every train.eval_every steps, and checkpoints every updater's state, every model and `stage.state_dict()`.
Nothing here knows which objective a stage optimizes, or how many models it trains.
"""
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm import tqdm

from ms_llm.config import ExperimentConfig
from ms_llm.errors import MsLlmError
from ms_llm.models.io import load_weights, save_state_dict
from ms_llm.models.shards import shape_of
from ms_llm.training import checkpoint as ckpt
from ms_llm.training.metrics import RunLogger, read_metrics
from ms_llm.training.stage import Stage

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    metrics: dict
    history: list
    resumed_from: Optional[str] = None
    evals: list = field(default_factory=list)        # [{"step", "eval/...": ...}] in this process
    before: dict = field(default_factory=dict)       # the step-0 evaluation (evaluate_at_start), also after a resume
    stopped_early: bool = False


def train(cfg: ExperimentConfig, stage: Stage, run_dir: str) -> TrainResult:
    layout, model, t = stage.layout, stage.model, cfg.train
    updaters = stage.updaters()
    if len({u.name for u in updaters}) != len(updaters):
        raise MsLlmError(f"updater names must differ: {[u.name for u in updaters]}")
    for u in updaters:
        if u.sharded:
            total = 2 * sum(int(np.prod(shape_of(p))) for p in u.parameters)
            log.info("%s optimizer state sharded over %d ranks: rank %d holds %d of %d moment values (%.1f MB)",
                     u.name, cfg.parallel.data_parallel, layout.rank, u.state_elements(), total,
                     4 * u.state_elements() / 2**20)
    root = os.path.join(run_dir, "checkpoints")
    check_shared_storage(run_dir, layout)
    resumed, start, micro_index = _resume(cfg, root, stage, updaters)
    logger = RunLogger(run_dir, enabled=layout.rank == 0, tensorboard=cfg.log.tensorboard)
    logger.truncate_after(start)
    bar = None
    if layout.rank == 0 and t.progress_bar:
        bar = tqdm(total=t.max_steps, initial=start, desc=cfg.stage, dynamic_ncols=True)
    history, last, evals, stopped = [], {}, [], False
    nets = [u.loss_net for u in updaters]
    before = _evaluate_at_start(stage, nets, start, logger, run_dir)
    if before and start == 0:
        evals.append({"step": 0, **before})
    _set_train(nets, True)
    try:
        for step in range(start, t.max_steps):
            row, used = stage.step(step, micro_index)
            micro_index += used
            history.append(row)
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "lr", "tokens_per_s", "reward", "kl") if k in row})
            if stage.evaluates and ((t.eval_every and done % t.eval_every == 0) or done == t.max_steps):
                row.update(_evaluate(stage, nets))
                since = history[len(history) - (done - (evals[-1]["step"] if evals else start)):]
                row["eval/train_loss"] = float(np.mean([h["loss"] for h in since if not h["skipped"]] or [row["loss"]]))
                evals.append({"step": done, **{k: v for k, v in row.items() if k.startswith("eval/")}})
                stop = stage.should_stop(evals)    # it may annotate the evaluation (e.g. gate results): keep those
                row.update({k: v for k, v in evals[-1].items() if k.startswith("eval/")})
                stopped = bool(stop and done != t.max_steps)
            if done % t.log_every == 0 or done == t.max_steps or row["skipped"] or any(k.startswith("eval/") for k in row):
                logger.log(done, row)
            last = row
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == t.max_steps or stopped:
                _save(cfg, root, done, micro_index, stage, updaters)
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
    if layout.zero is not None:        # whole weights again on rank 0, for the stage's exports and evaluations
        layout.zero.unshard()
    return TrainResult(steps, metrics, history, resumed, evals, stopped_early=stopped, before=before)


def _evaluate_at_start(stage: Stage, nets, start: int, logger: RunLogger, run_dir: str) -> dict:
    """The evaluation before any update, logged as step 0, so one run's metrics.jsonl shows its lift; a resumed
    run reads it back from there instead of evaluating weights it no longer holds."""
    if not (stage.evaluates and stage.evaluate_at_start):
        return {}
    if start == 0:
        row = _evaluate(stage, nets)
        logger.log(0, row)
        return row
    for row in read_metrics(run_dir):
        if row.get("step") == 0:
            return {k: v for k, v in row.items() if k.startswith("eval/")}
    return {}


def _save(cfg: ExperimentConfig, root: str, done: int, micro_index: int, stage: Stage, updaters):
    # every rank takes part: ZeRO-1 moments, tensor-parallel slices and pipeline stages are gathered
    t, layout, model = cfg.train, stage.layout, stage.model
    full = {}
    for u in updaters:
        full.update(u.state_for_checkpoint())
    io = stage.weights_io()
    weights = layout.whole_weights(model, shards_only=io is not None)
    writer = io[0] if io else model
    if weights is not None and io is not None:       # ZeRO-3 with LoRA: the adapter's gathered factors
        writer = lambda d, w=weights: io[0](d, w)    # noqa: E731
    elif weights is not None:
        writer = lambda d, w=weights: save_state_dict(w, model.config, d)    # noqa: E731
    if not layout.main:
        return
    models = {"model": writer}
    models.update({name: w for name, (w, _) in stage.models().items()})
    state = {"step": done, "data_position": micro_index, "seed": t.seed, "world_size": cfg.parallel.data_parallel,
             "micro_batch_size": t.micro_batch_size,
             "consumed_samples": micro_index * t.micro_batch_size * cfg.parallel.data_parallel,
             "updaters": [u.name for u in updaters],
             "loss_scale": {u.name: float(u.loss_scale.scale.asnumpy()) for u in updaters}, **stage.state_dict()}
    ckpt.save_checkpoint(root, done, models, full, state, cfg.checkpoint.keep)


def check_shared_storage(run_dir: str, layout):
    """With several nodes (MS_LLM_NNODES, set by `ms-llm launch`), every rank must see the run directory rank 0
    writes: rank 0 writes a marker there, every rank looks for it, and ranks that do not see it are named in
    one error on every rank. `ms-llm launch --node-local-checkpoints` (MS_LLM_NODE_LOCAL_CHECKPOINTS=1) skips
    the check for users who copy checkpoints between nodes themselves; the resume-step agreement still holds."""
    nnodes = int(os.environ.get("MS_LLM_NNODES", "1"))
    if layout.world == 1 or nnodes == 1 or os.environ.get("MS_LLM_NODE_LOCAL_CHECKPOINTS") == "1":
        return
    token = np.zeros(layout.world, np.float32)
    if layout.main:
        token[0] = secrets.randbelow(2 ** 24)              # exact in float32
        os.makedirs(run_dir, exist_ok=True)
        marker = os.path.join(run_dir, f".shared_storage_{int(token[0])}")
        with open(marker, "w") as f:
            f.write(f"written by rank 0 of a {layout.world}-rank job on {socket.gethostname()}\n")
    token = int(layout.world_sum(token)[0])                    # also the barrier: the marker exists from here on
    marker = os.path.join(run_dir, f".shared_storage_{token}")
    seen = np.zeros(layout.world, np.float32)
    seen[layout.rank] = os.path.isfile(marker)
    seen = layout.world_sum(seen)
    if layout.main:
        os.remove(marker)
    blind = [r for r in range(layout.world) if not seen[r]]
    if blind:
        raise MsLlmError(f"{os.path.abspath(run_dir)}: rank(s) {blind} of {layout.world} on {nnodes} nodes do not "
                         f"see the marker rank 0 wrote there. Rank 0 writes checkpoints and exports: put "
                         f"train.output_dir on storage every node sees, or pass --node-local-checkpoints to ms-llm "
                         f"launch and copy checkpoints between nodes yourself")


def _agreed_resume_path(cfg: ExperimentConfig, root: str, layout):
    """The checkpoint every rank resumes from (None: a fresh start), agreed by a collective: rank 0 verifies
    it and shares the result, and ranks that would resume from different steps (node-local run directories,
    a checkpoint some node cannot see) stop with one error naming each rank's step."""
    how = cfg.checkpoint.resume
    path, step, failure = None, 0, None
    try:
        path = ckpt.find_resume(root, main=layout.main) if how == "auto" else how
        if path and how != "auto" and layout.main:
            ckpt.verify(path)
        if path:
            step = int(ckpt.read_trainer_state(path)["step"])
    except MsLlmError as e:
        failure = e
    if layout.world > 1:
        mine = np.zeros(2 * layout.world, np.float32)
        mine[layout.rank], mine[layout.world + layout.rank] = step, failure is not None
        agreed = layout.world_sum(mine)
        steps, failed = agreed[:layout.world].astype(int), agreed[layout.world:] > 0
        if failure is None and failed.any():
            bad = [r for r in range(layout.world) if failed[r]]
            raise MsLlmError(f"rank(s) {bad} could not read the checkpoint to resume from (their logs name it); "
                             f"this rank would have resumed from {path or 'nothing'}")
        if failure is None and len(set(steps.tolist())) > 1:
            where = ", ".join(f"rank {r} from step {s}" for r, s in enumerate(steps.tolist()))
            raise MsLlmError(f"the ranks would resume from different steps ({where}; 0: no checkpoint in {root}). "
                             "Rank 0 writes the checkpoints: every rank must see the same run directory (shared "
                             "storage across nodes), or copy rank 0's checkpoint to every node")
    if failure is not None:
        raise failure
    return path


def _resume(cfg: ExperimentConfig, root: str, stage: Stage, updaters):
    """Restore weights, every updater's state, the stage state and data position; returns (path, step,
    micro_index)."""
    if cfg.checkpoint.resume == "none":
        return None, 0, 0
    path = _agreed_resume_path(cfg, root, stage.layout)
    if not path:
        return None, 0, 0
    ts = ckpt.read_trainer_state(path)
    saved = ts.get("updaters", ["model"])
    if saved != [u.name for u in updaters]:
        raise MsLlmError(f"{path}: the checkpoint holds optimizer state for {saved}, this stage trains "
                         f"{[u.name for u in updaters]}")
    io = stage.weights_io()
    if io is not None:
        io[1](path)
    else:
        load_weights(stage.model, path, strict=True)
    for name, (_, reader) in stage.models().items():
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise MsLlmError(f"{path}: no '{name}/' model in this checkpoint")
        reader(folder)
    for u in updaters:          # checkpoints written before updaters had names hold one unprefixed state
        local = u.local_state_from if "updaters" in ts else stage.layout.local_optimizer_state
        ckpt.load_optimizer_state(path, u.local_state(), local)
    stage.load_state_dict(ts)
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


def _evaluate(stage: Stage, nets) -> dict:
    _set_train(nets, False)
    try:
        return stage.evaluate()
    finally:
        _set_train(nets, True)
