# SPDX-License-Identifier: Apache-2.0
"""Teacher -> student logit distillation (seed 000 §1.2.5.1).

    ms-llm train configs/tiny/distill.yaml
    ms-llm distill cache-teacher configs/tiny/distill.yaml       # optional: top-k teacher logits, offline

1. The teacher (any load_pretrained model; frozen, eval mode) and the student's vocabulary are aligned by token
   string (models/vocab.py); the coverage is logged.
2. With `distill.generate.prompts`, the teacher answers the prompts (sampling) and three filters keep the good
   answers: perplexity under a scoring model, rule-based text quality (data/filters.py) and BERTScore against the
   reference. `distill_data/` gets kept.jsonl, rejected.jsonl (with reasons) and filter_report.md.
3. Training minimizes alpha*tau^2*KL + beta*CE (losses/distill.py) on the SFT data plus the kept samples, with
   the teacher online or from a top-k cache.
4. Every `iterative.every` steps the student is probed; prompts it gets wrong (hard examples) are answered again
   by the teacher, filtered and added to the pool (`distill_data/hard_round_N.jsonl`).
5. Gates: student score >= gate_score_ratio x teacher score on `eval_prompts`, and training loss improving by
   less than gate_plateau over the plateau window. Both go to metrics.jsonl and summary.json; the run stops when
   they pass (stop_at_gates). final/ carries the version tag and SHA256 the next stage's init_sha256 names.
"""
import copy
import dataclasses
import hashlib
import json
import logging
import os

import mindspore as ms
import numpy as np

from ms_llm.config import ExperimentConfig
from ms_llm.context import setup_for
from ms_llm.data.cache import tokenizer_fingerprint
from ms_llm.data.chat import render, stop_token_ids
from ms_llm.data.filters import check as quality_check
from ms_llm.data.readers import read_records
from ms_llm.data.sft import SFTData
from ms_llm.data.teacher_cache import TeacherCache, write_cache
from ms_llm.errors import MsLlmError
from ms_llm.eval.generative import bertscore, exact_match
from ms_llm.eval.results import gate
from ms_llm.eval.scoring import sequence_logprobs
from ms_llm.fileio import read_json, read_jsonl, sha256_file, write_json_atomic
from ms_llm.generation import generate, release_caches
from ms_llm.losses.distill import DistillLoss, DistillLossConfig
from ms_llm.models import load_pretrained
from ms_llm.models.build import build_model
from ms_llm.models.config import preset
from ms_llm.data.tokenizer import Tokenizer
from ms_llm.distributed import init_model_groups
from ms_llm.models.frozen import frozen_source, load_frozen_weights
from ms_llm.models.io import frozen_dtype, read_config, resolve_model_dir
from ms_llm.models.tensor_parallel import check_config
from ms_llm.models.vocab import vocab_alignment
from ms_llm.rollout.batch import completion_rows
from ms_llm.rollout.prompts import PromptStream, read_tasks
from ms_llm.rollout.sources import rollout_source
from ms_llm.stages.common import export_final, finish, load_tokenizer, prepare_run_dir
from ms_llm.training.layout import Layout
from ms_llm.training.stage import SupervisedStage
from ms_llm.training.trainer import train

log = logging.getLogger(__name__)
KEYS = ("input_ids", "labels", "attention_mask", "weights", "row_weight")
CACHE_KEYS = KEYS + ("topk_ids", "topk_logp", "tail_logp")


# ---------------------------------------------------------------------------------------------- teacher side
def teacher_exact_match(cfg: ExperimentConfig, teacher, records: list, run_dir: str, write: bool = True,
                        barrier=None) -> float:
    """The teacher's exact match on the evaluation prompts. Greedy decoding of a frozen teacher gives the same
    score every time, so it is kept in `teacher_scores.json`, keyed by the teacher's weights and tokenizer, the
    prompts, the chat template and the answer length: runs that share a teacher (a CE-only baseline, a cached-logit
    run, a rerun) score it once. The file is in distill.cache_dir when there is one (cache-teacher scores the
    teacher there, and a cached-mode run, which must not load the teacher, only reads it), else in data.cache_dir,
    else in `<runs>/.cache`."""
    d = cfg.distill
    key = hashlib.sha256(json.dumps({"teacher": teacher.sha256, "tokenizer": tokenizer_fingerprint(teacher.tokenizer),
                                     "records": records, "template": cfg.tokenizer.chat_template,
                                     "max_new_tokens": d.eval_max_new_tokens}, sort_keys=True).encode()).hexdigest()
    root = d.cache_dir or cfg.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), ".cache")
    path = os.path.join(root, "teacher_scores.json")
    scores = read_json(path, "the teacher-score cache") if os.path.isfile(path) else {}
    if barrier is not None:        # every rank has looked before any writes (ranks that decode together agree)
        barrier()
    if key in scores:
        log.info("teacher exact match %.4f (cached in %s)", scores[key], path)
        return float(scores[key])
    if d.mode == "cached" and not teacher.loaded:
        raise MsLlmError(f"{path}: no score of the teacher on these distill.eval_prompts (eval_limit "
                         f"{d.eval_limit}, eval_max_new_tokens {d.eval_max_new_tokens}); a cached run does not load "
                         "the teacher: run `ms-llm distill cache-teacher` with the same distill settings, or set "
                         "distill.eval_prompts: null")
    score = exact_match(teacher.model, teacher.tokenizer, records, cfg.tokenizer.chat_template,
                        d.eval_max_new_tokens)["accuracy"]
    if not write:                          # (another rank computed the same and keeps it)
        return score
    os.makedirs(root, exist_ok=True)
    scores = read_json(path, "the teacher-score cache") if os.path.isfile(path) else {}   # another run may have added
    scores[key] = score
    write_json_atomic(path, scores)
    return score


