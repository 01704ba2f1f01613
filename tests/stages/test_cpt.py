# SPDX-License-Identifier: Apache-2.0
"""Continual pretraining: the live mixture, forgetting alarms with re-weighting, the anneal switch, resume."""
import json
import subprocess
import sys

import pytest

from conftest import assert_resumed_run_equals, kill_once_written


STARVED = ("cpt.phases=[{name: starved, weights: {general: 50, science: 2, code: 48}}]", "cpt.anneal_weights={}",
           "lr_schedule.type=constant", "optim.lr=5e-4", "lr_schedule.warmup_steps=10", "cpt.monitor.stop=false")


def _train(workdir, *overrides):
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "train", *overrides, "train.progress_bar=false",
                        "log.plots=false"], cwd=workdir, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def _rows(workdir, run):
    return [json.loads(x) for x in open(workdir / "runs" / run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def pretrained(tiny_pretrained):
    return tiny_pretrained


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
    assert "baseline accuracy: science" in decisions
    # the monitor's multiple-choice accuracy is that of the model at the evaluation: the last one is final/'s
    from ms_llm.data.tokenizer import Tokenizer
    from ms_llm.eval.multiple_choice import evaluate, read_jsonl
    from ms_llm.models import load_pretrained
    model = load_pretrained(pretrained / "runs" / "tiny_cpt" / "final")
    items = read_jsonl(str(pretrained / "data" / "tiny" / "eval_science_mc.jsonl"))[:64]
    acc = evaluate(model, Tokenizer.load(str(pretrained / "data" / "tiny" / "tokenizer")), items, method="cloze")
    assert rows[120]["eval/accuracy/science"] == pytest.approx(acc["accuracy"])


def test_an_accuracy_drop_of_more_than_the_threshold_is_an_alarm(tmp_path):
    from ms_llm.config import load_config
    from ms_llm.stages.cpt import ForgettingMonitor
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "1 + 1 =", "choices": ["2", "3"], "answer": 0}) + "\n")
    (tmp_path / "c.yaml").write_text("stage: cpt\nmodel: {preset: tiny}\ndata: {sources: [{path: x.jsonl}]}\n"
                                     "train: {eval_every: 10}\ncpt: {phases: [{name: p, weights: {science: 1}}], "
                                     f"monitor: {{choice_sets: {{science: {mc}}}, accuracy_threshold: 0.02}}}}\n")
    monitor = ForgettingMonitor(load_config(str(tmp_path / "c.yaml")), None, None)
    assert monitor.check({}, {"science": 0.50}) == ({"eval/accuracy/science": 0.5, "eval/accuracy_drop/science": 0.0,
                                                      "eval/loss/mean": 0.0, "eval/alarms": 0.0}, [])
    row, alarms = monitor.check({}, {"science": 0.49})                 # one point down: within the threshold
    assert alarms == []
    row, alarms = monitor.check({}, {"science": 0.47})                 # three points down
    assert alarms == ["science"] and row["eval/accuracy_drop/science"] == pytest.approx(0.03)
    assert "accuracy 47.0%, 3.0% below baseline 50.0%" in monitor.reason(row, "science")


@pytest.fixture(scope="module")
def starved(pretrained):
    """Science at 2% from the tiny pretrained model, 150 steps: with the seed's monitor (alarm at a 2% loss
    rise or a 2-point accuracy drop, weight x1.3) and with the monitor's thresholds out of reach."""
    common = ("configs/tiny/cpt.yaml", *STARVED, "train.log_every=1", "checkpoint.every=25")
    _train(pretrained, *common, "train.max_steps=150", "train.output_dir=runs/starved")
    _train(pretrained, *common, "train.max_steps=150", "train.output_dir=runs/unmonitored", "cpt.monitor.threshold=10",
           "cpt.monitor.accuracy_threshold=10")
    return pretrained, common


@pytest.mark.slow
def test_a_starved_domain_raises_the_alarm_gets_more_weight_and_recovers(starved):
    workdir, _ = starved
    rows = _rows(workdir, "starved")
    evals = [r for r in rows if "eval/loss/science" in r]
    alarms = [r for r in evals if r.get("eval/alarm/science")]
    assert alarms, [round(r["eval/rise/science"], 4) for r in evals]
    first = alarms[0]
    assert first["eval/rise/science"] > 0.02 or first["eval/accuracy_drop/science"] > 0.02
    assert first["eval/mix/science"] == pytest.approx(0.02 * 1.3 / (0.98 + 0.02 * 1.3))     # x1.3, renormalized
    later = [r for r in rows if r["step"] > first["step"] and "mix/science" in r]
    assert later and later[0]["mix/science"] == pytest.approx(first["eval/mix/science"])   # sampled from then on
    assert max(r["eval/mix/science"] for r in evals) > 1.5 * 0.02                # alarms compound while they last
    # without re-weighting the starved domain degrades past the threshold and ends worse than with it; with
    # it, its held-out loss is back within the threshold of the baseline at the end
    plain = [r for r in _rows(workdir, "unmonitored") if "eval/loss/science" in r]
    assert max(r["eval/rise/science"] for r in plain) > 0.02
    assert evals[-1]["eval/loss/science"] < plain[-1]["eval/loss/science"]
    assert evals[-1]["eval/rise/science"] < 0.02, [round(r["eval/rise/science"], 4) for r in evals]
    summary = json.loads((workdir / "runs" / "starved" / "summary.json").read_text())
    assert summary["metrics"]["alarms"] >= 1


