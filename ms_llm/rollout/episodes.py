# SPDX-License-Identifier: Apache-2.0
"""Agentic rollouts: each completion of a group is a multi-turn episode (rollout/agent.py): model turns and the
tool calls they make, run in the sandbox, until an answer, grpo.agent.max_turns or the context budget.

    source = EpisodeSource(cfg, policy, rewards, decode, stream, pad, stops, tokenizer=tok, template="chatml",
                           tools=ToolSet.from_file(cfg.grpo.agent.tools))
    batch, stats = source.collect(step)

A group's rows are its episodes after the prompt, grpo.max_new_tokens tokens at most: the model's turns and the
tool results between them. `trained` marks the model's own tokens; the stage's loss mask is the response mask
times it, so tool results (and the template's turn markers around them) carry no loss weight while the policy
still reads them. Rewards score the episode's final answer (the last model turn's text outside calls).

With grpo.agent.turns_per_step = 0 every episode runs to its end within the step, and each data-parallel rank
runs its share of the step's groups (the ranks exchange the finished groups, as the synchronous source does).
With turns_per_step = k, each episode takes at most k model turns per step; unfinished batches wait, checkpointed
with the tokens so far, and continue under the next step's policy (partial rollout by turns): the sampler's
log-probs stand in for π_old, and a batch older than grpo.agent.max_staleness steps is run out. Episodes hold no
generation state between turns (each turn prefills its whole context), so a checkpoint holds only host lists and
a resumed run continues a paused episode exactly as an uninterrupted one would: turn t of row r samples from the
generator seeded by (train.seed, step the batch started, round, t) and r.
"""
from dataclasses import asdict

import numpy as np

from ms_llm.rollout.agent import Episode, advance_episodes, start_episodes
from ms_llm.rollout.batch import gather_rows
from ms_llm.rollout.sources import SEED_TAG, RolloutSource

EPISODE_STATS = ("turns", "calls", "malformed", "tool_errors", "finished")


class EpisodeBatch:
    """Episodes of G per prompt started at one step, and the groups already handed to the trainer."""

    def __init__(self, key: str, rows: list, started: int, rnd: int, first: int, episodes: list):
        self.key, self.rows, self.started, self.rnd, self.first = key, rows, started, rnd, first
        self.episodes, self.taken = episodes, set()


