# SPDX-License-Identifier: Apache-2.0
"""The GRPO stage from the tiny SFT model on the Zorbish translation prompts: it lifts held-out accuracy; two msrun
ranks equal one process; dynamic sampling drops the groups without reward variance and refills the batch; partial
rollouts continue paused generations exactly and train each token against the policy that sampled it; bad
configs fail with one message and exit 2. (Kill-and-resume runs: test_grpo_resume.py.)"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli

QUICK = ("train.progress_bar=false", "log.plots=false")


def _rows(run):
    """The training steps' rows (a step-0 evaluation row, logged before any update, is not one)."""
    return [r for r in [json.loads(x) for x in open(run / "metrics.jsonl")] if r["step"] > 0]


def _correct(model_dir, prompts_path, tasks=("translation",), keep=None):
    """[N] greedy right/wrong of a saved model on a prompts file's records (optionally those whose prompt is in
    `keep`), as the stage scores them."""
    from ms_llm.config import load_config
    from ms_llm.data.chat import stop_token_ids
    from ms_llm.data.tokenizer import Tokenizer
    from ms_llm.models import load_pretrained
    from ms_llm.rollout.prompts import read_tasks
    from ms_llm.stages.grpo import correct
    cfg = load_config(str(model_dir.parent.parent.parent / "configs" / "tiny" / "grpo.yaml"), [])
    tok = Tokenizer.load(str(model_dir))
    stops = stop_token_ids(cfg.tokenizer.chat_template, tok)
    records = read_tasks(str(prompts_path), tok, cfg.tokenizer.chat_template, cfg.grpo.max_prompt_len, tasks)[0]
    records = [r for r in records if keep is None or r["prompt"] in keep]
    model = load_pretrained(str(model_dir))
    model.set_train(False)
    return correct(model, tok, records, cfg, stops, "none")


