# SPDX-License-Identifier: Apache-2.0
"""GRPO-family RL with verifiable rewards (seed 004): GRPO, Dr. GRPO, DAPO and GSPO as settings of one stage.

    ms-llm train configs/tiny/grpo.yaml                 # from runs/tiny_sft_lora, on its translation prompts

One step (formulas: losses/grpo.py, docs/rl.md):

  1. sample G = grpo.group_size completions for each of grpo.prompts_per_step prompts, storing the sampler's
     per-token log-probs; score them with the reward functions (rollout/verifiable.py), plus DAPO's overlong
     penalty. With dynamic sampling, groups whose rewards are all equal are dropped and further prompts
     sampled, up to dynamic_sampling.max_rounds rounds.
  2. advantages per group; old-policy log-probs (and with β > 0 the reference's) of every completion token;
     truncated completions optionally masked (DAPO overlong filtering).
  3. grpo.epochs passes of mini-batches, each one optimizer update whose loss is the configured aggregation
     over the whole mini-batch, exact however it is split into micro-batches or data-parallel ranks.

The prompt stream's position is stage state: a resumed run continues from its last checkpoint as if never
stopped (every completion draws from a generator seeded by train.seed, the step, the round and its row). Under
data parallel each rank generates and rewards its share of each round's groups (synchronous rollouts; partial and
asynchronous ones generate the whole batch on every rank), recomputes π_old and the reference's log-probs for
its share of the step's rows, and the ranks exchange those rows; each rank then trains its share of each
mini-batch.
"""
import logging
import os
import time

import numpy as np
from mindspore import Tensor

from ms_llm.config import ExperimentConfig
from ms_llm.data.chat import stop_token_ids
from ms_llm.errors import MsLlmError
from ms_llm.generation import generate, release_caches
from ms_llm.eval.results import gate
from ms_llm.eval.sandbox import require_isolation
from ms_llm.losses.grpo import GRPOLoss, aggregation_weights, group_advantages, group_reward_std
from ms_llm.losses.policy import TokenLogps
from ms_llm.models.build import build_model
from ms_llm.models.frozen import freeze, load_frozen
from ms_llm.models.io import resolve_model_dir
from ms_llm.peft.lora import LoRAConfig, apply_lora, hold_base
from ms_llm.rollout.agent import ToolSet, advance_episodes, episode_metrics, start_episodes
from ms_llm.rollout.batch import dump_rollout, gather_rows, score_windows
from ms_llm.rollout.episodes import EpisodeSource
from ms_llm.rollout.prompts import PromptStream, read_tasks
from ms_llm.rollout.reward_model import load_reward
from ms_llm.rollout.rollout_ranks import serve
from ms_llm.rollout.sources import GroupBatch, RolloutSource, rollout_source
from ms_llm.rollout.verifiable import VerifiableRewards, code_reward, exact_match_reward
from ms_llm.stages.common import (export_final, finish, load_tokenizer, prepare_run_dir,
                                  reference_section, trained_model)
from ms_llm.training.layout import Layout
from ms_llm.training.stage import Stage, adapter_io
from ms_llm.training.trainer import train
from ms_llm.training.updater import Updater

log = logging.getLogger(__name__)
LOSS_KEYS = ("ids", "attention_mask", "position_ids", "targets", "loss_mask", "weights", "counts", "old_logps",
             "ref_logps", "advantages")
SCORE_KEYS = ("ids", "attention_mask", "position_ids", "targets")


