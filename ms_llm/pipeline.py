# SPDX-License-Identifier: Apache-2.0
"""`ms-llm pipeline CONFIG [k=v ...]`: stages in order, each handed the SHA256-checked `final/` of the stages it
names, with its gates applied after it, resumable.

A pipeline YAML:

    name: tiny
    output_dir: runs/tiny_pipeline          # one run directory per stage below it, plus pipeline.json, report.md
    gate_policy: stop                       # stop | warn: what a failed gate does (a stage may override, per gate:
                                            #   gate_policy: {loss_plateau: warn})
    seed: 0                                 # optional: every stage's train.seed (a stage's overrides may still set it)
    stages:
      - name: sft
        config: configs/tiny/sft_rlhf.yaml
        overrides: [train.max_steps=200]
        inputs: {model: pretrain}           # model.init_from + model.init_sha256 <- pretrain's final/
      - name: ppo
        config: configs/tiny/ppo.yaml
        inputs: {model: sft, ppo.reward_model: reward}

`inputs` maps a config key to an earlier stage: `model` sets model.init_from and model.init_sha256; a frozen
model section (distill.teacher, dpo.reference, ppo.reference, grpo.reference) gets .path and .sha256;
ppo.reward_model and grpo.reward_model get their reward_sha256 too (config/registry.py lists every key). Without `inputs`, a stage after the first starts from the previous stage's model.

Each stage runs as `ms-llm train` in a child process (or, with `launch: [flags]`, as `ms-llm launch` with those
flags: msrun workers on this node) with train.output_dir=<output_dir>/<name>, its log in
<output_dir>/logs/<name>.log. pipeline.json records per stage: status (pending, running, completed,
stopped_early, failed, gate_failed), run_dir, config hash, input and output SHA256, gates and wall time.
On a rerun a finished stage is skipped when its config hash and input hashes are unchanged and its final/
still verifies (a changed byte there stops the pipeline, naming the file); an unfinished stage resumes from its
newest checkpoint; a stage whose config or inputs changed starts afresh (its old run directory is kept,
renamed). Command-line overrides: `output_dir=...`, `gate_policy=...`, `seed=N`, or `<stage>.<key>=<value>` for
one stage's config.
"""
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import yaml

from ms_llm.config import load_config
from ms_llm.config.load import to_dict
from ms_llm.config.registry import handoff_keys
from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_json, read_text, write_json_atomic
from ms_llm.launch import die_with_parent, parse
from ms_llm.manifest import verify
from ms_llm.pipeline_report import fmt, write_pipeline_report

STATUSES = ("pending", "running", "completed", "stopped_early", "failed", "gate_failed")   # per stage
PIPELINE_STATUSES = ("running", "completed", "stopped", "failed", "gate_failed")
FINISHED = ("completed", "stopped_early")
GATE_POLICIES = ("stop", "warn")
PIPELINE_KEYS = ("name", "output_dir", "gate_policy", "seed", "stages")
HANDOFF_KEYS = handoff_keys()           # every stage's, from the stage registry (config/registry.py)


@dataclasses.dataclass
class PipelineStage:
    name: str
    config: str
    overrides: list
    inputs: dict
    gate_policy: dict                # gate name -> stop | warn; "*": every other gate
    launch: list = None              # `ms-llm launch` flags (msrun workers); None: one `ms-llm train` process


@dataclasses.dataclass
class Pipeline:
    name: str
    output_dir: str
    gate_policy: str
    stages: list
    path: str = ""
    seed: int = None                 # every stage's train.seed (before the stage's own overrides); None: the configs'


def _handoff_keys(key: str, where: str) -> tuple:
    if key in HANDOFF_KEYS:
        return HANDOFF_KEYS[key]
    raise MsLlmError(f"{where}: inputs key '{key}' is not a model hand-off; use one of "
                     f"{sorted(HANDOFF_KEYS)}")


