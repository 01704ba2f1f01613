# SPDX-License-Identifier: Apache-2.0
"""Pretraining stage (also continual pretraining from `model.init_from`): next-token loss on packed text.

    ms-llm data synth --out data/tiny && ms-llm train configs/tiny/pretrain.yaml
"""
import math
import os

import mindspore as ms

from ms_llm.config import ExperimentConfig
from ms_llm.data.loader import PretrainData
from ms_llm.errors import MsLlmError
from ms_llm.losses.lm import LMLoss
from ms_llm.models.build import build_model
from ms_llm.stages.common import export_final, finish, load_tokenizer, prepare_run_dir
from ms_llm.training.layout import Layout
from ms_llm.training.stage import SupervisedStage
from ms_llm.training.trainer import train


def eval_loss(loss_net, data: PretrainData, keys, micro_batch: int) -> dict:
    num = den = 0.0
    for batch in data.eval_batches(micro_batch):
        n, d = loss_net(*(ms.Tensor(batch[k]) for k in keys))
        num, den = num + float(n.asnumpy()), den + float(d.asnumpy())
    if not den:
        return {}
    return {"eval/loss": num / den, "eval/ppl": math.exp(min(num / den, 50.0))}


class PretrainStage(SupervisedStage):
    """Next-token loss on `data`'s packed rows; held-out loss and perplexity when data.eval_fraction > 0."""

    def __init__(self, cfg: ExperimentConfig, model, layout: Layout, data: PretrainData):
        d, mbs = cfg.data, cfg.train.micro_batch_size
        super().__init__(cfg, model, layout, LMLoss(model) if layout.pp is None else model,   # a pipeline stage
                         mbs * d.seq_len)                                                   # computes its own part
        self.data = data
        self.keys = ("input_ids", "labels", "position_ids", "segment_ids") if cfg.packing == "documents" \
            else ("input_ids", "labels")
        self.evaluates = d.eval_fraction > 0
        self.eval_fn = layout.eval_loss_fn(self.loss_net, model)

    def batch(self, micro_index: int) -> dict:
        return self.data.batch(micro_index, self.cfg.train.micro_batch_size, self.layout.data_rank,
                               self.layout.data_world)

    def evaluate(self) -> dict:
        return eval_loss(self.eval_fn, self.data, self.keys, self.cfg.train.micro_batch_size)


def run(cfg: ExperimentConfig, layout: Layout) -> dict:
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, layout)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise MsLlmError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                         f"{model.config.vocab_size}; raise model.overrides.vocab_size")
    d = cfg.data
    cache_dir = d.cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), ".cache")
    data = PretrainData(d.sources, tokenizer, d.seq_len, cache_dir, cfg.packing == "documents", d.shuffle_seed,
                        d.eval_fraction, d.on_error, d.index)
    result = train(cfg, PretrainStage(cfg, model, layout, data), run_dir)
    weights = layout.whole_weights(model)
    if not layout.main:
        return {}
    final = export_final(run_dir, model, tokenizer, cfg.pretrain.export_version, weights)
    metrics = dict(result.metrics, data_skipped_records=data.skipped)
    return finish(run_dir, cfg.stage, "completed", result.steps, metrics, final, plots=cfg.log.plots)
