# SPDX-License-Identifier: Apache-2.0
"""PPO measurements.

`ms-llm bench ppo-digits [--steps 60]`: a verifiable toy task in the style of verl's digit-completion test. A
randomly initialised tiny model (vocabulary: the ten digits and padding) sees four terms of an arithmetic
sequence mod 10 (start 0-9, step 1-3) and continues it for six tokens; every correct next term earns a dense
reward of 1 at its token. Printed: the mean reward per response over the steps (random: 0.6 of 6) and the
greedy accuracy on every one of the 30 sequences before and after.

`ms-llm bench ppo-memory [--chunk 64]`: peak memory of the PPO scoring pass (old-policy log-probs of a rollout
batch), chunked vs exact, at response lengths 4x and 8x the chunk, each in its own child process; and the
mean |log-prob error| of chunked against exact scoring.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

from ms_llm.bench import run_worker
from ms_llm.config import load_config

DIGITS, PROMPT, NEW = 10, 4, 6


def digit_task_config(steps: int, overrides=()):
    """The toy task's PPO settings (any ExperimentConfig carries a ppo section)."""
    d = tempfile.mkdtemp(prefix="ppo_digits_")
    path = os.path.join(d, "digits.yaml")
    with open(path, "w") as f:
        f.write("model: {preset: tiny}\ndata: {sources: [{path: none.jsonl}]}\n")
    return load_config(path, [
        f"train.max_steps={steps}", "train.micro_batch_size=16", "train.loss_scale=none", "train.clip_grad_norm=1.0",
        "optim.lr=2e-3", "optim.weight_decay=0", "lr_schedule.type=constant", "lr_schedule.warmup_steps=0",
        "ppo.rollout_batch_size=64", "ppo.mini_batch_size=32", "ppo.ppo_epochs=2", f"ppo.max_prompt_len={PROMPT}",
        f"ppo.max_new_tokens={NEW}", "ppo.chunk_size=6", "ppo.chunk_overlap=4", "ppo.ent_coef=0",
        "ppo.kl.controller=fixed", "ppo.kl.init_coef=0.01", "ppo.kl.alarm=null", "ppo.value_lr=2e-3",
        *overrides])


def digit_prompts(r, n: int) -> list:
    out = []
    for _ in range(n):
        x0, d = int(r.integers(0, DIGITS)), int(r.integers(1, 4))
        seq = [(x0 + i * d) % DIGITS for i in range(PROMPT + NEW)]
        out.append({"ids": [x + 1 for x in seq[:PROMPT]], "answer": [x + 1 for x in seq[PROMPT:]], "tag": f"step{d}"})
    return out


class DigitPrompts:
    """A prompt stream (rollout/prompts.py's shape) of fresh random digit sequences: each `take` draws anew."""

    def __init__(self, seed: int):
        self.r, self.cursor = np.random.default_rng(seed), 0

    def take(self, n: int) -> list:
        return digit_prompts(self.r, n)


def digit_reward(prompts, tokens, lengths):
    dense = np.zeros(tokens.shape, np.float64)
    for i, pr in enumerate(prompts):
        n = min(int(lengths[i]), NEW)
        dense[i, :n] = (tokens[i, :n] == np.array(pr["answer"][:n])).astype(np.float64)
    return {"total": np.zeros(len(prompts)), "dense": dense, "parts": {"correct_tokens": dense.sum(-1)}}


def greedy_accuracy(policy) -> float:
    # MindSpore only in the process that runs the MindSpore side
    from ms_llm.generation import generate
    every = [{"ids": [(x0 + i * d) % DIGITS + 1 for i in range(PROMPT)],
              "answer": [(x0 + i * d) % DIGITS + 1 for i in range(PROMPT, PROMPT + NEW)]}
             for x0 in range(DIGITS) for d in (1, 2, 3)]
    out = generate(policy, [x["ids"] for x in every], NEW, temperature=0, eos_token_id=-1, pad_token_id=0)
    return float(np.mean([np.mean(out.tokens[i] == np.array(x["answer"])) for i, x in enumerate(every)]))


