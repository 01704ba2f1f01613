# SPDX-License-Identifier: Apache-2.0
"""`ms-llm pipeline`: a four-stage chain (pretrain -> sft -> reward -> ppo) at a few steps per stage, killed in
the middle and rerun, then a changed byte in a finished stage's final/, a gate that stops the chain, and both
reports checked number by number against the stages' own records."""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import kill_once_written, make_workdir

MICRO = """
name: micro
output_dir: runs/micro
gate_policy: stop
stages:
  - name: pretrain
    config: configs/tiny/pretrain.yaml
    overrides: [train.max_steps=4, train.eval_every=0, checkpoint.every=2, lr_schedule.warmup_steps=0,
                data.eval_fraction=0, log.plots=false]
    launch: [--nproc-per-node, 1, --device, cpu]         # through ms-llm launch (one worker: no msrun)
  - name: sft
    config: configs/tiny/sft_rlhf.yaml
    overrides: [train.max_steps=4, train.log_every=1, train.eval_every=0, checkpoint.every=2, lr_schedule.warmup_steps=0,
                sft.eval_limit=4, sft.eval_max_new_tokens=4, log.plots=false]
  - name: reward
    config: configs/tiny/reward.yaml
    overrides: [train.max_steps=4, train.eval_every=0, checkpoint.every=2, lr_schedule.warmup_steps=0,
                reward.gate_auc=0.0, log.plots=false]
    inputs: {model: pretrain}
  - name: ppo
    config: configs/tiny/ppo.yaml
    overrides: [train.max_steps=2, train.eval_every=0, checkpoint.every=1, ppo.rollout_batch_size=4,
                ppo.mini_batch_size=4, ppo.eval_limit=4, ppo.max_new_tokens=8, log.plots=false]
    inputs: {model: sft, ppo.reward_model: reward}
"""


def _pipeline(workdir, *args, expect=0):
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "pipeline", "micro.yaml", *args], cwd=workdir,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == expect, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def _state(workdir):
    return json.loads((workdir / "runs" / "micro" / "pipeline.json").read_text())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = make_workdir(tmp_path_factory, "pipeline")
    (d / "micro.yaml").write_text(MICRO)
    # killed once the SFT stage wrote its first checkpoint, then run again
    kill_once_written(d, ["pipeline", "micro.yaml"],
                      d / "runs" / "micro" / "sft" / "checkpoints" / "step_000002" / "MANIFEST.json")
    killed = _state(d)
    rerun = _pipeline(d)
    return d, killed, rerun


