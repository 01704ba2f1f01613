# SPDX-License-Identifier: Apache-2.0
"""GRPO runs killed after a checkpoint resume to the uninterrupted run: DAPO settings with partial rollouts
(paused generations and waiting groups in the checkpoint), and one-step off-policy asynchronous rollout (the
batch generated ahead in the checkpoint), in one process and on rollout ranks of its own under msrun."""
import json
import os
import subprocess
import sys

import pytest

from conftest import assert_resumed_run_equals, kill_once_written, run_cli

QUICK = ("train.progress_bar=false", "log.plots=false")
DAPO = ("grpo.loss_agg=token-mean", "grpo.clip_high=0.28", "grpo.dynamic_sampling.enabled=true",
        "grpo.overlong.buffer=4", "grpo.overlong.mask_truncated=true", "grpo.mini_batch_size=32")


def _rows(run):
    """The training steps' rows (a step-0 evaluation row, logged before any update, is not one)."""
    return [r for r in [json.loads(x) for x in open(run / "metrics.jsonl")] if r["step"] > 0]


def _killed_and_resumed(work, name: str, *over):
    """4 steps uninterrupted, and 4 steps killed once the step-2 checkpoint exists, then resumed: equal runs."""
    args = ["train", "configs/tiny/grpo.yaml", *QUICK, *over, "train.max_steps=4", "checkpoint.every=2",
            "train.log_every=1", "train.eval_every=0", "grpo.eval_data=null"]
    run_cli(work, *args, f"train.output_dir=runs/{name}_a")
    b = work / "runs" / f"{name}_b"
    kill_once_written(work, [*args, f"train.output_dir=runs/{name}_b"], b / "checkpoints" / "step_000002" / "MANIFEST.json")
    run_cli(work, *args, f"train.output_dir=runs/{name}_b")
    assert_resumed_run_equals(work / "runs" / f"{name}_a", b, 4, 2)
    return _rows(work / "runs" / f"{name}_a"), b