class GRPOStage(Stage):
    """One GRPO-family step: the source's groups, advantages, π_old (and the reference's) log-probs, updates.

    `source` (rollout/sources.py) samples and rewards the groups; `evaluate` (optional): () -> {"eval/...": v};
    `run_dir`: where rollout dumps go (log.rollouts_every)."""
    evaluate_at_start = True

    def __init__(self, cfg: ExperimentConfig, policy, reference, source: RolloutSource, layout: Layout = None,
                 run_dir: str = None, evaluate=None, objective: dict = None):
        super().__init__(cfg, policy, layout)
        g, t = cfg.grpo, cfg.train
        self.g, self.seed, self.mbs, self.source, self.run_dir = g, t.seed, t.micro_batch_size, source, run_dir
        self._evaluate, self.evaluates = evaluate, evaluate is not None
        self.batch_rows = g.prompts_per_step * g.group_size
        self.mini = g.mini_batch_size or self.batch_rows
        world = self.layout.data_world
        if self.batch_rows % self.mini or self.mini % (self.mbs * world):
            raise MsLlmError(f"grpo.mini_batch_size {self.mini} must divide the step's {self.batch_rows} completions "
                             f"(prompts_per_step x group_size) and split into micro-batches of "
                             f"train.micro_batch_size {self.mbs} on each of {world} data-parallel ranks")
        loss = GRPOLoss(policy, g.clip_low, g.clip_high, g.dual_clip, g.beta, g.ent_coef, g.ratio, g.temperature)
        per_micro = self.mbs * g.max_new_tokens if g.loss_agg == "token-mean" else self.mbs   # a typical denominator
        self.updater = Updater("policy", cfg, loss, policy, self.layout, accum_steps=self.mini // (self.mbs * world),
                               loss_norm=float(per_micro))
        self.scorer = TokenLogps(policy, g.temperature)
        self.ref_scorer = TokenLogps(reference, g.temperature) if reference is not None else None
        self.must_match = {"objective": objective} if objective else {}

    def updaters(self) -> list:
        return [self.updater]

    def models(self) -> dict:                  # paused generations, groups waiting, the batch generated ahead
        return {"rollout_state": (self.source.save, self.source.load)} if self.source.has_state() else {}

    def weights_io(self):
        return adapter_io(self.model, self.cfg.model.init_from) if self.g.lora.enabled else None

    def evaluate(self) -> dict:
        with self.layout.replicated():
            return self._evaluate()

    def state_dict(self) -> dict:
        return dict(super().state_dict(), prompt_cursor=self.source.stream.cursor)

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        self.source.stream.cursor = int(state["prompt_cursor"])

    def prepare(self, batch: GroupBatch) -> dict:
        """The batch's training arrays: in the scoring-window layout (exact plan: one window per row) the fields
        of LOSS_KEYS; per row and token [B, N], "old" (π_old), "ref", "mask" (the loss mask: response tokens, of
        finished rows only under overlong.mask_truncated) and "current" (the policy recomputed on the rollout,
        synchronous only, else None); per row, "advantage". π_old is that recomputed policy (synchronous), or
        each token's behaviour log-prob (partial: one completion's tokens may come from several policies;
        asynchronous: they come from the previous step's)."""
        g, ro, plan = self.g, batch.ro, self.source.plan
        w, index = ro.windows, ro.windows["index"]
        mode = self.model.training
        self.model.set_train(False)
        current = None if self.source.behaviour_is_old else self._score_split(self.scorer, w)
        ref = self._score_split(self.ref_scorer, w) if self.ref_scorer is not None \
            else np.zeros(ro.response_mask.shape)
        self.model.set_train(mode)
        old = ro.behaviour.astype(np.float64) if current is None else current
        adv = group_advantages(batch.rewards["total"], g.group_size, g.advantage_scale, g.advantage_eps)
        mask = ro.response_mask * batch.trained           # the policy's own tokens (not an episode's tool results)
        if g.overlong.mask_truncated:
            mask[~batch.finished] = 0.0
        weights, counts = aggregation_weights(mask, g.loss_agg, g.max_new_tokens)
        return dict(w, loss_mask=plan.to_windows(mask, index), weights=plan.to_windows(weights, index),
                    counts=counts.astype(np.float32), old_logps=plan.to_windows(old, index),
                    ref_logps=plan.to_windows(ref, index),
                    advantages=plan.to_windows(np.repeat(adv[:, None], g.max_new_tokens, 1), index),
                    advantage=adv, mask=mask, old=old, ref=ref, current=current)

    def _score_split(self, cell, w: dict) -> np.ndarray:
        """[B, N] log-probs of the batch's rows under `cell`: each data-parallel rank scores its share of the
        rows, and the ranks exchange them."""
        plan = self.source.plan
        k = plan.n_windows
        part = self.layout.share(len(w["ids"]) // k)
        mine = {key: w[key][part.start * k:part.stop * k] for key in (*SCORE_KEYS, "index")}
        got = plan.to_response(score_windows(cell, mine, SCORE_KEYS, self.mbs), mine["index"]) \
            if part.stop > part.start else np.zeros((0, plan.max_new))
        return gather_rows(self.layout, got)

    def update(self, arrays: dict, step: int) -> dict:
        """grpo.epochs passes of mini-batches over the step's rows; a short batch is padded with empty rows (they
        add nothing to any sum) so every rank runs the same number of updates."""
        g, mbs, layout = self.g, self.mbs, self.layout
        rows = len(arrays["ids"])
        full = {k: arrays[k] for k in LOSS_KEYS}
        short = self.batch_rows - rows
        if short > 0:
            full = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in full.items()}
        out = []
        for epoch in range(g.epochs):
            perm = np.random.default_rng([self.seed, 104729, step, epoch]).permutation(rows)
            perm = np.concatenate([perm, np.arange(rows, self.batch_rows)])     # empty padding rows last
            for m in range(0, self.batch_rows, self.mini):
                mine = perm[m:m + self.mini]
                share = len(mine) // layout.data_world
                mine = mine[layout.data_rank * share:(layout.data_rank + 1) * share]
                micro = [tuple(Tensor(np.ascontiguousarray(full[k][mine[j:j + mbs]])) for k in LOSS_KEYS)
                         for j in range(0, len(mine), mbs)]
                out.append(self.updater(micro, step))
        row = {"loss": float(np.mean([o["loss"] for o in out])), "lr": out[-1]["lr"],
               "grad_norm": float(np.mean([o["grad_norm"] for o in out])),
               "skipped": not all(o["finite"] for o in out), "updates": len(out)}
        tokens = [o["policy/tokens"] for o in out]
        for name in self.updater.stat_names:
            if name != "policy/tokens":
                row[name] = float(np.mean([o[name] / t if t > 0 else 0.0 for o, t in zip(out, tokens)]))
        return row

    def step(self, step: int, micro_index: int) -> tuple:
        start = time.perf_counter()
        with self.layout.replicated():  # (ZeRO-3: each rank generates and scores its rows on whole copies)
            batch, stats = self.source.collect(step)
            release_caches(self.model)     # the rollout's KV caches go before the scoring and updates need memory
            arrays = self.prepare(batch) if batch is not None else None
        used = self.batch_rows // self.mbs
        if batch is None:                  # nothing finished or every group filtered: nothing to learn from
            return {"loss": 0.0, "skipped": True, "updates": 0, "lr": self.updater.lr_at(step), **stats}, used
        if self.run_dir and self.layout.main and self.cfg.log.rollouts_every \
                and (step + 1) % self.cfg.log.rollouts_every == 0:
            self._dump(step, batch, arrays)
        tic = time.perf_counter()
        row = self.update(arrays, step)
        train_s = time.perf_counter() - tic
        ro, rw, m = batch.ro, batch.rewards, arrays["mask"] > 0
        age = (step - batch.versions)[m] if m.any() else np.zeros(1)
        row.update(stats)
        row.update({"reward/total": float(np.mean(rw["total"])),
                    "group_reward_std": float(group_reward_std(rw["total"], self.g.group_size).mean()),
                    "groups": batch.groups, "response_length": float(ro.lengths.mean()),
                    "truncation_rate": float(np.mean(~batch.finished)), "train_s": train_s,
                    "staleness": float(age.mean()), "staleness_max": float(age.max())})
        if arrays["current"] is not None:   # sampler vs training graph on the same weights (sync): ~1e-6
            row["rollout/logprob_gap"] = float(np.abs((ro.behaviour - arrays["current"]) * arrays["mask"]).sum()
                                               / max(arrays["mask"].sum(), 1.0))
        for name, vals in rw["parts"].items():
            row[f"reward/{name}"] = float(np.mean(vals))
        row["step_s"] = time.perf_counter() - start
        return row, used

    def _dump(self, step: int, batch: GroupBatch, arrays: dict):
        ro, p = batch.ro, self.g.max_prompt_len
        prompt_ids = np.full((len(ro.prompts), p), -1, np.int64)
        for i, x in enumerate(ro.prompts):
            prompt_ids[i, :len(x["ids"])] = x["ids"]
        out = {"prompt_ids": prompt_ids, "tokens": ro.tokens, "lengths": ro.lengths, "finished": batch.finished,
               "versions": batch.versions, "group_ids": batch.group_ids, "response_mask": ro.response_mask,
               "trained": batch.trained, "behaviour_logps": ro.behaviour, "old_logps": arrays["old"], "ref_logps": arrays["ref"],
               "reward": batch.rewards["total"], "advantage": arrays["advantage"], "loss_mask": arrays["mask"],
               "counts": arrays["counts"], **{f"reward/{k}": v for k, v in batch.rewards["parts"].items()}}
        g = self.g
        dump_rollout(self.run_dir, step + 1, out, {"group_size": g.group_size, "advantage_scale": g.advantage_scale,
                                                   "advantage_eps": g.advantage_eps, "loss_agg": g.loss_agg,
                                                   "mask_truncated": g.overlong.mask_truncated})

    def close(self, wait: bool = True):
        self.source.close(wait)


