# SPDX-License-Identifier: Apache-2.0
"""Reward-model stage (seed 000 §1.2.5.4.1): Bradley–Terry training on preference pairs.

    ms-llm train configs/tiny/reward.yaml model.init_from=runs/tiny_sft_lora

The model is the first `reward.num_layers` decoder layers of `model.init_from` plus a 2-layer MLP head
(models/reward.py), trained in full or with LoRA on the backbone. Pairs are drawn by tag at the configured
shares (hard-example mixing); the realised shares go into summary.json. Held-out pairs (`reward.eval_data`)
are split into a calibration part, on which Platt scaling is fitted at the end, and a test part, on which
accuracy, AUC, per-tag accuracy and ECE (before and after calibration) are reported; AUC is the gate.
`final/` holds the backbone, the head, its config with the Platt coefficients and the tokenizer
(`ms_llm.models.load_reward_model` reads it).
"""
import os

import numpy as np

from ms_llm.config import ExperimentConfig
from ms_llm.manifest import verify_dataset
from ms_llm.data.preference import KEYS, PairStats, PreferenceData, read_pairs
from ms_llm.errors import MsLlmError
from ms_llm.eval.reward import fit_platt, pair_metrics, score_pairs, split_calibration
from ms_llm.eval.results import gate
from ms_llm.losses.reward import RewardLoss
from ms_llm.models.build import build_model
from ms_llm.models.io import load_weights, model_state_dict, save_pretrained, save_state_dict
from ms_llm.models.reward import HEAD_FILE, RewardModel, save_head, truncate
from ms_llm.models.safetensors_io import read_safetensors
from ms_llm.peft.lora import LoRAConfig, apply_lora, hold_base, load_adapter, save_adapter
from ms_llm.stages.common import export_final, finish, load_tokenizer, merged, prepare_run_dir
from ms_llm.training.layout import Layout
from ms_llm.training.stage import SupervisedStage
from ms_llm.training.trainer import train


def build_reward_model(cfg: ExperimentConfig) -> RewardModel:
    r = cfg.reward
    backbone = truncate(build_model(cfg), r.num_layers)
    if r.lora.enabled:
        apply_lora(backbone, LoRAConfig(r.lora.r, r.lora.alpha, r.lora.dropout, list(r.lora.targets)))
        hold_base(backbone, r.lora.base_dtype, "reward.lora")
    return RewardModel(backbone, r.head_hidden, r.activation)


def checkpoint_io(cfg: ExperimentConfig, rm: RewardModel):
    """(writer, reader) of a checkpoint's weights: the backbone (or its adapter) and the head."""
    lora = cfg.reward.lora.enabled

    def write(folder, weights=None):
        # weights: ZeRO-3's gathered matrices of the reward model (trainer._save); the rest is read as it is held
        def part(prefix):
            return {n[len(prefix):]: v for n, v in (weights or {}).items() if n.startswith(prefix)}
        if lora:
            save_adapter(rm.backbone, folder, cfg.model.init_from, part("backbone."))
        elif weights:
            save_state_dict({**model_state_dict(rm.backbone), **part("backbone.")}, rm.backbone.config, folder)
        else:
            save_pretrained(rm.backbone, folder)
        save_head(rm, folder, chat_template=cfg.tokenizer.chat_template, weights=part("score_head."))

    def read(folder):
        if lora:
            load_adapter(rm.backbone, folder)
        else:
            load_weights(rm.backbone, folder, strict=True)
        rm.load_head(read_safetensors(os.path.join(folder, HEAD_FILE)), os.path.join(folder, HEAD_FILE))
    return write, read


