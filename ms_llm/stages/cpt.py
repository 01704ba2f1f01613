# SPDX-License-Identifier: Apache-2.0
"""Continual pretraining (seed 000 §1.2.5.2, seed 002 §3): the pretrain stage's loss and data, plus

* a verified start point: `model.init_from` with `model.init_sha256` (the distillation manifest's hash);
* a domain-mixture curriculum by consumed tokens (data/curriculum.py), logged live as `mix/<domain>` and
  `phase`, and continued exactly on resume;
* with `lr_schedule.type: wsd` and `cpt.anneal_weights`, the mixture switches to the anneal data when the
  learning-rate decay starts;
* a forgetting monitor: per-domain held-out loss (and multiple-choice accuracy for `monitor.choice_sets`)
  at every evaluation; a domain whose loss rose more than `monitor.threshold` over its baseline, or whose
  accuracy fell more than `monitor.accuracy_threshold`, raises an alarm and has its sampling weight multiplied by
  `monitor.boost` from that sample on; the run ends when the mean held-out loss varied less than
  `monitor.tolerance` over `monitor.window` evaluations with every domain within its threshold.
  The decisions go to metrics.jsonl and `decisions.md` in the run directory.

    ms-llm train configs/tiny/cpt.yaml
"""
import logging
import math
import os

from ms_llm.config import ExperimentConfig
from ms_llm.data.curriculum import CurriculumSampler, Phase, Schedule
from ms_llm.data.loader import PretrainData
from ms_llm.errors import MsLlmError
from ms_llm.eval.generative import perplexity
from ms_llm.eval.multiple_choice import evaluate, read_jsonl
from ms_llm.eval.results import gate
from ms_llm.losses.lm import LMLoss
from ms_llm.models.build import build_model
from ms_llm.stages.common import export_final, finish, load_tokenizer, prepare_run_dir
from ms_llm.training.layout import Layout
from ms_llm.training.stage import SupervisedStage
from ms_llm.training.trainer import train

log = logging.getLogger(__name__)


def schedule_from(cfg: ExperimentConfig) -> Schedule:
    c = cfg.cpt
    phases = [Phase(ph.name, ph.until_tokens if ph.until_tokens is not None and i < len(c.phases) - 1 else math.inf,
                    {k: float(v) for k, v in ph.weights.items()}) for i, ph in enumerate(c.phases)]
    return Schedule(phases, float(c.smoothing_tokens), {k: float(v) for k, v in c.anneal_weights.items()} or None)


def decay_start(cfg: ExperimentConfig):
    """First optimizer step of the WSD decay (None for other schedules)."""
    s, t = cfg.lr_schedule, cfg.train
    if s.type != "wsd":
        return None
    span = s.decay_steps if s.decay_steps is not None else max(1, round(0.1 * t.max_steps))
    return t.max_steps - span