def correct(model, tokenizer, records: list, cfg: ExperimentConfig, stops, isolation: str) -> np.ndarray:
    """[N] 1.0 where the greedy answer to record i is right: exact match (code prompts: their tests pass)."""
    g = cfg.grpo
    texts = []
    for i in range(0, len(records), 32):
        chunk = records[i:i + 32]
        out = generate(model, [x["ids"] for x in chunk], g.max_new_tokens, temperature=0, eos_token_id=stops or -1,
                       pad_token_id=tokenizer.pad_id or 0, prompt_width=g.max_prompt_len)
        texts += [decode_text(tokenizer, stops, out.tokens[j], int(out.lengths[j])) for j in range(len(chunk))]
    code = [i for i, r in enumerate(records) if r.get("task") == "code"]
    right = exact_match_reward(texts, records, g.answer_style)
    if code:
        right[code] = code_reward([texts[i] for i in code], [records[i] for i in code], g.code_timeout, isolation)
    return np.asarray(right, np.float64)


def accuracy(model, tokenizer, records: list, cfg: ExperimentConfig, stops, isolation: str) -> dict:
    """eval/accuracy of the greedy answers to held-out prompts, overall and per task."""
    right = correct(model, tokenizer, records, cfg, stops, isolation)
    res = {"eval/accuracy": float(right.mean())}
    for task in sorted({r["tag"] for r in records}):
        res[f"eval/accuracy/{task}"] = float(np.mean([ok for ok, r in zip(right, records) if r["tag"] == task]))
    return res


