# SPDX-License-Identifier: Apache-2.0
"""Memory per rank of a config, before anything runs: `ms-llm plan CONFIG [k=v ...] [--nproc-per-node N]
[--nnodes M] [--device 910b|cpu] [--json]`.

The plan counts what this release's code holds, component by component, with the arithmetic written out here
(every figure traces to the code that allocates it):

- trainable weights: float32 masters of every trained parameter (a LoRA base too: its weights stay float32);
- gradients: one float32 copy per trainable parameter, a second for the unscaled copy the train step makes
  (training/step.py), a third when micro-batches accumulate (`train.grad_accum_steps` > 1), another when data
  parallel sums them in buckets (`parallel.bucket_mb` > 0: the flattened buffers);
- optimizer: AdamW's two float32 moments, 1/data_parallel of them under ZeRO-1 (`parallel.optimizer_shard: zero1`),
  which then also all-reduces full-size float32 updates (training/optim.py);
- under ZeRO-3 (`parallel.optimizer_shard: zero3`, training/zero.py) the trained matrices, their gradients,
  accumulation buffers and moments are 1/data_parallel each, plus the matrices gathered whole while in use
  (every one without `parallel.recompute`, one layer's and the lm_head's with it) and one full-size gradient
  before its reduce-scatter;
- activations: `ACTIVATION_VALUES` values of the compute dtype per token, per layer and per unit of
  hidden_size + intermediate_size — with fused kernels (CPU kernels, Ascend's fused ops) or the composed
  reference ops, `LORA_ACTIVATION_VALUES` more when LoRA layers train, each fitted on one CPU measurement
  (docs/benchmarks.md) — or with `parallel.recompute` one
  float32 hidden state per token and layer plus one layer's worth; attention scores [B, heads, S, S] float32
  when the attention is not flash (the reference ops);
- logits workspace: the log-prob readout (models/readout.py): 256 rows of the vocabulary on the CPU kernel,
  `context.loss_chunk_tokens` rows on the chunked path, the whole [B, S, V] otherwise; LOGIT_COPIES float32
  copies of them;
- frozen models (reference, teacher, reward, safety classifier): their parameters in their dtype
  (models/frozen.py); the PPO value model trains, and is counted as trainable;
- rollout: the KV cache of the generation batch in the compute dtype, capacity prompt + new tokens rounded up
  to 64: each data-parallel rank generates its share of the rows (PPO, synchronous GRPO), or the whole batch
  (partial and asynchronous GRPO rollouts; docs/rl.md); under ZeRO-3, the whole copy of the policy's sharded
  matrices that GRPO and on-policy distillation generate with;
- phases: a synchronous GRPO or on-policy distillation step frees its KV caches before it scores and
  updates, so the cache (rollout) and the train step's gathered matrices, activations and logits (train) are
  counted apart: the total is what is held throughout plus the larger phase;
- runtime: the framework itself (RUNTIME bytes per device kind: Python + MindSpore + compiled graphs on CPU,
  HCCL buffers and workspace on Ascend).

The budget is `context.max_device_memory` on 910B (58 GB default), and on CPU this machine's memory shared by
the ranks of a node. When the total does not fit, the plan tries the changes a user can make in the config,
cheapest first, and names the first that fits.
"""
import argparse
import copy
import dataclasses
import json
import os
import re

from ms_llm.config import load_config
from ms_llm.config.validate import STAGE_RULES
from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_json
from ms_llm.models.config import ModelConfig, preset
from ms_llm.training.layout import rollout_ranks

