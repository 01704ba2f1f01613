# SPDX-License-Identifier: Apache-2.0
"""Supervised fine-tuning (seed 000 §1.2.5.3, seed 002 §4): full or LoRA, single- and multi-turn.

    ms-llm train configs/tiny/sft_lora.yaml model.init_from=runs/tiny_pretrain

Data comes through the chat template with loss on assistant tokens only, per-task loss weights and
per-turn normalization (data/sft.py); with `data.packing` (the default) conversations are packed into rows
with document masks, the loss per token unchanged. With `sft.lora.enabled` only the adapters train; checkpoints hold
the adapter alone, and the run exports `final_adapter/` (PEFT format) plus the merged model in `final/`.
Held-out prompts (`sft.eval_prompts`) are scored by exact match at every evaluation and at the end.
"""
import copy
import os
import re

from ms_llm.config import ExperimentConfig
from ms_llm.data.readers import read_records
from ms_llm.data.sft import KEYS, SFTData, neftune_noise
from ms_llm.eval.agent import tool_call_accuracy
from ms_llm.eval.generative import code_pass_at_1, dialogue_coherence, exact_match
from ms_llm.eval.sandbox import require_isolation
from ms_llm.fileio import read_json
from ms_llm.losses.sft import SFTLoss
from ms_llm.manifest import verify_dataset
from ms_llm.models.build import build_model
from ms_llm.peft.lora import LoRAConfig, apply_lora, hold_base
from ms_llm.stages.common import export_final, finish, load_tokenizer, prepare_run_dir, trained_model
from ms_llm.training.layout import Layout
from ms_llm.training.metrics import radar_plot, write_summary
from ms_llm.training.stage import SupervisedStage, adapter_io
from ms_llm.training.trainer import train


def make_evaluator(cfg: ExperimentConfig, model, tokenizer):
    s = cfg.sft
    if not s.eval_prompts and not s.eval_dialogues and not s.eval_tool_calls:
        return None
    tool_records = read_records(s.eval_tool_calls, "openai") if s.eval_tool_calls else []
    tool_records = tool_records[:s.eval_tool_call_limit] if s.eval_tool_call_limit else tool_records
    records = read_records(s.eval_prompts, "prompts") if s.eval_prompts else []
    records = records[:s.eval_limit] if s.eval_limit else records
    dialogues = [r["messages"] for r in read_records(s.eval_dialogues, "sharegpt")][:s.eval_dialogue_limit] \
        if s.eval_dialogues else []

    isolation = "none" if s.eval_unsafe_no_isolation else "namespaces"
    if isolation == "namespaces" and any(re.search(r"def\s+\w+\s*\(", str(r.get("answer", ""))) for r in records):
        require_isolation()                               # code answers will run: refuse now, not mid-run

    def evaluate():
        out = {}
        if dialogues:
            out["eval/coherence"] = dialogue_coherence(model, tokenizer, dialogues, cfg.tokenizer.chat_template,
                                                       s.eval_max_new_tokens)["coherence"]
        if tool_records:
            res = tool_call_accuracy(model, tokenizer, tool_records, cfg.tokenizer.chat_template)
            out["eval/tool_call_accuracy"] = res["accuracy"]
            out["eval/tool_choice"] = res["tool_choice"]
            out["eval/tool_call_malformed"] = res["malformed"]
            out.update({f"eval/tool_call_accuracy/{t}": v for t, v in res["tasks"].items()})
        if not records:
            return out
        res = exact_match(model, tokenizer, records, cfg.tokenizer.chat_template, s.eval_max_new_tokens)
        out["eval/exact_match"] = res["accuracy"]
        passed = code_pass_at_1(res["outputs"], isolation)
        if passed == passed:                                   # not NaN: the set has code tasks
            out["eval/code_pass@1"] = passed
        out.update({f"eval/exact_match/{t}": v for t, v in res["tasks"].items()})
        return out
    return evaluate


def converged(metric: str, tolerance: float, patience: int):
    """Seed 000 §1.2.5.3.4: stop when `metric` moved less than `tolerance` (relative) across `patience`
    consecutive evaluations."""
    def should_stop(evals: list) -> bool:
        values = [e[metric] for e in evals if metric in e][-(patience + 1):]
        if patience <= 0 or len(values) < patience + 1:
            return False
        return all(abs(b - a) <= tolerance * max(abs(a), 1e-12) for a, b in zip(values, values[1:]))
    return should_stop