class Teacher:
    """The teacher's identity (hash), tokenizer and vocabulary map to the student, read from its directory; its
    weights (`model`) are loaded the first time something uses them — online distillation, on-policy scoring,
    sample generation, hard-example rounds, scoring its exact match — and never in a cached-mode run whose
    samples and score the cache-building run left behind."""

    def __init__(self, cfg: ExperimentConfig, student_tok, student_vocab_size: int, tp=None):
        """tp: a TPGroup: this rank holds its tensor-parallel part of the teacher (a several-rank cache-teacher)."""
        section = cfg.distill.teacher
        self.tp = tp
        self.path, self.sha256 = frozen_source(section, "distill.teacher")
        self.dtype = frozen_dtype(section.dtype, "distill.teacher")
        self.tokenizer = Tokenizer.load(section.tokenizer or self.path)
        self.template = cfg.tokenizer.chat_template
        self.vocab_map, self.coverage = vocab_alignment(student_tok, self.tokenizer, student_vocab_size,
                                                        read_config(self.path).vocab_size)
        self.unk = self.tokenizer.unk_id if self.tokenizer.unk_id is not None else 0
        self._model = None
        log.info("teacher %s (sha256 %s); vocabulary %s", self.path, self.sha256[:12],
                 "identical" if self.vocab_map is None else
                 f"mapped by string: {self.coverage['student_coverage']:.1%} of the student's tokens, "
                 f"{self.coverage['teacher_coverage']:.1%} of the teacher's")

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self):
        if self._model is None:
            log.info("loading the teacher's weights (%s, %s)", self.path, self.dtype)
            self._model = load_frozen_weights(self.path, self.dtype, self.tp)
        return self._model

    def answer(self, prompts: list, g, seed: int) -> list:
        """Sampled answers: [{"text", "hit_limit"}] per prompt."""
        stops = stop_token_ids(self.template, self.tokenizer)
        out = []
        for i in range(0, len(prompts), g.batch_size):
            ids = [render([{"role": "user", "content": p}], self.tokenizer, self.template, add_generation_prompt=True).ids
                   for p in prompts[i:i + g.batch_size]]
            res = generate(self.model, ids, g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                           eos_token_id=stops, pad_token_id=self.tokenizer.pad_id, seed=seed + i)
            for j in range(len(ids)):
                toks = res.tokens[j, :res.lengths[j]].tolist()
                ended = bool(toks) and toks[-1] in stops
                out.append({"text": self.tokenizer.decode(toks[:-1] if ended else toks), "hit_limit": not ended})
        return out