class ForgettingMonitor:
    """Seed 000 §1.2.5.2.4: held-out loss (and multiple-choice accuracy) per domain, alarms, re-weighting and
    the termination rule."""

    def __init__(self, cfg: ExperimentConfig, model, tokenizer):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        m = cfg.cpt.monitor
        for key, sets in (("sets", m.sets), ("choice_sets", m.choice_sets)):
            for domain, path in sets.items():
                if not os.path.isfile(path):
                    raise MsLlmError(f"cpt.monitor.{key}.{domain}: {path} not found")
        self.questions = {d: read_jsonl(p)[:m.max_questions] for d, p in sorted(m.choice_sets.items())}
        self.baseline, self.baseline_acc, self.history, self.decisions = {}, {}, [], []

    def measure(self) -> tuple:
        """({domain: held-out loss}, {domain: multiple-choice accuracy})."""
        m = self.cfg.cpt.monitor
        self.model.set_train(False)
        losses = {d: math.log(perplexity(self.model, self.tokenizer, path, self.cfg.data.seq_len, 8, m.max_docs)["perplexity"])
                  for d, path in sorted(m.sets.items())}
        accuracy = {d: evaluate(self.model, self.tokenizer, items, method=m.choice_method)["accuracy"]
                    for d, items in self.questions.items()}
        self.model.set_train(True)
        return losses, accuracy

    def check(self, losses: dict, accuracy: dict = None) -> tuple:
        """(metrics for the row, domains in alarm): loss up more than `threshold` (relative) or accuracy down
        more than `accuracy_threshold` (absolute) from the first measurement."""
        m, accuracy = self.cfg.cpt.monitor, accuracy or {}
        if not self.baseline and not self.baseline_acc:
            self.baseline, self.baseline_acc = dict(losses), dict(accuracy)
        row, alarms = {}, []
        for d, v in losses.items():
            rise = (v - self.baseline[d]) / max(abs(self.baseline[d]), 1e-12)
            row[f"eval/loss/{d}"] = v
            row[f"eval/rise/{d}"] = rise
            target = self.cfg.cpt.targets.get(d)
            if target is not None:
                row[f"eval/target_gap/{d}"] = v - float(target)
            if rise > m.threshold:
                alarms.append(d)
        for d, acc in accuracy.items():
            drop = self.baseline_acc[d] - acc
            row[f"eval/accuracy/{d}"], row[f"eval/accuracy_drop/{d}"] = acc, drop
            if drop > m.accuracy_threshold and d not in alarms:
                alarms.append(d)
        mean = sum(losses.values()) / max(len(losses), 1)
        self.history.append(mean)
        row["eval/loss/mean"] = mean
        row["eval/alarms"] = float(len(alarms))
        return row, alarms

    def reason(self, row: dict, domain: str) -> str:
        """Why `domain` alarmed, for decisions.md."""
        m, parts = self.cfg.cpt.monitor, []
        if row.get(f"eval/rise/{domain}", 0.0) > m.threshold:
            parts.append(f"held-out loss {row[f'eval/loss/{domain}']:.4f}, +{row[f'eval/rise/{domain}']:.1%} over "
                         f"baseline {self.baseline[domain]:.4f}")
        if row.get(f"eval/accuracy_drop/{domain}", 0.0) > m.accuracy_threshold:
            parts.append(f"accuracy {row[f'eval/accuracy/{domain}']:.1%}, {row[f'eval/accuracy_drop/{domain}']:.1%} "
                         f"below baseline {self.baseline_acc[domain]:.1%}")
        return "; ".join(parts)

    def variation(self) -> float:
        """Relative spread of the mean held-out loss over the last `window` evaluations (inf before then)."""
        m = self.cfg.cpt.monitor
        if len(self.history) < m.window or m.window < 2:
            return math.inf
        recent = self.history[-m.window:]
        return (max(recent) - min(recent)) / max(abs(recent[-1]), 1e-12)

    def converged(self) -> bool:
        return self.variation() < self.cfg.cpt.monitor.tolerance

    def gates(self, row: dict) -> dict:
        """summary.json gates from the last evaluation's row: per domain, the loss rise and the accuracy drop
        against their thresholds, and the termination rule (mean-loss variation over the window)."""
        m, out = self.cfg.cpt.monitor, {}
        for d in self.baseline:
            out[f"forgetting/loss/{d}"] = gate(row[f"eval/rise/{d}"], m.threshold, "<=")
        for d in self.baseline_acc:
            out[f"forgetting/accuracy/{d}"] = gate(row[f"eval/accuracy_drop/{d}"], m.accuracy_threshold, "<=")
        spread = self.variation()
        out["converged"] = gate(spread if spread != math.inf else None, m.tolerance, "<")   # None: too few evaluations
        return out


class CPTStage(SupervisedStage):
    """Next-token loss on the curriculum's samples; the mixture moves with the consumed tokens, the anneal switch
    and the forgetting monitor's alarms (the module docstring). `decisions` collects what it decided, for
    decisions.md."""

    def __init__(self, cfg: ExperimentConfig, model, layout: Layout, data: PretrainData, schedule: Schedule,
                 monitor):
        d, t = cfg.data, cfg.train
        super().__init__(cfg, model, layout, LMLoss(model) if layout.pp is None else model,
                         t.micro_batch_size * d.seq_len)
        self.data, self.schedule, self.monitor, self.decisions = data, schedule, monitor, []
        self.keys = ("input_ids", "labels", "position_ids", "segment_ids") if cfg.packing == "documents" \
            else ("input_ids", "labels")
        self.samples_per_step = t.micro_batch_size * t.grad_accum_steps * cfg.parallel.data_parallel
        self.tokens_per_step = self.samples_per_step * d.seq_len
        self.anneal_step = decay_start(cfg) if schedule.anneal_weights else None
        self.evaluates = monitor is not None

    def batch(self, micro_index: int) -> dict:
        return self.data.batch(micro_index, self.cfg.train.micro_batch_size, self.layout.data_rank,
                               self.layout.data_world)

    def step(self, step: int, micro_index: int) -> tuple:
        row, used = super().step(step, micro_index)
        done, schedule = self.done, self.schedule
        if self.anneal_step is not None and done == self.anneal_step and schedule.anneal_from_tokens is None:
            schedule.anneal_from_tokens = float(done * self.tokens_per_step)
            self.data.sampler.reset(done * self.samples_per_step)
            self.decisions.append(f"step {done}: learning-rate decay starts; mixture switched to the anneal weights "
                                  f"{schedule.anneal_weights}")
        tokens = done * self.tokens_per_step
        w = schedule.domain_weights(tokens, done * self.samples_per_step)
        row.update({f"mix/{k}": v for k, v in sorted(w.items())})
        row["tokens"] = float(tokens)
        if self.cfg.cpt.token_budget:
            row["token_budget_done"] = tokens / float(self.cfg.cpt.token_budget)
        return row, used

    def evaluate(self) -> dict:
        c, done, monitor = self.cfg.cpt, self.done, self.monitor
        row, alarms = monitor.check(*monitor.measure())
        for dom in alarms:
            self.schedule.boosts.append((done * self.samples_per_step, dom, c.monitor.boost))
            self.decisions.append(f"step {done}: alarm on '{dom}' ({monitor.reason(row, dom)}); its sampling weight "
                                  f"x{c.monitor.boost}")
            row[f"eval/alarm/{dom}"] = 1.0
        if alarms:
            self.data.sampler.reset(done * self.samples_per_step)
        w = self.schedule.domain_weights(done * self.tokens_per_step, done * self.samples_per_step)
        row.update({f"eval/mix/{k}": v for k, v in sorted(w.items())})
        return row

    def should_stop(self, evals: list) -> bool:
        m = self.cfg.cpt.monitor
        if self.monitor is None or not m.stop:
            return False
        stop = self.monitor.converged() and evals[-1].get("eval/alarms", 1.0) == 0
        if stop:
            self.decisions.append(f"step {evals[-1]['step']}: held-out loss varied < {m.tolerance:.2%} over "
                                  f"{m.window} evaluations with no domain over its threshold: terminate")
        return stop

    def state_dict(self) -> dict:
        monitor = self.monitor
        return {"curriculum": self.schedule.state(), "monitor_baseline": monitor.baseline if monitor else {},
                "monitor_baseline_accuracy": monitor.baseline_acc if monitor else {},
                "monitor_history": monitor.history if monitor else []}

    def load_state_dict(self, saved: dict):
        self.schedule.load_state(saved.get("curriculum", {}))
        self.data.sampler.reset(0)
        monitor = self.monitor
        if monitor is not None and (saved.get("monitor_baseline") or saved.get("monitor_baseline_accuracy")):
            monitor.baseline = dict(saved.get("monitor_baseline", {}))
            monitor.baseline_acc = dict(saved.get("monitor_baseline_accuracy", {}))
            monitor.history = list(saved.get("monitor_history", []))