def make_evaluator(cfg: ExperimentConfig, rm: RewardModel, tokenizer, stats: PairStats):
    """evaluate() -> eval/* metrics on the test part of the held-out pairs; keeps the last scores of every
    held-out pair in `evaluate.scores` for the calibration fit."""
    r = cfg.reward
    if not r.eval_data:
        return None, [], []
    pairs = read_pairs(r.eval_data, tokenizer, cfg.tokenizer.chat_template, cfg.data.seq_len, cfg.data.on_error, stats)
    pairs = pairs[:r.eval_limit] if r.eval_limit else pairs
    cal, test = split_calibration(len(pairs), r.calibration_fraction, cfg.train.seed)
    if not len(test):
        raise MsLlmError(f"reward.calibration_fraction={r.calibration_fraction} leaves no test pairs of "
                         f"{len(pairs)} in {r.eval_data}")
    tags = [pairs[i]["tag"] for i in test]

    def evaluate():
        c, j = score_pairs(rm, pairs, r.eval_batch_size)
        evaluate.scores = (c, j)
        return {f"eval/{k}": v for k, v in pair_metrics(c[test], j[test], tags).items()}
    evaluate.scores = None
    return evaluate, cal, test


class RewardStage(SupervisedStage):
    """Pairwise ranking loss (+ reward centring) on preference pairs; held-out AUC and calibration."""
    keys = KEYS

    def __init__(self, cfg: ExperimentConfig, rm: RewardModel, layout: Layout, data: PreferenceData, evaluate,
                 binding):
        mbs = cfg.train.micro_batch_size
        super().__init__(cfg, rm, layout, RewardLoss(rm, cfg.reward.center_coef), 2 * mbs * cfg.data.seq_len,
                         loss_norm=float(mbs))
        self.data, self._evaluate, self.evaluates = data, evaluate, evaluate is not None
        self.must_match = {"dataset": binding} if binding else {}

    def batch(self, micro_index: int) -> dict:
        batch = self.data.batch(micro_index, self.cfg.train.micro_batch_size, self.layout.data_rank,
                                self.layout.data_world)
        if not self.cfg.reward.use_margin:
            batch["margin"] = np.zeros_like(batch["margin"])
        return batch

    def evaluate(self) -> dict:
        return self._evaluate()

    def weights_io(self):
        return checkpoint_io(self.cfg, self.model)


def run(cfg: ExperimentConfig, layout: Layout) -> dict:
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    r, d = cfg.reward, cfg.data
    binding = verify_dataset(r.dataset_manifest, r.dataset_version, "reward.dataset_version") \
        if r.dataset_manifest else None
    rm = build_reward_model(cfg)
    data = PreferenceData(d.sources, tokenizer, cfg.tokenizer.chat_template, d.seq_len, r.tag_shares,
                          d.shuffle_seed, d.on_error)
    eval_stats = PairStats()
    evaluate, cal, test = make_evaluator(cfg, rm, tokenizer, eval_stats)
    result = train(cfg, RewardStage(cfg, rm, layout, data, evaluate, binding), run_dir)
    if not layout.main:
        return {}
    rm.set_train(False)
    metrics = dict(result.metrics, data_skipped_records=data.stats.skipped,
                   data_truncated_prompts=data.stats.truncated_prompts, eval_skipped_pairs=eval_stats.skipped,
                   eval_truncated_prompts=eval_stats.truncated_prompts)
    samples = result.steps * cfg.global_batch
    metrics.update({f"data/share/{t}": v for t, v in data.realised_shares(samples).items()})
    metrics.update({f"data/target_share/{t}": v for t, v in data.shares.items()})
    calibration, gates = {"a": 1.0, "b": 0.0}, {}
    if evaluate is not None:
        if evaluate.scores is None:              # resumed at the last step: nothing evaluated in this process
            metrics.update(evaluate())
        c, j = evaluate.scores
        if len(cal):
            calibration = fit_platt(c[cal] - j[cal])
        final_eval = pair_metrics(c[test], j[test], None, calibration)
        metrics.update({"eval/ece_calibrated": final_eval["ece_calibrated"], "platt/a": calibration["a"],
                        "platt/b": calibration["b"]})
        gates["auc"] = gate(metrics["eval/auc"], r.gate_auc)
    backbone = merged(cfg, rm.backbone) if r.lora.enabled else rm.backbone
    final = export_final(run_dir, backbone, tokenizer, r.export_version,
                         extra=lambda folder: save_head(rm, folder, calibration, cfg.tokenizer.chat_template))
    if binding:
        final["dataset"] = binding
    return finish(run_dir, cfg.stage, "completed", result.steps, metrics, final, gates, plots=cfg.log.plots)