@pytest.mark.slow
def test_killed_pipeline_resumes_and_reaches_ppo(chain):
    d, killed, rerun = chain
    assert [s["status"] for s in killed["stages"]] == ["completed", "running", "pending", "pending"]
    state = _state(d)
    assert state["status"] == "completed"
    assert [s["status"] for s in state["stages"]] == ["completed"] * 4
    assert state["stages"][0].get("skipped") and not state["stages"][1].get("skipped")
    assert "[1/4] pretrain: finished before with the same config and inputs; skipped" in rerun.stdout
    assert (d / "runs" / "micro" / "logs" / "pretrain.log").read_text().startswith("$ -m ms_llm.cli launch ")
    assert "[2/4] sft: resuming" in rerun.stdout and rerun.stdout.strip().endswith("runs/micro/report.md")
    # the SFT stage went on from its checkpoint: every step logged once
    rows = [json.loads(x) for x in open(d / "runs" / "micro" / "sft" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    # hand-offs: each stage's inputs are the SHA256 of the final/ it names, and its config says so
    by = {s["stage"]: s for s in state["stages"]}
    assert by["sft"]["input_sha256"] == {"model": by["pretrain"]["output"]["sha256"]}
    assert by["ppo"]["input_sha256"] == {"model": by["sft"]["output"]["sha256"],
                                         "ppo.reward_model": by["reward"]["output"]["sha256"]}
    ppo_cfg = yaml.safe_load((d / "runs" / "micro" / "ppo" / "config.resolved.yaml").read_text())
    assert ppo_cfg["model"]["init_sha256"] == by["sft"]["output"]["sha256"]
    assert ppo_cfg["ppo"]["reward_sha256"] == by["reward"]["output"]["sha256"]
    for s in state["stages"]:
        summary = json.loads((d / "runs" / "micro" / s["stage"] / "summary.json").read_text())
        assert s["output"]["sha256"] == summary["final"]["sha256"] and len(s["config_hash"]) == 64
    # a third run has nothing to do
    again = _pipeline(d)
    assert again.stdout.count("skipped") == 4


def _check_quotes(text: str, d) -> int:
    """Every `value [stage/file: key]` in `text` equals the stage's record; returns how many were checked."""
    root, n = d / "runs" / "micro", 0
    state = json.loads((root / "pipeline.json").read_text())
    for value, source in re.findall(r"(\S+) \[([^\]]+)\]", text):
        where, key = source.split(": ", 1)
        if where == "pipeline.json":
            stage, field = key.split(".", 1)
            rec = next(s for s in state["stages"] if s["stage"] == stage)
            got = rec
            for part in field.split("."):
                got = got[part]
        else:
            stage, file = where.split("/", 1)
            path = root / stage / file
            doc = yaml.safe_load(path.read_text()) if file.endswith(".yaml") else json.loads(path.read_text())
            if file == "summary.json" and key.startswith("metrics."):
                got = doc["metrics"][key[len("metrics."):]]
            else:
                got = doc
                for part in key.split("."):
                    got = got[part]
        if isinstance(got, bool):
            assert value == str(got).lower(), (value, source)
        elif isinstance(got, (int, float)):
            assert float(value) == pytest.approx(got, rel=5e-4, abs=1e-12), (value, source, got)
        elif isinstance(got, list):
            continue
        else:
            assert value == str(got), (value, source, got)
        n += 1
    return n


@pytest.mark.slow
def test_reports_quote_the_records(chain):
    d = chain[0]
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "report", "--technical", "runs/micro"], cwd=d,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tech = (d / "runs" / "micro" / "technical_report.md").read_text()
    for heading in ("## 1. Model overview", "## 2. Pretraining", "## 4. Post-training", "## 5. Evaluation",
                    "## 7. Safety and alignment"):
        assert heading in tech
    assert _check_quotes(tech, d) >= 40
    assert "not recorded" in tech                             # facts no record holds are not invented
    assert "ρ_t = π(a_t|s_t)/π_old(a_t|s_t)" in tech            # the PPO loss, written out
    # report.md: the stage table and, per stage, every metric against summary.json
    report = (d / "runs" / "micro" / "report.md").read_text()
    state = _state(d)
    checked = 0
    for s in state["stages"]:
        summary = json.loads((d / "runs" / "micro" / s["stage"] / "summary.json").read_text())
        section = report.split(f"## {s['stage']} (")[1].split("\n## ")[0]
        for name, value in re.findall(r"^\| (\S+) \| (\S+) \|$", section, re.M):
            if name in ("metric", "---"):
                continue
            assert float(value) == pytest.approx(summary["metrics"][name], rel=5e-4, abs=1e-12), (s["stage"], name)
            checked += 1
        row = next(x for x in report.splitlines() if x.startswith(f"| {s['stage']} | {summary['stage']} |"))
        assert f"| {s['steps']} |" in row and s["output"]["sha256"][:16] in row
    assert checked >= 20
    assert (d / "runs" / "micro" / "plots" / "loss.png").is_file() and (d / "runs" / "micro" / "plots" / "rl.png").is_file()


@pytest.mark.slow
def test_a_changed_byte_in_a_finished_stage_stops_the_next(chain):
    d = chain[0]
    weights = d / "runs" / "micro" / "sft" / "final" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    try:
        r = _pipeline(d, expect=2)
        err = r.stderr.strip().splitlines()[-1]
        assert err.startswith("error:") and "model.safetensors" in err and "the next stage (reward)" in err, err
        assert "[3/4]" not in r.stdout
    finally:
        raw[-3] ^= 0xFF
        weights.write_bytes(bytes(raw))
    # the failed check did not cost the later stages their records: with the byte back, nothing runs again
    assert _state(d)["stages"][3]["previous"]["status"] == "completed"
    assert _pipeline(d).stdout.count("skipped") == 4


@pytest.mark.slow
def test_a_failed_gate_stops_the_pipeline_with_its_reason(chain):
    d = chain[0]
    r = _pipeline(d, "reward.reward.gate_auc=0.999", expect=1)
    assert "pipeline stopped: stage reward: gate(s) failed under gate_policy stop: auc" in r.stdout
    state = _state(d)
    assert state["status"] == "gate_failed" and [s["status"] for s in state["stages"]][2:] == ["gate_failed", "pending"]
    assert "**Stopped:** stage reward: gate(s) failed" in (d / "runs" / "micro" / "report.md").read_text()
    assert (d / "runs" / "micro" / "reward.old1" / "summary.json").is_file()    # the earlier run is kept
    # under gate_policy warn the same result goes on (here up to the reward stage: it is not run again)
    r = _pipeline(d, "reward.reward.gate_auc=0.999", "gate_policy=warn", "--until", "reward")
    assert "[3/4] reward: finished before" in r.stdout and "gate(s) ['auc'] failed; going on" in r.stdout
    state = _state(d)
    assert state["status"] == "stopped" and state["stages"][2]["gate_warnings"] == ["auc"]


def test_bad_pipelines_are_refused_before_anything_runs(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cases = {
        "stages: []\n": "'stages' must be a non-empty list",
        "stage: [x]\n": "unknown key(s) ['stage']",
        "stages:\n  - {name: a, config: configs/tiny/pretrain.yaml}\n  - {name: b, config: configs/tiny/sft_rlhf.yaml, "
        "inputs: {model: c}}\n": "inputs.model names 'c', which is not an earlier stage",
        "stages:\n  - {name: a, config: configs/tiny/pretrain.yaml, overrides: [train.max_stepz=3]}\n":
            "stages[0] (a): ",
        "stages:\n  - {name: a, config: configs/tiny/pretrain.yaml, inputs: {ppo.value: a}}\n":
            "inputs key 'ppo.value' is not a model hand-off",
        "stages:\n  - {name: a, config: configs/tiny/pretrain.yaml, launch: [--nprocs, 2]}\n":
            "are not ms-llm launch flags",
        "stages:\n  - {name: logs, config: configs/tiny/pretrain.yaml}\n": "'name' must be unique",
    }
    for text, message in cases.items():
        path = tmp_path / "p.yaml"
        path.write_text(text)
        r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "pipeline", str(path)], cwd=root,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (text, r.stderr)
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "pipeline", str(tmp_path / "none.yaml")], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "none.yaml: cannot read pipeline" in r.stderr
    # a pipeline record that is not one
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pipeline.json").write_text('["not", "a", "record"]')
    (tmp_path / "p.yaml").write_text(f"output_dir: {tmp_path / 'out'}\nstages:\n"
                                     "  - {name: a, config: configs/tiny/pretrain.yaml}\n")
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "pipeline", str(tmp_path / "p.yaml")], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pipeline.json: not a pipeline record" in r.stderr and "Traceback" not in r.stderr
