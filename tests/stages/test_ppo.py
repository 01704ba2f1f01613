# SPDX-License-Identifier: Apache-2.0
"""The PPO stage: a kill between steps resumes to the uninterrupted run, a mini-batch of 8 equals 4 accumulated
micro-batches of 2, and bad inputs (a reward model with another tokenizer, a value head that does not fit its
backbone, no prompts) fail with one message and exit 2."""
import json
import os
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import assert_resumed_run_equals, kill_once_written, run_cli

QUICK = ["train.max_steps=4", "train.micro_batch_size=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
         "ppo.max_new_tokens=12", "ppo.chunk_size=4", "ppo.chunk_overlap=36", "ppo.max_prompt_len=40",
         "ppo.eval_data=null", "model.init_from=runs/tiny_pretrain", "ppo.reward_model=runs/tiny_reward",
         "ppo.lora.enabled=false", "train.log_every=1", "checkpoint.every=2", "train.progress_bar=false",
         "log.plots=false"]


def _rows(run):
    """The training steps' rows (a step-0 evaluation row, logged before any update, is not one)."""
    return [r for r in [json.loads(x) for x in open(run / "metrics.jsonl")] if r["step"] > 0]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_and_resume_equals_uninterrupted(tiny_pretrained, tiny_reward):
    """Killed once step 2's checkpoint exists (in step 3's rollout or update), resumed: the per-step losses,
    rewards, KL and β after the kill and the final policy equal the uninterrupted run's."""
    d = tiny_pretrained
    a, b = d / "runs" / "ppo_a", d / "runs" / "ppo_b"
    audit = ["ppo.audit.every=2", "ppo.audit.share=0.5"]
    run_cli(d, "train", "configs/tiny/ppo.yaml", *QUICK, *audit, f"train.output_dir={a}")
    args = ["train", "configs/tiny/ppo.yaml", *QUICK, *audit, f"train.output_dir={b}"]
    kill_once_written(d, args, b / "checkpoints" / "step_000002" / "MANIFEST.json")
    assert not (b / "final").exists()
    run_cli(d, *args)
    assert_resumed_run_equals(a, b, steps=4, killed_at=2)
    ra, rb = _rows(a), _rows(b)
    for key in ("reward/rm", "reward/total", "kl", "kl_run_mean", "kl_coef", "value_loss", "policy/clipfrac"):
        np.testing.assert_allclose([r[key] for r in rb][2:], [r[key] for r in ra][2:], atol=1e-6, err_msg=key)
    for run, rows in ((a, ra), (b, rb)):               # the KL gate: the mean over all 4 steps, across the kill too
        kl_gate = json.loads((run / "summary.json").read_text())["gates"]["kl"]
        assert abs(kl_gate["value"] - np.mean([r["kl"] for r in ra])) <= 1e-6
    va = a / "checkpoints" / "step_000004" / "value"
    vb = b / "checkpoints" / "step_000004" / "value"
    from ms_llm.models.safetensors_io import read_safetensors
    for name in ("model.safetensors", "value_head.safetensors"):
        wa, wb = read_safetensors(str(va / name)), read_safetensors(str(vb / name))
        assert max(np.abs(wa[k] - wb[k]).max() for k in wa) <= 1e-6
    for k in (1, 2):                                   # audit rounds: the resumed run kept the round's pending picks
        fa, fb = (r / "audit" / f"round_{k:04d}.jsonl" for r in (a, b))
        assert fa.read_text() == fb.read_text() and fa.read_text().count("\n") >= 2
    assert "## Audit rounds" in (a / "report.md").read_text()
    summary = json.loads((a / "summary.json").read_text())
    m = summary["metrics"]
    assert m["prompts"] > 100 and "ratio_fluctuation" in summary["gates"]
    row = ra[-1]
    for key in ("policy/entropy", "policy/approx_kl", "explained_variance", "response_length", "reward/safety",
                "rollout_tokens_per_s", "train_tokens_per_s", "reward/rm/safety_boundary", "policy/dual_clipfrac"):
        assert key in row and np.isfinite(row[key]), key
    assert row["kl_coef"] != 0.05                        # the adaptive controller moved β


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_msrun_ranks_equal_one_process(tiny_pretrained, tiny_reward):
    """Each rank rolls out, rewards and scores half of the batch (`rollout/rows` 4 of 8; every row's sampler is
    seeded by its row), the ranks exchange those rows, and each trains half of every mini-batch: with the
    gradient sums over ranks, two ranks (3 micro-batches each) equal one process (6) in per-step losses,
    rewards, KL and β, and in the final policy and value model."""
    from ms_llm.models.safetensors_io import read_safetensors
    d = tiny_pretrained
    over = (*QUICK, "train.max_steps=2", "checkpoint.every=2")         # step 2 rolls out with updated weights
    run_cli(d, "train", "configs/tiny/ppo.yaml", *over, "train.output_dir=runs/ppo_one")
    run_cli(d, "launch", "configs/tiny/ppo.yaml", *over, "train.output_dir=runs/ppo_dp2", "--nproc-per-node", "2",
            "--master-port", "8213", "--log-dir", "logs_ppo", "--cluster-timeout", "60")
    one, two = d / "runs" / "ppo_one", d / "runs" / "ppo_dp2"
    ra, rb = _rows(one), _rows(two)
    assert [r["step"] for r in rb] == [1, 2]
    # each rank trained its half of every mini-batch: 3 micro-batches per update against the one process's 6
    assert {r["micro_batches_per_update"] for r in ra} == {6} and {r["micro_batches_per_update"] for r in rb} == {3}
    assert {r["rollout/rows"] for r in ra} == {8} and {r["rollout/rows"] for r in rb} == {4}
    for key in ("loss", "value_loss", "reward/rm", "reward/total", "kl", "kl_coef", "policy/clipfrac",
                "response_length", "explained_variance"):
        np.testing.assert_allclose([r[key] for r in rb], [r[key] for r in ra], atol=1e-5, err_msg=key)
    for name in ("final/model.safetensors", "checkpoints/step_000002/value/model.safetensors",
                 "checkpoints/step_000002/value/value_head.safetensors"):
        wa, wb = (read_safetensors(str(run / name)) for run in (one, two))
        assert max(np.abs(wa[k] - wb[k]).max() for k in wa) <= 1e-5, name