GB = 1024 ** 3
MB = 1024 ** 2
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# values kept per token, layer and unit of (hidden + intermediate) for the backward pass: with fused kernels
# (the CPU kernels, Ascend's fused ops) and with MindSpore's composed reference ops; fitted on CPU (docs/launch.md)
ACTIVATION_VALUES = {"fused": 10, "reference": 43}
LORA_ACTIVATION_VALUES = 7      # what LoRA layers keep besides (their branches' inputs and outputs), fitted on CPU
LOGIT_COPIES = {"lm": 4, "policy": 6}
RUNTIME = {"cpu": 560 * MB, "910b": 3 * GB}
DEVICES = {"910b": "Ascend 910B, 64 GB HBM per NPU", "cpu": "host memory shared by the node's ranks"}
LORA_SHAPES = {"q_proj": ("h", "q"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("q", "h"),
               "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h")}


@dataclasses.dataclass
class Component:
    name: str
    bytes: int
    note: str = ""
    phase: str = ""           # "rollout" or "train": held only in that phase of an RL step; "": throughout


def peak(parts) -> int:
    """What a rank holds at its fullest: everything held throughout, plus the larger of the two phases."""
    held = sum(c.bytes for c in parts if not c.phase)
    return held + max([sum(c.bytes for c in parts if c.phase == ph) for ph in ("rollout", "train")])


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*GB\s*", str(text))
    if not m:
        raise MsLlmError(f"context.max_device_memory: '{text}' is not '<number>GB'")
    return int(float(m.group(1)) * GB)


def host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise MsLlmError("/proc/meminfo has no MemTotal")


def model_shape(cfg, key: str, path=None) -> ModelConfig:
    """The ModelConfig of the model at config key `key`: its directory's config.json when it is on this machine,
    else `plan.shapes[key]` (a preset), else for `model` the preset and overrides."""
    if key == "model" and not cfg.model.init_from:
        return preset(cfg.model.preset, **cfg.model.overrides)
    path = cfg.model.init_from if key == "model" else path
    for cand in (path, os.path.join(path, "final")) if path else ():
        src = os.path.join(cand, "config.json")
        if os.path.isfile(src):
            return ModelConfig.from_hf_config(read_json(src, "the model config"), source=src)
    name = cfg.plan.shapes.get(key)
    if name is None:
        raise MsLlmError(f"plan: {key} is {path}, which has no config.json on this machine; set plan.shapes.{key} "
                         f"to a preset (e.g. qwen2.5-7b) to plan without it")
    try:
        return preset(name)
    except (KeyError, TypeError, MsLlmError):
        raise MsLlmError(f"plan.shapes.{key}: '{name}' is not a preset") from None


def lora_parameters(shape: ModelConfig, r: int, targets) -> int:
    dims = {"h": shape.hidden_size, "q": shape.num_attention_heads * shape.head_dim,
            "kv": shape.num_key_value_heads * shape.head_dim, "i": shape.intermediate_size}
    per_layer = sum(r * (dims[LORA_SHAPES[t][0]] + dims[LORA_SHAPES[t][1]]) for t in targets)
    return per_layer * shape.num_hidden_layers


def _half(dtype: str, device: str) -> str:
    """A frozen or LoRA-base dtype setting as it resolves on `device` (models/io.frozen_dtype)."""
    return ("bfloat16" if device == "910b" else "float32") if dtype == "auto" else dtype


def _matrices(shape: ModelConfig) -> tuple:
    """(values in one decoder layer's matrices, in the lm_head's, in all matrices): what ZeRO-3 shards."""
    h, kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    q = shape.num_attention_heads * shape.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * shape.intermediate_size
    head = shape.vocab_size * h
    return layer, head, layer * shape.num_hidden_layers + head * (1 if shape.tie_word_embeddings else 2)


