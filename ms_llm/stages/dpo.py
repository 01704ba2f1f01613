# SPDX-License-Identifier: Apache-2.0
"""Preference optimisation (seed 002 §5.2.2): DPO and its family, and KTO, on the SFT model.

    ms-llm train configs/tiny/dpo.yaml                 # from runs/tiny_sft_rlhf_1500/final
    ms-llm train configs/tiny/dpo.yaml dpo.loss=simpo dpo.beta=2.0

The policy starts from `model.init_from` (full or LoRA). The reference is frozen, and its log-probs enter the
loss as inputs (losses/dpo.py), computed one of two ways:

  online   a frozen model scores every micro-batch: a copy of model.init_from, the model `dpo.reference` names,
           or — with LoRA — the policy itself with its adapter disabled (one base in memory);
  cached   the reference scores every training and held-out pair once, into `dpo.cache_dir` (safetensors +
           MANIFEST.json bound to the data's and the reference's hashes), and is unloaded before training.
           A cache built for other data or another reference is refused; resume reuses it.

SimPO and ORPO need no reference and load none. KTO reads unpaired completions (or splits pairs), scores
each row's mismatched partner for its KL estimate, and runs with an online reference.

Every step logs the loss and the implicit rewards (chosen, rejected, margin, accuracy) with the policy's
log-probs; evaluations report held-out preference accuracy; at the end, with `dpo.winrate.judge`, greedy
answers of the trained model and of the starting model are judged by a reward model in both orders.
"""
import functools
import hashlib
import itertools
import logging
import os

import numpy as np
from mindspore import Tensor, nn
from tqdm import tqdm

from ms_llm import storage
from ms_llm.config import ExperimentConfig
from ms_llm.config.schema import FrozenModelSection
from ms_llm.data.preference import CompletionData, PairStats, PreferenceData, answer_labels, read_pairs
from ms_llm.data.readers import read_records
from ms_llm.errors import MsLlmError
from ms_llm.eval.generative import chat_answers, score_judge, win_rate
from ms_llm.eval.results import gate, model_identity
from ms_llm.fileio import sha256_file
from ms_llm.losses.dpo import (REFERENCE_FREE, KTOLossAtZ, PreferenceLoss, implicit_rewards,
                             model_sequence_logps)
from ms_llm.manifest import verify, write_manifest
from ms_llm.models import load_pretrained
from ms_llm.models.build import build_model
from ms_llm.models.frozen import frozen_dtype, load_frozen
from ms_llm.models.io import resolve_model_dir
from ms_llm.models.reward import load_reward_model
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors
from ms_llm.peft.lora import LoRAConfig, apply_lora, hold_base
from ms_llm.stages import common
from ms_llm.stages.common import export_final, finish, load_tokenizer, policy_dtype, prepare_run_dir, trained_model
from ms_llm.training.layout import Layout
from ms_llm.training.stage import SupervisedStage, adapter_io
from ms_llm.training.trainer import train

log = logging.getLogger(__name__)
KEYS = ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "ref_chosen", "ref_rejected")
KTO_KEYS = ("ids", "labels", "ref_logps", "desirable", "z")          # KTOLossAtZ's inputs
CACHE_FILE = "reference_logps.safetensors"