@pytest.mark.slow
def test_resume_continues_the_schedule_and_the_monitor_state(starved):
    workdir, common = starved
    _train(workdir, *common, "train.max_steps=25", "train.output_dir=runs/split")
    _train(workdir, *common, "train.max_steps=50", "train.output_dir=runs/split")
    whole = {r["step"]: r for r in _rows(workdir, "starved")}
    split = {r["step"]: r for r in _rows(workdir, "split")}
    assert whole[25].get("eval/alarm/science")          # the resumed run must carry that alarm's boost on
    for step in range(26, 51):
        assert split[step]["loss"] == pytest.approx(whole[step]["loss"], abs=1e-5), step
        assert split[step]["mix/science"] == pytest.approx(whole[step]["mix/science"], abs=1e-12), step
    assert split[50]["eval/mix/science"] == pytest.approx(whole[50]["eval/mix/science"], abs=1e-12)


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(starved):
    """The starved run again, killed after the step-36 checkpoint (evaluations every 25, so between the alarm
    at 25 and the next one) and resumed: per-step losses afterwards and the final weights equal runs/starved."""
    workdir, common = starved
    args = ["train", *common, "train.max_steps=150", "checkpoint.every=12", "train.progress_bar=false", "log.plots=false"]
    b = workdir / "runs" / "starved_killed"
    kill_once_written(workdir, [*args, "train.output_dir=runs/starved_killed"],
                      b / "checkpoints" / "step_000036" / "MANIFEST.json")
    _train(workdir, *args[1:], "train.output_dir=runs/starved_killed")
    assert_resumed_run_equals(workdir / "runs" / "starved", b, 150, 36)
    gates = json.loads((b / "summary.json").read_text())["gates"]
    assert gates == json.loads((workdir / "runs" / "starved" / "summary.json").read_text())["gates"]
    assert {"forgetting/loss/science", "forgetting/accuracy/science", "converged"} <= set(gates)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_on_two_ranks_equals_one_process_with_the_monitor(pretrained):
    """CPT with parallel.optimizer_shard=zero3 on 2 msrun ranks = one process with the batch of both: per-step
    losses, the forgetting monitor's per-domain losses and accuracy at every evaluation (its baseline is measured
    before the updater shards the model: a graph compiled then must not be reused after), and the export."""
    import numpy as np
    from conftest import run_cli
    from ms_llm.models.safetensors_io import read_safetensors
    over = ("configs/tiny/cpt.yaml", "train.max_steps=6", "train.eval_every=3", "train.log_every=1",
            "checkpoint.every=0", "cpt.monitor.stop=false", "lr_schedule.warmup_steps=0", "train.progress_bar=false",
            "log.plots=false")
    _train(pretrained, *over, "train.micro_batch_size=8", "train.output_dir=runs/cpt_b8")
    run_cli(pretrained, "launch", *over, "train.micro_batch_size=4", "parallel.optimizer_shard=zero3",
            "train.output_dir=runs/cpt_zero3", "--nproc-per-node", "2", "--master-port", "8185", "--log-dir",
            "logs_cpt_zero3", "--cluster-timeout", "60")
    rows = [_rows(pretrained, run) for run in ("cpt_b8", "cpt_zero3")]
    np.testing.assert_allclose([r["loss"] for r in rows[1] if "loss" in r], [r["loss"] for r in rows[0] if "loss" in r],
                               rtol=1e-5)
    evals = [[{k: v for k, v in r.items() if k.startswith("eval/")} for r in x if any(k.startswith("eval/") for k in r)]
             for x in rows]
    assert len(evals[0]) == len(evals[1]) >= 2
    for a, b in zip(*evals):
        assert set(a) == set(b) and any(k.startswith("eval/loss/") for k in a)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    assert any(v != 0 for e in evals[0] for k, v in e.items() if k.startswith("eval/rise/"))
    a, b = (read_safetensors(str(pretrained / "runs" / n / "final" / "model.safetensors")) for n in ("cpt_b8", "cpt_zero3"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 3e-5
