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
from ms_llm.models.build import build_model
from ms_llm.models.frozen import freeze, load_frozen
from ms_llm.models.io import resolve_model_dir
from ms_llm.peft.lora import LoRAConfig, apply_lora, load_adapter, save_adapter
from ms_llm.rollout.batch import Rollout, score_windows
from ms_llm.rollout.chunks import ChunkPlan
from ms_llm.rollout.reward_model import load_reward
from ms_llm.rollout.verifiable import VerifiableRewards
from ms_llm.stages.common import (export_final, finish, load_tokenizer, prepare_run_dir,
                                  reference_section, trained_model)
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
    """A step's groups as one batch of rows: the rollout, rewards, finished flags, per-token policy versions."""

    def __init__(self, ro: Rollout, rewards: dict, finished: np.ndarray, versions: np.ndarray, groups: int):
        self.ro, self.rewards, self.finished, self.versions, self.groups = ro, rewards, finished, versions, groups


class Paused:
    """A generation batch between steps (partial rollout): its rows (G per prompt), what they produced so far —
    tokens, the sampler's log-probs and the step (policy version) of each token — and the generation state."""

    def __init__(self, key: str, rows: list, started: int, state, n: int):
        b = len(rows)
        self.key, self.rows, self.started, self.state, self.generated = key, rows, started, state, 0
        self.tokens = np.zeros((b, n), np.int32)
        self.logps = np.zeros((b, n), np.float32)
        self.versions = np.full((b, n), -1, np.int32)
        self.lengths = np.zeros(b, np.int64)
        self.taken = set()

    def add(self, out, step: int):
        n = out.tokens.shape[1]
        cols = slice(self.generated, self.generated + n)
        self.tokens[:, cols], self.logps[:, cols] = out.tokens, out.logprobs
        self.versions[:, cols] = np.where(np.arange(n)[None] < out.lengths[:, None], step, -1)
        self.lengths += out.lengths
        self.generated += n

    def done(self, max_new: int) -> np.ndarray:
        """[B] rows with nothing left to generate."""
        return self.state.finished | (self.generated >= max_new)