# ---------------------------------------------------------------------------------------------- filtering
class SampleFilter:
    """The three filters of seed 000 §1.2.5.1.2 with thresholds from distill.generate."""

    def __init__(self, g, teacher: Teacher):
        self.g = g
        self.scorer = load_pretrained(resolve_model_dir(g.scorer)) if g.scorer else teacher.model
        self.embedder = load_pretrained(resolve_model_dir(g.embedder)) if g.embedder else teacher.model
        self.tokenizer, self.template = teacher.tokenizer, teacher.template

    def perplexity(self, prompt: str, answer: str) -> float:
        """exp(mean NLL of the answer tokens given the prompt, in the chat template) under the scoring model."""
        r = render([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], self.tokenizer,
                   self.template)
        lp = sequence_logprobs(self.scorer, [r.ids])[0]
        sel = np.asarray(r.assistant_mask[1:], bool)
        return float(np.exp(-lp[sel].mean())) if sel.any() else float("inf")

    def __call__(self, rec: dict) -> dict:
        """rec: {"prompt", "answer", "reference"?, "hit_limit"?} -> the same with scores and `reasons` ([] = kept)."""
        g = self.g
        q = quality_check(rec["answer"], rec["prompt"], g.rules, {"hit_limit": rec.get("hit_limit", False),
                                                                 "language": g.language})
        out = dict(rec, perplexity=self.perplexity(rec["prompt"], rec["answer"]), error_rate=q["error_rate"],
                   issues=q["issues"])
        reasons = []
        if out["perplexity"] >= g.max_perplexity:
            reasons.append(f"perplexity {out['perplexity']:.2f} >= {g.max_perplexity}")
        if q["fatal"] or q["error_rate"] >= g.max_error_rate:
            detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in q["issues"].items())
            reasons.append(f"quality error rate {q['error_rate']:.2f} ({detail})")
        if rec.get("reference") not in (None, ""):
            out["consistency"] = float(bertscore(self.embedder, self.tokenizer, [rec["answer"]], [str(rec["reference"])],
                                                 layer="embedding")[0])
            if out["consistency"] <= g.min_consistency:
                reasons.append(f"consistency (BERTScore F1) {out['consistency']:.2f} <= {g.min_consistency}")
        out["reasons"] = reasons
        return out


def _is_valid(rec: dict) -> bool:
    """Independent of the filters: the answer equals the reference (whitespace-normalized)."""
    ref = rec.get("reference")
    return ref not in (None, "") and " ".join(str(ref).split()) == " ".join(rec["answer"].split())


def filter_samples(samples: list, flt: SampleFilter, out_dir: str, name: str, write: bool = True) -> dict:
    """Score and split samples; write <name>_kept.jsonl, <name>_rejected.jsonl and a before/after table (unless
    `write` is False: a rank other than the first, which computes the same)."""
    scored = [flt(s) for s in samples]
    kept = [s for s in scored if not s["reasons"]]
    rejected = [s for s in scored if s["reasons"]]
    if write:
        os.makedirs(out_dir, exist_ok=True)
        for suffix, rows in (("kept", kept), ("rejected", rejected)):
            with open(os.path.join(out_dir, f"{name}_{suffix}.jsonl"), "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")

    def stats(rows):
        with_ref = [r for r in rows if r.get("reference") not in (None, "")]
        return {"n": len(rows), "valid_rate": float(np.mean([_is_valid(r) for r in with_ref])) if with_ref else float("nan"),
                "perplexity": float(np.median([r["perplexity"] for r in rows])) if rows else float("nan"),
                "error_rate": float(np.mean([r["error_rate"] for r in rows])) if rows else float("nan"),
                "consistency": float(np.mean([r["consistency"] for r in rows if "consistency" in r]))
                if any("consistency" in r for r in rows) else float("nan")}
    before, after = stats(scored), stats(kept)
    counts = {}
    for r in rejected:
        for reason in r["reasons"]:
            key = reason.split(" ")[0]
            counts[key] = counts.get(key, 0) + 1
    lines = [f"# Teacher samples: {name}", "", "| | samples | valid (= reference) | median perplexity | "
             "mean error rate | mean consistency |", "|---|---|---|---|---|---|"]
    for label, st in (("before filtering", before), ("after filtering", after)):
        lines.append(f"| {label} | {st['n']} | {st['valid_rate']:.1%} | {st['perplexity']:.2f} | "
                     f"{st['error_rate']:.3f} | {st['consistency']:.3f} |")
    lines += ["", "Rejected: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none")]
    if write:
        with open(os.path.join(out_dir, f"{name}_report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return {"kept": kept, "rejected": rejected, "before": before, "after": after, "rejected_by": counts}


def as_alpaca(rows: list) -> list:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
             "task": r.get("task"), "line": i + 1} for i, r in enumerate(rows)]