class SequenceScorer(nn.Cell):
    """(ids, labels) [N, S] -> summed log-probs of the labelled tokens [N]: a graph of its own, no gradients."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model, self.readout = model, model.readout_cell()

    def construct(self, ids, labels):
        return model_sequence_logps(self.model, self.readout, ids, labels)[0]


def score_rows(scorer: SequenceScorer, ids, labels, batch: int) -> np.ndarray:
    out = [scorer(Tensor(ids[i:i + batch]), Tensor(labels[i:i + batch])).asnumpy()
           for i in range(0, len(ids), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def with_labels(pairs: dict) -> dict:
    """Adds chosen_labels / rejected_labels (answer tokens only) to stacked pairs."""
    for side in ("chosen", "rejected"):
        pairs[f"{side}_labels"] = answer_labels(pairs[f"{side}_ids"], pairs[f"{side}_mask"], pairs[f"{side}_start"])
    return pairs


def score_pairs(scorer: SequenceScorer, pairs: dict, batch: int):
    """(log p(chosen), log p(rejected)) [N] of stacked, labelled pairs."""
    return tuple(score_rows(scorer, pairs[f"{s}_ids"], pairs[f"{s}_labels"], batch) for s in ("chosen", "rejected"))


def stack(pairs: list) -> dict:
    return with_labels({k: np.stack([p[k] for p in pairs]) for k in pairs[0] if k not in ("tag", "messages")}) \
        if pairs else {}


def data_identity(chunks) -> str:
    """SHA256 of the token rows and labels every pair is scored on (covers files, tokenizer, template, seq_len),
    over an iterable of stacked chunks."""
    h = hashlib.sha256()
    for pairs in chunks:
        for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"):
            if k in pairs:
                h.update(k.encode())
                h.update(np.ascontiguousarray(pairs[k]).tobytes())
    return h.hexdigest()


def chunks(data: PreferenceData, size: int):
    """Every training pair, stacked and labelled, `size` at a time in `rows` order."""
    for start in range(0, len(data), size):
        yield with_labels(data.rows(start, size))


def reference_section(cfg: ExperimentConfig) -> FrozenModelSection:
    return common.reference_section(cfg, cfg.dpo)


@functools.lru_cache(maxsize=8)
def weights_identity(model_dir: str) -> str:
    """The model_sha256 of its manifest, else a hash over the SHA256 of every weight file (file names alone do
    not tell two checkpoints of one architecture apart)."""
    if os.path.isfile(os.path.join(model_dir, "MANIFEST.json")):
        return model_identity(model_dir)
    files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    h = hashlib.sha256()
    for n in files:
        h.update(f"{n}:{sha256_file(os.path.join(model_dir, n))}".encode())
    return h.hexdigest()


def reference_identity(cfg: ExperimentConfig, section: FrozenModelSection) -> str:
    """What the cached log-probs depend on besides the data: the reference's weights and compute dtype."""
    if section.policy_without_adapter:
        return f"{weights_identity(resolve_model_dir(cfg.model.init_from))}:{policy_dtype(cfg)}"
    return f"{weights_identity(resolve_model_dir(section.path))}:{frozen_dtype(section.dtype, 'dpo.reference')}"


def load_reference(cfg: ExperimentConfig, section: FrozenModelSection, policy, tokenizer):
    aux = load_frozen(section, "dpo.reference", policy, resolve_model_dir(cfg.model.init_from), tokenizer)
    if aux.tokenizer is not None and aux.tokenizer.vocab_size != tokenizer.vocab_size:
        raise MsLlmError(f"dpo.reference: {aux.path} has a tokenizer of {aux.tokenizer.vocab_size} tokens, the "
                         f"policy's has {tokenizer.vocab_size}; the log-probs would not be comparable")
    return SequenceScorer(aux.model)


def reference_cache(cfg: ExperimentConfig, run_dir: str, data: PreferenceData, eval_pairs: dict, build) -> dict:
    """{"train/chosen", "train/rejected", "eval/chosen", "eval/rejected"} from `dpo.cache_dir`, built with
    `build()` when absent; a cache whose data or reference identity differs is refused."""
    folder = cfg.dpo.cache_dir or os.path.join(run_dir, "reference_logps")
    section = reference_section(cfg)
    want = {"data_sha256": data_identity(itertools.chain(chunks(data, 256), [eval_pairs])),
            "reference": reference_identity(cfg, section)}
    if section.sha256 and not want["reference"].startswith(section.sha256 + ":"):
        raise MsLlmError(f"dpo.reference.sha256 {section.sha256} does not match the reference model "
                         f"({want['reference'].split(':')[0]}); refusing to train against other weights")
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "MANIFEST.json")):
        raise MsLlmError(f"dpo.cache_dir {folder} exists but holds no reference cache (no MANIFEST.json); point "
                         "dpo.cache_dir at a new folder or remove this one")
    if os.path.isfile(os.path.join(folder, "MANIFEST.json")):
        manifest = verify(folder)
        for key, value in want.items():
            if manifest.get(key) != value:
                what = "data (pairs, tokenizer, template or seq_len)" if key == "data_sha256" else "reference model"
                raise MsLlmError(f"{folder}: this reference cache was built for other {what} ({key} "
                                 f"{manifest.get(key)} != {value}); delete it or set dpo.cache_dir elsewhere")
        log.info("reference log-probs from the cache %s", folder)
        return read_safetensors(os.path.join(folder, CACHE_FILE))
    values = build()
    # every data-parallel rank computes the same values; whichever renames its copy first wins
    with storage.writing_dir(folder, "reference cache", replace=False) as tmp:
        write_safetensors(os.path.join(tmp, CACHE_FILE), values)
        write_manifest(tmp, extra={"format": "ms_llm.reference_logps.v1", **want})
    log.info("reference log-probs of %d training pairs cached in %s", len(values["train/chosen"]), folder)
    return values


