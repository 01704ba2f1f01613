# SPDX-License-Identifier: Apache-2.0
"""Where a GRPO-family step's completions come from: a `RolloutSource` hands the stage whole groups of G
completions per prompt, rewarded, as one `GroupBatch`.

    source = rollout_source(cfg, policy, rewards, decode, stream, pad, stops)
    batch, stats = source.collect(step)        # None when no group is ready (partial rollout, all filtered)

* `Synchronous`: G whole completions per prompt with the current policy; with dynamic sampling, further rounds
  of prompts until enough groups have reward variance (DAPO).
* `Partial`: at most `grpo.partial_rollout.token_budget` tokens per completion per step; unfinished batches
  wait (their generation state kept, and checkpointed) and continue under the next step's policy; a batch
  older than `max_staleness` steps is run out. Each token records the step (policy version) that sampled it.
* `Asynchronous`: a second process (rollout/async_worker.py) generates step t + 1's batch with θ_t while the
  trainer trains step t (one-step off-policy).

Every completion samples from its own generator, seeded by (train.seed, step, round, its row in the round's
batch), so a completion does not depend on where it is generated. The synchronous source splits each round's
prompts over the data-parallel ranks (`layout.share`): each rank generates and rewards its groups, and the ranks
exchange the finished groups (`gather_rows`), so every rank holds the round's groups in one order and takes the
same dynamic-sampling decisions. Partial and asynchronous rollouts generate the whole batch on every rank (their
paused batches and the batch generated ahead are one state, checkpointed once). All sources share one queue of
finished groups: groups without reward variance are dropped under dynamic sampling, and groups whose tokens are older
than the staleness bound (partial: max_staleness; asynchronous: 1) never reach the trainer. With partial or
asynchronous rollout, the sampler's per-token log-probs stand in for π_old (`behaviour_is_old`).
"""
import json
import logging
import os
import time

import numpy as np

from ms_llm.config import ExperimentConfig
from ms_llm.context import set_cpu_threads
from ms_llm.fileio import write_json_atomic
from ms_llm.errors import MsLlmError
from ms_llm.generation import gathering_cell, generate
from ms_llm.losses.grpo import overlong_penalty
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors
from ms_llm.rollout.async_worker import RolloutWorker, trainable_arrays
from ms_llm.rollout.batch import Rollout, gather_rows
from ms_llm.rollout.chunks import ChunkPlan
from ms_llm.rollout.prompts import PromptStream
from ms_llm.rollout.rollout_ranks import RankWorker
from ms_llm.rollout.state_cache import StateCache
from ms_llm.training.layout import Layout, rollout_ranks

log = logging.getLogger(__name__)
SEED_TAG = 7919                   # the rollout generators' seeds: [train.seed, SEED_TAG, step, round]
GROUP_ARRAYS = ("tokens", "logps", "versions", "lengths", "total", "trained")