def _trained(cfg, shape: ModelConfig, label: str, lora, dp: int, split: int, device: str = "cpu") -> list:
    """Weights, gradients and optimizer state of one trained model (`split`: tensor/pipeline ranks it is cut over)."""
    total = shape.num_parameters() // split
    mode = cfg.parallel.optimizer_shard if dp > 1 else "none"
    zero3 = dp if mode == "zero3" else 1
    out = []
    if lora is not None and lora.enabled:
        trainable = lora_parameters(shape, lora.r, lora.targets) // split
        base = _half(lora.base_dtype, device)
        out.append(Component(f"{label} weights", BYTES[base] * total + 4 * trainable // zero3,
                             f"{total:,} frozen base parameters in {base} + {trainable:,} LoRA parameters, float32"
                             + (f", 1/{zero3} of them (ZeRO-3)" if zero3 > 1 else "")))
    else:
        trainable = total
        out.append(Component(f"{label} weights", 4 * trainable // zero3, f"{trainable:,} parameters, float32 masters"
                             + (f", 1/{zero3} of each matrix (ZeRO-3)" if zero3 > 1 else "")))
    if zero3 > 1:
        out.append(_gathered(cfg, shape, label, lora, device))
    accum = cfg.train.grad_accum_steps > 1
    buckets = dp > 1 and zero3 == 1 and cfg.parallel.bucket_mb > 0 and cfg.parallel.pipeline_stages <= 1  # (its copy)
    copies = 2 + accum + buckets
    out.append(Component(f"{label} gradients", 4 * trainable * copies // zero3,
                         "gradients, the unscaled copy" + (", the accumulation buffer" if accum else "")
                         + (", the bucketed sum's copy (parallel.bucket_mb)" if buckets else "")
                         + (" of this rank's shards" if zero3 > 1 else "")))
    zero1 = dp if mode == "zero1" else 1
    out.append(Component(f"{label} optimizer", 8 * trainable // (zero1 * zero3) + (4 * trainable if zero1 > 1 else 0),
                         "AdamW m and v" + (f" over {zero1} ranks + full-size float32 updates (ZeRO-1)"
                                            if zero1 > 1 else "") + (f" of the shards (ZeRO-3)" if zero3 > 1 else "")))
    return out