class EpisodeSource(RolloutSource):
    """Groups of G tool-using episodes per prompt (module docstring)."""
    keeps_surplus = True

    def __init__(self, *args, tokenizer=None, template: str = "chatml", tools=None, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.g.agent
        self.tokenizer, self.template, self.tools, self.a = tokenizer, template, tools, a
        self.behaviour_is_old = a.turns_per_step > 0
        self.max_staleness = a.max_staleness if a.turns_per_step > 0 else None
        self.keeps_surplus = a.turns_per_step > 0
        self.paused, self.done_stats = [], []

    def _advance(self, b: EpisodeBatch, step: int, turns: int):
        g, a = self.g, self.a
        todo = [i for i, ep in enumerate(b.episodes) if not ep.done]
        if not todo:
            return
        advance_episodes(self.policy, self.tokenizer, [b.episodes[i] for i in todo], [b.rows[i] for i in todo],
                         self.template, self.tools, turns, a.max_turns, a.turn_tokens,
                         max_total_tokens=g.max_prompt_len + g.max_new_tokens, max_response_tokens=g.max_new_tokens,
                         seed=[self.seed, SEED_TAG, b.started, b.rnd],
                         rows=[b.first + i for i in todo], version=step, temperature=g.temperature,
                         top_k=g.top_k, top_p=g.top_p)

    def _start(self, step: int, rnd: int, prompts: list, first: int) -> EpisodeBatch:
        rows = [p for p in prompts for _ in range(self.g.group_size)]
        return EpisodeBatch(f"s{step}r{rnd}", rows, step, rnd, first, start_episodes(self.tokenizer, rows,
                                                                                      self.template))

    def harvest(self, b: EpisodeBatch) -> list:
        """The groups of `b` whose every episode is done (not harvested before), rewarded, as group dicts."""
        G, n = self.g.group_size, self.g.max_new_tokens
        ks = [k for k in range(len(b.rows) // G) if k not in b.taken
              and all(ep.done for ep in b.episodes[k * G:(k + 1) * G])]
        if not ks:
            return []
        eps = [b.episodes[k * G + j] for k in ks for j in range(G)]
        records = [b.rows[k * G + j] for k in ks for j in range(G)]
        texts = [ep.answer for ep in eps]
        got = self.reward_fn(texts, records)
        total = np.asarray(got["total"], np.float64)
        parts = {k: np.asarray(v, np.float64) for k, v in got["parts"].items()}
        arrays = {"tokens": np.zeros((len(eps), n), np.int32), "logps": np.zeros((len(eps), n), np.float32),
                  "versions": np.full((len(eps), n), -1, np.int32), "trained": np.zeros((len(eps), n), np.float32)}
        for i, ep in enumerate(eps):
            m = len(ep.ids) - ep.prompt_len
            arrays["tokens"][i, :m] = ep.ids[ep.prompt_len:]
            arrays["logps"][i, :m], arrays["versions"][i, :m] = ep.logps, ep.versions
            arrays["trained"][i, :m] = ep.trained[ep.prompt_len:]
        lengths = np.array([len(ep.ids) - ep.prompt_len for ep in eps], np.int64)
        stats = {k: np.array([float(getattr(ep, k)) for ep in eps]) for k in EPISODE_STATS}
        stats["tool_tokens"] = lengths - arrays["trained"].sum(1)
        stats["reward"] = total                    # every finished episode's, before dynamic sampling filters
        self.done_stats.append(stats)
        out = []
        for j, k in enumerate(ks):
            b.taken.add(k)
            r = slice(j * G, (j + 1) * G)
            out.append({"prompts": records[r], **{name: v[r] for name, v in arrays.items()}, "lengths": lengths[r],
                        "finished": stats["finished"][r] > 0, "total": total[r],
                        "parts": {name: v[r] for name, v in parts.items()}, "texts": texts[r], "started": b.started})
        return out

    def _generate(self, step: int) -> tuple:
        g, a = self.g, self.a
        self.done_stats = []
        if a.turns_per_step == 0:
            return self._whole(step)
        for b in self.paused:                                # continue under this step's policy
            self._advance(b, step, a.max_turns if step - b.started >= a.max_staleness else a.turns_per_step)
        b = self._start(step, 0, self.stream.take(g.prompts_per_step), 0)
        self._advance(b, step, a.turns_per_step if a.max_staleness > 0 else a.max_turns)
        self.paused.append(b)
        fresh = [x for b in self.paused for x in self.harvest(b)]
        self.paused = [b for b in self.paused if len(b.taken) < len(b.rows) // g.group_size]
        return fresh, 1

    def _whole(self, step: int) -> tuple:
        """Whole episodes, each rank its share of each round's groups (the synchronous source's rounds)."""
        def run_share(rnd, prompts, first):
            b = self._start(step, rnd, prompts, first)
            self._advance(b, step, self.a.max_turns)
            return self.harvest(b)
        out = self.split_rounds(step, run_share)
        self.done_stats = gather_rows(self.layout, self.done_stats)
        return out

    def _stats(self) -> dict:
        """Per episode (of those finished this step, filtered or not): reward, turns, tool calls, malformed calls,
        tool errors, answered, tool-result tokens; episodes still paused."""
        out = {}
        if self.done_stats:
            cat = {k: np.concatenate([s[k] for s in self.done_stats]) for k in self.done_stats[0]}
            out = {f"agent/{k}": float(v.mean()) for k, v in cat.items()}
            out["agent/episodes"] = len(cat["turns"])
        if self.a.turns_per_step:
            out["agent/episodes_paused"] = sum(not ep.done for b in self.paused for ep in b.episodes)
            out["groups_waiting"] = len(self.ready)
        return out

    # -- checkpointed state: paused episode batches (host lists) beside the finished groups waiting

    def has_state(self) -> bool:
        return self.a.turns_per_step > 0

    def _save(self, arrays: dict, meta: dict, folder: str):
        super()._save(arrays, meta, folder)
        meta["episodes"] = [{"key": b.key, "rows": b.rows, "started": b.started, "rnd": b.rnd, "first": b.first,
                             "taken": sorted(b.taken), "episodes": [asdict(ep) for ep in b.episodes]}
                            for b in self.paused]

    def _load(self, a: dict, meta: dict, folder: str):
        super()._load(a, meta, folder)
        self.paused = []
        for p in meta["episodes"]:
            b = EpisodeBatch(p["key"], p["rows"], p["started"], p["rnd"], p["first"],
                             [Episode(**ep) for ep in p["episodes"]])
            b.taken = set(p["taken"])
            self.paused.append(b)