@pytest.mark.slow
def test_grpo_fits_its_prompts_and_holds_the_others(tiny_sft, graph_mode):
    """What 40 GRPO steps do at this scale, measured per prompt against the SFT model it starts from:

    - on its 117 training prompts, greedy accuracy rose 0.154 -> 0.256 (16 prompts turned right, 4 wrong: 2.8
      paired standard errors; not 3, so no lift is claimed): checked, it does not fall;
    - on the held-out translation prompts of sft_eval.jsonl that are not training prompts (34), it stayed at
      0.059: checked, it does not fall by 3 standard errors. The config's 56-prompt evaluation (0.089 -> 0.214 in
      this run) holds 22 training prompts; its lift is theirs (0.136 -> 0.455 on those 22).
    Also: the step-0 evaluation is logged before any update, and each step's one update is on-policy."""
    work = tiny_sft.parent.parent
    run_cli(work, "train", "configs/tiny/grpo.yaml", *QUICK, "train.max_steps=40", "train.eval_every=0",
            "checkpoint.every=0", "train.output_dir=runs/grpo_lift")
    m = json.loads((work / "runs" / "grpo_lift" / "summary.json").read_text())["metrics"]
    first = json.loads(open(work / "runs" / "grpo_lift" / "metrics.jsonl").readline())
    assert first["step"] == 0 and first["eval/accuracy"] == m["before/eval/accuracy"]
    assert 0.0 < m["before/eval/accuracy"] < 0.5            # a task the SFT model solves sometimes, not always
    rows = _rows(work / "runs" / "grpo_lift")
    assert all(r["policy/ratio"] == pytest.approx(1.0, abs=1e-4) for r in rows)   # one on-policy update per step
    data = work / "data" / "tiny"
    trained = {json.loads(x)["prompt"] for x in open(data / "distill_prompts.jsonl")}
    held = {json.loads(x)["prompt"] for x in open(data / "sft_eval.jsonl")} - trained
    for prompts, keep, bound in ((data / "distill_prompts.jsonl", None, 0.0), (data / "sft_eval.jsonl", held, 3.0)):
        before, after = (_correct(work / "runs" / run / "final", prompts, keep=keep)
                         for run in ("tiny_sft_lora", "grpo_lift"))
        n, up, down = len(before), int(((before == 0) & (after == 1)).sum()), int(((before == 1) & (after == 0)).sum())
        se = np.sqrt(max(up + down - (up - down) ** 2 / n, 1.0)) / n          # paired (McNemar)
        print(f"{n} prompts: {before.mean():.3f} -> {after.mean():.3f}, {up} right, {down} wrong, SE {se:.3f}")
        assert after.mean() - before.mean() >= -bound * se


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_msrun_ranks_equal_one_process(tiny_sft):
    """Token-mean over 64 completions with dynamic sampling: each of 2 ranks generates and rewards half of every
    round's groups (`rollout/rows` half of one process's), and the ranks agree on the filtering and the extra
    rounds; per-step losses and rewards, and the final weights, equal one process's (4 accumulated micro-batches
    of 16; 2 on each rank)."""
    from ms_llm.models.safetensors_io import read_safetensors
    work = tiny_sft.parent.parent
    over = (*QUICK, "train.max_steps=2", "checkpoint.every=0", "train.eval_every=0", "train.log_every=1",
            "grpo.eval_data=null", "grpo.loss_agg=token-mean", "grpo.dynamic_sampling.enabled=true",
            "grpo.dynamic_sampling.max_rounds=3")
    run_cli(work, "train", "configs/tiny/grpo.yaml", *over, "train.output_dir=runs/grpo_one")
    run_cli(work, "launch", "configs/tiny/grpo.yaml", *over, "train.output_dir=runs/grpo_dp2", "--nproc-per-node",
            "2", "--master-port", "8175", "--log-dir", "logs_grpo", "--cluster-timeout", "60")
    runs = [work / "runs" / n for n in ("grpo_one", "grpo_dp2")]
    rows = [_rows(run) for run in runs]
    for key in ("loss", "reward/total", "groups_seen", "groups_filtered", "generation_rounds", "response_length"):
        np.testing.assert_allclose([r[key] for r in rows[1]], [r[key] for r in rows[0]], atol=1e-5, err_msg=key)
    for one, two in zip(*rows):
        assert one["rollout/rows"] == one["generation_rounds"] * 64 == 2 * two["rollout/rows"]
    assert sum(r["groups_seen"] for r in rows[0]) > 16 or any(r["groups_filtered"] > 0 for r in rows[0])
    w = [read_safetensors(str(run / "final" / "model.safetensors")) for run in runs]
    assert max(np.abs(w[1][k] - w[0][k]).max() for k in w[0]) <= 1e-5


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_on_two_msrun_ranks_equals_one_process_and_resumes_in_one(tiny_sft):
    """Full-weight GRPO with the policy in ZeRO-3 shards on 2 msrun ranks: each rank gathers a whole copy before
    every rollout, generates and scores its rows on it without collectives, then trains its shards. The held-out
    evaluations before and after, the per-step losses, rewards and dynamic-sampling decisions, and the final
    weights equal one process's (a stale copy would give other samples or π_old, and another loss). A run stopped
    after its step-1 checkpoint (written from the shards) resumes in one process to the uninterrupted run."""
    from conftest import assert_resumed_run_equals
    from ms_llm.models.safetensors_io import read_safetensors
    work = tiny_sft.parent.parent
    over = (*QUICK, "train.max_steps=2", "checkpoint.every=1", "train.eval_every=2", "train.log_every=1",
            "grpo.eval_limit=16", "grpo.lora.enabled=false", "grpo.loss_agg=token-mean",
            "grpo.dynamic_sampling.enabled=true", "grpo.dynamic_sampling.max_rounds=3")
    run_cli(work, "train", "configs/tiny/grpo.yaml", *over, "train.output_dir=runs/grpo_full_one")
    launch = ("--nproc-per-node", "2", "--cluster-timeout", "60")
    run_cli(work, "launch", "configs/tiny/grpo.yaml", *over, "parallel.optimizer_shard=zero3",
            "train.output_dir=runs/grpo_zero3", "--master-port", "8191", "--log-dir", "logs_grpo_zero3", *launch)
    run_cli(work, "launch", "configs/tiny/grpo.yaml", *over, "parallel.optimizer_shard=zero3", "train.max_steps=1",
            "train.output_dir=runs/grpo_zero3_cut", "--master-port", "8193", "--log-dir", "logs_grpo_zero3_cut", *launch)
    one, zero3, cut = (work / "runs" / n for n in ("grpo_full_one", "grpo_zero3", "grpo_zero3_cut"))
    rows = [[json.loads(x) for x in open(run / "metrics.jsonl")] for run in (one, zero3)]
    assert [r["step"] for r in rows[0]] == [0, 1, 2] and "eval/accuracy" in rows[0][0] and "eval/accuracy" in rows[0][2]
    for key in ("loss", "reward/total", "groups_seen", "generation_rounds", "response_length", "eval/accuracy"):
        np.testing.assert_allclose([r.get(key, -1) for r in rows[1]], [r.get(key, -1) for r in rows[0]], atol=1e-5,
                                   err_msg=key)
    assert all(a["rollout/rows"] == 2 * b["rollout/rows"] for a, b in zip(rows[0][1:], rows[1][1:]))
    w = [read_safetensors(str(run / "final" / "model.safetensors")) for run in (one, zero3)]
    assert max(np.abs(w[1][k] - w[0][k]).max() for k in w[0]) <= 1e-5
    run_cli(work, "train", "configs/tiny/grpo.yaml", *over, "train.output_dir=runs/grpo_zero3_cut", "checkpoint.reshard=true")
    assert_resumed_run_equals(one, cut, 2, 1)