def _pin_threads(cores):
    """CPU affinity of every thread of this process (kernel thread pools started earlier included); threads
    started later inherit it."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:                                # a thread that ended meanwhile
            pass


class _Finished:
    """The part of a generation state `Paused.done` reads, for batches that come back whole (async rollout)."""

    def __init__(self, finished):
        self.finished = np.asarray(finished, bool)


class GRPOLoop:
    """One GRPO-family step: sample groups, reward, advantages, updates (module docstring).

    reward_fn(texts, records) -> {"total": [B], "parts": {name: [B]}}; decode(tokens, length) -> text.
    With grpo.partial_rollout.token_budget, each step generates at most that many tokens per completion: the
    unfinished ones wait in `paused` (their generation state kept) and continue next step under the newer
    policy; finished groups wait in `ready` until a step trains them, their per-token behaviour log-probs
    standing in for π_old.
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
        per_micro = self.mbs * g.max_new_tokens if g.loss_agg == "token-mean" else self.mbs   # a typical denominator
        self.updater = Updater("policy", cfg, loss, policy, self.layout, accum_steps=self.mini // (self.mbs * world),
                               loss_norm=float(per_micro))
        self.scorer = TokenLogps(policy, g.temperature)
        self.ref_scorer = TokenLogps(reference, g.temperature) if reference is not None else None
        self.partial = g.partial_rollout.token_budget > 0
        self.budget = g.partial_rollout.token_budget if self.partial else g.max_new_tokens
        self.paused, self.ready = [], []
        self.async_ = g.async_rollout.enabled
        self.worker, self.request, self.queued = None, None, None     # async: in flight / received, not yet used
        self.score_current = False          # partial / async: also score the rollout with the current policy

    # -- rollout

    def _sampling(self) -> dict:
        g = self.g
        return dict(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, eos_token_id=self.stops or -1,
                    pad_token_id=self.pad)

    def start(self, step: int, rnd: int, prompts: list, run_out: bool) -> Paused:
        """Begin G completions of each prompt: one budget of tokens, or (run_out) all of them."""
        from ms_llm.generation import generate
        g = self.g
        rows = [p for p in prompts for _ in range(g.group_size)]
        out = generate(self.policy, [r["ids"] for r in rows], min(self.budget, g.max_new_tokens),
                       cache_len=self._cache_len(rows), seed=[self.seed, 7919, step, rnd], prompt_width=g.max_prompt_len,
                       **self._sampling())
        fl = Paused(f"s{step}r{rnd}", rows, step, out.state, g.max_new_tokens)
        fl.add(out, step)
        if run_out:
            self.advance(fl, step, run_out=True)
        return fl

    def _cache_len(self, rows: list) -> int:
        g = self.g
        return -(-(max(g.max_prompt_len, max(len(r["ids"]) for r in rows)) + g.max_new_tokens) // 64) * 64

    # -- asynchronous one-step off-policy rollout (rollout/async_worker.py)

    def _submit(self, step: int, version: int, stream: PromptStream):
        """Ask the rollout process for step `step`'s completions, generated with the current weights (those after
        `version` updates)."""
        from ms_llm.rollout.async_worker import RolloutWorker, trainable_arrays
        g = self.g
        if self.worker is None:
            a = g.async_rollout
            mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            split = a.worker_cores and len(mine) > a.worker_cores
            cores = mine[-a.worker_cores:] if split else None
            self.worker = RolloutWorker(self.cfg, self._sampling(), a.worker_threads, cores)
            if split:                                  # the two processes share the cores: each keeps its own
                _pin_threads(mine[:-a.worker_cores])
            if a.trainer_threads:
                from ms_llm.context import set_cpu_threads
                if not set_cpu_threads(a.trainer_threads):      # MindSpore takes it once per process
                    log.warning("grpo.async_rollout.trainer_threads not applied to MindSpore's own ops")
        rows = [p for p in stream.take(g.prompts_per_step) for _ in range(g.group_size)]
        path = self.worker.publish(trainable_arrays(self.policy), version)
        self.worker.submit(version, path, [r["ids"] for r in rows], [self.seed, 7919, step, 0], g.max_new_tokens,
                           self._cache_len(rows), g.max_prompt_len)
        self.request = {"rows": rows, "step": step, "version": version}

    def _receive(self) -> tuple:
        """(the request, its batch): the one received at a checkpoint, else wait for the one in flight."""
        got, self.queued = self.queued, None
        if got is None:
            tic = time.perf_counter()
            got = self.worker.result()
            got["wait_s"] = time.perf_counter() - tic
        return self.request, got

    def _collect_async(self, step: int, stream: PromptStream) -> list:
        if self.queued is None and (self.worker is None or not self.worker.pending):
            self._submit(step, step, stream)      # the first step: nothing was generated ahead
        req, got = self._receive()
        if step + 1 < self.cfg.train.max_steps:
            self._submit(step + 1, step, stream)  # θ_step generates the next step's batch while this one trains
        fl = Paused(f"s{req['step']}", req["rows"], req["step"], _Finished(got["finished"]), self.g.max_new_tokens)
        fl.tokens[:, :got["tokens"].shape[1]], fl.logps[:, :got["tokens"].shape[1]] = got["tokens"], got["logprobs"]
        n = got["tokens"].shape[1]
        fl.versions[:, :n] = np.where(np.arange(n)[None] < got["lengths"][:, None], req["version"], -1)
        fl.lengths, fl.generated = np.asarray(got["lengths"], np.int64), self.g.max_new_tokens
        self.async_times = {"rollout_s": got.get("generate_s", 0.0), "rollout_wait_s": got.get("wait_s", 0.0)}
        return self.harvest(fl)

    def close(self, wait: bool = True):
        if self.worker is not None:
            self.worker.close(wait)
            self.worker = None

    def advance(self, fl: Paused, step: int, run_out: bool = False):
        """Continue a paused batch under the current policy: one budget of tokens, or (run_out) to the end."""
        from ms_llm.generation import generate
        g = self.g
        while not fl.done(g.max_new_tokens).all():
            out = generate(self.policy, None, min(self.budget, g.max_new_tokens - fl.generated), state=fl.state,
                           **self._sampling())
            fl.state = out.state
            fl.add(out, step)
            if not run_out:
                break

    def harvest(self, fl: Paused) -> list:
        """The groups of `fl` whose every completion is done (not harvested before), rewarded, as group dicts."""
        G, n = self.g.group_size, self.g.max_new_tokens
        done = fl.done(n)
        ks = [k for k in range(len(fl.rows) // G) if k not in fl.taken and done[k * G:(k + 1) * G].all()]
        if not ks:
            return []
        sel = np.concatenate([np.arange(k * G, (k + 1) * G) for k in ks])
        texts = [self.decode(fl.tokens[i], int(fl.lengths[i])) for i in sel]
        records = [fl.rows[i] for i in sel]
        got = self.reward_fn(texts, records)
        total = np.asarray(got["total"], np.float64)
        o = self.g.overlong
        finished = fl.state.finished[sel].copy()
        lengths = np.where(finished, fl.lengths[sel], n + 1)              # cut off: beyond the maximum
        pen = overlong_penalty(lengths, n, o.buffer, o.factor) if o.buffer else np.zeros(len(sel))
        parts = dict({k: np.asarray(v, np.float64) for k, v in got["parts"].items()}, overlong=pen)
        total = total + pen
        out = []
        for j, k in enumerate(ks):
            fl.taken.add(k)
            rows = slice(j * G, (j + 1) * G)
            i = sel[rows]
            out.append({"prompts": records[rows], "tokens": fl.tokens[i], "logps": fl.logps[i],
                        "versions": fl.versions[i], "lengths": fl.lengths[i], "finished": finished[rows],
                        "total": total[rows], "parts": {name: v[rows] for name, v in parts.items()},
                        "texts": texts[rows], "started": fl.started})
        return out

    def collect(self, step: int, stream: PromptStream) -> tuple:
        """The step's groups and rollout stats. Synchronous: sample whole completions, with dynamic sampling
        further rounds until enough groups with reward variance; partial rollout: advance the paused batches,
        start one, train the oldest finished groups."""
        g = self.g
        tic = time.perf_counter()
        fresh, rounds = [], 0
        if self.async_:
            fresh, rounds = self._collect_async(step, stream), 1
        elif self.partial:
            limit = g.partial_rollout.max_staleness
            for fl in self.paused:
                self.advance(fl, step, run_out=step - fl.started >= limit)
            self.paused.append(self.start(step, 0, stream.take(g.prompts_per_step), run_out=limit == 0))
            rounds = 1
            for fl in self.paused:
                fresh += self.harvest(fl)
            self.paused = [fl for fl in self.paused if len(fl.taken) < len(fl.rows) // g.group_size]
        else:
            max_rounds = g.dynamic_sampling.max_rounds if g.dynamic_sampling.enabled else 1
            kept = 0
            while kept < g.prompts_per_step and rounds < max_rounds:
                got = self.harvest(self.start(step, rounds, stream.take(g.prompts_per_step), run_out=True))
                fresh += got
                kept += sum(1 for x in got if not self._flat(x))
                rounds += 1
        gen_s = time.perf_counter() - tic
        seen = len(fresh)
        if g.dynamic_sampling.enabled:
            fresh = [x for x in fresh if not self._flat(x)]
        dropped = seen - len(fresh)
        self.ready += fresh
        stale = 0
        if self.partial or self.async_:                # never train tokens older than the staleness bound
            bound = 1 if self.async_ else g.partial_rollout.max_staleness
            keep = [x for x in self.ready if step - x["started"] <= bound]
            stale, self.ready = len(self.ready) - len(keep), keep
        take, self.ready = self.ready[:g.prompts_per_step], self.ready[g.prompts_per_step:]
        if not self.partial:
            self.ready = []                            # one batch per step: surplus groups are not kept
        stats = {"groups_seen": seen, "groups_filtered": dropped / max(seen, 1), "generation_rounds": rounds,
                 "rollout_s": gen_s}
        if self.async_:                     # generation ran in the other process; the trainer waited only this long
            stats.update(self.async_times)
        if self.partial:
            stats.update({"groups_paused": sum(len(fl.rows) // g.group_size - len(fl.taken) for fl in self.paused),
                          "groups_waiting": len(self.ready), "groups_stale_dropped": stale})
        return self._merge(take), stats

    @staticmethod
    def _flat(group: dict) -> bool:
        return bool(np.all(group["total"] == group["total"][0]))

    def _merge(self, groups: list):
        """One batch of rows from whole groups."""
        if not groups:
            return None
        cat = lambda key: np.concatenate([x[key] for x in groups])          # noqa: E731
        prompts = [p for x in groups for p in x["prompts"]]
        ro = Rollout(prompts, cat("tokens"), cat("lengths"), cat("logps"), self.plan, self.pad)
        rewards = {"total": cat("total"), "parts": {k: np.concatenate([x["parts"][k] for x in groups])
                                                   for k in groups[0]["parts"]},
                   "texts": [t for x in groups for t in x["texts"]]}
        return GroupBatch(ro, rewards, cat("finished"), cat("versions"), len(groups))

    # -- update

    def prepare(self, batch: GroupBatch) -> dict:
        """Per-row training arrays in the scoring-window layout (exact plan: one window per row). π_old is the
        policy recomputed on the rollout (synchronous), or each token's behaviour log-prob (partial rollout: tokens
        of one completion may come from several policies; asynchronous: they come from the previous step's)."""
        g, ro, plan = self.g, batch.ro, self.plan
        w = ro.windows
        mode = self.policy.training
        self.policy.set_train(False)
        behaviour = self.partial or self.async_
        current = None if behaviour else plan.to_response(score_windows(self.scorer, w, SCORE_KEYS, self.mbs),
                                                          w["index"])
        ref = (plan.to_response(score_windows(self.ref_scorer, w, SCORE_KEYS, self.mbs), w["index"])
               if self.ref_scorer is not None else np.zeros(ro.response_mask.shape))
        if self.score_current and current is None:           # only to compare (tests): a forward pass per step
            current = plan.to_response(score_windows(self.scorer, w, SCORE_KEYS, self.mbs), w["index"])
        self.policy.set_train(mode)
        old = ro.behaviour.astype(np.float64) if behaviour else current
        adv = group_advantages(batch.rewards["total"], g.group_size, g.advantage_scale, g.advantage_eps)
        mask = ro.response_mask.copy()
        if g.overlong.mask_truncated:
            mask[~batch.finished] = 0.0
        weights, counts = aggregation_weights(mask, g.loss_agg, g.max_new_tokens)
        index = w["index"]
        return dict(w, loss_mask=plan.to_windows(mask, index), weights=plan.to_windows(weights, index),
                    counts=counts.astype(np.float32), old_logps=plan.to_windows(old, index),
                    ref_logps=plan.to_windows(ref, index),
                    advantages=plan.to_windows(np.repeat(adv[:, None], g.max_new_tokens, 1), index),
                    _adv=adv, _mask=mask, _old=old, _current=current)

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
            perm = np.random.default_rng([self.seed, 104729, step, epoch]).permutation(rows)
            perm = np.concatenate([perm, np.arange(rows, self.batch_rows)])     # empty padding rows last
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
        start = time.perf_counter()
        batch, stats = self.collect(step, stream)
        g = self.g
        if batch is None:                  # nothing finished or every group filtered: nothing to learn from
            return {"loss": 0.0, "skipped": True, "updates": 0, "lr": self.updater.lr_at(step), **stats}
        arrays = self.prepare(batch)
        tic = time.perf_counter()
        row = self.update(arrays, step)
        train_s = time.perf_counter() - tic
        ro, rw = batch.ro, batch.rewards
        std = group_reward_std(rw["total"], g.group_size)
        m = arrays["_mask"] > 0
        age = (step - batch.versions)[m] if m.any() else np.zeros(1)
        row.update(stats)
        row.update({"reward/total": float(np.mean(rw["total"])), "group_reward_std": float(std.mean()),
                    "groups": batch.groups, "response_length": float(ro.lengths.mean()),
                    "truncation_rate": float(np.mean(~batch.finished)), "train_s": train_s,
                    "staleness": float(age.mean()), "staleness_max": float(age.max())})
        if arrays["_current"] is not None:   # sampler vs training graph on the same weights (sync): ~1e-6
            row["rollout/logprob_gap"] = float(np.abs((ro.behaviour - arrays["_current"]) * arrays["_mask"]).sum()
                                               / max(arrays["_mask"].sum(), 1.0))
        for name, vals in rw["parts"].items():
            row[f"reward/{name}"] = float(np.mean(vals))
        self.last, self.last_arrays = batch, arrays
        row["step_s"] = time.perf_counter() - start
        return row

    # -- checkpointed rollout state (partial rollout)

    def save_pending(self, folder: str):
        """The paused batches (generation states, tokens so far) and the finished groups waiting to train."""
        from ms_llm.models.safetensors_io import write_safetensors
        from ms_llm.rollout.state_cache import StateCache
        from ms_llm.training.checkpoint import write_json_atomic
        cache = StateCache()
        arrays, paused = {}, []
        for fl in self.paused:
            cache.put(fl.key, fl.state)
            for name in ("tokens", "logps", "versions", "lengths"):
                arrays[f"{fl.key}.{name}"] = getattr(fl, name)
            paused.append({"key": fl.key, "rows": fl.rows, "started": fl.started, "generated": fl.generated,
                           "taken": sorted(fl.taken)})
        ready = []
        for j, x in enumerate(self.ready):
            for name in ("tokens", "logps", "versions", "lengths", "total"):
                arrays[f"ready{j}.{name}"] = x[name]
            arrays[f"ready{j}.finished"] = x["finished"].astype(np.int8)
            for name, v in x["parts"].items():
                arrays[f"ready{j}.part.{name}"] = v
            ready.append({"prompts": x["prompts"], "texts": x["texts"], "started": x["started"],
                          "parts": sorted(x["parts"])})
        queued = None
        if self.async_ and (self.queued is not None or (self.worker is not None and self.worker.pending)):
            if self.queued is None:
                tic = time.perf_counter()
                self.queued = self.worker.result()
                self.queued["wait_s"] = time.perf_counter() - tic
            for name in ("tokens", "logprobs", "lengths"):
                arrays[f"queued.{name}"] = np.asarray(self.queued[name])
            arrays["queued.finished"] = np.asarray(self.queued["finished"]).astype(np.int8)
            queued = {"request": self.request, "version": self.queued["version"],
                      "generate_s": self.queued.get("generate_s", 0.0)}
        cache.save(os.path.join(folder, "states"))
        write_safetensors(os.path.join(folder, "pending.safetensors"), arrays or {"empty": np.zeros(1, np.int8)})
        write_json_atomic(os.path.join(folder, "pending.json"), {"paused": paused, "ready": ready, "queued": queued})

    def load_pending(self, folder: str):
        import json
        from ms_llm.models.safetensors_io import read_safetensors
        from ms_llm.rollout.state_cache import StateCache
        with open(os.path.join(folder, "pending.json")) as f:
            meta = json.load(f)
        a = read_safetensors(os.path.join(folder, "pending.safetensors"))
        cache = StateCache.load(os.path.join(folder, "states"), self.policy)
        self.paused = []
        for p in meta["paused"]:
            fl = Paused(p["key"], p["rows"], p["started"], cache.pop(p["key"]), self.g.max_new_tokens)
            for name in ("tokens", "logps", "versions", "lengths"):
                setattr(fl, name, a[f"{p['key']}.{name}"])
            fl.generated, fl.taken = p["generated"], set(p["taken"])
            self.paused.append(fl)
        self.ready = []
        for j, r in enumerate(meta["ready"]):
            x = {name: a[f"ready{j}.{name}"] for name in ("tokens", "logps", "versions", "lengths", "total")}
            x.update(finished=a[f"ready{j}.finished"].astype(bool), prompts=r["prompts"], texts=r["texts"],
                     started=r["started"], parts={name: a[f"ready{j}.part.{name}"] for name in r["parts"]})
            self.ready.append(x)
        q = meta.get("queued")
        self.queued, self.request = None, None
        if q:
            self.request = q["request"]
            self.queued = {"tokens": a["queued.tokens"], "logprobs": a["queued.logprobs"],
                           "lengths": a["queued.lengths"], "finished": a["queued.finished"].astype(bool),
                           "version": q["version"], "generate_s": q["generate_s"], "wait_s": 0.0}


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
        reward_model = load_reward(g.reward_model, g.reward_sha256, tokenizer, "grpo.reward_model")
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

    objective = {"rewards": dict(g.rewards), "loss_agg": g.loss_agg, "ratio": g.ratio, "group_size": g.group_size,
                 "token_budget": g.partial_rollout.token_budget, "async_rollout": g.async_rollout.enabled}

    def check_resume(state: dict):
        if state.get("objective", objective) != objective:
            raise MsLlmError(f"the checkpoint was trained with {state['objective']}, this config asks for "
                             f"{objective}; resume with the same rewards and objective, or start a new run")
        stream.cursor = int(state["prompt_cursor"])

    write_policy = (lambda folder: save_adapter(policy, folder, cfg.model.init_from)) if g.lora.enabled else None
    read_policy = (lambda folder: load_adapter(policy, folder)) if g.lora.enabled else None
    # partial rollout: paused generations and finished groups not yet trained go into every checkpoint
    # and the asynchronous batch generated ahead
    pending = {"rollout_state": (loop.save_pending, loop.load_pending)} if loop.partial or loop.async_ else {}
    spec = StageSpec(updaters=[loop.updater], run_step=run_step, weights_writer=write_policy,
                     weights_reader=read_policy, evaluate=evaluate if eval_records else None, models=pending,
                     extra_state=lambda: {"prompt_cursor": stream.cursor, "objective": objective},
                     check_resume=check_resume, evaluate_at_start=True)
    try:
        result = train(cfg, policy, spec, run_dir, layout)
    except BaseException:
        loop.close(wait=False)             # do not wait for a generation nobody will use
        raise
    loop.close()
    if not layout.main:
        return {}
    trained = trained_model(cfg, run_dir, policy, g.lora.enabled)
    metrics = dict(result.metrics, prompts=len(prompts), prompts_cut=cut,
                   **{f"before/{k}": v for k, v in result.before.items()})
    if eval_records and "eval/accuracy" not in metrics:
        metrics.update(evaluate())
    final = export_final(run_dir, trained, tokenizer, g.export_version)
    gates = {}
    if eval_records and "eval/accuracy" in result.before:
        from ms_llm.eval.results import gate
        gates["accuracy_not_lower"] = gate(metrics["eval/accuracy"], result.before["eval/accuracy"], ">=")
    return finish(run_dir, cfg.stage, "completed", result.steps, metrics, final, gates, plots=cfg.log.plots)