def run(cfg: ExperimentConfig, layout: Layout) -> dict:
    c, d = cfg.cpt, cfg.data
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, layout)
    cache_dir = d.cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), ".cache")
    schedule = schedule_from(cfg)
    sampled = {k for ph in schedule.phases for k, v in ph.weights.items() if v > 0}
    sampled |= {k for k, v in (schedule.anneal_weights or {}).items() if v > 0}
    data = PretrainData(d.sources, tokenizer, d.seq_len, cache_dir, cfg.packing == "documents", d.shuffle_seed,
                        d.eval_fraction, d.on_error, d.index, sorted(sampled) if d.index else None)
    try:
        data.sampler = CurriculumSampler(data.n_train, data.domains, data.weights, schedule, d.seq_len, d.shuffle_seed)
    except ValueError as e:
        raise MsLlmError(f"cpt.phases: {e}") from None
    monitor = ForgettingMonitor(cfg, model, tokenizer) if c.monitor.sets or c.monitor.choice_sets else None
    stage = CPTStage(cfg, model, layout, data, schedule, monitor)
    # the baseline, before any CPT step, on every rank: the alarms (and so the data mixture) must agree across
    # data-parallel ranks, and under tensor parallelism the evaluation is a collective
    if monitor is not None and not _has_checkpoint(run_dir):
        row, _ = monitor.check(*monitor.measure())
        stage.decisions.append("baseline held-out loss: " + ", ".join(f"{k[len('eval/loss/'):]} {v:.4f}" for k, v in row.items()
                                                                if k.startswith("eval/loss/") and k != "eval/loss/mean"))
        if monitor.baseline_acc:
            stage.decisions.append("baseline accuracy: " + ", ".join(f"{d} {v:.1%}" for d, v in monitor.baseline_acc.items()))
    result = train(cfg, stage, run_dir)
    weights = layout.whole_weights(model)
    if not layout.main:
        return {}
    with open(os.path.join(run_dir, "decisions.md"), "a") as f:
        f.write("".join(f"- {x}\n" for x in stage.decisions))
    final = export_final(run_dir, model, tokenizer, c.export_version, weights)
    metrics = dict(result.metrics, data_skipped_records=data.skipped, alarms=sum("alarm on" in x for x in stage.decisions),
                   tokens=float(result.steps * stage.tokens_per_step))
    status = "stopped_early" if result.stopped_early else "completed"
    gates = monitor.gates(result.evals[-1]) if monitor is not None and result.evals else None
    return finish(run_dir, cfg.stage, status, result.steps, metrics, final, gates, plots=cfg.log.plots)


def _has_checkpoint(run_dir: str) -> bool:
    return os.path.isdir(os.path.join(run_dir, "checkpoints")) and any(
        n.startswith("step_") for n in os.listdir(os.path.join(run_dir, "checkpoints")))