def run_digits(steps: int = 60, seed: int = 0, log=None) -> dict:
    """Train the toy task for `steps` PPO steps; returns {"rewards": per-step mean reward, "before", "after"}."""
    # MindSpore only in the process that runs the MindSpore side
    import mindspore as ms

    # MindSpore only in the process that runs the MindSpore side
    from ms_llm.models import CausalLM, preset
    from ms_llm.models.frozen import freeze
    from ms_llm.models.value import ValueModel
    from ms_llm.stages.ppo import PPOStage
    cfg = digit_task_config(steps, [f"train.seed={seed}"])
    shape = dict(vocab_size=DIGITS + 1, max_position_embeddings=32)
    ms.set_seed(seed)
    policy = CausalLM(preset("tiny", **shape))
    reference = freeze(CausalLM(preset("tiny", **shape)))
    ms.load_param_into_net(reference, {p.name: ms.Parameter(p.asnumpy(), name=p.name)
                                       for p in policy.get_parameters()}, strict_load=True)
    value = ValueModel(CausalLM(preset("tiny", **shape)), 32)
    stage = PPOStage(cfg, policy, reference, value, digit_reward, DigitPrompts(seed))
    for u in stage.updaters():
        u.loss_net.set_train(True)
    before = greedy_accuracy(policy)
    rewards = []
    for step in range(steps):
        row, _ = stage.step(step, 0)
        rewards.append(row["reward/dense"])
        if log:
            log(step, row)
    policy.set_train(False)
    return {"rewards": rewards, "before": before, "after": greedy_accuracy(policy)}


def memory_worker(a):
    # MindSpore only in the process that runs the MindSpore side
    from ms_llm.context import setup_context
    from ms_llm.losses.policy import TokenLogps
    from ms_llm.models import CausalLM, preset
    from ms_llm.rollout.batch import score_windows
    from ms_llm.rollout.chunks import ChunkPlan
    os.makedirs(a.workdir, exist_ok=True)
    os.chdir(a.workdir)
    setup_context("graph", seed=0)
    n = a.chunk * a.multiple
    p = 16
    model = CausalLM(preset("tiny", vocab_size=a.vocab, max_position_embeddings=p + n + 8))
    model.set_train(False)
    r = np.random.default_rng(0)
    rows = r.integers(1, a.vocab, (a.batch, p + n)).astype(np.int32)
    row_mask = np.ones_like(rows)
    resp = np.ones((a.batch, n))
    plan = ChunkPlan(p, n, a.chunk, a.overlap, exact=a.worker == "exact")
    w = plan.windows(rows, row_mask, resp)
    scorer = TokenLogps(model)
    keys = ("ids", "attention_mask", "position_ids", "targets")
    base = _rss_mb()
    logps = plan.to_response(score_windows(scorer, w, keys, a.batch), w["index"])
    peak = _hwm_mb()
    np.save(os.path.join(a.workdir, f"{a.worker}_{a.multiple}.npy"), logps)
    print(json.dumps({"worker": a.worker, "multiple": a.multiple, "response": n, "window": plan.width,
                      "windows_per_row": plan.n_windows, "peak_mb": peak, "growth_mb": peak - base}))


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status("VmRSS:")


def _hwm_mb() -> float:
    return _status("VmHWM:")


def run(argv):
    name = sys.argv[2] if len(sys.argv) > 2 else "ppo-digits"
    ap = argparse.ArgumentParser(prog=f"ms-llm bench {name}")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--multiple", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/ms_llm_bench_ppo")
    ap.add_argument("--worker", default=None)
    a = ap.parse_args(argv)
    if a.worker:
        return memory_worker(a)
    if name == "ppo-memory":
        rows = []
        for multiple in (4, 8):
            for worker in ("chunked", "exact"):
                a.multiple = multiple
                got = run_worker("ppo-memory", worker, a, ("chunk", "overlap", "vocab", "batch", "multiple",
                                                            "workdir"))
                if got:
                    rows.append(got)
                    print(json.dumps(got))
        for multiple in (4, 8):
            c, e = (np.load(os.path.join(a.workdir, f"{w}_{multiple}.npy")) for w in ("chunked", "exact"))
            print(json.dumps({"multiple": multiple, "logprob_error_mean": float(np.abs(c - e).mean()),
                              "logprob_error_max": float(np.abs(c - e).max())}))
        return
    # MindSpore only in the process that runs the MindSpore side
    from ms_llm.context import setup_context
    setup_context("graph", seed=a.seed)

    def log(step, row):
        if step % 5 == 0 or step == a.steps - 1:
            print(json.dumps({"step": step + 1, "reward": round(row["reward/dense"], 3), "kl": round(row["kl"], 4),
                              "clipfrac": round(row["policy/clipfrac"], 3)}))
    res = run_digits(a.steps, a.seed, log)
    first, last = np.mean(res["rewards"][:5]), np.mean(res["rewards"][-5:])
    print(json.dumps({"reward_first5": first, "reward_last5": last, "greedy_accuracy_before": res["before"],
                      "greedy_accuracy_after": res["after"], "random_reward": NEW / DIGITS}))
