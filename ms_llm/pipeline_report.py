# SPDX-License-Identifier: Apache-2.0
"""The pipeline's report.md (a table and plots across stages) and `ms-llm report --technical PIPELINE_DIR`'s
technical_report.md in seed 001's outline.

Every number either report quotes is read from a stage's own records and carries its source in brackets,
`[stage/file: key]` (file: summary.json, config.resolved.yaml, final/config.json, or pipeline.json for the
pipeline's own record), so a reader — and tests/test_pipeline_chain.py — can check each one. A fact no record holds
is written "not recorded", never guessed.
"""
import json
import math
import os

import yaml

from ms_llm.config.registry import STAGES, kinds
from ms_llm.fileio import read_json

SOURCES = ("summary.json", "config.resolved.yaml", "final/config.json")


def fmt(v) -> str:
    """How a number is printed in both reports (4 significant digits)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Records:
    """A pipeline directory's records: pipeline.json and, per stage, summary.json, config.resolved.yaml,
    final/config.json and metrics.jsonl."""

    def __init__(self, output_dir: str, state: dict = None):
        self.dir = output_dir
        self.state = state if state is not None else read_json(os.path.join(output_dir, "pipeline.json"),
                                                               "the pipeline record")
        self.stages = self.state.get("stages", [])
        # stages that finished in this chain (a pending stage's files may be an older run's)
        self.done = [x for x in self.stages if x.get("status") in ("completed", "stopped_early", "gate_failed")]
        self._cache = {}

    def run_dir(self, stage: str) -> str:
        return os.path.join(self.dir, stage)

    def read(self, stage: str, file: str):
        key = (stage, file)
        if key not in self._cache:
            path = os.path.join(self.run_dir(stage), file)
            if not os.path.isfile(path):
                self._cache[key] = None
            elif file.endswith(".yaml"):
                with open(path) as f:
                    self._cache[key] = yaml.safe_load(f)
            else:
                self._cache[key] = read_json(path, file)
        return self._cache[key]

    def value(self, stage: str, file: str, key: str):
        """The value at `key` (dotted; summary.json metric names keep their slashes) or None."""
        doc = self.read(stage, file)
        if doc is None:
            return None
        if file == "summary.json" and key.startswith("metrics."):
            return (doc.get("metrics") or {}).get(key[len("metrics."):])
        node = doc
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def quote(self, stage: str, file: str, key: str) -> str:
        """`value [stage/file: key]`, or "not recorded"."""
        if stage is None:
            return "not recorded"
        v = self.value(stage, file, key)
        if v is None or isinstance(v, (dict, list)):
            return "not recorded"
        return f"{fmt(v)} [{stage}/{file}: {key}]"

    def metrics(self, stage: str) -> list:
        rows = []
        path = os.path.join(self.run_dir(stage), "metrics.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                rows = [json.loads(x) for x in f if x.strip()]
        return rows

    def by_kind(self, *kinds) -> list:
        """Stage names whose summary says they are one of `kinds` (pretrain, cpt, distill, sft, reward, dpo, ppo)."""
        out = []
        for rec in self.done:
            summary = self.read(rec["stage"], "summary.json")
            if summary and summary.get("stage") in kinds:
                out.append(rec["stage"])
        return out


# -- report.md ------------------------------------------------------------------------------------------------

def write_pipeline_report(output_dir: str, state: dict, plots: bool = True) -> str:
    r = Records(output_dir, state)
    lines = [f"# Pipeline {state.get('name')}: {state.get('status')}", ""]
    if state.get("reason"):
        lines += [f"**Stopped:** {state['reason']}", ""]
    lines += ["| stage | kind | status | steps | wall time (s) | output SHA256 | gates |", "|---|---|---|---|---|---|---|"]
    for rec in r.stages:
        summary = r.read(rec["stage"], "summary.json") if rec.get("status") != "pending" else None
        gates = "; ".join(f"{k} {fmt(g.get('value'))} {g.get('op', '>=')} {fmt(g.get('threshold'))} "
                          f"{'passed' if g.get('passed') else 'FAILED'}" for k, g in (rec.get("gates") or {}).items())
        sha = (rec.get("output") or {}).get("sha256", "")
        lines.append(f"| {rec['stage']} | {(summary or {}).get('stage', '')} | {rec['status']}"
                     f"{' (skipped: done before)' if rec.get('skipped') else ''} | {fmt(rec.get('steps', ''))} | "
                     f"{fmt(rec.get('wall_s', ''))} | {sha[:16]}{'…' if sha else ''} | {gates or '—'} |")
    plots = _plots(r) if plots else []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}](plots/{name}.png)" for name in plots]
    for rec in r.stages:
        summary = r.read(rec["stage"], "summary.json")
        if not summary or rec.get("status") == "pending":
            continue
        numeric = {k: v for k, v in (summary.get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("data/")}
        lines += ["", f"## {rec['stage']} ({summary.get('stage')})", "",
                  f"Run directory: `{r.run_dir(rec['stage'])}`; input SHA256: "
                  + (", ".join(f"{k} {v[:16]}…" for k, v in (rec.get("input_sha256") or {}).items()) or "none"), "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in sorted(numeric.items())]
    path = os.path.join(output_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _plots(r: Records) -> list:
    """Loss per stage; held-out perplexity per domain (CPT); final evaluation metrics per stage (exact match,
    code pass@1, reward-model AUC and accuracy, RL reward); reward and KL of the RL stages."""
    # matplotlib loads only when a figure is drawn
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.join(r.dir, "plots"), exist_ok=True)
    done = [rec["stage"] for rec in r.stages if rec.get("status") not in ("pending",)]
    written = []
    curves = [(s, [(m["step"], m["loss"]) for m in r.metrics(s) if isinstance(m.get("loss"), (int, float))])
              for s in done]
    curves = [(s, pts) for s, pts in curves if pts]
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), squeeze=False)
        for ax, (s, pts) in zip(axes[0], curves):
            ax.plot(*zip(*pts))
            ax.set_title(s)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("loss")
        _save(fig, r.dir, "loss", written)
    domains = [(s, k) for s in done for k in sorted({k for m in r.metrics(s) for k in m
                                                     if k.startswith("eval/loss/") and k != "eval/loss/mean"})]
    if domains:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for s, k in domains:
            pts = [(m["step"], math.exp(m[k])) for m in r.metrics(s) if isinstance(m.get(k), (int, float))]
            ax.plot(*zip(*pts), marker="o", label=f"{s}: {k.split('/')[-1]}")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, r.dir, "perplexity", written)
    wanted = ("eval/exact_match", "eval/code_pass@1", "eval/auc", "eval/accuracy", "eval/preference_accuracy",
              "eval/reward", "eval/unsafe_rate", "teacher_exact_match")
    bars = [(f"{s}\n{k}", v) for s in done for k, v in ((r.read(s, "summary.json") or {}).get("metrics") or {}).items()
            if k in wanted or (k.startswith("eval/ppl") and isinstance(v, (int, float)))]
    if bars:
        fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(bars)), 3.5))
        ax.bar(range(len(bars)), [v for _, v in bars])
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([n for n, _ in bars], fontsize=6, rotation=30, ha="right")
        ax.set_title("final evaluations")
        _save(fig, r.dir, "evaluations", written)
    rl = [(s, r.metrics(s)) for s in done if any("reward/total" in m or "rewards/margin" in m for m in r.metrics(s))]
    if rl:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        for s, rows in rl:
            for ax, key in zip(axes, (("reward/total", "rewards/margin"), ("kl", "logps/chosen"))):
                pts = [(m["step"], m[k]) for m in rows for k in key if isinstance(m.get(k), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=s)
        axes[0].set_title("reward (PPO) / margin (DPO)")
        axes[1].set_title("KL to the reference (PPO)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        _save(fig, r.dir, "rl", written)
    return written


def _save(fig, out_dir, name, written):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "plots", f"{name}.png"), dpi=90)
    # matplotlib loads only when a figure is drawn
    import matplotlib.pyplot as plt
    plt.close(fig)
    written.append(name)


# -- technical_report.md ------------------------------------------------------------------------------------

LOSS_TEXT = {name: entry.loss_text for name, entry in STAGES.items()}


def write_technical_report(output_dir: str) -> str:
    r = Records(output_dir)
    q = r.quote
    last = lambda *kinds: (r.by_kind(*kinds) or [None])[-1]          # noqa: E731
    final_stage = r.done[-1]["stage"] if r.done else None
    sft, rm = last("sft"), last("reward")
    rl = last(*kinds("rl"))
    L = [f"# Technical report: pipeline {r.state.get('name')}", "",
         f"Written from the records of `{output_dir}` (pipeline status: {r.state.get('status')}). Each number "
         "gives its source in brackets; \"not recorded\" marks a fact no record holds.", ""]

    L += ["## 1. Model overview", ""]
    arch = final_stage
    L += [f"- Final model: stage {final_stage}, output SHA256 {_sha(r, final_stage)}",
          f"- Architecture: decoder-only Transformer (Llama/Qwen2 family: RMSNorm, rotary positions, SwiGLU MLP, "
          f"grouped-query attention); type {q(arch, 'final/config.json', 'model_type')}",
          f"- Layers: {q(arch, 'final/config.json', 'num_hidden_layers')}",
          f"- Hidden size: {q(arch, 'final/config.json', 'hidden_size')}",
          f"- Attention heads: {q(arch, 'final/config.json', 'num_attention_heads')}; key-value heads: "
          f"{q(arch, 'final/config.json', 'num_key_value_heads')}",
          f"- MLP width: {q(arch, 'final/config.json', 'intermediate_size')}",
          f"- Vocabulary: {q(arch, 'final/config.json', 'vocab_size')}",
          "- Stages, in order: " + ", ".join(f"{s['stage']} ({s.get('status')})" for s in r.stages), ""]

    L += ["## 2. Pretraining / continual pretraining", ""]
    for s in r.by_kind(*kinds("pretraining")):
        kind = r.read(s, "summary.json")["stage"]
        L += [f"### {s} ({kind})", ""] + _data_lines(r, s) + _training_lines(r, s) + [
            f"- Loss: {LOSS_TEXT.get(kind, 'not recorded')}"]
        if kind == "distill":
            L += [f"- Teacher: {q(s, 'config.resolved.yaml', 'distill.teacher.path')}; temperature "
                  f"{q(s, 'config.resolved.yaml', 'distill.temperature')}; α {q(s, 'config.resolved.yaml', 'distill.alpha')}; "
                  f"β {q(s, 'config.resolved.yaml', 'distill.beta')}",
                  f"- Teacher exact match: {q(s, 'summary.json', 'metrics.teacher_exact_match')}; student: "
                  f"{q(s, 'summary.json', 'metrics.eval/exact_match')}"]
        if kind == "cpt":
            losses = sorted(k for k in (r.read(s, "summary.json").get("metrics") or {})
                            if k.startswith("eval/loss/") and k != "eval/loss/mean")
            L += [f"- Held-out loss, {k.split('/')[-1]} (perplexity = e^loss): {q(s, 'summary.json', 'metrics.' + k)}"
                  for k in losses]
        L += [""]
    if not r.by_kind(*kinds("pretraining")):
        L += ["No pretraining stage in this pipeline: not recorded.", ""]
    L += ["- Scaling analysis: not recorded", ""]

    L += ["## 3. Mid-training", "", "- not recorded (no mid-training stage is defined)", ""]

    L += ["## 4. Post-training", "", "### Supervised fine-tuning", ""]
    if sft:
        lora = r.value(sft, "config.resolved.yaml", "sft.lora.enabled")
        L += _data_lines(r, sft) + [
            f"- Method: {'LoRA' if lora else 'full-parameter'} (LoRA enabled: "
            f"{q(sft, 'config.resolved.yaml', 'sft.lora.enabled')})"]
        if lora:
            L += [f"- LoRA rank {q(sft, 'config.resolved.yaml', 'sft.lora.r')}, alpha "
                  f"{q(sft, 'config.resolved.yaml', 'sft.lora.alpha')}, targets "
                  f"{', '.join(r.value(sft, 'config.resolved.yaml', 'sft.lora.targets') or [])}; merged into final/"]
        L += _training_lines(r, sft) + [f"- Loss: {LOSS_TEXT['sft']}",
                                        f"- Held-out exact match: {q(sft, 'summary.json', 'metrics.eval/exact_match')}"
                                        f" (before: {q(sft, 'summary.json', 'metrics.before/eval/exact_match')})",
                                        f"- Code pass@1: {q(sft, 'summary.json', 'metrics.eval/code_pass@1')}", ""]
    else:
        L += ["- not recorded (no SFT stage)", ""]
    L += ["### Reinforcement learning / preference optimisation", ""]
    if rl:
        kind = r.read(rl, "summary.json")["stage"]
        L += [f"- Paradigm: {STAGES[kind].paradigm} (stage kind: {q(rl, 'summary.json', 'stage')}"
              + (f", loss {q(rl, 'config.resolved.yaml', 'dpo.loss')})" if kind == "dpo" else ")")]
        L += _data_lines(r, rl, "Preference / prompt data")
        L += ["- Annotation process, annotator training and agreement: not recorded"]
        if rm:
            L += [f"- Reward model: stage {rm}, {q(rm, 'final/config.json', 'num_hidden_layers')} layers, hidden "
                  f"{q(rm, 'final/config.json', 'hidden_size')}, a scalar head on the last token",
                  f"- Reward model loss: {LOSS_TEXT['reward']}",
                  f"- Reward model held-out accuracy {q(rm, 'summary.json', 'metrics.eval/accuracy')}, AUC "
                  f"{q(rm, 'summary.json', 'metrics.eval/auc')}, ECE {q(rm, 'summary.json', 'metrics.eval/ece')}"]
        L += [f"- Loss: {LOSS_TEXT[kind]}"]
        if kind == "ppo":
            c = lambda k: q(rl, "config.resolved.yaml", k)      # noqa: E731
            L += [f"- Clip ε_low {c('ppo.clip_low')}, ε_high {c('ppo.clip_high')}, dual-clip c {c('ppo.dual_clip')}",
                  f"- KL estimator {c('ppo.kl.estimator')}, controller {c('ppo.kl.controller')}, initial β "
                  f"{c('ppo.kl.init_coef')}, target {c('ppo.kl.target')}",
                  f"- GAE γ {c('ppo.gamma')}, λ {c('ppo.lam')}; PPO epochs {c('ppo.ppo_epochs')}; rollout batch "
                  f"{c('ppo.rollout_batch_size')}, mini-batch {c('ppo.mini_batch_size')}",
                  f"- Value model: initialised from {c('ppo.value_init')}, lr {c('ppo.value_lr')}, value clip "
                  f"{c('ppo.value_clip')}, coefficient {c('ppo.vf_coef')}",
                  f"- Safety reward weight {c('ppo.safety.weight')}",
                  f"- Mean KL to the reference at the end: {q(rl, 'summary.json', 'metrics.kl')}",
                  f"- Held-out reward: {q(rl, 'summary.json', 'metrics.eval/reward')} (before: "
                  f"{q(rl, 'summary.json', 'metrics.before/eval/reward')}); unsafe rate "
                  f"{q(rl, 'summary.json', 'metrics.eval/unsafe_rate')} (before: "
                  f"{q(rl, 'summary.json', 'metrics.before/eval/unsafe_rate')})"]
        elif kind == "grpo":
            c = lambda k: q(rl, "config.resolved.yaml", k)      # noqa: E731
            L += [f"- Rewards {c('grpo.rewards')}; {c('grpo.group_size')} completions per prompt; aggregation "
                  f"{c('grpo.loss_agg')}; ratio {c('grpo.ratio')}",
                  f"- Clip ε_low {c('grpo.clip_low')}, ε_high {c('grpo.clip_high')}; reference KL β {c('grpo.beta')}",
                  f"- Held-out accuracy: {q(rl, 'summary.json', 'metrics.eval/accuracy')} (before: "
                  f"{q(rl, 'summary.json', 'metrics.before/eval/accuracy')})"]
        else:
            c = lambda k: q(rl, "config.resolved.yaml", k)      # noqa: E731
            L += [f"- β {c('dpo.beta')}; reference {c('dpo.reference.path')}",
                  f"- Held-out preference accuracy: {q(rl, 'summary.json', 'metrics.eval/preference_accuracy')}"]
        L += _training_lines(r, rl) + [""]
    else:
        L += ["- not recorded (no RL stage)", ""]

    L += ["## 5. Evaluation", "", "| stage | metric | start | end |", "|---|---|---|---|"]
    for rec in r.done:
        s = rec["stage"]
        m = (r.read(s, "summary.json") or {}).get("metrics") or {}
        for k in sorted(k for k in m if k.startswith("eval/") and isinstance(m[k], (int, float))
                        and not k.startswith("eval/loss")):
            start = q(s, "summary.json", "metrics.before/" + k) if ("before/" + k) in m else "not recorded"
            L.append(f"| {s} | {k} | {start} | {q(s, 'summary.json', 'metrics.' + k)} |")
    L += ["", "- Public benchmarks (MMLU, GSM8K, HumanEval, MT-Bench) and comparisons with other models: not "
          "recorded by this pipeline (`ms-llm eval` measures them)", "- Ablations: not recorded", ""]

    L += ["## 6. Training details", ""]
    for rec in r.stages:
        L.append(f"- {rec['stage']}: {rec.get('status')}, wall time (s) {_pipe(r, rec, 'wall_s')}, steps "
                 f"{_pipe(r, rec, 'steps')}")
    L += ["- Findings and problems met: not recorded", ""]

    L += ["## 7. Safety and alignment", ""]
    if rl and r.read(rl, "summary.json")["stage"] == "ppo":
        L += [f"- Safety reward (sensitive phrases, classifier if configured) with weight "
              f"{q(rl, 'config.resolved.yaml', 'ppo.safety.weight')}; held-out unsafe rate "
              f"{q(rl, 'summary.json', 'metrics.eval/unsafe_rate')}"]
    L += ["- Red-teaming, bias and fairness evaluation: not recorded", ""]
    L += ["## 8. Limitations", "", "- not recorded", ""]
    path = os.path.join(output_dir, "technical_report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(L) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _sha(r: Records, stage: str) -> str:
    rec = next((x for x in r.stages if x["stage"] == stage), None)
    sha = ((rec or {}).get("output") or {}).get("sha256")
    return f"{sha} [pipeline.json: {stage}.output.sha256]" if sha else "not recorded"


def _pipe(r: Records, rec: dict, key: str) -> str:
    v = rec.get(key)
    return f"{fmt(v)} [pipeline.json: {rec['stage']}.{key}]" if v is not None else "not recorded"


def _data_lines(r: Records, s: str, label: str = "Data") -> list:
    sources = r.value(s, "config.resolved.yaml", "data.sources") or []
    parts = [f"{x.get('path')} (format {x.get('format')}, weight {fmt(x.get('weight'))})" for x in sources]
    if parts:
        data = f"{'; '.join(parts)} [{s}/config.resolved.yaml: data.sources]"
    elif r.value(s, "config.resolved.yaml", "data.index"):
        data = "the domain-tagged shard index " + r.quote(s, "config.resolved.yaml", "data.index")
    else:
        data = "not recorded"
    return [f"- {label}: {data}",
            f"- Sequence length: {r.quote(s, 'config.resolved.yaml', 'data.seq_len')}",
            "- Cleaning, deduplication and quality scoring: not recorded"]


def _training_lines(r: Records, s: str) -> list:
    q = r.quote
    return [f"- Optimiser: AdamW (β1 {q(s, 'config.resolved.yaml', 'optim.beta1')}, β2 "
            f"{q(s, 'config.resolved.yaml', 'optim.beta2')}), peak lr {q(s, 'config.resolved.yaml', 'optim.lr')}, "
            f"weight decay {q(s, 'config.resolved.yaml', 'optim.weight_decay')}; schedule "
            f"{q(s, 'config.resolved.yaml', 'lr_schedule.type')} with {q(s, 'config.resolved.yaml', 'lr_schedule.warmup_steps')} "
            "warm-up steps",
            f"- Batch: micro-batch {q(s, 'config.resolved.yaml', 'train.micro_batch_size')} × accumulation "
            f"{q(s, 'config.resolved.yaml', 'train.grad_accum_steps')}; steps {q(s, 'summary.json', 'steps')}",
            f"- Parallel layout: data {q(s, 'config.resolved.yaml', 'parallel.data_parallel')}, tensor "
            f"{q(s, 'config.resolved.yaml', 'parallel.tensor_parallel')}, pipeline "
            f"{q(s, 'config.resolved.yaml', 'parallel.pipeline_stages')}; AMP level "
            f"{q(s, 'config.resolved.yaml', 'train.amp_level')} with compute dtype "
            f"{q(s, 'config.resolved.yaml', 'train.compute_dtype')} (O0 computes in float32)"]
