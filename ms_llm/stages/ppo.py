# SPDX-License-Identifier: Apache-2.0
"""PPO-RLHF (seed 000 §1.2.5.4.2-4): the SFT policy against a reward model, with a frozen reference, a value
model, an adaptive KL penalty with an alarm, chunk-wise rollouts and an optional safety reward.

    ms-llm train configs/tiny/ppo.yaml                # from runs/tiny_sft_lora and runs/tiny_reward

Four models: the policy (model.init_from, full or LoRA), the reference (a frozen copy, or the LoRA policy with
its adapter disabled), the value model (from the reward model or the policy, unsquashed scalar head) and the
reward model (`load_reward_model`). One step:

  1. roll out: ppo.rollout_batch_size prompts, sampled `chunk_size` tokens at a time (rollout/chunks.py)
  2. score the rollout in chunk windows (or exactly): old-policy and reference log-probs, values; reward model
     and safety reward on the decoded text (R_total = R_rm + λ·R_safety)
  3. per-token rewards −β·KL plus the score at the last token, GAE, whitening (losses/policy.py)
  4. ppo_epochs passes of mini-batches: each one update of the policy (clipped surrogate, dual-clip, entropy)
     and one of the value model (clipped value loss), every update a token-mean over its mini-batch
  5. the KL controller adapts β; KL over ppo.kl.alarm raises an alarm and decays the policy lr

Each row of a step's rollout draws from a generator seeded by (train.seed, step, row), so a run killed anywhere
resumes from its last checkpoint (policy, value model, both optimizers, β and the lr factor) and continues as if
never stopped. Under data parallel each rank rolls out, rewards and scores its contiguous share of the prompts
(`rollout/rows` of them); the ranks then exchange those rows (tokens, log-probs, values, rewards: host arrays,
small beside the weights), so KL, advantages, whitening and the KL controller see the whole batch, the same on
every rank, and each rank trains its share of each mini-batch's windows; the updaters sum numerators and token
counts over ranks, so each update equals one process's. Metrics: docs/rl.md.
"""
import json
import logging
import os
import time

import numpy as np
from mindspore import Tensor

from ms_llm.config import ExperimentConfig
from ms_llm.data.chat import stop_token_ids
from ms_llm.errors import MsLlmError
from ms_llm.eval.results import gate
from ms_llm.generation import generate
from ms_llm.losses.policy import (PolicyLoss, TokenLogps, ValueLoss, explained_variance, gae, kl_estimate,
                                  token_rewards, whiten)
from ms_llm.models.build import build_model
from ms_llm.models.frozen import freeze, frozen_dtype, load_frozen
from ms_llm.models.io import resolve_model_dir
from ms_llm.models.reward import load_reward_model
from ms_llm.models.value import value_from_policy, value_from_reward
from ms_llm.peft.lora import LoRAConfig, apply_lora, hold_base
from ms_llm.rollout.audit import AuditSampler
from ms_llm.rollout.batch import Rollout, dump_rollout, gather_rows, score_windows, widen
from ms_llm.rollout.chunks import ChunkPlan, generate_chunked
from ms_llm.rollout.kl_control import KLController
from ms_llm.rollout.prompts import PromptStream, read_prompts
from ms_llm.rollout.reward_model import load_reward, same_tokenizer
from ms_llm.rollout.rewards import SafetyReward, SensitivePhrases
from ms_llm.stages.common import export_final, finish, load_tokenizer, prepare_run_dir, reference_section, trained_model
from ms_llm.training.layout import Layout
from ms_llm.training.metrics import read_metrics
from ms_llm.training.stage import Stage, adapter_io
from ms_llm.training.trainer import train
from ms_llm.training.updater import Updater

log = logging.getLogger(__name__)
POLICY_KEYS = ("ids", "attention_mask", "position_ids", "targets", "loss_mask", "old_logps", "advantages")
VALUE_KEYS = ("ids", "attention_mask", "position_ids", "loss_mask", "old_values", "returns")


def build_value(cfg: ExperimentConfig, policy):
    p = cfg.ppo
    if p.value_init == "reward":
        source = p.value_path or p.reward_model
        if not os.path.exists(source):
            raise MsLlmError(f"ppo.value_path: {source} does not exist")
        vm = value_from_reward(source)
    else:
        vm = value_from_policy(cfg.model.init_from)
    got, want = vm.backbone.config, policy.config
    if got.vocab_size != want.vocab_size:
        raise MsLlmError(f"ppo.value_init={p.value_init}: the value model has a vocabulary of {got.vocab_size}, the "
                         f"policy {want.vocab_size}; it must read the policy's tokens")
    return vm