def load_pipeline(path: str, overrides=()) -> Pipeline:
    """Read and check a pipeline YAML (keys, stage names, inputs, each stage's own config) before anything runs."""
    text = read_text(path, "pipeline")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise MsLlmError(f"{path}: YAML syntax error ({e})") from None
    if not isinstance(raw, dict):
        raise MsLlmError(f"{path}: a pipeline is a mapping with name, output_dir, gate_policy and stages")
    unknown = set(raw) - set(PIPELINE_KEYS)
    if unknown:
        raise MsLlmError(f"{path}: unknown key(s) {sorted(unknown)}; a pipeline has {', '.join(PIPELINE_KEYS)}")
    stage_overrides = {}
    for ov in overrides:
        if "=" not in ov:
            raise MsLlmError(f"override '{ov}' must look like key=value or <stage>.<section>.<key>=value")
        key, value = ov.split("=", 1)
        if key in ("output_dir", "gate_policy", "name", "seed"):
            raw[key] = yaml.safe_load(value) if key == "seed" else value
        elif "." in key:
            stage, rest = key.split(".", 1)
            stage_overrides.setdefault(stage, []).append(f"{rest}={value}")
        else:
            raise MsLlmError(f"override '{ov}': not a pipeline key (name, output_dir, gate_policy, seed) nor "
                             "<stage>.<key>")
    policy = raw.get("gate_policy", "stop")
    if policy not in GATE_POLICIES:
        raise MsLlmError(f"{path}: gate_policy must be one of {GATE_POLICIES}, not {policy!r}")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise MsLlmError(f"{path}: seed must be a non-negative integer (every stage's train.seed), not {seed!r}")
    items = raw.get("stages")
    if not isinstance(items, list) or not items:
        raise MsLlmError(f"{path}: 'stages' must be a non-empty list")
    base = os.path.dirname(os.path.abspath(path))
    stages, names = [], []
    for i, item in enumerate(items):
        where = f"{path}: stages[{i}]"
        if not isinstance(item, dict):
            raise MsLlmError(f"{where}: a stage is a mapping (name, config, overrides, inputs, gate_policy)")
        bad = set(item) - {"name", "config", "overrides", "inputs", "gate_policy", "launch"}
        if bad:
            raise MsLlmError(f"{where}: unknown key(s) {sorted(bad)}")
        name, config = item.get("name"), item.get("config")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in names \
                or name in ("logs", "plots"):
            raise MsLlmError(f"{where}: 'name' must be unique, of letters, digits, '_' and '-', and not logs or "
                             f"plots (got {name!r})")
        if not config:
            raise MsLlmError(f"{where} ({name}): 'config' is required")
        if not os.path.isfile(config) and os.path.isfile(os.path.join(base, config)):
            config = os.path.join(base, config)
        inputs = item.get("inputs")
        if inputs is None:
            inputs = {"model": names[-1]} if names else {}
        if not isinstance(inputs, dict):
            raise MsLlmError(f"{where} ({name}): 'inputs' maps config keys to earlier stages")
        for key, src in inputs.items():
            _handoff_keys(key, f"{where} ({name})")
            if src not in names:
                raise MsLlmError(f"{where} ({name}): inputs.{key} names '{src}', which is not an earlier stage "
                                 f"(earlier: {names or 'none'})")
        stage_policy = item.get("gate_policy", policy)
        if isinstance(stage_policy, dict):                    # per gate; the others follow the pipeline's
            stage_policy = {"*": policy, **stage_policy}
        else:
            stage_policy = {"*": stage_policy}
        bad_policy = {k: v for k, v in stage_policy.items() if v not in GATE_POLICIES}
        if bad_policy:
            raise MsLlmError(f"{where} ({name}): gate_policy must be one of {GATE_POLICIES}, or a mapping of gate "
                             f"names to them (got {bad_policy})")
        ovs = ([f"train.seed={seed}"] if seed is not None else []) + list(item.get("overrides") or []) \
            + stage_overrides.pop(name, [])
        if not all(isinstance(o, str) for o in ovs):
            raise MsLlmError(f"{where} ({name}): overrides are strings like train.max_steps=100")
        launch = item.get("launch")
        if launch is not None:
            if not (isinstance(launch, list) and all(isinstance(x, (str, int)) for x in launch)):
                raise MsLlmError(f"{where} ({name}): 'launch' is a list of ms-llm launch flags, e.g. "
                                 "[--nproc-per-node, 8]")
            _check_launch_flags([str(x) for x in launch], f"{where} ({name})")
        stage = PipelineStage(name, config, ovs, dict(inputs), stage_policy,
                              [str(x) for x in launch] if launch is not None else None)
        try:
            load_config(config, _stage_overrides(stage, raw.get("output_dir", "runs/pipeline"), {}))
        except MsLlmError as e:
            raise MsLlmError(f"{where} ({name}): {e}") from None
        stages.append(stage)
        names.append(name)
    if stage_overrides:
        raise MsLlmError(f"override(s) for unknown stage(s) {sorted(stage_overrides)}; stages: {names}")
    return Pipeline(raw.get("name") or os.path.splitext(os.path.basename(path))[0],
                    raw.get("output_dir", "runs/pipeline"), policy, stages, path, seed)