def generate_samples(cfg: ExperimentConfig, teacher: Teacher, out_dir: str, write: bool = True,
                     barrier=None) -> dict:
    """Teacher answers to distill.generate.prompts, filtered (kept in out_dir with a key of everything they came
    from — prompts file, teacher, generation and filter settings, seed — that reruns reuse them under). `write`:
    False on the ranks of a several-rank cache-teacher but the first (each computes the same samples)."""
    d = cfg.distill
    g = d.generate
    kept_path = os.path.join(out_dir, "generated_kept.jsonl")
    summary_path = os.path.join(out_dir, "generated_summary.json")
    key = hashlib.sha256(json.dumps({"prompts": sha256_file(g.prompts), "teacher": teacher.sha256,
                                     "generate": dataclasses.asdict(g), "seed": cfg.train.seed,
                                     "template": cfg.tokenizer.chat_template}, sort_keys=True,
                                    default=str).encode()).hexdigest()
    found = None
    if os.path.isfile(kept_path) and os.path.isfile(summary_path):
        found = read_json(summary_path, "the generation summary")
        found = dict(found, kept=read_jsonl(kept_path)) if found.get("key") == key else None
        if found is None:
            log.info("%s: generated under other settings; generating again", summary_path)
    if barrier is not None:        # every rank has looked before any writes (ranks that decode together agree)
        barrier()
    if found is not None:
        return found
    if d.mode == "cached" and not teacher.loaded:
        raise MsLlmError(f"{summary_path}: the teacher's samples for these distill.generate settings are not there; "
                         "a cached run does not load the teacher: run `ms-llm distill cache-teacher` with the same "
                         "distill settings first (it writes them beside the cache)")
    records = read_records(g.prompts, "prompts")
    records = records[:g.limit] if g.limit else records
    answers = teacher.answer([r["prompt"] for r in records], g, cfg.train.seed)
    samples = [{"prompt": r["prompt"], "answer": a["text"], "reference": r.get("answer"), "task": r.get("task"),
                "hit_limit": a["hit_limit"]} for r, a in zip(records, answers)]
    res = filter_samples(samples, SampleFilter(g, teacher), out_dir, "generated", write)
    summary = dict({k: res[k] for k in ("before", "after", "rejected_by")}, key=key)
    if write:
        write_json_atomic(summary_path, summary)
    log.info("teacher samples: %d generated, %d kept (valid rate %.1f%% -> %.1f%%)", len(samples), len(res["kept"]),
             100 * res["before"]["valid_rate"], 100 * res["after"]["valid_rate"])
    return dict(summary, kept=res["kept"])


# ---------------------------------------------------------------------------------------------- data
def sft_settings(cfg: ExperimentConfig):
    """The SFT data settings with distill.task_weights as the loss weights."""
    sft_cfg = copy.deepcopy(cfg.sft)
    sft_cfg.task_weights = dict(cfg.distill.task_weights)
    return sft_cfg


def add_samples(cfg: ExperimentConfig, tokenizer, data: SFTData, rows: list, key, weight: float):
    """Teacher samples ({prompt, answer, task}) as a new, weighted group of `data`."""
    ex = data.encode_records(as_alpaca(rows), tokenizer, cfg.tokenizer.chat_template, sft_settings(cfg), str(key))
    data.add_group(key, ex, weight)


def build_data(cfg: ExperimentConfig, tokenizer, generated: list) -> SFTData:
    """The SFT-format data (distill.task_weights as loss weights) plus the kept teacher samples."""
    d = cfg.data
    data = SFTData(d.sources, tokenizer, cfg.tokenizer.chat_template, d.seq_len, sft_settings(cfg), d.shuffle_seed,
                   d.on_error)
    if generated:
        n = sum(len(g) for g in data.groups)
        add_samples(cfg, tokenizer, data, generated, ("generated", "teacher"), len(generated) / max(n + len(generated), 1))
    return data


def cache_expectations(cfg: ExperimentConfig, teacher_sha: str, data: SFTData) -> dict:
    d = cfg.distill
    return {"teacher_sha256": teacher_sha, "temperature": float(d.temperature), "seq_len": cfg.data.seq_len,
            "data_fingerprint": data.fingerprint()}


def samples_dir(cfg: ExperimentConfig, run_dir: str) -> str:
    """Where the teacher's generated samples live: beside the top-k cache when there is one (`cache-teacher`
    writes them there and a cached-mode run reads them back, never needing the teacher to generate), else in the
    run directory."""
    d = cfg.distill
    return os.path.join(d.cache_dir if d.cache_dir else run_dir, "distill_data")


def prepare(cfg: ExperimentConfig, run_dir: str, tokenizer, student_vocab: int, layout: Layout = None):
    """(teacher, generated samples, data). `layout`: a several-rank cache-teacher's (the teacher split by tensor
    parallel; only rank 0 writes the samples)."""
    layout = layout or Layout()
    teacher = Teacher(cfg, tokenizer, student_vocab, layout.tp)
    barrier = (lambda: layout.world_sum([0.0])) if layout.world > 1 else None
    generated = generate_samples(cfg, teacher, samples_dir(cfg, run_dir), layout.main, barrier) \
        if cfg.distill.generate.prompts else None
    data = build_data(cfg, tokenizer, generated["kept"] if generated else [])
    return teacher, generated, data