@pytest.mark.slow
def test_dapo_with_partial_rollout_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(tiny_sft):
    """DAPO settings with partial rollouts: the checkpoint holds the paused generations (KV caches, RNG) and the
    finished groups waiting to train; the resumed run continues them as if never stopped."""
    rows, b = _killed_and_resumed(tiny_sft.parent.parent, "dapo", *DAPO, "grpo.dynamic_sampling.max_rounds=1",
                                  "grpo.partial_rollout.token_budget=6", "grpo.partial_rollout.max_staleness=1")
    assert all(r["updates"] == 2 for r in rows if not r["skipped"])
    assert max(r["staleness_max"] for r in rows if "staleness_max" in r) == 1     # continued under a newer policy
    pending = json.loads((b / "checkpoints" / "step_000002" / "rollout_state" / "pending.json").read_text())
    assert pending["paused"]                      # there was a paused batch to carry over
    state = json.loads((b / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["prompt_cursor"] == 4 * 8


@pytest.mark.slow
def test_async_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(tiny_sft):
    """One-step off-policy: the checkpoint after step 2 holds the batch the rollout process generated ahead
    (with step 2's weights) for step 3; the resumed run trains it and asks a new process for the next."""
    rows, b = _killed_and_resumed(tiny_sft.parent.parent, "async", "grpo.async_rollout.enabled=true")
    assert [r["staleness"] for r in rows][0] == 0 and all(r["staleness"] == 1 for r in rows[1:])
    assert all(r["policy/ratio"] != pytest.approx(1.0, abs=1e-7) for r in rows[1:])    # off-policy
    pending = json.loads((b / "checkpoints" / "step_000002" / "rollout_state" / "pending.json").read_text())
    assert pending["queued"]["request"]["step"] == 2 and pending["queued"]["version"] == 1


def _launch_rollout_ranks(work, name: str, port: str, *over, wait: bool = True):
    """The tiny GRPO config, one-step off-policy, on 3 msrun ranks: 2 train, 1 generates."""
    args = [sys.executable, "-m", "ms_llm.cli", "launch", "configs/tiny/grpo.yaml", *QUICK, *ASYNC_RANKS, *over,
            f"train.output_dir=runs/{name}", "--nproc-per-node", "3", "--master-port", port, "--log-dir",
            f"logs_{name}", "--cluster-timeout", "20"]
    if not wait:
        return subprocess.Popen(args, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    r = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


ASYNC_RANKS = ("grpo.async_rollout.enabled=true", "grpo.async_rollout.rollout_ranks=1", "train.max_steps=4",
               "checkpoint.every=2", "train.log_every=1", "train.eval_every=0", "grpo.eval_data=null",
               "log.rollouts_every=1")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_rollout_ranks_equal_the_one_process_asynchronous_run_and_resume_after_a_kill(tiny_sft, monkeypatch):
    """grpo.async_rollout.rollout_ranks=1 on 3 msrun ranks: rank 2 generates each next batch with the weights it is
    sent over collectives while ranks 0-1 train in data parallel. Against the one-process asynchronous run (a
    rollout process beside one trainer): the same staleness, rewards, per-step losses and final weights. The batch
    of step 3 is what a synchronous generation from the weights the trainers held before step 2's update (the
    step-1 checkpoint) gives, token for token. Trainer 0 killed once the step-2 checkpoint (which holds the batch
    generated ahead) exists, the job fails within the cluster timeout, and the relaunched job ends where the
    uninterrupted one ends."""
    import signal
    import time
    import numpy as np
    from ms_llm.config import load_config
    from ms_llm.generation import generate
    from ms_llm.models.safetensors_io import read_safetensors
    from ms_llm.rollout.batch import read_rollout
    from ms_llm.rollout.sources import SEED_TAG
    from ms_llm.stages.grpo import build_policy
    from ms_llm.training.checkpoint import find_resume
    from ms_llm.models.io import load_weights
    work = tiny_sft.parent.parent
    one = ["train", "configs/tiny/grpo.yaml", *QUICK, *[o for o in ASYNC_RANKS if "rollout_ranks" not in o],
           "train.output_dir=runs/async_one"]
    run_cli(work, *one)
    _launch_rollout_ranks(work, "async_ranks", "8205", "checkpoint.every=1", "checkpoint.keep=4")
    runs = [work / "runs" / n for n in ("async_one", "async_ranks")]
    rows = [_rows(run) for run in runs]
    assert [r["staleness"] for r in rows[1]] == [0, 1, 1, 1]
    for key in ("loss", "reward/total", "staleness", "policy/ratio", "response_length"):
        np.testing.assert_allclose([r[key] for r in rows[1]], [r[key] for r in rows[0]], atol=1e-5, err_msg=key)
    w = [read_safetensors(str(run / "final" / "model.safetensors")) for run in runs]
    assert max(np.abs(w[1][k] - w[0][k]).max() for k in w[0]) <= 1e-5

    # step 3's batch (0-based step 2), regenerated in this process from the weights after 1 update
    monkeypatch.chdir(work)                                        # (the config's paths are the work dir's)
    cfg = load_config("configs/tiny/grpo.yaml", [*QUICK, *ASYNC_RANKS], check=False)
    dump, _ = read_rollout(str(runs[1] / "rollouts" / "step_000003.safetensors"))
    prompts = [[int(t) for t in row if t >= 0] for row in dump["prompt_ids"]]
    policy = build_policy(cfg)
    load_weights(policy, str(runs[1] / "checkpoints" / "step_000001"), strict=True)
    g = cfg.grpo
    cache = -(-(max(g.max_prompt_len, max(len(p) for p in prompts)) + g.max_new_tokens) // 64) * 64
    from ms_llm.data.chat import stop_token_ids
    from ms_llm.data.tokenizer import Tokenizer
    tok = Tokenizer.load(str(work / "runs" / "tiny_sft_lora" / "final"))
    out = generate(policy, prompts, g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                   eos_token_id=stop_token_ids(cfg.tokenizer.chat_template, tok) or -1, pad_token_id=tok.pad_id or 0,
                   seed=[cfg.train.seed, SEED_TAG, 2, 0], cache_len=cache, prompt_width=g.max_prompt_len,
                   rows=range(len(prompts)))
    np.testing.assert_array_equal(out.lengths, dump["lengths"])
    for i, n in enumerate(out.lengths):
        assert out.tokens[i, :n].tolist() == dump["tokens"][i, :n].tolist()

    # killed after the step-2 checkpoint, relaunched
    proc = _launch_rollout_ranks(work, "async_kill", "8207", "train.max_steps=400", wait=False)
    marker = work / "runs" / "async_kill" / "checkpoints" / "step_000002" / "MANIFEST.json"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "no step-2 checkpoint"
    victim = json.load(open(work / "logs_async_kill" / "rank_0.status"))["pid"]
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "rank 0: died without reporting an exit status" in err
    newest = find_resume(str(work / "runs" / "async_kill" / "checkpoints"))
    assert json.loads(open(os.path.join(newest, "trainer_state.json")).read())["step"] >= 2
    pending = json.loads((work / "runs" / "async_kill" / "checkpoints" / "step_000002" / "rollout_state"
                          / "pending.json").read_text())
    assert pending["queued"]["request"]["step"] == 2 and pending["queued"]["version"] == 1
    _launch_rollout_ranks(work, "async_kill", "8209")            # max_steps 4 again: the resumed job
    assert_resumed_run_equals(work / "runs" / "async_ranks", work / "runs" / "async_kill", 4, 2)