def _stage_overrides(stage: PipelineStage, output_dir: str, handoffs: dict) -> list:
    """The stage's overrides: its own, its run directory, then the hand-offs {key: {path, sha256}}."""
    out = list(stage.overrides) + [f"train.output_dir={os.path.join(output_dir, stage.name)}"]
    for key, final in handoffs.items():
        path_key, sha_key = _handoff_keys(key, stage.name)
        out += [f"{path_key}={final['path']}"] + ([f"{sha_key}={final['sha256']}"] if sha_key else [])
    return out


def config_hash(stage: PipelineStage, output_dir: str, handoffs: dict) -> str:
    """SHA256 of the stage's fully resolved config (every key, defaults included)."""
    cfg = load_config(stage.config, _stage_overrides(stage, output_dir, handoffs))
    doc = {"config": to_dict(cfg), "launch": stage.launch}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _state_path(p: Pipeline) -> str:
    return os.path.join(p.output_dir, "pipeline.json")


def read_state(output_dir: str) -> dict:
    path = os.path.join(output_dir, "pipeline.json")
    if not os.path.isfile(path):
        return {}
    state = read_json(path, "the pipeline record")
    if not isinstance(state, dict) or not isinstance(state.get("stages", []), list) or not all(
            isinstance(r, dict) and isinstance(r.get("stage"), str) for r in state.get("stages", [])):
        raise MsLlmError(f"{path}: not a pipeline record (a mapping whose 'stages' list names each stage); "
                         "move it away to start the pipeline afresh")
    return state


def _last_known(rec: dict) -> dict:
    """A stage the last run did not reach keeps what an earlier run recorded for it under 'previous'."""
    return rec["previous"] if rec.get("status") == "pending" and isinstance(rec.get("previous"), dict) else rec


def _save(p: Pipeline, records: list, status: str, reason: str = None):
    state = {"name": p.name, "config": p.path, "seed": p.seed, "status": status, "reason": reason, "stages": records}
    write_json_atomic(_state_path(p), state)
    write_pipeline_report(p.output_dir, state, plots=status != "running")
    return state


def _verify_output(record: dict, next_name: str):
    """A finished stage's final/ must still be what it was: every file against its manifest, and the manifest's
    hash against the one recorded when the stage finished."""
    final = record["output"]["path"]
    try:
        manifest = verify(final)
    except MsLlmError as e:
        raise MsLlmError(f"stage {record['stage']}'s final/ changed after it completed: {e}; "
                         f"the next stage ({next_name}) was not started") from None
    if manifest.get("model_sha256") != record["output"]["sha256"]:
        raise MsLlmError(f"{final}/MANIFEST.json: model_sha256 {manifest.get('model_sha256')} is not the "
                         f"{record['output']['sha256']} recorded when stage {record['stage']} completed; "
                         f"the next stage ({next_name}) was not started")


