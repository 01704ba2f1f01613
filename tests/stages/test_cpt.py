# SPDX-License-Identifier: Apache-2.0
"""Continual pretraining: the live mixture, forgetting alarms with re-weighting, the anneal switch, resume."""
import json
import subprocess
import sys

import pytest

from conftest import make_workdir

STARVED = ("cpt.phases=[{name: starved, weights: {general: 50, science: 2, code: 48}}]", "cpt.anneal_weights={}",
           "lr_schedule.type=constant", "optim.lr=5e-4", "lr_schedule.warmup_steps=10", "cpt.monitor.stop=false")


def _train(workdir, *overrides):
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "train", *overrides, "train.progress_bar=false",
                        "log.plots=false"], cwd=workdir, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def _rows(workdir, run):
    return [json.loads(x) for x in open(workdir / "runs" / run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    d = make_workdir(tmp_path_factory, "cpt")
    _train(d, "configs/tiny/pretrain.yaml", "data.eval_fraction=0")
    return d


@pytest.mark.slow
def test_curriculum_is_logged_and_the_anneal_mixture_starts_with_the_decay(pretrained):
    _train(pretrained, "configs/tiny/cpt.yaml", "train.max_steps=120", "lr_schedule.decay_steps=10",
           "cpt.monitor.stop=false", "cpt.monitor.threshold=10", "train.eval_every=40", "train.log_every=1")
    rows = {r["step"]: r for r in _rows(pretrained, "tiny_cpt")}
    # phase 1 until 102400 tokens = step 100 (8 x 128 tokens per step), blended over +-10240 tokens
    assert rows[80]["mix/code"] == pytest.approx(0.10)
    assert 0.10 < rows[100]["mix/code"] < 0.30
    assert rows[99]["mix/code"] < rows[100]["mix/code"]
    assert rows[100]["mix/code"] == pytest.approx(0.20, abs=1e-6)            # halfway through the blend
    # WSD decay over step indices 110..119 (index 110 is its start, still at the peak): the anneal mixture
    # takes over from exactly those samples
    assert rows[110]["lr"] == rows[111]["lr"] == pytest.approx(1.5e-3) and rows[112]["lr"] < 1.5e-3
    assert rows[109]["mix/science"] == pytest.approx(0.3) and rows[110]["mix/science"] == pytest.approx(0.4)
    assert rows[120]["token_budget_done"] == pytest.approx(120 * 8 * 128 / 204800)
    decisions = (pretrained / "runs" / "tiny_cpt" / "decisions.md").read_text()
    assert "step 110: learning-rate decay starts" in decisions and "baseline held-out loss" in decisions
    assert all(f"eval/loss/{d}" in rows[40] for d in ("general", "science", "code"))


@pytest.mark.slow
def test_a_starved_domain_raises_the_alarm_and_gets_more_weight(pretrained):
    _train(pretrained, "configs/tiny/cpt.yaml", *STARVED, "train.max_steps=100", "cpt.monitor.threshold=0.005",
           "train.output_dir=runs/starved")
    evals = [r for r in _rows(pretrained, "starved") if "eval/loss/science" in r]
    alarms = [r for r in evals if r.get("eval/alarm/science")]
    assert alarms, [round(r["eval/rise/science"], 4) for r in evals]
    first = alarms[0]
    assert first["eval/rise/science"] > 0.005
    assert first["eval/mix/science"] > 0.02                                     # x1.3, renormalized
    later = [r for r in _rows(pretrained, "starved") if r["step"] > first["step"] and "mix/science" in r]
    assert later and later[0]["mix/science"] == pytest.approx(first["eval/mix/science"])   # sampled from then on
    assert max(r["eval/mix/science"] for r in evals) > 1.5 * 0.02                # alarms compound while they last
    # the held-out science loss comes back toward its baseline once science is sampled more
    rises = [r["eval/rise/science"] for r in evals]
    assert rises[-1] < max(rises) / 2, rises
    summary = json.loads((pretrained / "runs" / "starved" / "summary.json").read_text())
    assert summary["metrics"]["alarms"] >= 1


@pytest.mark.slow
def test_resume_continues_the_schedule_and_the_monitor_state(pretrained):
    common = ("configs/tiny/cpt.yaml", *STARVED, "cpt.monitor.threshold=0.005", "train.eval_every=20",
              "checkpoint.every=20", "train.log_every=1")
    _train(pretrained, *common, "train.max_steps=60", "train.output_dir=runs/whole")
    _train(pretrained, *common, "train.max_steps=40", "train.output_dir=runs/split")
    _train(pretrained, *common, "train.max_steps=60", "train.output_dir=runs/split")
    whole = {r["step"]: r for r in _rows(pretrained, "whole")}
    split = {r["step"]: r for r in _rows(pretrained, "split")}
    for step in range(41, 61):
        assert split[step]["loss"] == pytest.approx(whole[step]["loss"], abs=1e-5), step
        assert split[step]["mix/science"] == pytest.approx(whole[step]["mix/science"], abs=1e-12), step