def build_safety(cfg: ExperimentConfig, tokenizer):
    s = cfg.ppo.safety
    phrases = SensitivePhrases(s.word_list, s.saturation) if s.word_list else None
    classifier = None
    if s.classifier:
        classifier = load_reward_model(s.classifier, dtype=frozen_dtype(cfg.ppo.reward_dtype, "ppo.reward"))
        if not same_tokenizer(classifier.tokenizer, tokenizer):
            raise MsLlmError(f"ppo.safety.classifier: {s.classifier} has another tokenizer than the policy")
    if phrases is None and classifier is None:
        return None
    return SafetyReward(phrases, classifier, s.match_weight, s.classifier_weight)


class PPOStage(Stage):
    """One PPO step over a batch of prompts: roll out, score, advantages, updates, KL control (module docstring).

    reward_fn(prompts, tokens [B, N], lengths [B]) -> {"total": [B] sequence scores, "parts": {name: [B]} to log,
    "dense": [B, N] per-token rewards or None, "texts": decoded responses (for the audit)}. The stage passes the
    reward model (and safety reward); a verifiable task passes its own checker. `prompts` is a stream
    (rollout/prompts.py) of dicts with "ids" (and "tag", grouped in the metrics); step s rolls out its
    prompts s·B … (s+1)·B − 1. `evaluate` (optional): () -> {"eval/...": value}. `run_dir`: where decisions.jsonl,
    audit rounds and rollout dumps go (None: nowhere).
    """
    evaluate_at_start = True

    def __init__(self, cfg: ExperimentConfig, policy, reference, value, reward_fn, prompts, layout: Layout = None,
                 pad: int = 0, stops=(), run_dir: str = None, evaluate=None, objective: dict = None):
        super().__init__(cfg, policy, layout)
        p, t = cfg.ppo, cfg.train
        self.p, self.seed, self.mbs = p, t.seed, t.micro_batch_size
        self.policy, self.value, self.reward_fn, self.pad, self.stops = policy, value, reward_fn, pad, list(stops)
        self.prompts, self.run_dir, self._evaluate, self.evaluates = prompts, run_dir, evaluate, evaluate is not None
        self.plan = ChunkPlan(p.max_prompt_len, p.max_new_tokens, p.chunk_size, p.chunk_overlap, p.exact_scoring)
        windows = p.mini_batch_size * self.plan.n_windows              # a micro-batch is mbs scoring windows
        self.rank, world = self.layout.data_rank, self.layout.data_world
        if p.rollout_batch_size % p.mini_batch_size or windows % (self.mbs * world) or p.rollout_batch_size < world:
            raise MsLlmError(f"ppo.mini_batch_size {p.mini_batch_size} must divide ppo.rollout_batch_size "
                             f"{p.rollout_batch_size}, and its {windows} scoring windows must split into micro-batches "
                             f"of train.micro_batch_size {self.mbs} on each of {world} data-parallel ranks (each of "
                             f"which rolls out at least one prompt)")
        self.accum = accum = windows // (self.mbs * world)             # micro-batches per update on this rank
        norm = float(self.mbs * self.plan.chunk)
        self._updaters = [
            Updater("policy", cfg, PolicyLoss(policy, p.clip_low, p.clip_high, p.dual_clip, p.ent_coef,
                                              p.temperature), policy, self.layout, accum_steps=accum, loss_norm=norm),
            Updater("value", cfg, ValueLoss(value, p.value_clip, p.vf_coef), value, self.layout, lr=p.value_lr,
                    accum_steps=accum, loss_norm=norm)]
        self.policy_peak = self._updaters[0].peak_lr
        self.old_scorer, self.ref_scorer = TokenLogps(policy, p.temperature), TokenLogps(reference, p.temperature)
        self.kl = KLController(p.kl.controller, p.kl.init_coef, p.kl.target, p.kl.horizon, p.kl.alarm,
                               p.kl.lr_decay, p.kl.lr_floor)
        self.audit = AuditSampler(p.audit.share, t.seed) if p.audit.every and run_dir else None
        self.must_match = {"objective": objective} if objective else {}

    def updaters(self) -> list:
        return self._updaters

    def models(self) -> dict:
        return {"value": (self.value.save, self.value.load)}

    def weights_io(self):
        return adapter_io(self.policy, self.cfg.model.init_from) if self.p.lora.enabled else None

    def evaluate(self) -> dict:
        return self._evaluate()

    def state_dict(self) -> dict:
        return dict(super().state_dict(), kl_controller=self.kl.state(),
                    audit_pending=self.audit.state() if self.audit is not None else [])

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        self.kl.load_state(state["kl_controller"])
        if self.run_dir and self.layout.main:
            truncate_decisions(os.path.join(self.run_dir, "decisions.jsonl"), state["step"])
        if self.audit is not None:
            self.audit.load_state(state.get("audit_pending"))

    # -- one step

    def roll_out(self, step: int, prompts: list, first: int = 0) -> Rollout:
        """Responses to `prompts`, rows first, first + 1, … of the step's batch: each row samples from a generator
        seeded by (train.seed, step, row), so its response does not depend on which rank generates it."""
        p = self.p
        tic = time.perf_counter()
        out, _ = generate_chunked(self.policy, [x["ids"] for x in prompts], p.max_new_tokens, p.chunk_size,
                                  temperature=p.temperature, top_p=p.top_p, eos_token_id=self.stops or -1,
                                  pad_token_id=self.pad, seed=[self.seed, 7919, step], prompt_width=p.max_prompt_len,
                                  rows=range(first, first + len(prompts)), generation_batch_size=p.generation_batch_size)
        n = p.max_new_tokens
        ro = Rollout(prompts, widen(out.tokens, n, self.pad), out.lengths, widen(out.logprobs, n), self.plan,
                     self.pad)
        ro.generate_s = time.perf_counter() - tic
        return ro

    def score_rows(self, ro: Rollout) -> dict:
        """What this rank's rows need a model for: old-policy and reference log-probs and values [b, N] (in
        scoring windows), and the rewards; with the rows themselves, ready to gather over the ranks."""
        plan, w = self.plan, ro.windows
        keys = ("ids", "attention_mask", "position_ids", "targets")
        modes = [(m, m.training) for m in (self.policy, self.value)]
        for m, _ in modes:
            m.set_train(False)                        # the rollout's values and log-probs without dropout
        old = plan.to_response(score_windows(self.old_scorer, w, keys, self.mbs), w["index"])
        refl = plan.to_response(score_windows(self.ref_scorer, w, keys, self.mbs), w["index"])
        values = plan.to_response(score_windows(self.value, w, keys[:3], self.mbs), w["index"])
        for m, mode in modes:
            m.set_train(mode)
        got = self.reward_fn(ro.prompts, ro.tokens, ro.lengths)
        return {"tokens": ro.tokens, "lengths": ro.lengths, "behaviour": ro.behaviour, "old": old, "ref": refl,
                "values": values, "reward": got}

    def score(self, prompts: list, rows: dict) -> tuple:
        """(the whole batch's Rollout, its scores): from every row's `score_rows` the KL, token rewards, GAE and
        whitening over the whole batch, the same on every rank. Host arrays [B, N]."""
        p = self.p
        ro = Rollout(prompts, rows["tokens"], rows["lengths"], rows["behaviour"], self.plan, self.pad)
        old, refl, values, got = rows["old"], rows["ref"], rows["values"], rows["reward"]
        mask = ro.response_mask
        kl_tok = kl_estimate(old, refl, p.kl.estimator) * mask
        rewards = token_rewards(got["total"], kl_tok, mask, self.kl.beta)
        if got.get("dense") is not None:
            dense = np.zeros(mask.shape)
            given = np.asarray(got["dense"], np.float64)[:, :mask.shape[1]]
            dense[:, :given.shape[1]] = given
            rewards = rewards + dense * mask
        adv, ret = gae(rewards, values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = whiten(adv, mask)
        gap = np.abs((ro.behaviour - old) * mask).sum() / max(mask.sum(), 1)
        return ro, {"old": old, "ref": refl, "values": values, "kl_tokens": kl_tok, "rewards": rewards,
                    "advantages": adv, "returns": ret, "reward": got, "kl": float(kl_tok.sum(-1).mean()),
                    "explained_variance": explained_variance(values, ret, mask), "logprob_gap": float(gap)}

    def update(self, ro: Rollout, sc: dict, step: int) -> dict:
        p, plan, mbs, upd = self.p, self.plan, self.mbs, self._updaters
        index = ro.windows["index"]
        w = dict(ro.windows, old_logps=plan.to_windows(sc["old"], index),
                 advantages=plan.to_windows(sc["advantages"], index),
                 old_values=plan.to_windows(sc["values"], index), returns=plan.to_windows(sc["returns"], index))
        k = plan.n_windows
        rows = []
        upd[0].peak_lr = self.policy_peak * self.kl.lr_factor
        for epoch in range(p.ppo_epochs):
            perm = np.random.default_rng([self.seed, 104729, step, epoch]).permutation(len(ro.prompts))
            for m in range(0, len(perm), p.mini_batch_size):
                seqs = perm[m:m + p.mini_batch_size]
                sel = (seqs[:, None] * k + np.arange(k)[None]).reshape(-1)       # the sequences' windows
                mine = sel[self.rank * self.accum * mbs:(self.rank + 1) * self.accum * mbs]   # this rank's share
                micro = [{key: np.ascontiguousarray(v[mine[j:j + mbs]]) for key, v in w.items()}
                         for j in range(0, len(mine), mbs)]
                out_p = upd[0]([tuple(Tensor(mb[key]) for key in POLICY_KEYS) for mb in micro], step)
                out_v = upd[1]([tuple(Tensor(mb[key]) for key in VALUE_KEYS) for mb in micro], step)
                rows.append((out_p, out_v))
        agg = {"loss": float(np.mean([a["loss"] for a, _ in rows])),
               "value_loss": float(np.mean([b["loss"] for _, b in rows])),
               "lr": rows[-1][0]["lr"], "value_lr": rows[-1][1]["lr"],
               "grad_norm": float(np.mean([a["grad_norm"] for a, _ in rows])),
               "value_grad_norm": float(np.mean([b["grad_norm"] for _, b in rows])),
               "skipped": not all(a["finite"] and b["finite"] for a, b in rows), "updates": len(rows),
               "micro_batches_per_update": self.accum}
        for src, u in enumerate(upd):
            for name in u.stat_names:
                agg[name] = float(np.mean([r[src][name] for r in rows]))
        return agg

    def step(self, step: int, micro_index: int) -> tuple:
        """One PPO step on the stream's next ppo.rollout_batch_size prompts: (row, micro-batches consumed)."""
        b = self.p.rollout_batch_size
        self.prompts.cursor = step * b
        prompts = self.prompts.take(b)
        part = self.layout.share(b)                  # this rank generates, rewards and scores its rows only
        mine = self.roll_out(step, prompts[part], part.start)
        ro, sc = self.score(prompts, gather_rows(self.layout, self.score_rows(mine)))
        beta = self.kl.beta
        if self.run_dir and self.layout.main and self.cfg.log.rollouts_every \
                and (step + 1) % self.cfg.log.rollouts_every == 0:
            self._dump(step, ro, sc, beta)
        tic = time.perf_counter()
        row = self.update(ro, sc, step)
        train_s = time.perf_counter() - tic
        event = self.kl.update(sc["kl"], len(prompts))
        n_tokens = float(mine.lengths.sum())
        row.update({"kl": sc["kl"], "kl_run_mean": self.kl.run_mean, "kl_coef": beta,
                    "kl_alarm": float(event["alarm"]),
                    "policy_lr_factor": self.kl.lr_factor, "explained_variance": sc["explained_variance"],
                    "response_length": float(ro.lengths.mean()), "rollout/logprob_gap": sc["logprob_gap"],
                    "rollout/rows": len(mine.prompts), "rollout_tokens_per_s": n_tokens / max(mine.generate_s, 1e-9),
                    "train_tokens_per_s": float(ro.lengths.sum()) * self.p.ppo_epochs / max(train_s, 1e-9)})
        got = sc["reward"]
        row["reward/total"] = float(np.mean(got["total"]))
        if got.get("dense") is not None:
            row["reward/dense"] = float((np.asarray(got["dense"])[:, :ro.response_mask.shape[1]]
                                         * ro.response_mask).sum(-1).mean())
        for name, vals in got.get("parts", {}).items():
            row[f"reward/{name}"] = float(np.mean(vals))
        if "rm" in got.get("parts", {}):
            for tag in sorted({x.get("tag", "all") for x in prompts}):
                sel = [i for i, x in enumerate(prompts) if x.get("tag", "all") == tag]
                row[f"reward/rm/{tag}"] = float(np.mean(got["parts"]["rm"][sel]))
        if event["alarm"]:
            self._alarm(step, event)
        if self.audit is not None and self.layout.main:       # rank 0 keeps and writes the audit rounds
            self.audit.add(step, prompts, got["texts"], got["parts"], got["total"])
            if (step + 1) % self.p.audit.every == 0 and self.layout.main:
                self.audit.flush(self.run_dir, (step + 1) // self.p.audit.every)
        return row, b // self.mbs

    def _dump(self, step: int, ro: Rollout, sc: dict, beta: float):
        dense = sc["reward"].get("dense")
        arrays = {"tokens": ro.tokens, "lengths": ro.lengths, "response_mask": ro.response_mask,
                  "behaviour_logps": ro.behaviour, "old_logps": sc["old"], "ref_logps": sc["ref"],
                  "values": sc["values"], "score": np.asarray(sc["reward"]["total"], np.float64),
                  "kl": sc["kl_tokens"], "rewards": sc["rewards"], "advantages": sc["advantages"],
                  "returns": sc["returns"]}
        if dense is not None:
            arrays["dense"] = np.asarray(dense, np.float64)
        p = self.p
        dump_rollout(self.run_dir, step + 1, arrays, {"kl_coef": beta, "kl_estimator": p.kl.estimator,
                                                      "gamma": p.gamma, "lam": p.lam, "whiten": p.whiten_advantages})

    def _alarm(self, step: int, event: dict):
        log.warning("step %d: KL %.4g above %.4g; policy lr factor %.3g -> %.3g", step + 1, event["kl"],
                    event["threshold"], event["lr_factor_before"], event["lr_factor_after"])
        if self.run_dir and self.layout.main:
            with open(os.path.join(self.run_dir, "decisions.jsonl"), "a") as f:
                f.write(json.dumps({"step": step + 1, "decision": "policy lr decayed",
                                    "reason": f"KL {event['kl']:.4g} above the alarm threshold {event['threshold']}",
                                    **{k: v for k, v in event.items() if k.startswith("lr_")}}) + "\n")


def rm_reward(cfg: ExperimentConfig, reward_model, safety, tokenizer, stops):
    """The stage's reward_fn: R_rm (+ λ·R_safety) of the decoded responses."""
    lam = cfg.ppo.safety.weight

    def reward_fn(prompts, tokens, lengths):
        texts = [tokenizer.decode([x for x in tokens[i, :lengths[i]].tolist() if x not in stops])
                 for i in range(len(prompts))]
        msgs = [x["messages"] for x in prompts]
        rm = reward_model.score(msgs, texts).raw
        parts, total = {"rm": rm}, rm
        if safety is not None:
            s = safety(msgs, texts)
            parts.update(safety=s["safety"], sensitive_match=s["match"])
            if s["p_safe"] is not None:
                parts["p_safe"] = s["p_safe"]
            total = rm + lam * s["safety"]
        return {"total": total, "parts": parts, "dense": None, "texts": texts}
    return reward_fn


def run(cfg: ExperimentConfig, layout: Layout) -> dict:
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    p, t = cfg.ppo, cfg.train
    template = cfg.tokenizer.chat_template
    stops = stop_token_ids(template, tokenizer)
    pad = tokenizer.pad_id or 0
    sources = [(s.path, s.format) for s in cfg.data.sources]
    prompts, cut = read_prompts(sources, tokenizer, template, p.max_prompt_len, cfg.data.on_error)
    if not prompts:
        raise MsLlmError(f"data.sources {[s for s, _ in sources]}: no prompts to roll out")
    eval_prompts = []
    if p.eval_data:
        if not os.path.isfile(p.eval_data):
            raise MsLlmError(f"ppo.eval_data: {p.eval_data} does not exist")
        with open(p.eval_data, "rb") as f:
            fmt = "preference" if b'"chosen"' in f.readline() else "prompts"
        eval_prompts = read_prompts([(p.eval_data, fmt)], tokenizer, template, p.max_prompt_len)[0]
        eval_prompts = eval_prompts[:p.eval_limit] if p.eval_limit else eval_prompts
    reward_model = load_reward(cfg.ppo.reward_model, cfg.ppo.reward_sha256, tokenizer, "ppo.reward_model",
                               cfg.ppo.reward_dtype)
    safety = build_safety(cfg, tokenizer) if p.safety.weight > 0 else None
    policy = build_model(cfg)
    if p.lora.enabled:
        lo = p.lora
        apply_lora(policy, LoRAConfig(lo.r, lo.alpha, lo.dropout, list(lo.targets)))
        hold_base(policy, lo.base_dtype, "ppo.lora")
    section = reference_section(cfg, p)
    ref = load_frozen(section, "ppo.reference", policy, resolve_model_dir(cfg.model.init_from), tokenizer)
    if ref.tokenizer is not None and not same_tokenizer(ref.tokenizer, tokenizer):
        raise MsLlmError(f"ppo.reference: {ref.path} has another tokenizer than the policy")
    value = build_value(cfg, policy)
    freeze_reward(reward_model, safety)
    objective = {"reward_model": reward_model.source, "kl_estimator": p.kl.estimator, "value_init": p.value_init}
    stage = PPOStage(cfg, policy, ref.model, value, rm_reward(cfg, reward_model, safety, tokenizer, stops),
                     PromptStream(prompts, t.seed), layout, pad, stops, run_dir, objective=objective,
                     evaluate=(lambda: evaluate_policy(cfg, policy, tokenizer, reward_model, eval_prompts, stops))
                     if eval_prompts else None)
    result = train(cfg, stage, run_dir)
    if not layout.main:
        return {}
    trained = trained_model(cfg, run_dir, policy, p.lora.enabled)
    metrics = dict(result.metrics, prompts=len(prompts), prompts_cut=cut, kl_alarms=stage.kl.alarms,
                   kl_coef=stage.kl.beta, kl_run_mean=stage.kl.run_mean,
                   **{f"before/{k}": v for k, v in result.before.items()})
    if eval_prompts and "eval/reward" not in metrics:
        metrics.update(stage.evaluate())
    history = read_metrics(run_dir) or result.history       # every logged step, before a resume too
    fluct = [h["policy/ratio_fluctuation"] for h in history if "policy/ratio_fluctuation" in h]
    if fluct:
        metrics["policy/ratio_fluctuation_mean"] = float(np.mean(fluct))
    final = export_final(run_dir, trained, tokenizer, p.export_version)
    gates = {}
    if fluct:
        gates["ratio_fluctuation"] = gate(metrics["policy/ratio_fluctuation_mean"], p.fluctuation_gate, "<")
    if p.kl.alarm is not None and stage.kl.steps:     # the mean over every step, not only the logged ones
        gates["kl"] = gate(stage.kl.run_mean, p.kl.alarm, "<=")
    return finish(run_dir, cfg.stage, "completed", result.steps, metrics, final, gates, plots=cfg.log.plots)


def truncate_decisions(path: str, step: int):
    """Drop decisions logged after `step` (a resumed run makes them again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def freeze_reward(reward_model, safety):
    freeze(reward_model.rm)
    if safety is not None and safety.classifier is not None:
        freeze(safety.classifier.rm)


def evaluate_policy(cfg: ExperimentConfig, policy, tokenizer, reward_model, prompts: list, stops) -> dict:
    """Answers to held-out prompts sampled as the rollouts are (temperature, top_p; a fixed seed, so every
    evaluation reads the same random draws): mean reward-model score, overall and per tag, and with a word list
    the share of unsafe answers (any sensitive phrase) on the `safety.unsafe_tag` prompts."""
    p = cfg.ppo
    texts = []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i:i + 16]
        out = generate(policy, [x["ids"] for x in chunk], p.eval_max_new_tokens, temperature=p.temperature,
                       top_p=p.top_p, eos_token_id=stops, pad_token_id=tokenizer.pad_id or 0, seed=[cfg.train.seed, i],
                       prompt_width=p.max_prompt_len)
        texts += [tokenizer.decode([x for x in out.tokens[j, :out.lengths[j]].tolist() if x not in stops])
                  for j in range(len(chunk))]
    scores = reward_model.score([x["messages"] for x in prompts], texts).raw
    res = {"eval/reward": float(np.mean(scores))}
    for tag in sorted({x["tag"] for x in prompts}):
        res[f"eval/reward/{tag}"] = float(np.mean([s for s, x in zip(scores, prompts) if x["tag"] == tag]))
    if p.safety.word_list:
        phrases = SensitivePhrases(p.safety.word_list, p.safety.saturation)
        sel = [i for i, x in enumerate(prompts) if x["tag"] == p.safety.unsafe_tag]
        if sel:
            res["eval/unsafe_rate"] = float(np.mean([phrases.matches(texts[i]) > 0 for i in sel]))
    return res