def test_dynamic_sampling_drops_groups_without_reward_variance(tmp_path, graph_mode):
    """Prompts tagged "fixed" get the same reward whatever is sampled: their groups carry no gradient and are
    dropped; the batch is refilled from further prompts, and the prompt cursor counts every prompt sampled."""
    import mindspore as ms
    from ms_llm.config import load_config
    from ms_llm.models import CausalLM, preset
    from ms_llm.rollout.prompts import PromptStream
    from ms_llm.rollout.sources import Synchronous
    from ms_llm.stages.grpo import GRPOStage
    (tmp_path / "c.yaml").write_text("stage: grpo\nmodel: {preset: tiny}\ndata: {sources: [{path: x.jsonl, format: "
                                     "prompts}]}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), [
        "train.micro_batch_size=8", "train.loss_scale=none", "grpo.group_size=4", "grpo.prompts_per_step=4",
        "grpo.max_prompt_len=6", "grpo.max_new_tokens=5", "grpo.dynamic_sampling.enabled=true",
        "grpo.dynamic_sampling.max_rounds=3"], check=False)
    ms.set_seed(0)
    policy = CausalLM(preset("tiny", vocab_size=32, max_position_embeddings=32))
    r = np.random.default_rng(0)
    prompts = [{"ids": r.integers(1, 32, 4).tolist(), "tag": "fixed" if i % 2 else "live", "i": i} for i in range(12)]

    def reward(texts, records):
        live = np.array([len(t) % 3 for t in texts], np.float64)     # varies with what was sampled
        return {"total": np.where([x["tag"] == "fixed" for x in records], 1.0, live), "parts": {}}

    stream = PromptStream(prompts, 0)
    source = Synchronous(cfg, policy, reward, lambda tok, n: "x" * int(tok[:n].sum() % 7 + n), stream, pad=0)
    stage = GRPOStage(cfg, policy, None, source)
    batch, stats = source.collect(0)
    assert all(p["tag"] == "live" for p in batch.ro.prompts)
    assert stats["groups_filtered"] > 0 and stats["generation_rounds"] >= 2
    assert stream.cursor == 4 * stats["generation_rounds"] and stats["groups_seen"] == stream.cursor
    assert batch.groups <= 4 and len(batch.ro.prompts) == 4 * batch.groups
    row, _ = stage.step(1, 0)
    assert row["groups_filtered"] > 0 and np.isfinite(row["loss"])


