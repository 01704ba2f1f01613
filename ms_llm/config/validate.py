# SPDX-License-Identifier: Apache-2.0
"""Cross-field config rules. What each stage supports (layouts, the shard index, μP) and its own checks come
from one table, `STAGE_RULES`; single-field types and ranges are checked earlier, when the YAML is read.

Every failure is an MsLlmError naming the file and the keys involved.
"""
import re
from dataclasses import dataclass
from typing import Callable, Optional

from ms_llm.config.registry import STAGE_NAMES
from ms_llm.config.schema import GRPO_REWARDS, PACKING_STAGES, REFERENCE_FREE_DPO_LOSSES, TEXT_RULES, ExperimentConfig
from ms_llm.errors import MsLlmError


def _check_cpt(cfg: ExperimentConfig, where: str):
    c = cfg.cpt
    if not c.phases:
        raise MsLlmError(f"{where}: cpt.phases is empty; give at least one {{name, weights}} phase")
    ends = [ph.until_tokens for ph in c.phases[:-1]]
    if any(e is None for e in ends) or ends != sorted(ends):
        raise MsLlmError(f"{where}: cpt.phases[*].until_tokens must be set and increasing for every phase but the last")
    for i, ph in enumerate(c.phases):
        if not ph.weights or any(w < 0 for w in ph.weights.values()) or sum(ph.weights.values()) <= 0:
            raise MsLlmError(f"{where}: cpt.phases[{i}].weights needs non-negative weights with a positive sum")
    if (c.monitor.sets or c.monitor.choice_sets) and not cfg.train.eval_every:
        raise MsLlmError(f"{where}: cpt.monitor.sets / choice_sets need train.eval_every (the monitor runs at "
                         "evaluations)")
    if cfg.parallel.pipeline_stages > 1 and (c.monitor.sets or c.monitor.choice_sets):
        raise MsLlmError(f"{where}: cpt.monitor evaluates the whole model on one rank and does not run under "
                         "parallel.pipeline_stages in this release; use data_parallel/tensor_parallel, or drop "
                         "cpt.monitor.sets and cpt.monitor.choice_sets")


def _check_distill(cfg: ExperimentConfig, where: str):
    d = cfg.distill
    if not d.teacher.path:
        raise MsLlmError(f"{where}: distill.teacher.path is required for stage: distill")
    if d.mode == "cached" and not d.cache_dir:
        raise MsLlmError(f"{where}: distill.mode: cached needs distill.cache_dir (write it with "
                         "`ms-llm distill cache-teacher CONFIG`)")
    if d.mode == "on_policy":
        op = d.on_policy
        if not op.prompts:
            raise MsLlmError(f"{where}: distill.mode: on_policy needs distill.on_policy.prompts (what the student "
                             "answers)")
        if op.max_prompt_len + op.max_new_tokens > cfg.data.seq_len + 1:
            raise MsLlmError(f"{where}: distill.on_policy.max_prompt_len {op.max_prompt_len} + max_new_tokens "
                             f"{op.max_new_tokens} do not fit data.seq_len {cfg.data.seq_len} (+1)")
        if op.async_rollout and op.student_share < 1:
            raise MsLlmError(f"{where}: distill.on_policy.async_rollout needs student_share 1 (every step samples, "
                             f"so the next step's answers can be generated ahead); it is {op.student_share}")
        if d.iterative.every or d.generate.prompts:
            raise MsLlmError(f"{where}: distill.mode: on_policy does not combine with distill.iterative or "
                             "distill.generate (the student generates its own data)")
    if d.mode == "on_policy" and d.on_policy.async_rollout and cfg.parallel.optimizer_shard == "zero3":
        raise MsLlmError(f"{where}: distill.on_policy.async_rollout does not combine with parallel.optimizer_shard: "
                         "zero3 (the rollout process is sent the student's weights, which ZeRO-3 holds in shards); "
                         "sample synchronously (async_rollout: false) or use zero1")
    if d.mode == "cached" and d.iterative.every:
        raise MsLlmError(f"{where}: distill.iterative needs distill.mode: online (hard examples added during "
                         "training have no cached teacher logits)")
    if d.alpha + d.beta <= 0:
        raise MsLlmError(f"{where}: distill.alpha and distill.beta must not both be 0")
    if d.iterative.every and (not cfg.train.eval_every or d.iterative.every % cfg.train.eval_every):
        raise MsLlmError(f"{where}: distill.iterative.every ({d.iterative.every}) must be a multiple of "
                         f"train.eval_every ({cfg.train.eval_every}): hard-example rounds run at evaluations")
    if d.teacher.policy_without_adapter:
        raise MsLlmError(f"{where}: distill.teacher.policy_without_adapter is for RLHF references; the teacher is "
                         "a model of its own (distill.teacher.path)")
    unknown = [r for r in d.generate.rules if r not in TEXT_RULES]
    if unknown:
        raise MsLlmError(f"{where}: distill.generate.rules names unknown rules {unknown}; "
                         f"known: {sorted(TEXT_RULES)}")