def task_success(model, tokenizer, records: list, cfg: ExperimentConfig, tools: ToolSet) -> dict:
    """Greedy episodes on held-out tasks: eval/task_success (the final answer states the record's answer), and per
    episode eval/turns, eval/tool_calls, eval/malformed, eval/tool_errors."""
    g, a, template = cfg.grpo, cfg.grpo.agent, cfg.tokenizer.chat_template
    episodes = start_episodes(tokenizer, records, template)
    advance_episodes(model, tokenizer, episodes, records, template, tools, a.max_turns, a.max_turns, a.turn_tokens,
                     max_total_tokens=g.max_prompt_len + g.max_new_tokens, max_response_tokens=g.max_new_tokens,
                     temperature=0.0)
    m = episode_metrics(episodes, records, g.answer_style)
    return {"eval/task_success": m["success"], **{f"eval/{k}": m[k] for k in ("turns", "tool_calls", "malformed",
                                                                               "tool_errors")}}


def decode_text(tokenizer, stops, tokens, length: int) -> str:
    return tokenizer.decode([x for x in tokens[:length].tolist() if x not in stops])


def build_policy(cfg: ExperimentConfig):
    """The policy as the stage trains it (LoRA and its base dtype included): what a rollout rank generates with."""
    g = cfg.grpo
    policy = build_model(cfg)
    if g.lora.enabled:
        lo = g.lora
        apply_lora(policy, LoRAConfig(lo.r, lo.alpha, lo.dropout, list(lo.targets)))
        hold_base(policy, lo.base_dtype, "grpo.lora")
    return policy