def test_continuous_batching_collects_the_batch_it_collects_without(tmp_path, graph_mode):
    """grpo.generation_batch_size 3 decodes 3 of the 16 rows at once, refilling finished ones: every row samples
    from its own generator, so the groups, their tokens, log-probs and rewards are those of the whole batch."""
    import mindspore as ms
    from ms_llm.config import load_config
    from ms_llm.models import CausalLM, preset
    from ms_llm.rollout.prompts import PromptStream
    from ms_llm.rollout.sources import Synchronous
    (tmp_path / "c.yaml").write_text("stage: grpo\nmodel: {preset: tiny}\ndata: {sources: [{path: x.jsonl, format: "
                                     "prompts}]}\n")
    ms.set_seed(0)
    policy = CausalLM(preset("tiny", vocab_size=32, max_position_embeddings=32))
    r = np.random.default_rng(1)
    prompts = [{"ids": r.integers(3, 32, 2 + i % 4).tolist(), "i": i} for i in range(4)]

    def reward(texts, records):
        return {"total": np.array([len(t) % 3 for t in texts], np.float64), "parts": {}}

    got = []
    for gbs in (0, 3):
        cfg = load_config(str(tmp_path / "c.yaml"), [
            "grpo.group_size=4", "grpo.prompts_per_step=4", "grpo.max_prompt_len=6", "grpo.max_new_tokens=6",
            f"grpo.generation_batch_size={gbs}"], check=False)
        source = Synchronous(cfg, policy, reward, lambda tok, n: "x" * int(tok[:n].sum() % 7 + n),
                             PromptStream(prompts, 0), pad=0, stops=[5])
        got.append(source.collect(0)[0])
    a, b = got
    assert len(set(a.ro.lengths.tolist())) > 1                    # rows end at different times (the stop id 5)
    assert np.array_equal(a.ro.tokens, b.ro.tokens) and np.array_equal(a.ro.lengths, b.ro.lengths)
    assert np.abs(a.ro.behaviour - b.ro.behaviour).max() <= 1e-6
    assert np.array_equal(a.rewards["total"], b.rewards["total"]) and np.array_equal(a.finished, b.finished)


@pytest.mark.parametrize("over,needle", [
    (("grpo.rewards={exact: 1.0}",), "grpo.rewards ['exact']"),
    (("grpo.mini_batch_size=24",), "grpo.mini_batch_size 24"),
    (("grpo.overlong.buffer=16",), "grpo.overlong.buffer 16"),
    (("grpo.reference.path=runs/tiny_sft_lora",), "grpo.beta is 0"),
    (("grpo.rewards={reward_model: 1.0}",), "grpo.reward_model"),
    (("grpo.async_rollout.enabled=true", "grpo.partial_rollout.token_budget=4"), "do not combine"),
    (("grpo.generation_batch_size=4", "grpo.partial_rollout.token_budget=4"), "grpo.generation_batch_size"),
    (("grpo.async_rollout.rollout_ranks=1",), "rollout_ranks needs grpo.async_rollout.enabled: true"),
    (("grpo.async_rollout.enabled=true", "grpo.async_rollout.rollout_ranks=1", "parallel.data_parallel=2",
      "parallel.optimizer_shard=zero1"), "the trainer ranks train in plain data parallel"),
    (("grpo.async_rollout.enabled=true", "parallel.data_parallel=2"), "grpo.async_rollout.rollout_ranks"),
    (("grpo.async_rollout.enabled=true", "context.device_target=ascend"), "ranks of its own"),
    (("grpo.agent.tools=t.py", "grpo.partial_rollout.token_budget=4"), "use grpo.agent.turns_per_step"),
    (("grpo.agent.tools=t.py", "grpo.async_rollout.enabled=true"), "grpo.agent does not combine with grpo.async"),
    (("grpo.agent.tools=t.py", "grpo.agent.turn_tokens=64"), "grpo.agent.turn_tokens 64 must fit"),
    (("grpo.agent.tools=t.py", "grpo.agent.turn_tokens=8", "grpo.agent.turns_per_step=1",
      "grpo.dynamic_sampling.enabled=true"),
     "grpo.agent.turns_per_step starts one batch per step"),
    (("grpo.agent.tools=t.py", "grpo.agent.turn_tokens=8", "grpo.agent.turns_per_step=1",
      "parallel.data_parallel=2"), "each rank would run their tools itself"),
])
def test_bad_grpo_configs_are_refused_naming_the_key(over, needle):
    import os
    from ms_llm.config import load_config
    from ms_llm.errors import MsLlmError
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(MsLlmError) as e:
        load_config(os.path.join(root, "configs", "tiny", "grpo.yaml"), list(over))
    assert needle in str(e.value) and "grpo.yaml" in str(e.value)


