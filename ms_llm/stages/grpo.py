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
stopped (every generation round draws from a generator seeded by train.seed, the step and the round). Under
data parallel every rank generates the step's whole batch (same seeds) and trains on its share of each
mini-batch: training scales with the ranks, rollout does not in this release.
"""
import logging
import os
import time

import numpy as np
from mindspore import Tensor

from ms_llm.config import ExperimentConfig
from ms_llm.data.chat import render, stop_token_ids
from ms_llm.data.readers import read_records
from ms_llm.errors import MsLlmError
from ms_llm.losses.grpo import GRPOLoss, aggregation_weights, group_advantages, group_reward_std, overlong_penalty
from ms_llm.losses.policy import TokenLogps
from ms_llm.models.frozen import load_frozen
from ms_llm.models.io import resolve_model_dir
from ms_llm.peft.lora import LoRAConfig, apply_lora, load_adapter, save_adapter
from ms_llm.rollout.chunks import ChunkPlan, generate_chunked
from ms_llm.rollout.verifiable import VerifiableRewards
from ms_llm.stages.common import (build_model, export_final, finish, load_tokenizer, prepare_run_dir,
                                  reference_section, trained_model)
from ms_llm.stages.ppo import Rollout, score_windows
from ms_llm.training.layout import Layout
from ms_llm.training.trainer import StageSpec, train
from ms_llm.training.updater import Updater

log = logging.getLogger(__name__)
LOSS_KEYS = ("ids", "attention_mask", "position_ids", "targets", "loss_mask", "weights", "counts", "old_logps",
             "ref_logps", "advantages")
SCORE_KEYS = ("ids", "attention_mask", "position_ids", "targets")


def read_tasks(path: str, tokenizer, template: str, max_len: int, tasks=(), on_error: str = "raise",
               limit: int = 0) -> tuple:
    """Prompt records of a prompts JSONL ({prompt, answer, task[, tests]}) with "messages" and "ids" (rendered
    with the generation prompt, cut from the start to `max_len`), kept when their task is in `tasks` (all when
    empty); returns (records, number cut)."""
    out, cut = [], 0
    for rec in read_records(path, "prompts", on_error):
        if tasks and rec.get("task") not in tasks:
            continue
        msgs = [{"role": "user", "content": rec["prompt"]}]
        ids = render(msgs, tokenizer, template, add_generation_prompt=True).ids
        if len(ids) > max_len:
            ids, cut = ids[-max_len:], cut + 1
        out.append(dict(rec, messages=msgs, ids=ids, tag=rec.get("task") or "all"))
        if limit and len(out) >= limit:
            break
    return out, cut


class PromptStream:
    """Prompts in a fresh seeded order each epoch; `take(n)` advances a cursor that is the stream's only state."""

    def __init__(self, prompts: list, seed: int):
        self.prompts, self.seed, self.cursor, self._orders = prompts, seed, 0, {}

    def take(self, n: int) -> list:
        out = []
        for i in range(self.cursor, self.cursor + n):
            epoch, k = divmod(i, len(self.prompts))
            if epoch not in self._orders:
                self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))}
            out.append(self.prompts[self._orders[epoch][k]])
        self.cursor += n
        return out


class GroupBatch:
    """A step's kept groups: the rollout rows, rewards, advantages and masks (host arrays)."""

    def __init__(self, ro: Rollout, rewards: dict, finished: np.ndarray, groups: int):
        self.ro, self.rewards, self.finished, self.groups = ro, rewards, finished, groups