def _check_sft(cfg: ExperimentConfig, where: str):
    t = cfg.train
    for i, ph in enumerate(cfg.sft.phases):
        mbs = ph.micro_batch_size or t.micro_batch_size
        acc = ph.grad_accum_steps or t.grad_accum_steps
        if ph.global_batch_size is not None and ph.global_batch_size != mbs * acc * cfg.parallel.data_parallel:
            raise MsLlmError(f"{where}: sft.phases[{i}].global_batch_size ({ph.global_batch_size}) must equal "
                             f"micro_batch_size ({mbs}) x grad_accum_steps ({acc}) x data_parallel "
                             f"({cfg.parallel.data_parallel})")
    if cfg.mup.enabled and cfg.sft.lora.enabled:
        raise MsLlmError(f"{where}: mup.enabled with sft.lora: LoRA adapters have no μP rule here; disable one")


def _check_reward(cfg: ExperimentConfig, where: str):
    bad = [s.path for s in cfg.data.sources if s.format != "preference"]
    if bad:
        raise MsLlmError(f"{where}: stage reward reads preference pairs; data.sources {bad} have another format")
    shares = cfg.reward.tag_shares
    if any(not isinstance(v, (int, float)) or v < 0 for v in shares.values()) or sum(shares.values()) > 1:
        raise MsLlmError(f"{where}: reward.tag_shares needs non-negative shares adding up to at most 1, got {shares}")