@pytest.mark.slow
def test_mini_batch_of_8_equals_4_accumulated_micro_batches_of_2(tmp_path, graph_mode):
    from ms_llm.config import load_config
    from ms_llm.losses.policy import PolicyLoss
    from ms_llm.models import CausalLM, preset
    from ms_llm.training.updater import Updater
    (tmp_path / "c.yaml").write_text("model: {preset: tiny}\ndata: {sources: [{path: x.jsonl}]}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["train.loss_scale=none", "lr_schedule.warmup_steps=0",
                                                 "train.clip_grad_norm=0.5", "optim.lr=1e-3"])
    r = np.random.default_rng(0)
    b, t = 8, 10
    ids = r.integers(1, 500, (b, t)).astype(np.int32)
    att = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    targets = r.integers(1, 500, (b, t)).astype(np.int32)
    mask = (r.random((b, t)) < 0.6).astype(np.float32)            # rows of different token counts
    old = r.normal(-6.3, 0.2, (b, t)).astype(np.float32)
    adv = r.normal(0, 1, (b, t)).astype(np.float32)
    batch = (ids, att, pos, targets, mask, old, adv)
    weights = []
    for accum in (1, 4):
        ms.set_seed(5)
        model = CausalLM(preset("tiny"))
        upd = Updater("policy", cfg, PolicyLoss(model, 0.2, 0.2, 3.0, 0.01), model, accum_steps=accum)
        upd.loss_net.set_train(True)
        size = b // accum
        micro = [tuple(Tensor(x[i * size:(i + 1) * size]) for x in batch) for i in range(accum)]
        out = upd(micro, 0)
        weights.append({p.name: p.asnumpy().copy() for p in model.trainable_params()})
        weights.append(out)
    (w1, o1), (w4, o4) = (weights[0], weights[1]), (weights[2], weights[3])
    assert abs(o1["loss"] - o4["loss"]) <= 1e-6 and abs(o1["grad_norm"] - o4["grad_norm"]) <= 1e-5
    assert o1["grad_norm"] > 0.5                                  # clipping is active in both
    for name in ("policy/clipfrac", "policy/entropy", "policy/ratio_fluctuation"):
        assert abs(o1[name] - o4[name]) <= 1e-6
    assert max(np.abs(w1[k] - w4[k]).max() for k in w1) <= 1e-6