class GroupBatch:
    """Whole groups as one batch of rows. `ro`: prompts, tokens, lengths, behaviour log-probs (the sampler's),
    response mask and scoring windows; `rewards`: {"total": [B], "parts": {function: [B]}, "texts": [B]};
    `finished` [B] (False: cut at max_new_tokens); `versions` [B, N] the step that sampled each token (-1: none);
    `group_ids` [B] the group of each row, 0 … groups − 1; `trained` [B, N] 1 on the tokens the policy sampled
    (an episode's tool results: 0), which alone the loss may weight."""

    def __init__(self, ro: Rollout, rewards: dict, finished: np.ndarray, versions: np.ndarray, groups: int,
                 trained: np.ndarray = None):
        self.ro, self.rewards, self.finished, self.versions, self.groups = ro, rewards, finished, versions, groups
        self.trained = ro.response_mask if trained is None else trained
        self.group_ids = np.repeat(np.arange(groups), len(finished) // max(groups, 1))


class Paused:
    """A generation batch between steps: its rows (G per prompt), what they produced so far — tokens, the
    sampler's log-probs and the step (policy version) of each token — and the generation state."""

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


class _Finished:
    """The part of a generation state `Paused.done` reads, for batches that come back whole (asynchronous)."""

    def __init__(self, finished):
        self.finished = np.asarray(finished, bool)


class RolloutSource:
    """The shared part: sampling settings, starting and continuing generation batches, rewarding finished
    groups, the queue of finished groups and its filters. Subclasses give `_generate(step) -> (groups, rounds)`.

    reward_fn(texts, records) -> {"total": [B], "parts": {name: [B]}}; decode(tokens, length) -> text.
    `settings`: the rollout settings (default cfg.grpo: group_size, prompts_per_step, max_prompt_len,
    max_new_tokens, sampling, dynamic_sampling, overlong, partial_rollout, async_rollout); another stage passes a
    section of the same shape (on-policy distillation: one sample per prompt).
    """
    behaviour_is_old = False       # π_old: the sampler's log-probs (True) or the policy recomputed on the batch
    max_staleness = None           # groups whose batch started more steps ago than this are dropped
    keeps_surplus = False          # finished groups beyond a step's prompts wait for the next step

    def __init__(self, cfg: ExperimentConfig, policy, reward_fn, decode, stream: PromptStream, pad: int = 0,
                 stops=(), settings=None, layout: Layout = None):
        self.cfg, self.g, self.seed = cfg, settings or cfg.grpo, cfg.train.seed
        self.layout = layout or Layout()
        self.policy, self.reward_fn, self.decode, self.stream = policy, reward_fn, decode, stream
        self.pad, self.stops = pad, list(stops)
        g = self.g
        self.plan = ChunkPlan(g.max_prompt_len, g.max_new_tokens, g.max_new_tokens, 0, exact=True)
        self.budget = g.max_new_tokens
        self.ready = []                # finished, rewarded groups not yet trained

    def sampling(self) -> dict:
        g = self.g
        return dict(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, eos_token_id=self.stops or -1,
                    pad_token_id=self.pad)

    def cache_len(self, rows: list) -> int:
        g = self.g
        return -(-(max(g.max_prompt_len, max(len(r["ids"]) for r in rows)) + g.max_new_tokens) // 64) * 64

    def start(self, step: int, rnd: int, prompts: list, run_out: bool, first: int = 0) -> Paused:
        """Begin G completions of each prompt: one budget of tokens, or (run_out) all of them. `first`: the row of
        the round's batch the first completion is (its generator's seed)."""
        g = self.g
        rows = [p for p in prompts for _ in range(g.group_size)]
        whole = self.budget >= g.max_new_tokens           # (continuous batching generates every row to its end)
        out = generate(self.policy, [r["ids"] for r in rows], min(self.budget, g.max_new_tokens),
                       cache_len=self.cache_len(rows), seed=[self.seed, SEED_TAG, step, rnd],
                       prompt_width=g.max_prompt_len, rows=range(first, first + len(rows)),
                       generation_batch_size=getattr(g, "generation_batch_size", 0) if whole else 0,
                       **self.sampling())
        state = out.state if out.state is not None else _Finished(out.finished)
        fl = Paused(f"s{step}r{rnd}", rows, step, state, g.max_new_tokens)
        fl.add(out, step)
        if run_out:
            self.advance(fl, step, run_out=True)
        return fl

    def advance(self, fl: Paused, step: int, run_out: bool = False):
        """Continue a paused batch under the current policy: one budget of tokens, or (run_out) to the end."""
        g = self.g
        while not fl.done(g.max_new_tokens).all():
            out = generate(self.policy, None, min(self.budget, g.max_new_tokens - fl.generated), state=fl.state,
                           **self.sampling())
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
                        "trained": (np.arange(n)[None] < fl.lengths[i][:, None]).astype(np.float32),
                        "versions": fl.versions[i], "lengths": fl.lengths[i], "finished": finished[rows],
                        "total": total[rows], "parts": {name: v[rows] for name, v in parts.items()},
                        "texts": texts[rows], "started": fl.started})
        return out

    def split_rounds(self, step: int, run_share) -> tuple:
        """(groups, rounds): rounds of grpo.prompts_per_step prompts (dynamic sampling: until enough groups have
        reward variance), each rank running its share of a round's prompts to finished groups with
        run_share(round, prompts, first row) and the ranks exchanging them, so every rank holds every group."""
        g = self.g
        self.rows_generated = 0
        max_rounds = g.dynamic_sampling.max_rounds if g.dynamic_sampling.enabled else 1
        fresh, kept, rounds = [], 0, 0
        while kept < g.prompts_per_step and rounds < max_rounds:
            prompts = self.stream.take(g.prompts_per_step)
            part = self.layout.share(len(prompts))        # this rank's groups of the round
            mine = run_share(rounds, prompts[part], part.start * g.group_size) \
                if part.stop > part.start else []       # more ranks than the round's prompts
            self.rows_generated += len(mine) * g.group_size
            got = gather_rows(self.layout, mine)         # every rank's groups, in prompt order
            fresh += got
            kept += sum(1 for x in got if not flat(x))
            rounds += 1
        return fresh, rounds

    def _generate(self, step: int) -> tuple:
        raise NotImplementedError

    def _stats(self) -> dict:
        return {}

    def collect(self, step: int) -> tuple:
        """(the step's GroupBatch or None, rollout stats)."""
        g = self.g
        cell = gathering_cell(self.policy)
        if cell is not None:      # each rank decodes its own rows, a different number of steps: no collectives
            raise MsLlmError(f"rollout: the policy's {cell} reads ZeRO-3 shards through gathers; collect rollouts "
                             "within layout.replicated(), where every rank reads whole copies")
        tic = time.perf_counter()
        fresh, rounds = self._generate(step)
        gen_s = time.perf_counter() - tic
        seen = len(fresh)
        if g.dynamic_sampling.enabled:
            fresh = [x for x in fresh if not flat(x)]
        dropped = seen - len(fresh)
        self.ready += fresh
        stale = 0
        if self.max_staleness is not None:            # never train tokens older than the staleness bound
            keep = [x for x in self.ready if step - x["started"] <= self.max_staleness]
            stale, self.ready = len(self.ready) - len(keep), keep
        take, self.ready = self.ready[:g.prompts_per_step], self.ready[g.prompts_per_step:]
        if not self.keeps_surplus:
            self.ready = []                            # one batch per step: surplus groups are not kept
        stats = {"groups_seen": seen, "groups_filtered": dropped / max(seen, 1), "generation_rounds": rounds,
                 "rollout_s": gen_s}
        if self.max_staleness is not None:
            stats["groups_stale_dropped"] = stale
        stats.update(self._stats())
        return self.merge(take), stats

    def merge(self, groups: list):
        """One GroupBatch of rows from whole groups (None for none)."""
        if not groups:
            return None
        cat = lambda key: np.concatenate([x[key] for x in groups])          # noqa: E731
        prompts = [p for x in groups for p in x["prompts"]]
        ro = Rollout(prompts, cat("tokens"), cat("lengths"), cat("logps"), self.plan, self.pad)
        rewards = {"total": cat("total"), "parts": {k: np.concatenate([x["parts"][k] for x in groups])
                                                   for k in groups[0]["parts"]},
                   "texts": [t for x in groups for t in x["texts"]]}
        return GroupBatch(ro, rewards, cat("finished"), cat("versions"), len(groups), cat("trained"))

    # -- checkpointed state: the finished groups waiting to train (and what subclasses add)

    def has_state(self) -> bool:
        """Does a checkpoint need `save`/`load` (state beyond the prompt cursor)?"""
        return False

    def save(self, folder: str):
        arrays, meta = {}, {}
        self._save(arrays, meta, folder)
        write_safetensors(os.path.join(folder, "pending.safetensors"), arrays or {"empty": np.zeros(1, np.int8)})
        write_json_atomic(os.path.join(folder, "pending.json"), meta)

    def load(self, folder: str):
        with open(os.path.join(folder, "pending.json")) as f:
            meta = json.load(f)
        self._load(read_safetensors(os.path.join(folder, "pending.safetensors")), meta, folder)

    def _save(self, arrays: dict, meta: dict, folder: str):
        meta["ready"] = []
        for j, x in enumerate(self.ready):
            for name in GROUP_ARRAYS:
                arrays[f"ready{j}.{name}"] = x[name]
            arrays[f"ready{j}.finished"] = x["finished"].astype(np.int8)
            for name, v in x["parts"].items():
                arrays[f"ready{j}.part.{name}"] = v
            meta["ready"].append({"prompts": x["prompts"], "texts": x["texts"], "started": x["started"],
                                  "parts": sorted(x["parts"])})

    def _load(self, a: dict, meta: dict, folder: str):
        self.ready = []
        for j, r in enumerate(meta["ready"]):
            x = {name: a[f"ready{j}.{name}"] for name in GROUP_ARRAYS if f"ready{j}.{name}" in a}
            if "trained" not in x:                   # (a checkpoint of an earlier release: every token sampled)
                x["trained"] = (np.arange(x["tokens"].shape[1])[None] < x["lengths"][:, None]).astype(np.float32)
            x.update(finished=a[f"ready{j}.finished"].astype(bool), prompts=r["prompts"], texts=r["texts"],
                     started=r["started"], parts={name: a[f"ready{j}.part.{name}"] for name in r["parts"]})
            self.ready.append(x)

    def close(self, wait: bool = True):
        """Release what the source runs beside the trainer (the asynchronous worker)."""