def score_dataset(scorer: SequenceScorer, data: PreferenceData, eval_pairs: dict, batch: int, progress: bool) -> dict:
    chosen, rejected = [], []
    parts = chunks(data, batch)
    if progress:
        parts = tqdm(parts, total=-(-len(data) // batch), desc="reference log-probs", dynamic_ncols=True)
    for pairs in parts:
        c, r = score_pairs(scorer, pairs, batch)
        chosen.append(c)
        rejected.append(r)
    ec, er = score_pairs(scorer, eval_pairs, batch) if eval_pairs else (np.zeros(0, np.float32),) * 2
    return {"train/chosen": np.concatenate(chosen), "train/rejected": np.concatenate(rejected), "eval/chosen": ec,
            "eval/rejected": er}


def make_evaluator(cfg: ExperimentConfig, policy, pairs: dict, ref: tuple):
    """Held-out preference accuracy and margin of the implicit reward."""
    d = cfg.dpo
    if not pairs:
        return None
    scorer = SequenceScorer(policy)

    def evaluate():
        pc, pr = score_pairs(scorer, pairs, d.eval_batch_size)
        nc, nr = (np.maximum((pairs[f"{s}_labels"] != -100).sum(-1), 1) for s in ("chosen", "rejected"))
        wc, wr = implicit_rewards(d.loss if d.loss != "kto" else "sigmoid", pc, pr, ref[0], ref[1], nc, nr, d.beta)
        # a tie (the policy still equals the reference) counts half: the starting point is chance, not 0
        won = (wc > wr) + 0.5 * (wc == wr)
        return {"eval/preference_accuracy": float(np.mean(won)), "eval/reward_margin": float(np.mean(wc - wr)),
                "eval/rewards_chosen": float(np.mean(wc)), "eval/rewards_rejected": float(np.mean(wr))}
    return evaluate


def win_rate_against_start(cfg: ExperimentConfig, trained, tokenizer, eval_records: list) -> dict:
    """Greedy answers of the trained and the starting model, judged by `dpo.winrate.judge` in both orders."""
    w = cfg.dpo.winrate
    judge = load_reward_model(w.judge)
    if w.prompts:
        convs = [[{"role": "user", "content": r["prompt"]}] for r in read_records(w.prompts, "prompts")]
    else:
        convs = [r["messages"] for r in eval_records]
    convs = convs[:w.limit]
    if not convs:
        raise MsLlmError("dpo.winrate: no prompts (set dpo.winrate.prompts or dpo.eval_data)")
    template = cfg.tokenizer.chat_template
    ours = chat_answers(trained, tokenizer, convs, template, w.max_new_tokens)
    start = chat_answers(load_pretrained(cfg.model.init_from), tokenizer, convs, template, w.max_new_tokens)
    res = win_rate(convs, ours, start, score_judge(lambda p, a: float(judge.score([p], [a]).raw[0])))
    # a scalar judge has no position bias (both orders agree by construction); an LLM judge would
    return {"winrate/win_rate": res["win_rate"], "winrate/position_bias": res["position_bias"], "winrate/n": res["n"],
            "winrate/identical_answers": float(np.mean([a == b for a, b in zip(ours, start)]))}


class DPOStage(SupervisedStage):
    """A preference loss (DPO family, or KTO on unpaired completions) against the frozen reference's log-probs,
    scored live (`ref_scorer`), read from the reference cache (`cached`) or absent (reference-free losses);
    held-out preference accuracy from step 0."""
    evaluate_at_start = True

    def __init__(self, cfg: ExperimentConfig, policy, layout: Layout, loss, data, evaluate, objective: dict,
                 ref_scorer, cached):
        mbs = cfg.train.micro_batch_size
        super().__init__(cfg, policy, layout, loss, 2 * mbs * cfg.data.seq_len, loss_norm=float(mbs))
        self.kto = cfg.dpo.loss == "kto"
        self.keys = KTO_KEYS if self.kto else KEYS
        self.data, self._evaluate, self.evaluates = data, evaluate, evaluate is not None
        self.ref_scorer, self.cached = ref_scorer, cached
        self.scorer = SequenceScorer(policy) if self.kto else None         # the policy's side of KTO's z
        self.must_match = {"objective": objective}

    def batch(self, micro_index: int) -> dict:
        mbs, ref = self.cfg.train.micro_batch_size, self.ref_scorer
        batch = self.data.batch(micro_index, mbs, self.layout.data_rank, self.layout.data_world)
        if self.kto:
            both = ref(Tensor(np.concatenate([batch["ids"], batch["kl_ids"]])),
                       Tensor(np.concatenate([batch["labels"], batch["kl_labels"]]))).asnumpy()
            batch["ref_logps"], batch["ref_kl_logps"] = both[:mbs], both[mbs:]
            return batch
        batch = with_labels(batch)
        if self.cached is not None:
            batch["ref_chosen"] = self.cached["train/chosen"][batch["pair_index"]]
            batch["ref_rejected"] = self.cached["train/rejected"][batch["pair_index"]]
        elif ref is not None:
            both = ref(Tensor(np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])),
                       Tensor(np.concatenate([batch["chosen_labels"], batch["rejected_labels"]]))).asnumpy()
            batch["ref_chosen"], batch["ref_rejected"] = both[:mbs], both[mbs:]
        else:
            batch["ref_chosen"] = batch["ref_rejected"] = np.zeros(mbs, np.float32)
        return batch

    def step(self, step: int, micro_index: int) -> tuple:
        if not self.kto:
            return super().step(step, micro_index)
        accum = self.cfg.train.grad_accum_steps
        batches = [self.batch(micro_index + j) for j in range(accum)]
        z = self.kto_reference_point(batches)
        for b in batches:
            b["z"] = np.full(len(b["ids"]), z, np.float32)
        return self.update(batches, step, accum), accum

    def kto_reference_point(self, batches: list) -> float:
        """KTO's z for the step: max(0, mean of π(y′) − ρ(y′)) over the mismatched rows of every micro-batch on
        every data-parallel rank, with the weights the step starts from (so it equals one process's)."""
        mode = self.model.training
        self.model.set_train(False)
        total = 0.0
        for b in batches:
            lp = self.scorer(Tensor(b["kl_ids"]), Tensor(b["kl_labels"])).asnumpy().astype(np.float64)
            total += float((lp - b["ref_kl_logps"]).sum())
        self.model.set_train(mode)
        total, count = self.layout.data_sum([total, sum(len(b["ids"]) for b in batches)])
        return max(0.0, float(total) / float(count))

    def evaluate(self) -> dict:
        return self._evaluate()

    def weights_io(self):
        return adapter_io(self.model, self.cfg.model.init_from) if self.cfg.dpo.lora.enabled else None


