# SPDX-License-Identifier: Apache-2.0
"""`ms-llm bench grpo-async [--steps 40] [--config configs/tiny/grpo.yaml]`: the same GRPO run synchronous and
with one-step off-policy asynchronous rollout (grpo.async_rollout), one after the other on this machine.

Printed per mode: steady-state steps per second (from each step's wall time, the first 3 steps — compilation —
left out), where a step's time went (rollout generation, the trainer's wait for it, the update), the mean
reward over the first and the last 10 steps, and held-out accuracy after the run; then the speed-up and the
reward difference. Needs the config's inputs (for the tiny config: `ms-llm data synth --out data/tiny`, then
the tiny pretraining and SFT runs).

`--ranks N` runs both on N msrun ranks instead: synchronous data parallel over all N, against N − 1 trainer ranks
with one rollout rank of its own (grpo.async_rollout.rollout_ranks: 1). Its batch is 6 prompts x the group,
micro-batches of 8, so that it splits over both 3 and 2 trainer ranks (overrides may change that).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from ms_llm.errors import MsLlmError


def _run(config: str, out: str, steps: int, extra, ranks: int = 0, port: int = 8231) -> list:
    shutil.rmtree(out, ignore_errors=True)              # a fresh run, never a resume of an earlier one
    how = ["launch", config] if ranks else ["train", config]
    cmd = [sys.executable, "-m", "ms_llm.cli", *how, f"train.output_dir={out}", f"train.max_steps={steps}",
           "train.log_every=1", "train.eval_every=0", "checkpoint.every=0", "train.progress_bar=false",
           "log.plots=false", *extra]
    if ranks:
        cmd += ["--nproc-per-node", str(ranks), "--master-port", str(port), "--log-dir", out + "_logs",
                "--cluster-timeout", "120"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise MsLlmError(f"bench grpo-async: {' '.join(cmd[3:])} failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    rows = [r for r in rows if r["step"] > 0]            # the training steps (step 0: the evaluation before them)
    summary = json.load(open(os.path.join(out, "summary.json")))
    return rows, summary["metrics"]


def run(argv):
    ap = argparse.ArgumentParser(prog="ms-llm bench grpo-async")
    ap.add_argument("--config", default="configs/tiny/grpo.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--ranks", type=int, default=0, help="msrun ranks: synchronous data parallel over all of them "
                                                           "against one rollout rank beside the others")
    ap.add_argument("--port", type=int, default=8231, help="msrun's master port (with --ranks)")
    ap.add_argument("overrides", nargs="*", help="section.key=value for both runs")
    a = ap.parse_intermixed_args(argv)
    if a.ranks == 1 or a.ranks < 0:
        raise MsLlmError("--ranks: give at least 2 (one rollout rank and a trainer), or 0 for one process")
    if not os.path.isfile(a.config):
        raise MsLlmError(f"{a.config}: no such config")
    work = a.workdir or tempfile.mkdtemp(prefix="ms_llm_bench_grpo_")
    res = {}
    modes = (("sync", ["grpo.async_rollout.enabled=false"]), ("async", ["grpo.async_rollout.enabled=true"]))
    shape = []
    if a.ranks:
        modes = ((f"sync_dp{a.ranks}", ["grpo.async_rollout.enabled=false"]),
                 (f"async_{a.ranks - 1}_trainers_1_rollout_rank",
                  ["grpo.async_rollout.enabled=true", "grpo.async_rollout.rollout_ranks=1"]))
        shape = ["grpo.prompts_per_step=6", "train.micro_batch_size=8"]
    for mode, extra in modes:
        rows, final = _run(a.config, os.path.join(work, mode), a.steps, [*shape, *a.overrides, *extra], a.ranks,
                           a.port)
        steady = rows[3:] if len(rows) > 6 else rows
        step_s = float(np.mean([r["step_s"] for r in steady]))
        rewards = [r["reward/total"] for r in rows if "reward/total" in r]
        res[mode] = {"steps_per_s": 1.0 / step_s, "step_s": step_s,
                     "rollout_s": float(np.mean([r["rollout_s"] for r in steady])),
                     "rollout_wait_s": float(np.mean([r.get("rollout_wait_s", r["rollout_s"]) for r in steady])),
                     "train_s": float(np.mean([r["train_s"] for r in steady])),
                     "reward_first10": float(np.mean(rewards[:10])), "reward_last10": float(np.mean(rewards[-10:])),
                     "eval_accuracy": final.get("eval/accuracy"),
                     "staleness": float(np.mean([r["staleness"] for r in steady]))}
        print(json.dumps({"mode": mode, **{k: (round(v, 4) if isinstance(v, float) else v)
                                            for k, v in res[mode].items()}}))
    s, y = (res[m] for m, _ in modes)
    print(json.dumps({"speedup": round(y["steps_per_s"] / s["steps_per_s"], 3),
                      "reward_last10_difference": round(y["reward_last10"] - s["reward_last10"], 4),
                      "eval_accuracy": {"sync": s["eval_accuracy"], "async": y["eval_accuracy"]},
                      "steps": a.steps, "workdir": work}))