def cache_teacher(cfg: ExperimentConfig) -> dict:
    """`ms-llm distill cache-teacher CONFIG`: write the top-k cache distill.cache_dir names. Under msrun (`ms-llm
    distill cache-teacher CONFIG --nproc-per-node N`) the ranks form groups of distill.cache_tensor_parallel, each
    holding the teacher split across it and scoring its share of the cache's shards (data/teacher_cache.py); the
    teacher's samples and held-out score, which every group computes alike, are written by rank 0."""
    d = cfg.distill
    if not d.cache_dir:
        raise MsLlmError("distill.cache_dir is not set: name the directory the cache goes to")
    setup_for(cfg)
    layout = init_model_groups(d.cache_tensor_parallel, "distill.cache_tensor_parallel")
    if layout.tp is not None:
        check_config(read_config(resolve_model_dir(d.teacher.path)), layout.tp.size)
    run_dir = prepare_run_dir(cfg) if layout.main else cfg.train.output_dir
    tokenizer = load_tokenizer(cfg)
    teacher, _, data = prepare(cfg, run_dir, tokenizer, student_vocab_size(cfg), layout)
    manifest = write_cache(d.cache_dir, teacher.model, list(data.examples()), cache_expectations(cfg, teacher.sha256, data),
                           d.top_k, d.temperature, teacher.vocab_map, tokenizer.unk_id or 0, teacher.unk,
                           shard_examples=d.cache_shard_examples, progress=cfg.train.progress_bar and layout.main,
                           layout=layout)
    out = {"cache_dir": os.path.abspath(d.cache_dir), "examples": manifest["examples"],
           "shards": len(manifest["shards"]), "top_k": d.top_k, "ranks": layout.world,
           "tensor_parallel": layout.tp.size if layout.tp else 1}
    records = eval_records(cfg)
    if records:              # scored now, with the teacher loaded, so that cached-mode runs read the score
        out["teacher_exact_match"] = teacher_exact_match(cfg, teacher, records, run_dir, layout.main,
                                                         (lambda: layout.world_sum([0.0])) if layout.world > 1 else None)
    return out


def student_vocab_size(cfg: ExperimentConfig) -> int:
    """The student's vocabulary size, from its config (the student itself is not built)."""
    m = cfg.model
    if m.init_from:
        return read_config(resolve_model_dir(m.init_from)).vocab_size
    return preset(m.preset, **m.overrides).vocab_size


def eval_records(cfg: ExperimentConfig) -> list:
    d = cfg.distill
    if not d.eval_prompts:
        return []
    records = read_records(d.eval_prompts, "prompts")
    return records[:d.eval_limit] if d.eval_limit else records


# ---------------------------------------------------------------------------------------------- evaluation
class HardExamples:
    """Seed 000 §1.2.5.1.4: probe the student, have the teacher answer what it got wrong, add the kept answers."""

    def __init__(self, cfg: ExperimentConfig, teacher: Teacher, student, tokenizer, data: SFTData, out_dir: str):
        it = cfg.distill.iterative
        self.cfg, self.teacher, self.student, self.tokenizer, self.data, self.out_dir = cfg, teacher, student, tokenizer, data, out_dir
        path = it.probe or cfg.distill.generate.prompts
        if not path:
            raise MsLlmError("distill.iterative needs distill.iterative.probe (or distill.generate.prompts): prompts "
                             "with reference answers to probe the student on")
        self.probe = [r for r in read_records(path, "prompts") if r.get("answer") not in (None, "")][:it.probe_limit]
        self.rounds, self.previous = 0, []
        self.filter = None

    def _add(self, rows: list):
        add_samples(self.cfg, self.tokenizer, self.data, rows, ("hard", self.rounds), 0.25)

    def restore(self, rounds: int):
        """Reload the rounds a checkpoint had (resume sees the same data pool as the uninterrupted run)."""
        for n in range(1, rounds + 1):
            path = os.path.join(self.out_dir, f"hard_round_{n}_kept.jsonl")
            if not os.path.isfile(path):
                raise MsLlmError(f"{path}: the checkpoint used hard-example round {n}, but its samples are missing")
            self.rounds = n
            self._add(read_jsonl(path))

    def round(self) -> dict:
        if self.rounds >= self.cfg.distill.iterative.max_rounds:
            return {}
        d = self.cfg.distill
        res = exact_match(self.student, self.tokenizer, self.probe, self.cfg.tokenizer.chat_template, d.eval_max_new_tokens)
        wrong = [o for o in res["outputs"] if not o["correct"]]
        right = {o["prompt"] for o in res["outputs"] if o["correct"]}
        recall = float(np.mean([p in right for p in self.previous])) if self.previous else float("nan")
        out = {"eval/hard/found": float(len(wrong)), "eval/hard/probe_accuracy": res["accuracy"]}
        if recall == recall:
            out["eval/hard/recall"] = recall      # share of the last round's hard examples now answered right
        self.previous = [o["prompt"] for o in wrong]
        if not wrong:
            return out
        self.rounds += 1
        if self.filter is None:
            self.filter = SampleFilter(d.generate, self.teacher)
        answers = self.teacher.answer([o["prompt"] for o in wrong], d.generate, self.cfg.train.seed + 7919 * self.rounds)
        task = {r["prompt"]: r.get("task") for r in self.probe}
        samples = [{"prompt": o["prompt"], "answer": a["text"], "reference": o["answer"], "task": task.get(o["prompt"]),
                    "hit_limit": a["hit_limit"]} for o, a in zip(wrong, answers)]
        kept = filter_samples(samples, self.filter, self.out_dir, f"hard_round_{self.rounds}")["kept"]
        self._add(kept)
        out["eval/hard/added"] = float(len(kept))
        return out