def run(cfg: ExperimentConfig, layout: Layout) -> dict:
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    d, data_cfg = cfg.dpo, cfg.data
    template = cfg.tokenizer.chat_template
    for key, path in (("dpo.winrate.judge", d.winrate.judge), ("dpo.winrate.prompts", d.winrate.prompts)):
        if path and not os.path.exists(path):                # found before training, not after it
            raise MsLlmError(f"{key}: {path} does not exist")
    eval_stats = PairStats()
    eval_records = read_pairs(d.eval_data, tokenizer, template, data_cfg.seq_len, data_cfg.on_error, eval_stats,
                              keep_messages=True) if d.eval_data else []
    eval_records = eval_records[:d.eval_limit] if d.eval_limit else eval_records
    eval_pairs = stack(eval_records)
    kto = d.loss == "kto"
    if kto:
        data = CompletionData(data_cfg.sources, tokenizer, template, data_cfg.seq_len, data_cfg.shuffle_seed,
                              data_cfg.on_error)
    else:
        data = PreferenceData(data_cfg.sources, tokenizer, template, data_cfg.seq_len, {}, data_cfg.shuffle_seed,
                              data_cfg.on_error)
    needs_ref = d.loss not in REFERENCE_FREE
    section = reference_section(cfg) if needs_ref else None
    ref_scorer, cached, eval_ref = None, None, (np.zeros(len(eval_records), np.float32),) * 2
    progress = cfg.train.progress_bar and layout.main

    def cache_with(policy_or_none):
        def build():
            scorer = load_reference(cfg, section, policy_or_none, tokenizer)
            return score_dataset(scorer, data, eval_pairs, d.eval_batch_size, progress)
        return reference_cache(cfg, run_dir, data, eval_pairs, build)
    if needs_ref and d.reference_mode == "cached" and not section.policy_without_adapter:
        cached = cache_with(None)               # the reference is scored and released before the policy is built
    policy = build_model(cfg)
    if d.lora.enabled:
        lo = d.lora
        apply_lora(policy, LoRAConfig(lo.r, lo.alpha, lo.dropout, list(lo.targets)))
        hold_base(policy, lo.base_dtype, "dpo.lora")
    if needs_ref and d.reference_mode == "cached" and section.policy_without_adapter:
        cached = cache_with(policy)
    elif needs_ref and d.reference_mode == "online":
        ref_scorer = load_reference(cfg, section, policy, tokenizer)
        if eval_records:
            eval_ref = score_pairs(ref_scorer, eval_pairs, d.eval_batch_size)
    if cached is not None:
        eval_ref = (cached["eval/chosen"], cached["eval/rejected"])

    if kto:
        loss = KTOLossAtZ(policy, d.beta, d.kto_desirable_weight, d.kto_undesirable_weight)
    else:
        loss = PreferenceLoss(policy, d.loss, d.beta, d.label_smoothing, d.simpo_gamma, d.nll_coef)
    evaluate = make_evaluator(cfg, policy, eval_pairs, eval_ref)
    if d.gate_accuracy is not None and evaluate is None:
        raise MsLlmError(f"dpo.gate_accuracy is set but {d.eval_data} left no held-out pair to measure it on")
    objective = {"loss": d.loss, "beta": d.beta, "label_smoothing": d.label_smoothing, "simpo_gamma": d.simpo_gamma,
                 "nll_coef": d.nll_coef, "reference": reference_identity(cfg, section) if needs_ref else None}
    stage = DPOStage(cfg, policy, layout, loss, data, evaluate, objective, ref_scorer, cached)
    result = train(cfg, stage, run_dir)
    if not layout.main:
        return {}
    trained = trained_model(cfg, run_dir, policy, d.lora.enabled)
    metrics = dict(result.metrics, data_skipped_records=data.stats.skipped,
                   data_truncated_prompts=data.stats.truncated_prompts, eval_skipped_pairs=eval_stats.skipped,
                   **{f"before/{k}": v for k, v in result.before.items()})
    if evaluate is not None and "eval/preference_accuracy" not in metrics:
        metrics.update(evaluate())                   # resumed at the last step: nothing evaluated in this process
    final = export_final(run_dir, trained, tokenizer, d.export_version)      # before the win-rate's generation
    if d.winrate.judge:
        metrics.update(win_rate_against_start(cfg, trained, tokenizer, eval_records))
    gates = {}
    if d.gate_accuracy is not None:
        gates["preference_accuracy"] = gate(metrics["eval/preference_accuracy"], d.gate_accuracy)
    return finish(run_dir, cfg.stage, "completed", result.steps, metrics, final, gates, plots=cfg.log.plots)