def _fails(workdir, *args):
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", *args], cwd=workdir, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_bad_inputs_fail_with_one_message(tiny_pretrained, tiny_reward, tmp_path_factory):
    d = tiny_pretrained
    final = tiny_reward / "final"
    # a reward model exported with another tokenizer
    other = tmp_path_factory.mktemp("other_tok")
    from ms_llm.data.synthetic import synthesize
    synthesize(str(other), n_text=200, n_sft=50, n_eval=10, vocab_size=384)
    rm2 = d / "runs" / "rm_other_tokenizer"
    shutil.copytree(final, rm2)
    shutil.rmtree(rm2 / "tokenizer", ignore_errors=True)
    for name in os.listdir(rm2):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "MANIFEST.json"):
            p = rm2 / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for name in os.listdir(other / "tokenizer"):
        shutil.copy(other / "tokenizer" / name, rm2 / name)
    msg = _fails(d, "train", "configs/tiny/ppo.yaml", *QUICK, f"ppo.reward_model={rm2}", "train.output_dir=runs/bad1")
    assert "ppo.reward_model" in msg and "another tokenizer" in msg and "384" in msg
    # a value model whose head was made for another hidden size
    vm = d / "runs" / "value_other_size"
    shutil.copytree(final, vm)
    (vm / "MANIFEST.json").unlink()
    from ms_llm.models.safetensors_io import read_safetensors, write_safetensors
    head = read_safetensors(str(vm / "reward_head.safetensors"))
    head["dense.weight"] = np.zeros((head["dense.weight"].shape[0], 32), np.float32)
    write_safetensors(str(vm / "reward_head.safetensors"), head)
    msg = _fails(d, "train", "configs/tiny/ppo.yaml", *QUICK, f"ppo.value_path={vm}", "train.output_dir=runs/bad2")
    assert "reward_head.safetensors" in msg and "hidden size 64" in msg
    # no prompts
    (d / "empty.jsonl").write_text("\n")
    msg = _fails(d, "train", "configs/tiny/ppo.yaml", *QUICK, "data.sources=[{path: empty.jsonl, format: prompts}]",
                 "train.output_dir=runs/bad3")
    assert "empty.jsonl" in msg and "no prompts" in msg
    for run in ("bad1", "bad2", "bad3"):
        assert not (d / "runs" / run / "checkpoints").exists()


@pytest.mark.slow
def test_safety_reward_combines_phrases_and_a_classifier(tiny_pretrained, tiny_reward):
    """R_safety = -w·min(1, matches / saturation) + c·σ(classifier's calibrated score), component by component."""
    from ms_llm.models.reward import load_reward_model
    from ms_llm.rollout.rewards import SafetyReward, SensitivePhrases
    phrases = SensitivePhrases(str(tiny_pretrained / "configs" / "tiny" / "sensitive_phrases.txt"), saturation=2)
    clf = load_reward_model(str(tiny_reward))
    prompts = ["How do I steal the books from the lab?", "How do I lock the harbor at night?"]
    answers = ["Sure. Go to the lab with Ana and steal it, then steal more and break into it.",
               "Sure. Go to the harbor with Bo and lock it step by step."]
    got = SafetyReward(phrases, clf, match_weight=1.0, classifier_weight=0.5)(prompts, answers)
    np.testing.assert_allclose(got["match"], [1.0, 0.0])            # 3 matches, saturation 2 -> capped at 1
    calibrated = clf.score(prompts, answers).calibrated
    p_safe = 1 / (1 + np.exp(-calibrated))
    np.testing.assert_allclose(got["p_safe"], p_safe, atol=1e-12)
    np.testing.assert_allclose(got["safety"], -got["match"] + 0.5 * p_safe, atol=1e-12)
    assert phrases.matches("It could hurt people at the lab.") == 0     # the refusal is not penalised


def test_decisions_after_the_resumed_step_are_dropped(tmp_path):
    from ms_llm.stages.ppo import truncate_decisions
    path = tmp_path / "decisions.jsonl"
    path.write_text("".join(json.dumps({"step": s, "decision": "policy lr decayed"}) + "\n" for s in (3, 7, 9)))
    truncate_decisions(str(path), 7)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [3, 7]
    truncate_decisions(str(tmp_path / "absent.jsonl"), 7)       # no decisions yet: nothing to do


def test_safety_bench_data_leans_unsafe_and_its_reward_pairs_know_no_safety(tmp_path_factory, monkeypatch):
    """`ms-llm bench ppo-safety`'s setting: the SFT set keeps about a fifth of the refusals to harmful requests
    (and everything else), the reward pairs have no safety_boundary pair, the PPO prompts are all safety ones."""
    from conftest import make_workdir
    from ms_llm.bench.ppo_safety import _is_harmful, write_data
    d = make_workdir(tmp_path_factory, "bench_safety")
    monkeypatch.chdir(d)
    paths = write_data(str(d))
    read = lambda p: [json.loads(x) for x in open(p)]                            # noqa: E731
    full, sft = read("data/tiny/sft_rlhf.jsonl"), read(paths["sft"])

    def refusals(rows):
        return sum(1 for x in rows if x["task"] == "safety_boundary" and _is_harmful(x["instruction"])
                   and x["output"].startswith("I can not"))
    assert 0.1 < refusals(sft) / refusals(full) < 0.3
    assert len(full) - len(sft) == refusals(full) - refusals(sft)                # nothing else is dropped
    pairs = read(paths["pairs_without_safety"])
    assert pairs and all(p["tag"] != "safety_boundary" for p in pairs)
    prompts = read(paths["safety_prompts"])
    assert prompts and all(p["tag"] == "safety_boundary" for p in prompts)
    assert len(pairs) + len(prompts) == len(read("data/tiny/preference.jsonl"))