def test_a_bad_grpo_config_exits_2_with_one_message(tmp_path):
    import os
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.copytree(os.path.join(root, "configs"), tmp_path / "configs")
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "train", "configs/tiny/grpo.yaml", "grpo.rewards={exact: 1}"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "grpo.rewards ['exact']" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def _toy(tmp_path, *over):
    """(the GRPO stage, its partial-rollout source, the policy, prompts) on a tiny random model."""
    import mindspore as ms
    from ms_llm.config import load_config
    from ms_llm.rollout.prompts import PromptStream
    from ms_llm.rollout.sources import rollout_source
    from ms_llm.stages.grpo import GRPOStage
    from ms_llm.models.build import build_model
    (tmp_path / "c.yaml").write_text("stage: grpo\nmodel: {preset: tiny, overrides: {vocab_size: 32, "
                                     "max_position_embeddings: 32}}\ndata: {sources: [{path: x.jsonl, format: "
                                     "prompts}]}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), [
        "train.micro_batch_size=4", "train.loss_scale=none", "grpo.group_size=2", "grpo.prompts_per_step=2",
        "grpo.max_prompt_len=6", "grpo.max_new_tokens=7", "grpo.partial_rollout.token_budget=2",
        "optim.lr=1e-2", "lr_schedule.type=constant", "lr_schedule.warmup_steps=0", *over], check=False)
    ms.set_seed(0)
    policy = build_model(cfg)          # as the asynchronous worker builds its copy

    def reward(texts, records):
        return {"total": np.array([float(len(t) % 3) for t in texts]), "parts": {}}

    r = np.random.default_rng(1)
    prompts = [{"ids": r.integers(4, 32, int(r.integers(3, 6))).tolist(), "tag": "t"} for _ in range(8)]
    source = rollout_source(cfg, policy, reward, lambda tok, n: "x" * int(tok[:n].sum() % 5 + n),
                            PromptStream(prompts, 0), pad=0, stops=[3])
    return GRPOStage(cfg, policy, None, source, run_dir=str(tmp_path)), source, policy, prompts


def test_partial_rollout_with_frozen_weights_equals_one_pass_and_survives_a_checkpoint(tmp_path, graph_mode):
    """A batch paused after every 2-token budget (and once saved to disk and loaded into a fresh loop) draws the
    same tokens and log-probs as one uninterrupted generation; each token records the step that sampled it."""
    from ms_llm.generation import generate
    _, source, policy, prompts = _toy(tmp_path)
    fl = source.start(0, 0, prompts[:2], run_out=False)
    source.advance(fl, 1)
    source.paused = [fl]
    os.makedirs(tmp_path / "pending")
    source.save(str(tmp_path / "pending"))
    _, other, _, _ = _toy(tmp_path)
    other.load(str(tmp_path / "pending"))
    for step in (2, 3):
        source.advance(fl, step)
        other.advance(other.paused[0], step)
    rows = [p["ids"] for p in prompts[:2] for _ in range(2)]
    one = generate(policy, rows, 7, seed=[source.seed, 7919, 0, 0], prompt_width=6, cache_len=64, eos_token_id=[3],
                   pad_token_id=0, rows=range(len(rows)))
    for x in (fl, other.paused[0]):
        np.testing.assert_array_equal(x.tokens, one.tokens)
        np.testing.assert_array_equal(x.lengths, one.lengths)
        np.testing.assert_allclose(x.logps, one.logprobs, atol=1e-6)
    assert (fl.versions[:, :2] == 0).all() and (fl.versions[fl.lengths > 2, 2] == 1).all()
    assert fl.generated == 7 or fl.state.finished.all()


