# SPDX-License-Identifier: Apache-2.0
"""Pretraining stage (also continual pretraining from `model.init_from`): next-token loss on packed text.

    ms-llm data synth --out data/tiny && ms-llm train configs/tiny/pretrain.yaml
"""
import math
import os

import mindspore as ms

from ms_llm.config import ExperimentConfig
from ms_llm.data.loader import PretrainData
from ms_llm.losses.lm import LMLoss
from ms_llm.stages.common import (build_model, data_position, export_final, finish, load_tokenizer, prepare_run_dir,
                                  whole_weights)
from ms_llm.training.trainer import StageSpec, train


def eval_loss(loss_net, data: PretrainData, keys, micro_batch: int) -> dict:
    num = den = 0.0
    for batch in data.eval_batches(micro_batch):
        n, d = loss_net(*(ms.Tensor(batch[k]) for k in keys))
        num, den = num + float(n.asnumpy()), den + float(d.asnumpy())
    if not den:
        return {}
    return {"eval/loss": num / den, "eval/ppl": math.exp(min(num / den, 50.0))}


def pipeline_loss(model):
    """Under pipeline parallelism the loss is computed by passing the batch through every stage."""
    from ms_llm.training.pipeline import PipelineLoss
    return PipelineLoss(model)


def run(cfg: ExperimentConfig, rank: int = 0, world: int = 1, reducer=None, tp=None, pp=None) -> dict:
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tp, pp)
    data_rank, data_world = data_position(rank, world, tp, pp)
    if tokenizer.vocab_size > model.config.vocab_size:
        from ms_llm.errors import MsLlmError
        raise MsLlmError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                         f"{model.config.vocab_size}; raise model.overrides.vocab_size")
    d = cfg.data
    cache_dir = d.cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), ".cache")
    data = PretrainData(d.sources, tokenizer, d.seq_len, cache_dir, d.packing and d.document_mask, d.shuffle_seed,
                        d.eval_fraction, d.on_error, d.index)
    keys = ("input_ids", "labels", "position_ids", "segment_ids") if d.packing and d.document_mask else ("input_ids", "labels")
    loss_net = LMLoss(model) if pp is None else model
    loss_fn = loss_net if pp is None else pipeline_loss(model)
    mbs = cfg.train.micro_batch_size
    spec = StageSpec(loss_net=loss_net, batch_keys=keys,
                     next_batch=lambda i: data.batch(i, mbs, data_rank, data_world),
                     tokens_per_micro=mbs * d.seq_len,
                     evaluate=(lambda: eval_loss(loss_fn, data, keys, mbs)) if d.eval_fraction > 0 else None)
    result = train(cfg, model, spec, run_dir, rank, reducer)
    weights = whole_weights(model)
    if rank != 0:
        return {}
    final = export_final(run_dir, model, tokenizer, cfg.pretrain.export_version, weights)
    metrics = dict(result.metrics, data_skipped_records=data.skipped)
    return finish(run_dir, cfg.stage, "completed", result.steps, metrics, final, plots=cfg.log.plots)