def _keep_aside(run_dir: str):
    """A run directory from another config or other inputs: renamed, never deleted."""
    if os.path.isdir(run_dir):
        n = 1
        while os.path.exists(f"{run_dir}.old{n}"):
            n += 1
        os.rename(run_dir, f"{run_dir}.old{n}")
        return f"{run_dir}.old{n}"
    return None


def _check_launch_flags(flags: list, where: str):
    try:
        a = parse(["config.yaml", *flags])
    except SystemExit:
        raise MsLlmError(f"{where}: launch flags {flags} are not ms-llm launch flags (ms-llm launch --help)") from None
    if a.overrides or a.dry_run:
        raise MsLlmError(f"{where}: launch holds flags only (overrides go in 'overrides'; no --dry-run)")


def _run_stage(p: Pipeline, stage: PipelineStage, handoffs: dict, resume: bool) -> tuple:
    os.makedirs(os.path.join(p.output_dir, "logs"), exist_ok=True)
    log = os.path.join(p.output_dir, "logs", f"{stage.name}.log")
    ovs = [*_stage_overrides(stage, p.output_dir, handoffs), "train.progress_bar=false",
           f"checkpoint.resume={'auto' if resume else 'none'}"]
    if stage.launch is None:
        argv = [sys.executable, "-m", "ms_llm.cli", "train", stage.config, *ovs]
    else:
        flags = list(stage.launch)
        if "--log-dir" not in flags:                   # rank logs beside the stage's own, not in ./logs
            flags += ["--log-dir", os.path.join(p.output_dir, "logs", stage.name)]
        argv = [sys.executable, "-m", "ms_llm.cli", "launch", stage.config, *ovs, *flags]
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(argv[1:])}\n")
        f.flush()
        rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                             preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
    return rc, time.time() - t0, log


def _last_error(log: str) -> str:
    try:
        with open(log) as f:
            lines = [x.strip() for x in f if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or [""])[-1][:500]