@pytest.mark.slow
def test_partial_rollout_trains_each_token_against_the_policy_that_sampled_it(tmp_path, graph_mode):
    """A batch started at one step is run out at the next under the updated policy and trained: π_old is the
    stored behaviour log-prob of every token, which for the tokens of the earlier step is no longer what the
    current policy gives. (The later tokens were sampled on top of the earlier policy's KV cache, so the current
    policy's recomputed log-probs differ on them too: only the stored ones are the sampling distribution's.)"""
    from ms_llm.rollout.batch import score_windows
    from ms_llm.stages.grpo import SCORE_KEYS
    stage, source, policy, prompts = _toy(tmp_path, "grpo.partial_rollout.max_staleness=1", "grpo.max_new_tokens=6")
    rows = [stage.step(step, 0)[0] for step in range(2)]
    step = 2                                   # the third step, taken apart: the batch, its arrays, the update
    batch, _ = source.collect(step)
    a = stage.prepare(batch)
    assert a["current"] is None and source.behaviour_is_old
    m = a["mask"] > 0
    np.testing.assert_array_equal(a["old"][m], batch.ro.behaviour.astype(np.float64)[m])
    old_tokens = m & (batch.versions < step)
    assert old_tokens.any() and (m & (batch.versions == step)).any()
    staleness = [r["staleness_max"] for r in rows if r.get("updates")] + [(step - batch.versions[m]).max()]
    assert max(staleness) == 1
    policy.set_train(False)                    # what the current policy gives these tokens
    w = batch.ro.windows
    current = source.plan.to_response(score_windows(stage.scorer, w, SCORE_KEYS, 4), w["index"])
    assert np.abs(current - a["old"])[old_tokens].max() > 1e-3          # the policy moved since
    policy.set_train(True)
    assert stage.update(a, step)["updates"] == 1