def flat(group: dict) -> bool:
    """All of a group's rewards equal: no advantage, no gradient."""
    return bool(np.all(group["total"] == group["total"][0]))


class Synchronous(RolloutSource):
    """Whole completions with the current policy; dynamic sampling draws further rounds of prompts. Each rank
    generates its share of each round's groups (module docstring)."""

    def _generate(self, step: int) -> tuple:
        return self.split_rounds(step, lambda rnd, prompts, first: self.harvest(
            self.start(step, rnd, prompts, True, first)))

    def _stats(self) -> dict:
        return {"rollout/rows": self.rows_generated}


class Partial(RolloutSource):
    """A token budget per step; unfinished batches wait and continue under the next policy (module docstring)."""
    behaviour_is_old = True
    keeps_surplus = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pr = self.g.partial_rollout
        self.budget, self.max_staleness = pr.token_budget, pr.max_staleness
        self.paused = []

    def _generate(self, step: int) -> tuple:
        g, limit = self.g, self.max_staleness
        for fl in self.paused:
            self.advance(fl, step, run_out=step - fl.started >= limit)
        self.paused.append(self.start(step, 0, self.stream.take(g.prompts_per_step), run_out=limit == 0))
        fresh = [x for fl in self.paused for x in self.harvest(fl)]
        self.paused = [fl for fl in self.paused if len(fl.taken) < len(fl.rows) // g.group_size]
        return fresh, 1

    def _stats(self) -> dict:
        G = self.g.group_size
        return {"groups_paused": sum(len(fl.rows) // G - len(fl.taken) for fl in self.paused),
                "groups_waiting": len(self.ready)}

    def has_state(self) -> bool:
        return True

    def _save(self, arrays: dict, meta: dict, folder: str):
        super()._save(arrays, meta, folder)
        cache = StateCache()
        meta["paused"] = []
        for fl in self.paused:
            cache.put(fl.key, fl.state)
            for name in ("tokens", "logps", "versions", "lengths"):
                arrays[f"{fl.key}.{name}"] = getattr(fl, name)
            meta["paused"].append({"key": fl.key, "rows": fl.rows, "started": fl.started, "generated": fl.generated,
                                   "taken": sorted(fl.taken)})
        cache.save(os.path.join(folder, "states"))

    def _load(self, a: dict, meta: dict, folder: str):
        super()._load(a, meta, folder)
        cache = StateCache.load(os.path.join(folder, "states"), self.policy)
        self.paused = []
        for p in meta["paused"]:
            fl = Paused(p["key"], p["rows"], p["started"], cache.pop(p["key"]), self.g.max_new_tokens)
            for name in ("tokens", "logps", "versions", "lengths"):
                setattr(fl, name, a[f"{p['key']}.{name}"])
            fl.generated, fl.taken = p["generated"], set(p["taken"])
            self.paused.append(fl)


def _pin_threads(cores):
    """CPU affinity of every thread of this process (kernel thread pools started earlier included); threads
    started later inherit it."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:                                # a thread that ended meanwhile
            pass


class Asynchronous(RolloutSource):
    """One-step off-policy: the worker process generates step t + 1's batch with θ_t while step t trains."""
    behaviour_is_old = True
    max_staleness = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.worker, self.request, self.queued = None, None, None     # in flight / received, not yet used
        self.times = {}

    def _start_worker(self):
        a = self.g.async_rollout
        if rollout_ranks(self.cfg):                     # rollout ranks of its own (rollout/rollout_ranks.py)
            self.worker = RankWorker(self.layout, self.sampling())
            return
        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        split = a.worker_cores and len(mine) > a.worker_cores
        self.worker = RolloutWorker(self.cfg, self.sampling(), a.worker_threads,
                                    mine[-a.worker_cores:] if split else None)
        if split:                                      # the two processes share the cores: each keeps its own
            _pin_threads(mine[:-a.worker_cores])
        if a.trainer_threads:
            if not set_cpu_threads(a.trainer_threads):      # MindSpore takes it once per process
                log.warning("grpo.async_rollout.trainer_threads not applied to MindSpore's own ops")

    def _submit(self, step: int, version: int):
        """Ask the worker for step `step`'s completions, generated with the current weights (those after `version`
        updates)."""
        g = self.g
        if self.worker is None:
            self._start_worker()
        rows = [p for p in self.stream.take(g.prompts_per_step) for _ in range(g.group_size)]
        path = self.worker.publish(lambda: trainable_arrays(self.policy), version)     # (read only if sent)
        self.worker.submit(version, path, [r["ids"] for r in rows], [self.seed, SEED_TAG, step, 0], g.max_new_tokens,
                           self.cache_len(rows), g.max_prompt_len)
        self.request = {"rows": rows, "step": step, "version": version}

    def _receive(self) -> tuple:
        """(the request, its batch): the one received at a checkpoint, else wait for the one in flight."""
        got, self.queued = self.queued, None
        if got is None:
            tic = time.perf_counter()
            got = self.worker.result()
            got["wait_s"] = got.get("wait_s", 0.0) + time.perf_counter() - tic
        return self.request, got

    def _generate(self, step: int) -> tuple:
        if self.queued is None and (self.worker is None or not self.worker.has_batch):
            self._submit(step, step)      # the first step: nothing was generated ahead
        req, got = self._receive()
        if step + 1 < self.cfg.train.max_steps:
            self._submit(step + 1, step)  # θ_step generates the next step's batch while this one trains
        fl = Paused(f"s{req['step']}", req["rows"], req["step"], _Finished(got["finished"]), self.g.max_new_tokens)
        n = got["tokens"].shape[1]
        fl.tokens[:, :n], fl.logps[:, :n] = got["tokens"], got["logprobs"]
        fl.versions[:, :n] = np.where(np.arange(n)[None] < got["lengths"][:, None], req["version"], -1)
        fl.lengths, fl.generated = np.asarray(got["lengths"], np.int64), self.g.max_new_tokens
        self.times = {"rollout_s": got.get("generate_s", 0.0), "rollout_wait_s": got.get("wait_s", 0.0)}
        return self.harvest(fl), 1

    def _stats(self) -> dict:                # generation ran in the other process; the trainer waited this long
        return dict(self.times)

    def has_state(self) -> bool:
        return True

    def _save(self, arrays: dict, meta: dict, folder: str):
        super()._save(arrays, meta, folder)
        meta["queued"] = None
        if self.queued is None and not (self.worker is not None and self.worker.has_batch):
            return
        # the batch generated ahead goes into the checkpoint; the worker keeps it for the next step (peek: only
        # rank 0 writes checkpoints, and the other trainer ranks take the batch from the worker at the next step)
        queued = self.queued if self.queued is not None else self.worker.peek()
        for name in ("tokens", "logprobs", "lengths"):
            arrays[f"queued.{name}"] = np.asarray(queued[name])
        arrays["queued.finished"] = np.asarray(queued["finished"]).astype(np.int8)
        meta["queued"] = {"request": self.request, "version": queued["version"],
                          "generate_s": queued.get("generate_s", 0.0)}

    def _load(self, a: dict, meta: dict, folder: str):
        super()._load(a, meta, folder)
        q = meta.get("queued")
        self.queued, self.request = None, None
        if q:
            self.request = q["request"]
            self.queued = {"tokens": a["queued.tokens"], "logprobs": a["queued.logprobs"],
                           "lengths": a["queued.lengths"], "finished": a["queued.finished"].astype(bool),
                           "version": q["version"], "generate_s": q["generate_s"], "wait_s": 0.0}

    def close(self, wait: bool = True):
        if self.worker is not None:
            self.worker.close(wait)
            self.worker = None


def rollout_source(cfg: ExperimentConfig, policy, reward_fn, decode, stream: PromptStream, pad: int = 0,
                   stops=(), settings=None, layout: Layout = None) -> RolloutSource:
    """The source the settings (default cfg.grpo) ask for: asynchronous, partial (a token budget) or synchronous."""
    g = settings or cfg.grpo
    kind = Asynchronous if g.async_rollout.enabled else Partial if g.partial_rollout.token_budget > 0 else Synchronous
    return kind(cfg, policy, reward_fn, decode, stream, pad, stops, settings, layout)