def run_pipeline(p: Pipeline, log=print, until: str = None) -> int:
    """Run (or resume) the pipeline, or its stages up to `until`; returns 0 when every stage run finished with its
    gates passed or warned, 1 when a stage failed or a gate stopped it."""
    names = [s.name for s in p.stages]
    if until is not None and until not in names:
        raise MsLlmError(f"--until {until}: not a stage of {p.path} (stages: {names})")
    os.makedirs(p.output_dir, exist_ok=True)
    old = {r["stage"]: _last_known(r) for r in read_state(p.output_dir).get("stages", [])}
    records = [{"stage": s.name, "config": s.config, "run_dir": os.path.join(p.output_dir, s.name),
                "status": "pending", **({"previous": old[s.name]} if s.name in old else {})} for s in p.stages]
    outputs, n = {}, len(p.stages)
    for i, (stage, rec) in enumerate(zip(p.stages, records), 1):
        handoffs = {key: outputs[src] for key, src in stage.inputs.items()}
        rec.pop("previous", None)
        rec.update({"config_hash": config_hash(stage, p.output_dir, handoffs),
                    "input_sha256": {key: h["sha256"] for key, h in handoffs.items()},
                    "inputs": {key: src for key, src in stage.inputs.items()}})
        prev = old.get(stage.name, {})
        same = prev.get("config_hash") == rec["config_hash"] and prev.get("input_sha256") == rec["input_sha256"]
        if same and prev.get("status") in FINISHED + ("gate_failed",) and prev.get("output"):
            nxt = p.stages[i].name if i < n else "none: it is the last"
            try:
                _verify_output(prev, nxt)
            except MsLlmError as e:                 # its record stays: restored files let a rerun skip it
                records[i - 1] = dict(prev)
                _save(p, records, "failed", str(e))
                raise
            rec.update({k: prev[k] for k in ("output", "gates", "wall_s", "steps", "finished_status") if k in prev})
            rec["status"], rec["skipped"] = prev.get("finished_status", prev["status"]), True
            log(f"[{i}/{n}] {stage.name}: finished before with the same config and inputs; skipped")
        else:
            moved = None if same else _keep_aside(rec["run_dir"])
            if moved:
                log(f"[{i}/{n}] {stage.name}: config or inputs changed; the old run directory is now {moved}")
            resume = same and prev.get("status") in ("running", "failed")
            log(f"[{i}/{n}] {stage.name}: {'resuming' if resume else 'running'} {stage.config} "
                f"(log: {os.path.join(p.output_dir, 'logs', stage.name + '.log')})")
            rec["status"] = "running"
            _save(p, records, "running")
            rc, wall, logfile = _run_stage(p, stage, handoffs, resume)
            rec["wall_s"] = round(wall + (prev.get("wall_s", 0.0) if resume else 0.0), 1)
            summary_path = os.path.join(rec["run_dir"], "summary.json")
            summary = read_json(summary_path, "a stage summary") if os.path.isfile(summary_path) else None
            final = (summary or {}).get("final") or {}
            if rc != 0 or summary is None or summary.get("status") not in FINISHED or not final.get("sha256"):
                rec["status"] = "failed"
                reason = (f"stage {stage.name} failed (exit {rc}): {_last_error(logfile)}" if rc != 0 or summary is None
                          else f"stage {stage.name} ended with status {summary.get('status')} and "
                               f"{'no final/' if not final else 'a final/ without its SHA256'}; see {logfile}")
                _save(p, records, "failed", reason)
                log(f"[{i}/{n}] {stage.name}: FAILED after {wall:.0f} s: {reason}")
                return 2 if rc == 2 else 1
            rec.update({"status": summary["status"], "finished_status": summary["status"],
                        "steps": summary.get("steps"), "gates": summary.get("gates") or {},
                        "output": {"path": final.get("path"), "sha256": final["sha256"]}})
            gate_text = ", ".join(f"{k} {fmt(g.get('value'))} {g.get('op', '>=')} {fmt(g.get('threshold'))}: "
                                  f"{'passed' if g.get('passed') else 'FAILED'}" for k, g in rec["gates"].items())
            log(f"[{i}/{n}] {stage.name}: {summary['status']} in {wall:.0f} s, {summary.get('steps')} steps"
                + (f"; gates: {gate_text}" if gate_text else ""))
        outputs[stage.name] = rec["output"]
        failed = {k: g for k, g in rec.get("gates", {}).items() if not g.get("passed")}
        stopping = {k: g for k, g in failed.items() if stage.gate_policy.get(k, stage.gate_policy["*"]) == "stop"}
        if stopping:
            rec["status"] = "gate_failed"
            reason = f"stage {stage.name}: gate(s) failed under gate_policy stop: " + "; ".join(
                f"{k} = {fmt(g.get('value'))}, needs {g.get('op', '>=')} {fmt(g.get('threshold'))}"
                for k, g in stopping.items())
            _save(p, records, "gate_failed", reason)
            log(f"pipeline stopped: {reason}")
            return 1
        if failed:
            rec["gate_warnings"] = sorted(failed)
            log(f"[{i}/{n}] {stage.name}: gate(s) {sorted(failed)} failed; going on (gate_policy warn)")
        if stage.name == until and i < n:
            _save(p, records, "stopped", f"--until {until}: stopped after stage {until}")
            log(f"pipeline stopped after {until} (--until)")
            return 0
        _save(p, records, "running")
    _save(p, records, "completed")
    return 0
