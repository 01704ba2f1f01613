# SPDX-License-Identifier: Apache-2.0
"""Plain functions every stage shares: run directory, model and tokenizer from the config, final export."""
import logging
import os

import mindspore as ms

from ms_llm import storage
from ms_llm.config import ExperimentConfig, load_config, to_yaml
from ms_llm.config.schema import FrozenModelSection
from ms_llm.data.tokenizer import Tokenizer
from ms_llm.errors import MsLlmError
from ms_llm.models import save_pretrained
from ms_llm.models.io import load_pretrained, model_state_dict, resolve_model_dir, save_state_dict
from ms_llm.peft.lora import merge_lora, save_adapter
from ms_llm.rollout.audit import audit_status
from ms_llm.training import checkpoint as ckpt
from ms_llm.training.metrics import plot_metrics, read_metrics, write_summary

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: ExperimentConfig) -> str:
    run_dir = cfg.train.output_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.resolved.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    return run_dir


def load_tokenizer(cfg: ExperimentConfig) -> Tokenizer:
    path = cfg.tokenizer.path or (resolve_model_dir(cfg.model.init_from) if cfg.model.init_from else None)
    if not path:
        raise MsLlmError("tokenizer.path is not set and there is no model.init_from to take it from")
    return Tokenizer.load(path)


def export_final(run_dir: str, model, tokenizer, version: str = None, weights: dict = None, extra=None) -> dict:
    """final/: Hugging Face layout + tokenizer + MANIFEST.json; returns summary.json's `final` entry.
    `weights`: the whole model's arrays (Layout.whole_weights) instead of the model's own parameters;
    `extra(folder)`: writes further files (e.g. a reward head) before the manifest hashes them."""
    final = os.path.join(run_dir, "final")
    checkpoints = ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints"))
    with storage.writing_dir(final, "final export", last_good=checkpoints[0][1] if checkpoints else None) as tmp:
        if weights is not None:
            save_state_dict(weights, model.config, tmp)
        else:
            save_pretrained(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra is not None:
            extra(tmp)
        manifest = ckpt.write_manifest(tmp, version=version)
    return {"path": os.path.abspath(final), "sha256": manifest["model_sha256"], "version": version}


def finish(run_dir: str, stage: str, status: str, steps: int, metrics: dict, final: dict = None, gates=None,
           plots: bool = True) -> dict:
    summary = write_summary(run_dir, stage, status, steps, metrics, gates, final)
    if plots:
        plot_metrics(run_dir)
    write_report(run_dir, summary)
    return summary


def _audit_lines(run_dir: str) -> list:
    """The human-audit rounds of an RLHF run (rollout/audit.py), overdue ones flagged; read when the report is
    written, so `ms-llm report RUN_DIR` later shows what is overdue by then."""
    hours = 48.0
    try:
        # the run's own record, not a config to run: no cross-field rules (an older release's defaults may break them)
        hours = load_config(os.path.join(run_dir, "config.resolved.yaml"), check=False).ppo.audit.review_hours
    except Exception:                  # noqa: BLE001 - an old or hand-written run dir: the default applies
        pass
    rounds = audit_status(run_dir, hours)
    if not rounds:
        return []
    lines = ["", "## Audit rounds", "", "| round | records | reviewed | status |", "|---|---|---|---|"]
    for r in rounds:
        status = f"**OVERDUE: unreviewed after {hours:g} h**" if r["overdue"] else (
            "reviewed" if r["reviewed"] else "awaiting review")
        lines.append(f"| {r['round']} | {r['records']} | {r['reviewed']} | {status} |")
    return lines


def policy_dtype(cfg: ExperimentConfig) -> str:
    return cfg.train.compute_dtype if cfg.train.amp_level != "O0" else "float32"


def reference_section(cfg: ExperimentConfig, section):
    """The frozen reference of an RL stage (`section`: cfg.dpo or cfg.ppo) as configured; empty: model.init_from
    frozen in `reference.dtype` — with `auto`, the policy's half compute dtype when it has one (its matmuls then
    read the same rounded weights as the policy's), else models/frozen.py's auto — or with LoRA the policy itself
    with its adapter disabled."""
    ref = section.reference
    if ref.path or ref.policy_without_adapter:
        return ref
    if section.lora.enabled:
        return FrozenModelSection(policy_without_adapter=True, sha256=ref.sha256)
    dtype = ref.dtype if ref.dtype != "auto" or policy_dtype(cfg) == "float32" else policy_dtype(cfg)
    return FrozenModelSection(path=cfg.model.init_from, sha256=ref.sha256 or cfg.model.init_sha256,
                              dtype=dtype, tokenizer=ref.tokenizer)


def trained_model(cfg: ExperimentConfig, run_dir: str, model, lora_enabled: bool):
    """After training: eval mode; with LoRA, final_adapter/ (PEFT format) and the merged model; else the model."""
    model.set_train(False)
    if not lora_enabled:
        return model
    save_adapter(model, os.path.join(run_dir, "final_adapter"), cfg.model.init_from)
    return merged(cfg, model)


def merged(cfg: ExperimentConfig, model):
    """The LoRA model merged into a plain float32 one; a base held in half precision (`lora.base_dtype`) is
    replaced by the float32 base on disk (model.init_from) first, so the export carries no rounding."""
    half = any(p.dtype != ms.float32 for n, p in model.parameters_and_names() if ".lora_" not in n)
    if half and cfg.model.init_from:
        return merge_lora(model, model_state_dict(load_pretrained(cfg.model.init_from)))
    if half:
        log.warning("the LoRA base was held in half precision and model.init_from names no float32 copy: the "
                    "merged model carries the rounded base")
    return merge_lora(model)


def write_report(run_dir: str, summary: dict):
    rows = read_metrics(run_dir)
    lines = [f"# {summary['stage']} run: {summary['status']}", "", f"Steps: {summary['steps']}", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary["metrics"].items()]
    if summary.get("gates"):
        lines += ["", "| gate | value | threshold | passed |", "|---|---|---|---|"]
        lines += [f"| {k} | {g['value']} | {g['op']} {g['threshold']} | {g['passed']} |" for k, g in summary["gates"].items()]
    if summary.get("final"):
        lines += ["", f"Final model: `{summary['final']['path']}` (sha256 `{summary['final']['sha256']}`)"]
    if rows:
        lines += ["", f"Logged steps: {sum(r.get('step', 0) > 0 for r in rows)}; plots in `plots/`."]
    lines += _audit_lines(run_dir)
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