def checkpoint_report(run_dir: str, evals: list, metric: str) -> dict:
    """Best-checkpoint report: markdown table of every evaluation plus a radar chart of the per-task metrics."""
    if not evals:
        return {}
    best = max(evals, key=lambda e: e.get(metric, float("-inf")))
    keys = sorted({k for e in evals for k in e if k.startswith("eval/")})
    lines = ["# Checkpoint report", "", f"Best by `{metric}`: step {best['step']}"
             + (f" (`checkpoints/step_{best['step']:06d}`)" if os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{best['step']:06d}")) else ""),
             "", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {e['step']} | " + " | ".join(f"{e.get(k, float('nan')):.3f}" for k in keys) + " |" for e in evals]
    axes = [k for k in keys if k != metric] or keys
    if len(axes) >= 3:
        radar_plot(os.path.join(run_dir, "plots", "checkpoint_radar.png"), [a.split("/")[-1] for a in axes],
                   {f"step {e['step']}": [e.get(a, 0.0) for a in axes] for e in evals}, "held-out metrics per checkpoint")
        lines += ["", "![metrics per checkpoint](plots/checkpoint_radar.png)"]
    with open(os.path.join(run_dir, "checkpoint_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"best_step": best["step"], f"best/{metric}": best.get(metric)}


def run(cfg: ExperimentConfig, layout: Layout) -> dict:
    if cfg.sft.phases:
        return run_phases(cfg, layout)
    return run_phase(cfg, layout)


def run_phases(cfg: ExperimentConfig, layout: Layout) -> dict:
    """Phases back to back (seed 000 §1.2.5.3.1), each starting from the previous one's hash-checked result."""
    base = prepare_run_dir(cfg)
    init, sha, summaries = cfg.model.init_from, cfg.model.init_sha256, []
    for ph in cfg.sft.phases:
        sub = copy.deepcopy(cfg)
        sub.sft.phases = []
        sub.train.output_dir = os.path.join(base, ph.name)
        sub.model.init_from, sub.model.init_sha256 = init, sha
        sub.data.sources = ph.sources or cfg.data.sources
        sub.train.max_steps = ph.max_steps or cfg.train.max_steps
        sub.train.micro_batch_size = ph.micro_batch_size or cfg.train.micro_batch_size
        sub.train.grad_accum_steps = ph.grad_accum_steps or cfg.train.grad_accum_steps
        sub.train.global_batch_size = ph.global_batch_size
        sub.optim.lr = ph.lr or cfg.optim.lr
        run_phase(sub, layout)
        # every rank starts the next phase from rank 0's export: wait until it exists, then read where it is
        layout.world_sum([0.0])
        summary = read_json(os.path.join(sub.train.output_dir, "summary.json"), "the phase summary")
        summaries.append({"phase": ph.name, "steps": summary["steps"], "status": summary["status"],
                          "final": summary["final"]})
        init, sha = summary["final"]["path"], summary["final"]["sha256"]
    if not layout.main:
        return {}
    last = read_json(os.path.join(base, cfg.sft.phases[-1].name, "summary.json"), "the phase summary")
    metrics = dict(last["metrics"], phases=summaries)
    return write_summary(base, cfg.stage, last["status"], sum(p["steps"] for p in summaries), metrics,
                         last["gates"], last["final"])


class SFTStage(SupervisedStage):
    """Loss on the assistant tokens of chat-rendered conversations (data/sft.py); optional NEFTune noise."""
    keys = KEYS

    def __init__(self, cfg: ExperimentConfig, model, layout: Layout, data: SFTData, evaluate, binding):
        mbs, s = cfg.train.micro_batch_size, cfg.sft
        super().__init__(cfg, model, layout, SFTLoss(model), mbs * cfg.data.seq_len, loss_norm=float(mbs))
        self.data, self._evaluate, self.evaluates = data, evaluate, evaluate is not None
        self.noisy = s.neftune_alpha > 0
        self.keys = KEYS + (("embed_noise",) if self.noisy else ())
        self.must_match = {"dataset": binding} if binding else {}
        if data.identity:          # the rows themselves: sources, tokenizer, packing, settings (data/sft.py)
            self.must_match["sft_data"] = data.identity
        self.converged = converged(s.converge_metric, s.converge_tolerance, s.converge_patience)

    def batch(self, micro_index: int) -> dict:
        mbs, rank, world = self.cfg.train.micro_batch_size, self.layout.data_rank, self.layout.data_world
        batch = self.data.batch(micro_index, mbs, rank, world)
        if self.noisy:
            where = self.data.batch_indices(micro_index, mbs, rank, world)
            batch["embed_noise"] = neftune_noise(self.cfg.train.seed, where, self.cfg.data.seq_len,
                                                 self.model.config.hidden_size)
        return batch

    def evaluate(self) -> dict:
        return self._evaluate()

    def should_stop(self, evals: list) -> bool:
        return self.converged(evals)

    def weights_io(self):
        return adapter_io(self.model, self.cfg.model.init_from) if self.cfg.sft.lora.enabled else None


def run_phase(cfg: ExperimentConfig, layout: Layout) -> dict:
    """One SFT run (see the module docstring)."""
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg)
    model.neftune_alpha = float(cfg.sft.neftune_alpha)
    lora = cfg.sft.lora
    if lora.enabled:
        apply_lora(model, LoRAConfig(lora.r, lora.alpha, lora.dropout, list(lora.targets)))
        hold_base(model, lora.base_dtype, "sft.lora")
    s = cfg.sft
    binding = verify_dataset(s.dataset_manifest, s.dataset_version) if s.dataset_manifest else None
    d = cfg.data
    cache_dir = d.cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), ".cache")
    data = SFTData(d.sources, tokenizer, cfg.tokenizer.chat_template, d.seq_len, cfg.sft, d.shuffle_seed, d.on_error,
                   cfg.packing, cache_dir)
    evaluate = make_evaluator(cfg, model, tokenizer)
    before = evaluate() if evaluate and layout.main else {}
    result = train(cfg, SFTStage(cfg, model, layout, data, evaluate, binding), run_dir)
    if not layout.main:
        return {}
    exported = trained_model(cfg, run_dir, model, lora.enabled)
    final = export_final(run_dir, exported, tokenizer, None)
    metrics = dict(result.metrics, data_skipped_records=data.stats.skipped,
                   **{f"before/{k}": v for k, v in before.items()}, **checkpoint_report(run_dir, result.evals, s.converge_metric))
    if binding:
        final["dataset"] = binding
    status = "stopped_early" if result.stopped_early else "completed"
    return finish(run_dir, cfg.stage, status, result.steps, metrics, final, plots=cfg.log.plots)