def plateau(values: list, window: int) -> float:
    """Relative improvement of the last value over the one `window` evaluations earlier (inf if too few)."""
    if len(values) <= window or window < 1:
        return float("inf")
    old, new = values[-window - 1], values[-1]
    return (old - new) / max(abs(old), 1e-12)


def gates(cfg: ExperimentConfig, evals: list) -> dict:
    d = cfg.distill
    ratio = evals[-1].get("eval/score_ratio", float("nan")) if evals else float("nan")
    losses = [e["eval/train_loss"] for e in evals if "eval/train_loss" in e]
    return {"score_ratio": gate(ratio if ratio == ratio else 0.0, d.gate_score_ratio, ">="),
            "loss_plateau": gate(plateau(losses, d.plateau_window), d.gate_plateau, "<")}


class DistillStage(SupervisedStage):
    """The student's distillation loss against the teacher's logits (live, or read from the teacher cache);
    held-out exact match against the teacher's, the gates, and hard-example rounds (the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, student, layout: Layout, loss, data, cache, teacher, tokenizer,
                 records: list, teacher_score: float, hard, on_policy=None):
        mbs = cfg.train.micro_batch_size
        super().__init__(cfg, student, layout, loss, mbs * cfg.data.seq_len, params=student.trainable_params(),
                         loss_norm=float(mbs))
        self.keys = CACHE_KEYS if cache is not None else KEYS
        self.data, self.cache, self.teacher, self.tokenizer = data, cache, teacher, tokenizer
        self.records, self.teacher_score, self.hard = records, teacher_score, hard
        self.on_policy = on_policy                  # OnPolicy (mode: on_policy), else None
        self.evaluates = bool(records or hard)
        self.evaluate_at_start = on_policy is not None          # its lift, in one run's metrics.jsonl

    def step(self, step: int, micro_index: int) -> tuple:
        if self.on_policy is None or not self.on_policy.samples_at(step):
            row, used = super().step(step, micro_index)
            return (dict(row, on_policy=0.0) if self.on_policy else row), used
        rows, stats = self.on_policy.rows(step, self.layout)
        mbs = self.cfg.train.micro_batch_size
        micro = [{k: v[j:j + mbs] for k, v in rows.items()} for j in range(0, len(rows["row_weight"]), mbs)]
        row = self.update(micro, step, len(micro))
        return dict(row, on_policy=1.0, **stats), 0          # the student's samples: no data.sources consumed

    def models(self) -> dict:
        return self.on_policy.models() if self.on_policy else {}

    def batch(self, micro_index: int) -> dict:
        mbs, rank, world = self.cfg.train.micro_batch_size, self.layout.data_rank, self.layout.data_world
        b = self.data.batch(micro_index, mbs, rank, world)
        if self.cache is not None:
            b.update(self.cache.rows([self.data.flat_index(k)
                                      for k in self.data.batch_indices(micro_index, mbs, rank, world)]))
        return b

    def evaluate(self) -> dict:
        if self.on_policy is None:
            return self._evaluate()
        # the student's decoding graph reads the rollouts' whole copies under ZeRO-3 (training/zero.py): one mode
        with self.layout.replicated():
            return self._evaluate()

    def _evaluate(self) -> dict:
        d, out = self.cfg.distill, {}
        if self.on_policy is not None and self.records:
            out["eval/reverse_kl"] = self.on_policy.reverse_kl(self.records)
        if self.records:
            acc = exact_match(self.model, self.tokenizer, self.records, self.cfg.tokenizer.chat_template,
                              d.eval_max_new_tokens)["accuracy"]
            ts = self.teacher_score
            out.update({"eval/exact_match": acc, "eval/teacher_exact_match": ts,
                        "eval/score_ratio": acc / ts if ts > 0 else float("nan")})
        if self.hard is not None and self.done % d.iterative.every == 0:
            out.update(self.hard.round())
        return out

    def should_stop(self, evals: list) -> bool:
        g = gates(self.cfg, evals)
        for name, v in g.items():
            evals[-1][f"eval/gate/{name}"] = float(v["passed"])
        return self.cfg.distill.stop_at_gates and all(v["passed"] for v in g.values())

    def state_dict(self) -> dict:
        return dict(super().state_dict(), hard_rounds=self.hard.rounds if self.hard else 0,
                    teacher_sha256=self.teacher.sha256,
                    prompt_cursor=self.on_policy.source.stream.cursor if self.on_policy else 0)

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        if self.hard is not None:
            self.hard.restore(int(state.get("hard_rounds", 0)))
        if self.on_policy is not None:
            self.on_policy.source.stream.cursor = int(state.get("prompt_cursor", 0))


class OnPolicy:
    """GKD's on-policy half: the student samples answers to distill.on_policy.prompts (a RolloutSource with one
    sample per prompt: synchronous, or asynchronous one step ahead), the teacher scores every sampled token in
    the loss (the live teacher of DistillLoss). `samples_at(step)` is GKD's coin with P(on-policy) = λ, seeded by
    (train.seed, step), so a resumed run makes the same choices."""

    def __init__(self, cfg: ExperimentConfig, student, loss_cfg: DistillLossConfig, teacher, tokenizer,
                 layout: Layout = None):
        op, t = cfg.distill.on_policy, cfg.train
        self.cfg, self.student, self.tokenizer = cfg, student, tokenizer
        self.settings = rollout_settings(cfg)
        template = cfg.tokenizer.chat_template
        prompts, self.cut = read_tasks(op.prompts, tokenizer, template, op.max_prompt_len, on_error=cfg.data.on_error)
        if not prompts:
            raise MsLlmError(f"distill.on_policy.prompts: {op.prompts} holds no prompts")
        self.pad = tokenizer.pad_id or 0
        stops = stop_token_ids(template, tokenizer)
        self.source = rollout_source(cfg, student, lambda texts, recs: {"total": np.zeros(len(texts)), "parts": {}},
                                     lambda tok, n: "", PromptStream(prompts, t.seed), self.pad, stops, self.settings,
                                     layout)
        unk = tokenizer.unk_id if tokenizer.unk_id is not None else 0
        kl = DistillLossConfig(1.0, 0.0, 1.0, "reverse_kl", loss_cfg.jsd_beta, loss_cfg.chunk_size)
        self.kl_cell = DistillLoss(student, kl, teacher.model, teacher.vocab_map, unk, teacher_unk=teacher.unk)

    def samples_at(self, step: int) -> bool:
        share = self.cfg.distill.on_policy.student_share
        return share >= 1 or (share > 0 and np.random.default_rng([self.cfg.train.seed, 6007, step]).random() < share)

    def rows(self, step: int, layout: Layout) -> tuple:
        """This rank's rows of the step's samples: the ones it sampled itself (synchronous: each rank samples
        its share, the source gathers the batch; asynchronous: every rank samples the whole batch)."""
        with layout.replicated():      # (ZeRO-3: each rank samples its rows on a whole copy of the student)
            batch, stats = self.source.collect(step)
        release_caches(self.student)       # the rollout's KV caches go before the updates need memory
        mine = layout.share(len(batch.ro.prompts))
        rows = completion_rows(batch.ro.prompts[mine], batch.ro.tokens[mine], batch.ro.lengths[mine],
                               self.cfg.data.seq_len, self.pad)
        out = {"response_length": float(batch.ro.lengths.mean()), "rollout_s": stats["rollout_s"]}
        if "rollout/rows" in stats:
            out["rollout/rows"] = stats["rollout/rows"]
        return rows, out

    def reverse_kl(self, records: list) -> float:
        """Mean per-token KL(student ‖ teacher) over the full vocabulary, on the student's greedy answers to
        held-out prompts (greedy: the measure moves with the weights, not with sampling noise)."""
        op, seq = self.cfg.distill.on_policy, self.cfg.data.seq_len
        template = self.cfg.tokenizer.chat_template
        prompts = [{"ids": render([{"role": "user", "content": r["prompt"]}], self.tokenizer, template,
                                  add_generation_prompt=True).ids[-op.max_prompt_len:]} for r in records]
        num = den = 0.0
        for i in range(0, len(prompts), 32):
            chunk = prompts[i:i + 32]
            out = generate(self.student, [x["ids"] for x in chunk], op.max_new_tokens, temperature=0,
                           eos_token_id=self.source.stops or -1, pad_token_id=self.pad, prompt_width=op.max_prompt_len)
            b = completion_rows(chunk, out.tokens, out.lengths, seq, self.pad)
            n, d = self.kl_cell(*(ms.Tensor(b[k]) for k in KEYS))
            num, den = num + float(n.asnumpy()), den + float(d.asnumpy())
        return num / max(den, 1.0)

    def models(self) -> dict:                    # the asynchronous batch generated ahead
        return {"rollout_state": (self.source.save, self.source.load)} if self.source.has_state() else {}

    def close(self, wait: bool = True):
        self.source.close(wait)


def rollout_settings(cfg: ExperimentConfig):
    """The RolloutSource settings of on-policy distillation: the GRPO section's shape, one sample per prompt,
    each step's micro-batches' worth of prompts, the on_policy section's lengths and sampling."""
    op, t = cfg.distill.on_policy, cfg.train
    s = copy.deepcopy(cfg.grpo)
    s.group_size, s.prompts_per_step = 1, t.micro_batch_size * t.grad_accum_steps * cfg.parallel.data_parallel
    s.max_prompt_len, s.max_new_tokens = op.max_prompt_len, op.max_new_tokens
    s.temperature, s.top_p, s.top_k = op.temperature, op.top_p, op.top_k
    s.dynamic_sampling.enabled, s.partial_rollout.token_budget, s.overlong.buffer = False, 0, 0
    s.async_rollout.enabled = op.async_rollout
    return s