def test_advantages_and_truncation_masks_equal_a_numpy_recomputation_from_the_logged_rewards(tmp_path, graph_mode):
    """One synchronous step's batch as the stage trained it (log.rollouts_every): per group, (r − mean) / (std + ε)
    from the logged rewards; the loss mask is the response tokens of the finished rows only (overlong filtering)."""
    from ms_llm.rollout.batch import read_rollout
    stage, source, _, _ = _toy(tmp_path, "grpo.partial_rollout.token_budget=0", "grpo.group_size=4",
                               "grpo.max_new_tokens=4", "grpo.overlong.mask_truncated=true", "log.rollouts_every=1",
                               "train.micro_batch_size=8", "train.seed=1")
    row, _ = stage.step(0, 0)
    a, meta = read_rollout(str(tmp_path / "rollouts" / "step_000001.safetensors"))
    G, eps = meta["group_size"], meta["advantage_eps"]
    assert G == 4 and meta["advantage_scale"] == "group" and meta["mask_truncated"]
    want = np.zeros(len(a["reward"]))
    for k in range(len(want) // G):
        r = a["reward"][k * G:(k + 1) * G]
        mean = sum(r) / G
        std = (sum((x - mean) ** 2 for x in r) / (G - 1)) ** 0.5
        want[k * G:(k + 1) * G] = [(x - mean) / (std + eps) for x in r]
    np.testing.assert_allclose(a["advantage"], want, atol=1e-12)
    assert np.abs(want).max() > 0.5                               # groups with reward variance: a real check
    n = a["loss_mask"].shape[1]
    lengths, finished = a["lengths"], a["finished"].astype(bool)
    mask = (np.arange(n)[None] < lengths[:, None]) & finished[:, None]
    np.testing.assert_array_equal(a["loss_mask"] > 0, mask)
    assert (~finished).any() and finished.any()                  # both kinds of row are in the batch
    assert (lengths[~finished] == n).all()                       # truncated rows ran to max_new_tokens
    assert row["truncation_rate"] == pytest.approx(np.mean(~finished))
    assert (a["group_ids"] == np.repeat(np.arange(len(want) // G), G)).all()


def test_groups_older_than_the_staleness_bound_never_reach_the_trainer(tmp_path, graph_mode):
    """A paused batch started at step 0 and run out at step 3, with max_staleness 1, is three steps old when it
    finishes: its groups are dropped and counted; the step trains only tokens within the bound."""
    _, source, _, _ = _toy(tmp_path, "grpo.partial_rollout.max_staleness=1")
    batch, stats = source.collect(0)
    assert batch is None or (batch.versions[batch.ro.response_mask > 0] == 0).all()
    assert len(source.paused) == 1 and source.paused[0].started == 0
    batch, stats = source.collect(3)           # a step that finds the step-0 batch older than the bound
    assert stats["groups_stale_dropped"] >= 1
    if batch is not None:
        live = batch.ro.response_mask > 0
        assert (3 - batch.versions[live] <= 1).all()
    assert all(3 - x["started"] <= 1 for x in source.ready)


@pytest.mark.slow
def test_the_asynchronous_worker_generates_with_the_weights_it_was_sent(tmp_path, graph_mode):
    """Step 2 trains a batch the rollout process generated during step 1, from the weights after step 0's update.
    Regenerated here, synchronously, from those weights and the same seed, its tokens and log-probs are what the
    worker produced (read from the step's rollout dump)."""
    import mindspore as ms
    from ms_llm.generation import generate
    from ms_llm.rollout.batch import read_rollout
    from ms_llm.rollout.sources import SEED_TAG
    stage, source, policy, _ = _toy(tmp_path, "grpo.partial_rollout.token_budget=0", "grpo.async_rollout.enabled=true",
                                    "grpo.async_rollout.worker_cores=0", "grpo.async_rollout.trainer_threads=0",
                                    "log.rollouts_every=1", "train.max_steps=3")
    try:
        stage.step(0, 0)
        sent = {p.name: p.asnumpy().copy() for p in policy.get_parameters()}   # published during step 1
        stage.step(1, 0)
        stage.step(2, 0)
    finally:
        stage.close()
    a, _ = read_rollout(str(tmp_path / "rollouts" / "step_000003.safetensors"))
    assert (a["versions"][a["response_mask"] > 0] == 1).all()           # one step behind
    moved = [p for p in policy.get_parameters() if np.abs(p.asnumpy() - sent[p.name]).max() > 1e-4]
    assert moved                                                        # the policy has moved on since
    for p in policy.get_parameters():
        p.set_data(ms.Tensor(sent[p.name]))
    policy.set_train(False)
    rows = [[int(x) for x in r if x >= 0] for r in a["prompt_ids"]]
    g = source.g
    again = generate(policy, rows, g.max_new_tokens, seed=[source.seed, SEED_TAG, 2, 0],
                     cache_len=source.cache_len([{"ids": r} for r in rows]), prompt_width=g.max_prompt_len,
                     rows=range(len(rows)), **source.sampling())
    np.testing.assert_array_equal(again.lengths, a["lengths"])
    n = again.tokens.shape[1]
    live = np.arange(n)[None] < again.lengths[:, None]
    np.testing.assert_array_equal(np.where(live, again.tokens, -1), np.where(live, a["tokens"][:, :n], -1))
    np.testing.assert_allclose(np.where(live, again.logprobs, 0), np.where(live, a["behaviour_logps"][:, :n], 0),
                               atol=1e-6)