def run(cfg: ExperimentConfig, layout: Layout) -> dict:
    if layout.role == "rollout":        # a rank that only generates (grpo.async_rollout.rollout_ranks)
        serve(build_policy(cfg), layout)
        return {}
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    g = cfg.grpo
    template = cfg.tokenizer.chat_template
    stops = stop_token_ids(template, tokenizer)
    prompts, cut = [], 0
    for s in cfg.data.sources:
        got, c = read_tasks(s.path, tokenizer, template, g.max_prompt_len, g.tasks, cfg.data.on_error)
        prompts, cut = prompts + got, cut + c
    if not prompts:
        raise MsLlmError(f"data.sources {[s.path for s in cfg.data.sources]}: no prompts"
                         + (f" of grpo.tasks {list(g.tasks)}" if g.tasks else ""))
    eval_records = []
    if g.eval_data:
        if not os.path.isfile(g.eval_data):
            raise MsLlmError(f"grpo.eval_data: {g.eval_data} does not exist")
        eval_records = read_tasks(g.eval_data, tokenizer, template, g.max_prompt_len, g.tasks, limit=g.eval_limit)[0]
    isolation = "none" if g.unsafe_no_isolation else "namespaces"
    if ("code" in g.rewards or g.agent.tools) and isolation == "namespaces":
        require_isolation()
    tools = None
    if g.agent.tools:
        if not os.path.isfile(g.agent.tools):
            raise MsLlmError(f"grpo.agent.tools: {g.agent.tools} does not exist")
        tools = ToolSet.from_file(g.agent.tools, timeout=g.agent.tool_timeout, isolation=isolation)
    reward_model = None
    if g.reward_model:
        reward_model = load_reward(g.reward_model, g.reward_sha256, tokenizer, "grpo.reward_model", g.reward_dtype)
        freeze(reward_model.rm)
    rewards = VerifiableRewards(g.rewards, g.answer_style, g.code_timeout, isolation, reward_model)
    policy = build_policy(cfg)
    reference = None
    if g.beta > 0:
        ref = load_frozen(reference_section(cfg, g), "grpo.reference", policy, resolve_model_dir(cfg.model.init_from),
                          tokenizer)
        reference = ref.model
    args = (cfg, policy, rewards, lambda tok, n: decode_text(tokenizer, stops, tok, n),
            PromptStream(prompts, cfg.train.seed), tokenizer.pad_id or 0, stops)
    source = EpisodeSource(*args, layout=layout, tokenizer=tokenizer, template=template, tools=tools) if tools \
        else rollout_source(*args, layout=layout)
    objective = {"rewards": dict(g.rewards), "loss_agg": g.loss_agg, "ratio": g.ratio, "group_size": g.group_size,
                 "token_budget": g.partial_rollout.token_budget, "async_rollout": g.async_rollout.enabled}
    if tools:
        a = g.agent
        objective["agent"] = {"turns_per_step": a.turns_per_step, "max_turns": a.max_turns, "turn_tokens": a.turn_tokens}
    evaluate = None
    if eval_records:
        evaluate = (lambda: task_success(policy, tokenizer, eval_records, cfg, tools)) if tools \
            else (lambda: accuracy(policy, tokenizer, eval_records, cfg, stops, isolation))
    stage = GRPOStage(cfg, policy, reference, source, layout, run_dir, evaluate, objective)
    try:
        result = train(cfg, stage, run_dir)
    except BaseException:
        stage.close(wait=False)            # do not wait for a generation nobody will use
        raise
    stage.close()
    if not layout.main:
        return {}
    trained = trained_model(cfg, run_dir, policy, g.lora.enabled)
    metrics = dict(result.metrics, prompts=len(prompts), prompts_cut=cut,
                   **{f"before/{k}": v for k, v in result.before.items()})
    key = "eval/task_success" if tools else "eval/accuracy"
    if eval_records and key not in metrics:
        metrics.update(stage.evaluate())
    final = export_final(run_dir, trained, tokenizer, g.export_version)
    gates = {}
    if eval_records and key in result.before:
        gates["task_success_not_lower" if tools else "accuracy_not_lower"] = gate(metrics[key], result.before[key],
                                                                                  ">=")
    return finish(run_dir, cfg.stage, "completed", result.steps, metrics, final, gates, plots=cfg.log.plots)
