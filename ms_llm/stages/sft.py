# SPDX-License-Identifier: Apache-2.0
"""Supervised fine-tuning (seed 000 §1.2.5.3, seed 002 §4): full or LoRA, single- and multi-turn.

    ms-llm train configs/tiny/sft_lora.yaml model.init_from=runs/tiny_pretrain

Data comes through the chat template with loss on assistant tokens only, per-task loss weights and
per-turn normalization (data/sft.py). With `sft.lora.enabled` only the adapters train; checkpoints hold
the adapter alone, and the run exports `final_adapter/` (PEFT format) plus the merged model in `final/`.
Held-out prompts (`sft.eval_prompts`) are scored by exact match at every evaluation and at the end.
"""
import os

from ms_llm.config import ExperimentConfig
from ms_llm.data.readers import read_records
from ms_llm.data.sft import SFTData
from ms_llm.eval.generative import exact_match
from ms_llm.losses.sft import SFTLoss
from ms_llm.peft.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
from ms_llm.stages.common import build_model, export_final, finish, load_tokenizer, prepare_run_dir
from ms_llm.training.trainer import StageSpec, train

KEYS = ("input_ids", "labels", "attention_mask", "weights", "row_weight")


def make_evaluator(cfg: ExperimentConfig, model, tokenizer):
    s = cfg.sft
    if not s.eval_prompts:
        return None
    records = read_records(s.eval_prompts, "prompts")
    records = records[:s.eval_limit] if s.eval_limit else records

    def evaluate():
        res = exact_match(model, tokenizer, records, cfg.tokenizer.chat_template, s.eval_max_new_tokens)
        out = {"eval/exact_match": res["accuracy"]}
        out.update({f"eval/exact_match/{t}": v for t, v in res["tasks"].items()})
        return out
    return evaluate


def run(cfg: ExperimentConfig, rank: int = 0, world: int = 1, reducer=None) -> dict:
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg)
    lora = cfg.sft.lora
    writer = reader = None
    if lora.enabled:
        apply_lora(model, LoRAConfig(lora.r, lora.alpha, lora.dropout, list(lora.targets)))
        writer = lambda folder: save_adapter(model, folder, cfg.model.init_from)      # noqa: E731
        reader = lambda folder: load_adapter(model, folder)                           # noqa: E731
    d = cfg.data
    data = SFTData(d.sources, tokenizer, cfg.tokenizer.chat_template, d.seq_len, cfg.sft, d.shuffle_seed, d.on_error)
    mbs = cfg.train.micro_batch_size
    evaluate = make_evaluator(cfg, model, tokenizer)
    before = evaluate() if evaluate and rank == 0 else {}
    spec = StageSpec(loss_net=SFTLoss(model), batch_keys=KEYS, next_batch=lambda i: data.batch(i, mbs, rank, world),
                     tokens_per_micro=mbs * d.seq_len, evaluate=evaluate, weights_writer=writer,
                     weights_reader=reader, loss_norm=float(mbs))
    result = train(cfg, model, spec, run_dir, rank, reducer)
    if rank != 0:
        return {}
    model.set_train(False)
    if lora.enabled:
        save_adapter(model, os.path.join(run_dir, "final_adapter"), cfg.model.init_from)
        exported = merge_lora(model)
    else:
        exported = model
    final = export_final(run_dir, exported, tokenizer, None)
    metrics = dict(result.metrics, data_skipped_records=data.stats.skipped,
                   **{f"before/{k}": v for k, v in before.items()})
    return finish(run_dir, cfg.stage, "completed", result.steps, metrics, final, plots=cfg.log.plots)