def _gathered(cfg, shape: ModelConfig, label: str, lora, device: str) -> Component:
    """ZeRO-3's whole matrices while they are in use (training/zero.py), in the dtype their products read: without
    recompute the backward pass keeps every gathered matrix from the forward; with it, one decoder layer's at a
    time and the lm_head's (the readout's backward reads it). Plus the full-size gradient of the largest matrix
    before its reduce-scatter (on CPU an AllReduce: the padded gradient and the sum, float32)."""
    elem = BYTES[cfg.train.compute_dtype] if cfg.train.amp_level != "O0" else 4
    if device == "cpu" and cfg.context.kernels in ("auto", "cpu"):
        elem = 4                                          # (the CPU kernels read float32 weights)
    layer, head, every = _matrices(shape)
    if lora is not None and lora.enabled:                 # only the adapter's factors are sharded
        layer = lora_parameters(shape, lora.r, lora.targets) // shape.num_hidden_layers
        head, every = 0, layer * shape.num_hidden_layers
    held = layer + head if cfg.parallel.recompute else every
    largest = max(layer // 3, head)
    scatter = largest * 4 * (2 if device == "cpu" else 1)
    how = "one decoder layer's + the lm_head's (recompute)" if cfg.parallel.recompute else "every matrix (no recompute)"
    return Component(f"{label} gathered weights", held * elem + scatter,
                     f"ZeRO-3: {how} gathered whole, + one full-size gradient before its reduce-scatter")


def _rollout_copy(cfg, shape: ModelConfig, label: str, lora, device: str) -> Component:
    """What a rank's own rollouts read under ZeRO-3 (training/zero.py, `replicated`): a whole copy of every
    sharded matrix in the dtype its product reads, gathered before each rollout and kept for the run."""
    elem = BYTES[cfg.train.compute_dtype] if cfg.train.amp_level != "O0" else 4
    if device == "cpu" and cfg.context.kernels in ("auto", "cpu"):
        elem = 4
    every = _matrices(shape)[2]
    if lora is not None and lora.enabled:
        every = lora_parameters(shape, lora.r, lora.targets)
    return Component(f"{label} rollout copy", every * elem,
                     "ZeRO-3: every sharded matrix whole, what each rank generates and scores its rows with")


def _phases(out: list, label: str):
    """A synchronous rollout generates, frees its caches (generation.release_caches), then scores and updates
    (GRPO, on-policy distillation): the cache and the train step's transient memory are never held at once."""
    for c in out:
        if c.name == "rollout KV cache":
            c.phase = "rollout"
        elif c.name.startswith(label + " ") and c.name.endswith(("gathered weights", "activations", "logits")):
            c.phase = "train"


def _activations(cfg, shape: ModelConfig, label: str, rows: int, seq: int, device: str, split: int,
                 kind: str = "lm", lora=None) -> list:
    elem = BYTES[cfg.train.compute_dtype] if cfg.train.amp_level != "O0" else 4
    fused = device == "910b" or (cfg.context.kernels in ("auto", "cpu") and elem == 4)
    tokens = rows * seq
    layers = max(1, shape.num_hidden_layers // split)
    values = ACTIVATION_VALUES["fused" if fused else "reference"]
    if lora is not None and lora.enabled:
        values += LORA_ACTIVATION_VALUES
    per_layer = tokens * values * (shape.hidden_size + shape.intermediate_size) * elem // split
    if cfg.parallel.recompute:
        acts = tokens * shape.hidden_size * 4 * layers + per_layer
        note = f"recompute: one float32 hidden state per token and layer + one layer, {tokens:,} tokens"
    else:
        acts = per_layer * layers
        note = f"{layers} layers x {tokens:,} tokens"
    if not fused:
        acts += rows * shape.num_attention_heads * seq * seq * 4 * layers * 2
        note += ", attention scores (reference ops)"
    out = [Component(f"{label} activations", acts, note)]
    if kind:
        chunk = cfg.context.loss_chunk_tokens
        if device == "cpu" and cfg.context.kernels in ("auto", "cpu") and elem == 4 and kind == "lm":
            rows_v, how = min(tokens, 256), "CPU kernel, 256 rows at a time"
        elif chunk > 0:
            rows_v, how = min(tokens, chunk), f"chunked, {chunk} tokens at a time"
        else:
            rows_v, how = tokens, "whole [B, S, V]"
        out.append(Component(f"{label} logits", rows_v * shape.vocab_size * 4 * LOGIT_COPIES[kind],
                             f"log-prob readout: {how}"))
    return out


def _frozen(label: str, shape: ModelConfig, dtype: str, device: str) -> Component:
    dtype = _half(dtype, device)
    return Component(f"{label} (frozen)", shape.num_parameters() * BYTES[dtype],
                     f"{shape.num_parameters():,} parameters, {dtype}")


def _kv_cache(cfg, shape: ModelConfig, rows: int, prompt: int, new: int, dp: int, group: int = 1,
              batch: int = 0) -> Component:
    """The rollout's cache on one rank: `rows` split over `dp` data-parallel ranks (1: the whole batch) in whole
    groups of `group` rows (GRPO splits prompts, so the largest share is ceil(prompts / dp) groups), at most
    `batch` of them at once (the generation batch of continuous batching; 0: all)."""
    elem = BYTES[cfg.train.compute_dtype] if cfg.train.amp_level != "O0" else 4
    cap = -(-(prompt + new) // 64) * 64
    per_row = shape.num_hidden_layers * 2 * shape.num_key_value_heads * shape.head_dim * cap * elem
    mine = -(-(rows // group) // dp) * group
    how = f"{mine} of the batch's {rows} rows on this rank" if dp > 1 else "the whole batch"
    if 0 < batch < mine:
        how = f"{batch} at once of {how}"
        mine = batch
    return Component("rollout KV cache", mine * per_row, f"{mine} rows x {cap} slots ({how})")


def components(cfg, ranks: int, device: str) -> list:
    par = cfg.parallel
    split = max(1, par.tensor_parallel) * max(1, par.pipeline_stages)
    dp = max(1, (ranks - rollout_ranks(cfg)) // split)          # (a training rank's plan: rollout ranks only generate)
    t, stage = cfg.train, cfg.stage
    policy = model_shape(cfg, "model")
    out = []
    if stage in ("pretrain", "cpt"):
        out += _trained(cfg, policy, "model", None, dp, split, device)
        out += _activations(cfg, policy, "model", t.micro_batch_size, cfg.data.seq_len, device, split)
    elif stage == "sft":
        out += _trained(cfg, policy, "model", cfg.sft.lora, dp, split, device)
        out += _activations(cfg, policy, "model", t.micro_batch_size, cfg.data.seq_len, device, split,
                            lora=cfg.sft.lora)
    elif stage == "distill":
        d = cfg.distill
        out += _trained(cfg, policy, "student", None, dp, split, device)
        out += _activations(cfg, policy, "student", t.micro_batch_size, cfg.data.seq_len, device, split)
        if d.mode != "cached" or d.iterative.every:      # a cached run reads the teacher's logits, samples and score
            teacher = model_shape(cfg, "distill.teacher", d.teacher.path)
            out.append(_frozen("teacher", teacher, d.teacher.dtype, device))
        if d.mode == "on_policy":                         # the student samples each step's prompts, one per row
            op = d.on_policy
            rows = t.micro_batch_size * t.grad_accum_steps * dp
            out.append(_kv_cache(cfg, policy, rows, op.max_prompt_len, op.max_new_tokens, 1 if op.async_rollout else dp))
            if dp > 1 and cfg.parallel.optimizer_shard == "zero3":
                out.append(_rollout_copy(cfg, policy, "student", None, device))
            if not op.async_rollout:
                _phases(out, "student")
    elif stage == "reward":
        out += _trained(cfg, policy, "reward model", cfg.reward.lora, dp, split, device)
        out += _activations(cfg, policy, "reward model", 2 * t.micro_batch_size, cfg.data.seq_len, device, split,
                            None, cfg.reward.lora)
    elif stage == "dpo":
        p = cfg.dpo
        out += _trained(cfg, policy, "policy", p.lora, dp, split, device)
        out += _activations(cfg, policy, "policy", 2 * t.micro_batch_size, cfg.data.seq_len, device, split,
                            lora=p.lora)
        if p.reference_mode == "online" and not p.lora.enabled and p.loss not in ("simpo", "orpo"):
            ref = model_shape(cfg, "dpo.reference", p.reference.path or cfg.model.init_from)
            out.append(_frozen("reference", ref, p.reference.dtype, device))
    elif stage in ("ppo", "grpo"):
        p = cfg.ppo if stage == "ppo" else cfg.grpo
        seq = p.max_prompt_len + p.max_new_tokens
        out += _trained(cfg, policy, "policy", p.lora, dp, split, device)
        if dp > 1 and cfg.parallel.optimizer_shard == "zero3":
            out.append(_rollout_copy(cfg, policy, "policy", p.lora, device))
        out += _activations(cfg, policy, "policy", t.micro_batch_size, seq, device, split, "policy", p.lora)
        if not p.lora.enabled and (stage == "ppo" or p.beta > 0):
            ref = model_shape(cfg, f"{stage}.reference", p.reference.path or cfg.model.init_from)
            out.append(_frozen("reference", ref, p.reference.dtype, device))
        rows = p.rollout_batch_size if stage == "ppo" else p.prompts_per_step * p.group_size
        kept = stage == "grpo" and (p.partial_rollout.token_budget > 0 or p.async_rollout.enabled)
        # every rank generates the whole batch: partial and asynchronous rollouts, and episodes paused by turns
        # (these keep no cache between turns: each turn prefills its context, so the phases still alternate)
        whole = kept or (stage == "grpo" and bool(p.agent.tools and p.agent.turns_per_step))
        out.append(_kv_cache(cfg, policy, rows, p.max_prompt_len, p.max_new_tokens, 1 if whole else dp,
                             1 if stage == "ppo" else p.group_size, p.generation_batch_size))
        if stage == "grpo" and not kept:
            _phases(out, "policy")
        if stage == "ppo":
            rm = model_shape(cfg, "ppo.reward_model", p.reward_model)
            out.append(_frozen("reward model", rm, p.reward_dtype, device))
            if p.safety.weight > 0 and p.safety.classifier:
                out.append(_frozen("safety classifier", model_shape(cfg, "ppo.safety.classifier", p.safety.classifier),
                                   p.reward_dtype, device))
            value = rm if p.value_init == "reward" else policy
            out += _trained(cfg, value, "value model", None, dp, split, device)
            out += _activations(cfg, value, "value model", t.micro_batch_size, seq, device, split, None)
    else:
        raise MsLlmError(f"plan: stage '{stage}' is not planned")
    out.append(Component("runtime", RUNTIME[device], "framework, compiled graphs, communication buffers"))
    return out


def budget(cfg, device: str, nproc_per_node: int) -> tuple:
    if device == "910b":
        return _size(cfg.context.max_device_memory), f"context.max_device_memory {cfg.context.max_device_memory}"
    total = host_memory()
    return total // nproc_per_node, f"{total / GB:.1f} GB of host memory / {nproc_per_node} rank(s) on the node"


CHANGES = (  # (description, overrides), cheapest first
    ("recompute activations (parallel.recompute: true)", {"parallel.recompute": True}),
    ("shard Adam's moments (parallel.optimizer_shard: zero1)", {"parallel.optimizer_shard": "zero1"}),
    ("shard weights, gradients and Adam's moments (parallel.optimizer_shard: zero3, parallel.recompute: true)",
     {"parallel.optimizer_shard": "zero3", "parallel.recompute": True}),
    ("half the micro-batch, twice the accumulation", "halve"),
    ("chunk the log-prob readout (context.loss_chunk_tokens: 1024)", {"context.loss_chunk_tokens": 1024}),
)


def _apply(cfg, change):
    c = copy.deepcopy(cfg)
    if change == "halve":
        if c.train.micro_batch_size < 2:
            return None
        c.train.micro_batch_size //= 2
        c.train.grad_accum_steps *= 2
        return c
    if c.parallel.optimizer_shard != change.get("parallel.optimizer_shard", "zero1") == "zero3" \
            and "zero3" not in STAGE_RULES[c.stage].layouts:
        return None                                       # a stage that does not take ZeRO-3
    same = True
    for key, value in change.items():
        section, field = key.split(".")
        same = same and getattr(getattr(c, section), field) == value
        setattr(getattr(c, section), field, value)
    return None if same else c


def plan(cfg, nproc_per_node: int = 1, nnodes: int = 1, device: str = None) -> dict:
    """{"device", "ranks", "budget", "total", "fits", "components": [...], "suggestion"} for one rank."""
    device = device or ("910b" if cfg.context.device_target == "ascend" else "cpu")
    if device not in DEVICES:
        raise MsLlmError(f"plan: --device '{device}' is not one of {sorted(DEVICES)}")
    ranks = nproc_per_node * nnodes
    parts = components(cfg, ranks, device)
    limit, limit_note = budget(cfg, device, nproc_per_node)
    total = peak(parts)
    suggestion = None
    if total > limit:
        tried = []
        for what, change in CHANGES:
            alt = _apply(cfg, change)
            if alt is None:
                continue
            alt_total = peak(components(alt, ranks, device))
            if alt_total <= limit:
                suggestion = what
                break
            tried.append(f"{what.split(' (')[0]}: {alt_total / GB:.1f} GB")
        else:
            more = peak(components(cfg, 2 * ranks, device))
            suggestion = (f"no single config change fits ({'; '.join(tried) or 'none applies'}); twice the ranks: "
                          f"{more / GB:.1f} GB per rank. Weights, gradients and AdamW state "
                          f"({sum(c.bytes for c in parts if c.name.endswith(('weights', 'gradients', 'optimizer'))) / GB:.1f} GB) "
                          "stay whole on every rank outside the stages that take ZeRO-3 "
                          "(parallel.optimizer_shard: zero3)")
    return {"config": cfg.stage, "device": device, "device_kind": DEVICES[device], "ranks": ranks,
            "budget_bytes": limit, "budget": limit_note, "total_bytes": total, "fits": total <= limit,
            "components": [dataclasses.asdict(c) for c in parts], "suggestion": suggestion,
            "rank0_host_bytes": rank0_staging(cfg, parts, ranks)}


def rank0_staging(cfg, parts, ranks: int) -> int:
    """Host memory rank 0 holds while it writes a checkpoint under ZeRO-3: the trained float32 weights and both
    Adam moments gathered whole into its memory, one tensor at a time (training/zero.py). On Ascend this is the
    host's RAM, not the NPU's; on CPU it is the same memory as the rank's."""
    split = max(1, cfg.parallel.tensor_parallel) * max(1, cfg.parallel.pipeline_stages)
    dp = max(1, ranks // split)
    if cfg.parallel.optimizer_shard != "zero3" or dp < 2:
        return 0
    moments = sum(c.bytes for c in parts if c.name.endswith(" optimizer")) * dp      # 8 bytes per trained value
    return moments * 3 // 2                                                            # + the 4-byte weights


def table(p: dict) -> str:
    rows = [f"{'component':<28}{'GB':>9}  note"]
    rows += [f"{c['name']:<28}{c['bytes'] / GB:>9.2f}  " + (f"[{c['phase']} phase] " if c.get("phase") else "")
             + c["note"] for c in p["components"]]
    phases = {ph: sum(c["bytes"] for c in p["components"] if c.get("phase") == ph) for ph in ("rollout", "train")}
    if any(phases.values()):
        rows.append(f"{'phases':<28}{'':>9}  rollout {phases['rollout'] / GB:.2f} GB, train {phases['train'] / GB:.2f} "
                    "GB: one at a time (the rollout's KV caches are freed before the updates); the total counts the "
                    "larger")
    rows.append(f"{'total per rank':<28}{p['total_bytes'] / GB:>9.2f}  on {p['ranks']} rank(s), {p['device_kind']}")
    rows.append(f"{'budget':<28}{p['budget_bytes'] / GB:>9.2f}  {p['budget']}")
    if p.get("rank0_host_bytes"):
        rows.append(f"{'rank 0 checkpoint staging':<28}{p['rank0_host_bytes'] / GB:>9.2f}  host memory on rank 0 while "
                    "it writes a checkpoint (ZeRO-3 gathers whole tensors there)")
    if p["fits"]:
        verdict = "fits"
    elif p["suggestion"].startswith("no single"):
        verdict = f"does NOT fit: {p['suggestion']}"
    else:
        verdict = f"does NOT fit; the cheapest change that fits: {p['suggestion']}"
    rows.append(f"-> {verdict}")
    return "\n".join(rows)


def main(argv) -> int:
    ap = argparse.ArgumentParser(prog="ms-llm plan", description="Memory per rank of a config, by component.")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--nproc-per-node", type=int, help="default: the config's plan.nproc_per_node")
    ap.add_argument("--nnodes", type=int, help="default: the config's plan.nnodes")
    ap.add_argument("--device", choices=sorted(DEVICES), help="default: from context.device_target")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_intermixed_args(argv)
    cfg = load_config(a.config, list(a.overrides), check=False)
    p = plan(cfg, a.nproc_per_node or cfg.plan.nproc_per_node, a.nnodes or cfg.plan.nnodes, a.device)
    print(json.dumps(p, indent=1) if a.json else table(p))
    return 0