# ---------------------------------------------------------------------------------------------- the stage
def run(cfg: ExperimentConfig, layout: Layout) -> dict:
    d = cfg.distill
    run_dir = prepare_run_dir(cfg)
    data_dir = os.path.join(run_dir, "distill_data")
    tokenizer = load_tokenizer(cfg)
    student = build_model(cfg)
    teacher, generated, data = prepare(cfg, run_dir, tokenizer, student.config.vocab_size, layout)
    lcfg = DistillLossConfig(d.alpha, d.beta, d.temperature, d.loss, d.jsd_beta, d.chunk_size)
    unk = tokenizer.unk_id if tokenizer.unk_id is not None else 0
    cache = None
    if d.mode == "cached":
        cache = TeacherCache(d.cache_dir, cache_expectations(cfg, teacher.sha256, data))
        if cache.manifest["top_k"] != d.top_k:
            log.info("cache has top_k=%d (config says %d); using the cache's", cache.manifest["top_k"], d.top_k)
        loss = DistillLoss(student, lcfg, None, teacher.vocab_map, unk)
    else:
        loss = DistillLoss(student, lcfg, teacher.model, teacher.vocab_map, unk, teacher_unk=teacher.unk)
    records = eval_records(cfg)
    # every rank scores (or reads) the teacher alike, so none waits at its first collective for rank 0's scoring;
    # rank 0 keeps the score
    teacher_score = teacher_exact_match(cfg, teacher, records, run_dir, layout.main,
                                        (lambda: layout.world_sum([0.0])) if layout.world > 1 else None) \
        if records else float("nan")
    if layout.data_world > 1:            # every rank's gates (and so its early stop) read rank 0's score
        teacher_score = layout.gather_objects(teacher_score)[0]
    hard = HardExamples(cfg, teacher, student, tokenizer, data, data_dir) if d.iterative.every else None
    on_policy = OnPolicy(cfg, student, lcfg, teacher, tokenizer, layout) if d.mode == "on_policy" else None
    stage = DistillStage(cfg, student, layout, loss, data, cache, teacher, tokenizer, records, teacher_score, hard,
                         on_policy)
    try:
        result = train(cfg, stage, run_dir)
    except BaseException:
        if on_policy is not None:
            on_policy.close(wait=False)     # do not wait for a generation nobody will use
        raise
    if on_policy is not None:
        on_policy.close()
    if not layout.main:
        return {}
    student.set_train(False)
    final = export_final(run_dir, student, tokenizer, d.version)
    final["teacher_sha256"] = teacher.sha256
    g = gates(cfg, result.evals)
    metrics = dict(result.metrics, **{f"before/{k}": v for k, v in result.before.items()},
                   teacher_exact_match=teacher_score, teacher_loaded=float(teacher.loaded),
                   vocab_student_coverage=teacher.coverage["student_coverage"],
                   vocab_teacher_coverage=teacher.coverage["teacher_coverage"], hard_rounds=hard.rounds if hard else 0)
    if generated:
        metrics.update({"generated/before_valid_rate": generated["before"]["valid_rate"],
                        "generated/after_valid_rate": generated["after"]["valid_rate"],
                        "generated/kept": generated["after"]["n"], "generated/total": generated["before"]["n"]})
    status = "stopped_early" if result.stopped_early else "completed"
    return finish(run_dir, cfg.stage, status, result.steps, metrics, final, gates=g, plots=cfg.log.plots)