def _check_ppo(cfg: ExperimentConfig, where: str):
    p, t = cfg.ppo, cfg.train
    if p.generation_batch_size and p.chunk_size < p.max_new_tokens:
        raise MsLlmError(f"{where}: ppo.generation_batch_size (continuous batching) generates every response to its "
                         f"end in one call, but ppo.chunk_size {p.chunk_size} < max_new_tokens {p.max_new_tokens} "
                         "pauses every row between chunks: set one of them so they agree")
    bad = [s.path for s in cfg.data.sources if s.format not in ("prompts", "preference")]
    if bad:
        raise MsLlmError(f"{where}: stage ppo reads prompts (format prompts or preference); data.sources {bad} "
                         "have another format")
    if not cfg.model.init_from:
        raise MsLlmError(f"{where}: stage ppo starts from a trained model: set model.init_from (the SFT final/)")
    if not p.reward_model:
        raise MsLlmError(f"{where}: stage ppo needs ppo.reward_model (an exported reward run)")
    windows = 1 if p.exact_scoring else -(-p.max_new_tokens // min(p.chunk_size, p.max_new_tokens))
    world = cfg.parallel.data_parallel
    if p.rollout_batch_size % p.mini_batch_size or (p.mini_batch_size * windows) % (t.micro_batch_size * world):
        raise MsLlmError(f"{where}: ppo.mini_batch_size {p.mini_batch_size} must divide ppo.rollout_batch_size "
                         f"{p.rollout_batch_size}, and its {p.mini_batch_size * windows} scoring windows ({windows} "
                         f"per response) must split into micro-batches of train.micro_batch_size {t.micro_batch_size} "
                         f"on each of {world} data-parallel ranks")
    if t.grad_accum_steps != 1:
        raise MsLlmError(f"{where}: stage ppo accumulates ppo.mini_batch_size / train.micro_batch_size "
                         "micro-batches per update; leave train.grad_accum_steps at 1")
    if p.dual_clip and p.dual_clip <= 1:
        raise MsLlmError(f"{where}: ppo.dual_clip must be > 1 (or 0 to disable), got {p.dual_clip}")
    if p.reference.policy_without_adapter and not p.lora.enabled:
        raise MsLlmError(f"{where}: ppo.reference.policy_without_adapter needs ppo.lora.enabled")
    if p.lora.enabled and p.lora.dropout > 0:
        raise MsLlmError(f"{where}: ppo.lora.dropout must be 0: the rollout's log-probs are scored without dropout, "
                         "so dropout in the update would make the ratio noise (set ppo.lora.dropout: 0)")
    if p.safety.weight > 0 and not (p.safety.word_list or p.safety.classifier):
        raise MsLlmError(f"{where}: ppo.safety.weight > 0 needs ppo.safety.word_list or ppo.safety.classifier")


def _check_dpo(cfg: ExperimentConfig, where: str):
    d = cfg.dpo
    allowed = ("unpaired", "preference") if d.loss == "kto" else ("preference",)
    bad = [s.path for s in cfg.data.sources if s.format not in allowed]
    if bad:
        raise MsLlmError(f"{where}: dpo.loss {d.loss} reads {' or '.join(allowed)} records; data.sources {bad} "
                         "have another format")
    if not cfg.model.init_from:
        raise MsLlmError(f"{where}: stage dpo starts from a trained model: set model.init_from (the SFT final/)")
    ref = d.reference
    if d.loss in REFERENCE_FREE_DPO_LOSSES and (ref.path or ref.policy_without_adapter):
        raise MsLlmError(f"{where}: dpo.loss {d.loss} is reference-free; remove dpo.reference")
    if ref.path and ref.policy_without_adapter:
        raise MsLlmError(f"{where}: set dpo.reference.path or dpo.reference.policy_without_adapter, not both")
    if ref.policy_without_adapter and not d.lora.enabled:
        raise MsLlmError(f"{where}: dpo.reference.policy_without_adapter needs dpo.lora.enabled")
    if d.loss == "kto" and d.reference_mode == "cached":
        raise MsLlmError(f"{where}: dpo.loss kto scores mismatched pairs that change with every batch; use "
                         "dpo.reference_mode: online")
    if d.winrate.judge and not (d.winrate.prompts or d.eval_data):
        raise MsLlmError(f"{where}: dpo.winrate.judge needs prompts: set dpo.winrate.prompts or dpo.eval_data")
    if d.gate_accuracy is not None and not d.eval_data:
        raise MsLlmError(f"{where}: dpo.gate_accuracy needs dpo.eval_data")


def _check_grpo(cfg: ExperimentConfig, where: str):
    g, t = cfg.grpo, cfg.train
    bad = [s.path for s in cfg.data.sources if s.format != "prompts"]
    if bad:
        raise MsLlmError(f"{where}: stage grpo reads prompts with answers (format prompts); data.sources {bad} have "
                         "another format")
    if not cfg.model.init_from:
        raise MsLlmError(f"{where}: stage grpo starts from a trained model: set model.init_from (the SFT final/)")
    unknown = sorted(set(g.rewards) - set(GRPO_REWARDS))
    if unknown or not g.rewards:
        raise MsLlmError(f"{where}: grpo.rewards {unknown or '{}'}: name one or more of {list(GRPO_REWARDS)} "
                         "with a weight")
    if any(not isinstance(w, (int, float)) for w in g.rewards.values()):
        raise MsLlmError(f"{where}: grpo.rewards: every weight must be a number")
    if "reward_model" in g.rewards and not g.reward_model:
        raise MsLlmError(f"{where}: grpo.rewards names reward_model: set grpo.reward_model")
    rows = g.prompts_per_step * g.group_size
    mini = g.mini_batch_size or rows
    world = cfg.parallel.data_parallel
    if rows % mini or mini % (t.micro_batch_size * world):
        raise MsLlmError(f"{where}: grpo.mini_batch_size {mini} must divide the step's {rows} completions "
                         f"(prompts_per_step x group_size) and split into micro-batches of train.micro_batch_size "
                         f"{t.micro_batch_size} on each of {world} data-parallel ranks")
    if t.grad_accum_steps != 1:
        raise MsLlmError(f"{where}: stage grpo accumulates grpo.mini_batch_size / train.micro_batch_size "
                         "micro-batches per update; leave train.grad_accum_steps at 1")
    if g.dual_clip and g.dual_clip <= 1:
        raise MsLlmError(f"{where}: grpo.dual_clip must be > 1 (or 0 to disable), got {g.dual_clip}")
    if g.reference.policy_without_adapter and not g.lora.enabled:
        raise MsLlmError(f"{where}: grpo.reference.policy_without_adapter needs grpo.lora.enabled")
    if (g.reference.path or g.reference.policy_without_adapter) and g.beta == 0:
        raise MsLlmError(f"{where}: grpo.reference is set but grpo.beta is 0, so no reference is used; set grpo.beta "
                         "> 0 or remove grpo.reference")
    if g.lora.enabled and g.lora.dropout > 0:
        raise MsLlmError(f"{where}: grpo.lora.dropout must be 0: old-policy log-probs are scored without dropout")
    if g.generation_batch_size and (g.partial_rollout.token_budget or g.async_rollout.enabled):
        raise MsLlmError(f"{where}: grpo.generation_batch_size (continuous batching) generates every row to its end "
                         "in one call; partial and asynchronous rollouts keep paused or whole batches: set "
                         "grpo.generation_batch_size: 0 or turn them off")
    if g.partial_rollout.token_budget and g.dynamic_sampling.enabled and g.dynamic_sampling.max_rounds > 1:
        raise MsLlmError(f"{where}: grpo.partial_rollout starts one batch per step; set grpo.dynamic_sampling."
                         "max_rounds: 1 (groups without reward variance are still dropped)")
    if g.async_rollout.rollout_ranks and not g.async_rollout.enabled:
        raise MsLlmError(f"{where}: grpo.async_rollout.rollout_ranks needs grpo.async_rollout.enabled: true")
    if g.async_rollout.enabled:
        if g.partial_rollout.token_budget:
            raise MsLlmError(f"{where}: grpo.async_rollout and grpo.partial_rollout do not combine in this release; "
                             "choose one")
        if g.dynamic_sampling.enabled and g.dynamic_sampling.max_rounds > 1:
            raise MsLlmError(f"{where}: grpo.async_rollout generates one batch per step; set grpo.dynamic_sampling."
                             "max_rounds: 1 (groups without reward variance are still dropped)")
        if g.async_rollout.rollout_ranks:
            par = cfg.parallel
            if par.optimizer_shard != "none" or par.tensor_parallel > 1 or par.pipeline_stages > 1:
                raise MsLlmError(f"{where}: grpo.async_rollout.rollout_ranks: the trainer ranks train in plain data "
                                 "parallel in this release (the optimizer's shards are summed over every rank of the "
                                 "job, rollout ranks included); set parallel.optimizer_shard: none and "
                                 "tensor_parallel / pipeline_stages to 1")
        else:
            if world > 1:
                raise MsLlmError(f"{where}: grpo.async_rollout with a rollout process beside one trainer runs in one "
                                 "process; for several trainer ranks give the rollout ranks of its own "
                                 "(grpo.async_rollout.rollout_ranks) or set parallel.data_parallel: 1")
            if cfg.context.device_target != "cpu":
                raise MsLlmError(f"{where}: grpo.async_rollout's rollout process runs on CPU cores (on an NPU both "
                                 "processes would hold the model on one device); on NPUs give it ranks of its own "
                                 "(grpo.async_rollout.rollout_ranks) or use context.device_target: cpu")
    if g.overlong.buffer >= g.max_new_tokens:
        raise MsLlmError(f"{where}: grpo.overlong.buffer {g.overlong.buffer} must be below grpo.max_new_tokens "
                         f"{g.max_new_tokens}")
    if g.agent.tools:
        _check_agent(cfg, where)


def _check_agent(cfg: ExperimentConfig, where: str):
    """Episodes (grpo.agent) run their own turn loop: what the completion-level rollout options would change."""
    g = cfg.grpo
    a = g.agent
    clash = [name for name, on in (("grpo.partial_rollout.token_budget (use grpo.agent.turns_per_step)",
                                    g.partial_rollout.token_budget), ("grpo.async_rollout", g.async_rollout.enabled),
                                   ("grpo.generation_batch_size", g.generation_batch_size),
                                   ("grpo.overlong.buffer", g.overlong.buffer)) if on]
    if clash:
        raise MsLlmError(f"{where}: grpo.agent does not combine with {', '.join(clash)} in this release")
    if a.turn_tokens > g.max_new_tokens:
        raise MsLlmError(f"{where}: grpo.agent.turn_tokens {a.turn_tokens} must fit grpo.max_new_tokens "
                         f"{g.max_new_tokens}, the episode's budget after the prompt")
    if a.turns_per_step and cfg.parallel.data_parallel > 1:
        raise MsLlmError(f"{where}: grpo.agent.turns_per_step keeps the paused episodes on every rank, and each rank "
                         "would run their tools itself: a tool that times out on one rank only would make the ranks "
                         "train on different episodes. Under data parallel set grpo.agent.turns_per_step: 0 (each "
                         "rank runs its share of whole episodes)")
    if a.turns_per_step and g.dynamic_sampling.enabled and g.dynamic_sampling.max_rounds > 1:
        raise MsLlmError(f"{where}: grpo.agent.turns_per_step starts one batch per step; set grpo.dynamic_sampling."
                         "max_rounds: 1 (groups without reward variance are still dropped)")


@dataclass(frozen=True)
class StageRules:
    layouts: frozenset = frozenset()          # beyond data parallel and ZeRO-1: tensor_parallel, pipeline_stages, zero3
    reads_index: bool = False                 # data.index (tokenized shards) instead of / besides data.sources
    mup: bool = True                          # μP training of the whole model
    check: Optional[Callable] = None          # the stage's own rules: (cfg, where) -> None or MsLlmError


STAGE_RULES = {
    "pretrain": StageRules(frozenset({"tensor_parallel", "pipeline_stages", "zero3"}), reads_index=True),
    "cpt": StageRules(frozenset({"tensor_parallel", "pipeline_stages", "zero3"}), reads_index=True, check=_check_cpt),
    "distill": StageRules(frozenset({"zero3"}), check=_check_distill),
    "sft": StageRules(frozenset({"zero3"}), check=_check_sft),
    "reward": StageRules(frozenset({"zero3"}), mup=False, check=_check_reward),
    "dpo": StageRules(frozenset({"zero3"}), mup=False, check=_check_dpo),
    "ppo": StageRules(mup=False, check=_check_ppo),
    "grpo": StageRules(frozenset({"zero3"}), mup=False, check=_check_grpo),
}
if set(STAGE_RULES) != set(STAGE_NAMES):          # every stage of the registry has its rules, and no other
    raise RuntimeError(f"STAGE_RULES {sorted(STAGE_RULES)} != the stage registry {sorted(STAGE_NAMES)}")


def _check_context(ctx, where: str):
    """The memory and compile settings handed to MindSpore (applied by context.apply_runtime_settings)."""
    if not re.fullmatch(r"\d+(\.\d+)?GB", ctx.max_device_memory) or float(ctx.max_device_memory[:-2]) <= 0:
        raise MsLlmError(f"{where}: context.max_device_memory '{ctx.max_device_memory}' must be a positive size "
                         "in GB, e.g. '58GB'")
    if ctx.jit_level == "O2" and ctx.device_target != "ascend":
        raise MsLlmError(f"{where}: context.jit_level O2 (whole-graph sinking) runs on Ascend only; use O0 or O1 "
                         f"on {ctx.device_target}")
    if ctx.lazy_inline == "always" and ctx.device_target != "ascend":
        raise MsLlmError(f"{where}: context.lazy_inline always: MindSpore 2.7's CPU backend cannot compile a "
                         "lazy-inlined decoder layer inside the train step (its segment runner rejects the layer's "
                         "sub-graph call); use auto (Ascend only) or never")


def _check_model_split(cfg: ExperimentConfig, where: str, key: str, size: int):
    """A preset model (init_from models are checked when loaded) must split into `size` parts for `key`."""
    if not cfg.model.preset or cfg.model.init_from:
        return
    # models load MindSpore; only a preset split across ranks needs its shapes
    from ms_llm.models.config import preset
    if key == "parallel.tensor_parallel":
        # models load MindSpore; only a preset split across ranks needs its shapes
        from ms_llm.models.tensor_parallel import check_config
    else:
        # models load MindSpore; only a preset split across ranks needs its shapes
        from ms_llm.models.pipeline import check_config
    try:
        shape = preset(cfg.model.preset, **cfg.model.overrides)
    except TypeError:
        return                                        # reported with the model section when built
    try:
        check_config(shape, size)
    except MsLlmError as e:
        raise MsLlmError(f"{where}: {e}") from None


def _check_layout(cfg: ExperimentConfig, rules: StageRules, where: str):
    par = cfg.parallel
    for key, size in (("pipeline_stages", par.pipeline_stages), ("tensor_parallel", par.tensor_parallel)):
        if size > 1 and key not in rules.layouts:
            which = " and ".join(s for s, r in STAGE_RULES.items() if key in r.layouts)
            raise MsLlmError(f"{where}: parallel.{key} is supported by the {which} stages, not by stage "
                             f"'{cfg.stage}' in this release")
    if par.pipeline_stages > 1:
        for key, on in (("parallel.tensor_parallel", par.tensor_parallel > 1),
                        ("parallel.optimizer_shard", par.optimizer_shard != "none")):
            if on:
                raise MsLlmError(f"{where}: {key} together with parallel.pipeline_stages is not supported in this "
                                 "release; choose one")
        _check_model_split(cfg, where, "parallel.pipeline_stages", par.pipeline_stages)
    if par.tensor_parallel > 1:
        if par.optimizer_shard != "none":
            raise MsLlmError(f"{where}: parallel.optimizer_shard together with tensor_parallel is not supported in "
                             "this release; choose one")
        _check_model_split(cfg, where, "parallel.tensor_parallel", par.tensor_parallel)
    if par.optimizer_shard == "zero3" and "zero3" not in rules.layouts:
        which = ", ".join(s for s, r in STAGE_RULES.items() if "zero3" in r.layouts)
        raise MsLlmError(f"{where}: parallel.optimizer_shard: zero3 is supported by the {which} stages, not by stage "
                         f"'{cfg.stage}' in this release; use zero1 (the Adam moments only)")
    if par.optimizer_shard != "none" and par.data_parallel < 2:
        raise MsLlmError(f"{where}: parallel.optimizer_shard splits the optimizer state over data-parallel ranks; "
                         f"it needs parallel.data_parallel >= 2, got {par.data_parallel}")


def validate(cfg: ExperimentConfig, where: str = "config"):
    """Cross-field rules; each failure names the keys involved."""
    rules = STAGE_RULES[cfg.stage]
    t = cfg.train
    if t.global_batch_size is not None and t.global_batch_size != cfg.global_batch:
        raise MsLlmError(f"{where}: train.global_batch_size ({t.global_batch_size}) must equal micro_batch_size "
                         f"({t.micro_batch_size}) x grad_accum_steps ({t.grad_accum_steps}) x parallel.data_parallel "
                         f"({cfg.parallel.data_parallel}) = {cfg.global_batch}")
    if cfg.lr_schedule.warmup_steps >= t.max_steps and t.max_steps > 1:
        raise MsLlmError(f"{where}: lr_schedule.warmup_steps ({cfg.lr_schedule.warmup_steps}) must be below "
                         f"train.max_steps ({t.max_steps})")
    _check_layout(cfg, rules, where)
    if t.amp_level == "O3":
        raise MsLlmError(f"{where}: train.amp_level O3 (half-precision master weights) is not supported; use O2 "
                         "(half-precision matmuls, float32 master weights)")
    kernels, device = cfg.context.kernels, cfg.context.device_target
    if kernels in ("cpu", "ascend") and kernels != device:
        raise MsLlmError(f"{where}: context.kernels '{kernels}' runs on the {kernels} device only, but "
                         f"context.device_target is '{device}' (use auto)")
    _check_context(cfg.context, where)
    if not cfg.model.preset and not cfg.model.init_from:
        raise MsLlmError(f"{where}: set model.preset or model.init_from")
    if not cfg.data.sources and not (cfg.data.index and rules.reads_index):
        raise MsLlmError(f"{where}: data.sources is empty; list at least one JSONL file"
                         + (" or set data.index" if rules.reads_index else ""))
    if cfg.data.index and not rules.reads_index:
        readers = " and ".join(s for s, r in STAGE_RULES.items() if r.reads_index)
        raise MsLlmError(f"{where}: data.index is read by the {readers} stages, not by stage '{cfg.stage}'")
    if cfg.data.packing and cfg.stage not in PACKING_STAGES:
        raise MsLlmError(f"{where}: data.packing is supported by the {', '.join(PACKING_STAGES)} stages, not by stage "
                         f"'{cfg.stage}' in this release; remove it (or set it false)")
    if cfg.mup.enabled and not rules.mup:
        raise MsLlmError(f"{where}: mup.enabled is not supported by stage '{cfg.stage}'")
    if rules.check is not None:
        rules.check(cfg, where)
