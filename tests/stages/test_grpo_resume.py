# SPDX-License-Identifier: Apache-2.0
"""GRPO runs killed after a checkpoint resume to the uninterrupted run: DAPO settings with partial rollouts
(paused generations and waiting groups in the checkpoint), and one-step off-policy asynchronous rollout (the
batch generated ahead in the checkpoint)."""
import json

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