class GRPOLoop:
    """One GRPO-family step: sample groups, reward, advantages, updates (module docstring).

    reward_fn(texts, records) -> {"total": [B], "parts": {name: [B]}}; decode(tokens, length) -> text.
    """

    def __init__(self, cfg: ExperimentConfig, policy, reference, reward_fn, decode, layout: Layout = None,
                 pad: int = 0, stops=()):
        g, t = cfg.grpo, cfg.train
        self.cfg, self.g, self.seed, self.mbs = cfg, g, t.seed, t.micro_batch_size
        self.policy, self.reference, self.reward_fn, self.decode = policy, reference, reward_fn, decode
        self.layout = layout or Layout()
        self.pad, self.stops = pad, list(stops)
        self.batch_rows = g.prompts_per_step * g.group_size
        self.mini = g.mini_batch_size or self.batch_rows
        world = self.layout.data_world
        if self.batch_rows % self.mini or self.mini % (self.mbs * world):
            raise MsLlmError(f"grpo.mini_batch_size {self.mini} must divide the step's {self.batch_rows} completions "
                             f"(prompts_per_step x group_size) and split into micro-batches of "
                             f"train.micro_batch_size {self.mbs} on each of {world} data-parallel ranks")
        self.plan = ChunkPlan(g.max_prompt_len, g.max_new_tokens, g.max_new_tokens, 0, exact=True)
        loss = GRPOLoss(policy, g.clip_low, g.clip_high, g.dual_clip, g.beta, g.ent_coef, g.ratio, g.temperature)
        self.updater = Updater("policy", cfg, loss, policy, self.layout, accum_steps=self.mini // (self.mbs * world),
                               loss_norm=float(self.mbs * g.max_new_tokens))
        self.scorer = TokenLogps(policy, g.temperature)
        self.ref_scorer = TokenLogps(reference, g.temperature) if reference is not None else None

    # -- rollout

    def sample(self, step: int, rnd: int, prompts: list) -> tuple:
        """G completions of each prompt: (Rollout, finished [B])."""
        g = self.g
        rows = [p for p in prompts for _ in range(g.group_size)]
        out, _ = generate_chunked(self.policy, [x["ids"] for x in rows], g.max_new_tokens, g.max_new_tokens,
                                  temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                  eos_token_id=self.stops or -1, pad_token_id=self.pad,
                                  seed=[self.seed, 7919, step, rnd], prompt_width=g.max_prompt_len)
        finished = out.state.finished.copy() if out.state is not None else np.zeros(len(rows), bool)
        return Rollout(rows, out.tokens, out.lengths, out.logprobs, self.plan, self.pad), finished

    def score_rewards(self, ro: Rollout, finished: np.ndarray) -> dict:
        texts = [self.decode(ro.tokens[i], int(ro.lengths[i])) for i in range(len(ro.prompts))]
        got = self.reward_fn(texts, ro.prompts)
        total = np.asarray(got["total"], np.float64)
        o = self.g.overlong
        lengths = np.where(finished, ro.lengths, self.g.max_new_tokens + 1)   # cut off: beyond the maximum
        pen = overlong_penalty(lengths, self.g.max_new_tokens, o.buffer, o.factor) if o.buffer else np.zeros(len(total))
        return {"total": total + pen, "parts": dict(got["parts"], overlong=pen), "texts": texts}

    def collect(self, step: int, stream: PromptStream) -> tuple:
        """The step's groups (dynamic sampling: only groups with reward variance, refilled) and rollout stats."""
        g, G = self.g, self.g.group_size
        kept, seen, dropped, rounds, gen_s = [], 0, 0, 0, 0.0
        rounds_max = g.dynamic_sampling.max_rounds if g.dynamic_sampling.enabled else 1
        while len(kept) < g.prompts_per_step and rounds < rounds_max:
            prompts = stream.take(g.prompts_per_step)
            tic = time.perf_counter()
            ro, finished = self.sample(step, rounds, prompts)
            gen_s += time.perf_counter() - tic
            rw = self.score_rewards(ro, finished)
            std = group_reward_std(rw["total"], G)
            for k in range(len(prompts)):
                seen += 1
                if g.dynamic_sampling.enabled and std[k] == 0:
                    dropped += 1
                    continue
                kept.append((ro, rw, finished, k))
            rounds += 1
        kept = kept[:g.prompts_per_step]
        stats = {"groups_seen": seen, "groups_filtered": dropped / max(seen, 1), "generation_rounds": rounds,
                 "rollout_s": gen_s}
        return self._merge(kept), stats

    def _merge(self, kept: list):
        """One batch of rows from the kept groups (of one or several rounds)."""
        if not kept:
            return None
        G, rows = self.g.group_size, []
        for ro, rw, fin, k in kept:
            sel = np.arange(k * G, (k + 1) * G)
            rows.append((ro, rw, fin, sel))
        prompts = [ro.prompts[i] for ro, _, _, sel in rows for i in sel]
        cat = lambda f: np.concatenate([f(ro, rw, fin)[sel] for ro, rw, fin, sel in rows])      # noqa: E731
        n = self.g.max_new_tokens
        pad_to = lambda a: np.pad(a, ((0, 0), (0, n - a.shape[1])))                          # noqa: E731
        tokens = cat(lambda ro, rw, fin: pad_to(ro.tokens))
        behaviour = cat(lambda ro, rw, fin: pad_to(ro.behaviour))
        lengths = cat(lambda ro, rw, fin: ro.lengths)
        finished = cat(lambda ro, rw, fin: fin)
        total = cat(lambda ro, rw, fin: rw["total"])
        parts = {name: cat(lambda ro, rw, fin, name=name: rw["parts"][name]) for name in rows[0][1]["parts"]}
        texts = [rw["texts"][i] for _, rw, _, sel in rows for i in sel]
        ro = Rollout(prompts, tokens, lengths, behaviour, self.plan, self.pad)
        return GroupBatch(ro, {"total": total, "parts": parts, "texts": texts}, finished, len(kept))

    # -- update

    def prepare(self, batch: GroupBatch) -> dict:
        """Per-row training arrays in the scoring-window layout (exact plan: one window per row)."""
        g, ro, plan = self.g, batch.ro, self.plan
        w = ro.windows
        mode = self.policy.training
        self.policy.set_train(False)
        old = plan.to_response(score_windows(self.scorer, w, SCORE_KEYS, self.mbs), w["index"])
        ref = (plan.to_response(score_windows(self.ref_scorer, w, SCORE_KEYS, self.mbs), w["index"])
               if self.ref_scorer is not None else np.zeros_like(old))
        self.policy.set_train(mode)
        adv = group_advantages(batch.rewards["total"], g.group_size, g.advantage_scale, g.advantage_eps)
        mask = ro.response_mask.copy()
        if g.overlong.mask_truncated:
            mask[~batch.finished] = 0.0
        weights, counts = aggregation_weights(mask, g.loss_agg, g.max_new_tokens)
        index = w["index"]
        keep = plan.to_windows(mask, index)
        return dict(w, loss_mask=keep, weights=plan.to_windows(weights, index), counts=counts.astype(np.float32),
                    old_logps=plan.to_windows(old, index), ref_logps=plan.to_windows(ref, index),
                    advantages=plan.to_windows(np.repeat(adv[:, None], g.max_new_tokens, 1), index),
                    _adv=adv, _mask=mask, _old=old)

    def update(self, arrays: dict, step: int) -> dict:
        """grpo.epochs passes of mini-batches over the step's rows; a short batch is padded with empty rows (they
        add nothing to any sum) so every rank runs the same number of updates."""
        g, mbs, layout = self.g, self.mbs, self.layout
        rows = len(arrays["ids"])
        keys = LOSS_KEYS
        full = {k: arrays[k] for k in keys}
        short = self.batch_rows - rows
        if short > 0:
            full = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in full.items()}
        out = []
        for epoch in range(g.epochs):
            perm = np.random.default_rng([self.seed, 104729, step, epoch]).permutation(self.batch_rows)
            for m in range(0, self.batch_rows, self.mini):
                mine = perm[m:m + self.mini]
                share = len(mine) // layout.data_world
                mine = mine[layout.data_rank * share:(layout.data_rank + 1) * share]
                micro = [tuple(Tensor(np.ascontiguousarray(full[k][mine[j:j + mbs]])) for k in keys)
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

    def step(self, step: int, stream: PromptStream) -> dict:
        batch, stats = self.collect(step, stream)
        g = self.g
        if batch is None:                  # every group filtered in every round: nothing to learn from
            return {"loss": 0.0, "skipped": True, "updates": 0, "lr": self.updater.lr_at(step), **stats}
        arrays = self.prepare(batch)
        tic = time.perf_counter()
        row = self.update(arrays, step)
        train_s = time.perf_counter() - tic
        ro, rw = batch.ro, batch.rewards
        std = group_reward_std(rw["total"], g.group_size)
        row.update(stats)
        row.update({"reward/total": float(np.mean(rw["total"])), "group_reward_std": float(std.mean()),
                    "groups": batch.groups, "response_length": float(ro.lengths.mean()),
                    "truncation_rate": float(np.mean(~batch.finished)), "train_s": train_s, "staleness": 0.0,
                    "rollout/logprob_gap": float(np.abs((ro.behaviour - arrays["_old"]) * arrays["_mask"]).sum()
                                                 / max(arrays["_mask"].sum(), 1.0))})
        for name, vals in rw["parts"].items():
            row[f"reward/{name}"] = float(np.mean(vals))
        self.last = batch
        return row


def accuracy(model, tokenizer, records: list, cfg: ExperimentConfig, stops, isolation: str) -> dict:
    """eval/accuracy: greedy answers to held-out prompts, exact match (code prompts: their tests pass), overall
    and per task."""
    from ms_llm.generation import generate
    from ms_llm.rollout.verifiable import code_reward, exact_match_reward
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
    res = {"eval/accuracy": float(right.mean())}
    for task in sorted({r["tag"] for r in records}):
        res[f"eval/accuracy/{task}"] = float(np.mean([ok for ok, r in zip(right, records) if r["tag"] == task]))
    return res


def decode_text(tokenizer, stops, tokens, length: int) -> str:
    return tokenizer.decode([x for x in tokens[:length].tolist() if x not in stops])


def run(cfg: ExperimentConfig, layout: Layout) -> dict:
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
    if "code" in g.rewards and isolation == "namespaces":
        from ms_llm.eval.sandbox import require_isolation
        require_isolation()
    reward_model = None
    if g.reward_model:
        from ms_llm.models.frozen import freeze
        from ms_llm.models.reward import load_reward_model
        if not os.path.exists(g.reward_model):
            raise MsLlmError(f"grpo.reward_model: {g.reward_model} does not exist")
        reward_model = load_reward_model(g.reward_model)
        freeze(reward_model.rm)
    rewards = VerifiableRewards(g.rewards, g.answer_style, g.code_timeout, isolation, reward_model)
    policy = build_model(cfg)
    if g.lora.enabled:
        lo = g.lora
        apply_lora(policy, LoRAConfig(lo.r, lo.alpha, lo.dropout, list(lo.targets)))
    reference = None
    if g.beta > 0:
        ref = load_frozen(reference_section(cfg, g), "grpo.reference", policy, resolve_model_dir(cfg.model.init_from),
                          tokenizer)
        reference = ref.model
    loop = GRPOLoop(cfg, policy, reference, rewards, lambda tok, n: decode_text(tokenizer, stops, tok, n), layout,
                    tokenizer.pad_id or 0, stops)
    stream = PromptStream(prompts, cfg.train.seed)

    def run_step(step: int, micro_index: int):
        row = loop.step(step, stream)
        return row, loop.batch_rows // loop.mbs

    def evaluate() -> dict:
        return accuracy(policy, tokenizer, eval_records, cfg, stops, isolation)

    objective = {"rewards": dict(g.rewards), "loss_agg": g.loss_agg, "ratio": g.ratio, "group_size": g.group_size}

    def check_resume(state: dict):
        if state.get("objective", objective) != objective:
            raise MsLlmError(f"the checkpoint was trained with {state['objective']}, this config asks for "
                             f"{objective}; resume with the same rewards and objective, or start a new run")
        stream.cursor = int(state["prompt_cursor"])

    write_policy = (lambda folder: save_adapter(policy, folder, cfg.model.init_from)) if g.lora.enabled else None
    read_policy = (lambda folder: load_adapter(policy, folder)) if g.lora.enabled else None
    before = evaluate() if eval_records else {}
    if before:
        log.info("before training: %s", before)
    spec = StageSpec(updaters=[loop.updater], run_step=run_step, weights_writer=write_policy,
                     weights_reader=read_policy, evaluate=evaluate if eval_records else None,
                     extra_state=lambda: {"prompt_cursor": stream.cursor, "objective": objective},
                     check_resume=check_resume)
    result = train(cfg, policy, spec, run_dir, layout)
    if not layout.main:
        return {}
    trained = trained_model(cfg, run_dir, policy, g.lora.enabled)
    metrics = dict(result.metrics, prompts=len(prompts), prompts_cut=cut,
                   **{f"before/{k}": v for k, v in before.items()})
    if eval_records and "eval/accuracy" not in metrics:
        metrics.update(evaluate())
    final = export_final(run_dir, trained, tokenizer, g.export_version)
    gates = {}
    if eval_records:
        from ms_llm.eval.results import gate
        gates["accuracy_not_lower"] = gate(metrics["eval/accuracy"], before["eval/accuracy"], ">=")
    return finish(run_dir, cfg.stage, "completed", result.steps, metrics, final, gates, plots=cfg.log.plots)
