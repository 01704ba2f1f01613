# SPDX-License-Identifier: Apache-2.0
"""Weight I/O in the Hugging Face layout, which is also ms_llm's own export and checkpoint layout.

    load_pretrained(path, dtype="float32", strict=True) -> CausalLM
    save_pretrained(model, path)                        -> config.json + model.safetensors (or shards)

`path` may be a Hugging Face model dir, an ms_llm checkpoint dir (it holds config.json too), or an ms_llm
run dir (its `final/`, else its latest checkpoint). Loading reports every missing, unexpected and
mis-shaped key, and with `strict` fails on any of them.
"""
import json
import logging
import os

import mindspore as ms
import numpy as np
from mindspore import Parameter

from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_json, write_json_atomic
from ms_llm.manifest import verify
from ms_llm.models.config import ModelConfig
from ms_llm.models.decoder import DTYPES, CausalLM
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors
from ms_llm.models.shards import local_value, shape_of
from ms_llm.models.tensor_parallel import shard_state

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def resolve_model_dir(path: str) -> str:
    """The directory holding config.json for `path` (a model dir, a checkpoint dir or a run dir)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MsLlmError(f"{path}: model path not found")
    for cand in (path, os.path.join(path, "final")):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    latest = os.path.join(path, "checkpoints", "latest")
    if os.path.isfile(latest):
        cand = os.path.join(path, "checkpoints", open(latest).read().strip())
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    raise MsLlmError(f"{path}: no config.json here, in final/ or in the latest checkpoint; "
                     "expected a Hugging Face model directory or an ms_llm run directory")


def read_config(model_dir: str) -> ModelConfig:
    src = os.path.join(model_dir, "config.json")
    return ModelConfig.from_hf_config(read_json(src, "the model config"), source=src)


def read_weights(model_dir: str, keep=None) -> dict:
    """All tensors of a model dir as numpy arrays: model.safetensors, or the shards its index names. `keep`: see
    read_safetensors (what to keep of each tensor as it is read)."""
    index = os.path.join(model_dir, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise MsLlmError(f"{index}: not a valid shard index (needs a 'weight_map' object): {e}") from None
        by_file = {}
        for name, shard in weight_map.items():
            by_file.setdefault(shard, set()).add(name)
        tensors = {}
        for shard, names in sorted(by_file.items()):
            shard_path = os.path.join(model_dir, shard)
            if not os.path.isfile(shard_path):
                raise MsLlmError(f"{shard_path}: shard listed in {index} is missing ({len(names)} tensors)")
            got = read_safetensors(shard_path, names, keep)
            lost = names - set(got)
            if lost:
                raise MsLlmError(f"{shard_path}: index says it holds {sorted(lost)[:3]} but it does not")
            tensors.update(got)
        return tensors
    single = os.path.join(model_dir, WEIGHTS)
    if os.path.isfile(single):
        return read_safetensors(single, keep=keep)
    raise MsLlmError(f"{model_dir}: neither {WEIGHTS} nor {INDEX} found")


def named_parameters(model) -> dict:
    """{structural name: Parameter}. The name is the cell path (Hugging Face's), not `Parameter.name`,
    which MindSpore may rewrite when a graph holding frozen parameters compiles."""
    return dict(model.parameters_and_names())


def model_state_dict(model) -> dict:
    """{Hugging Face name: float32 numpy array} for every parameter of the model (half-precision ones widened)."""
    return {n: p.asnumpy() if p.dtype == ms.float32 else np.asarray(p.asnumpy(), np.float32)
            for n, p in named_parameters(model).items()}


def load_state_dict(model, tensors: dict, strict: bool = True, source: str = "weights") -> dict:
    """Copy `tensors` into the model's parameters.

    Returns {"missing": [...], "unexpected": [...], "mismatched": [(name, want, got)]}; raises MsLlmError
    listing every problem when `strict` and any list is non-empty.
    """
    params = named_parameters(model)
    tensors = dict(tensors)
    if getattr(model, "tied", False):
        tensors.pop("lm_head.weight", None)      # tied models reuse the embedding; HF may or may not store it
    report = {"missing": sorted(set(params) - set(tensors)), "unexpected": sorted(set(tensors) - set(params)),
              "mismatched": []}
    for name, p in params.items():
        if name in tensors and tuple(tensors[name].shape) != shape_of(p):
            report["mismatched"].append((name, shape_of(p), tuple(tensors[name].shape)))
    problems = [f"missing {n}" for n in report["missing"]] + [f"unexpected {n}" for n in report["unexpected"]]
    problems += [f"{n}: shape {list(g)} but the model needs {list(w)}" for n, w, g in report["mismatched"]]
    if problems and strict:
        shown = "; ".join(problems[:12]) + (f"; ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise MsLlmError(f"{source}: {len(problems)} key problem(s): {shown}")
    for p in problems:
        log.warning("%s: %s", source, p)
    bad = {n for n, _, _ in report["mismatched"]}
    for name, p in params.items():
        if name in tensors and name not in bad:
            p.set_data(ms.Tensor(local_value(p, np.asarray(tensors[name], dtype=np.float32))))
    return report


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def fold_multipliers(state: dict, cfg: ModelConfig) -> dict:
    """Weights a plain Llama/Qwen reader computes the same logits with: the embedding times the embedding
    multiplier, a separate lm_head times the logit multiplier (μP models; others pass through)."""
    if not cfg.has_multipliers:
        return state
    out = dict(state)
    out[EMBED] = state[EMBED] * np.float32(cfg.embedding_multiplier)
    out[HEAD] = (state[EMBED] if cfg.tie_word_embeddings else state[HEAD]) * np.float32(cfg.logit_multiplier)
    return out


def unfold_multipliers(tensors: dict, cfg: ModelConfig, source: str = "weights") -> dict:
    """The inverse of fold_multipliers, for a model built with `cfg`'s multipliers."""
    if not cfg.has_multipliers:
        return tensors
    missing = [k for k in (EMBED, HEAD) if k not in tensors]
    if missing:
        raise MsLlmError(f"{source}: config.json records μP multipliers, so {missing} must be stored")
    out = dict(tensors)
    out[EMBED] = tensors[EMBED] / np.float32(cfg.embedding_multiplier)
    if cfg.tie_word_embeddings:
        out.pop(HEAD)
    else:
        out[HEAD] = tensors[HEAD] / np.float32(cfg.logit_multiplier)
    return out


def load_weights(model, model_dir: str, strict: bool = True) -> dict:
    """Read `model_dir`'s weights into `model` (built from that dir's config), undoing folded multipliers."""
    cfg = read_config(model_dir)
    tp = getattr(model, "tp", None)
    # tensor parallel: each tensor cut to this rank's slice as it is read (a 72B teacher is never whole in memory)
    tensors = read_weights(model_dir, None if tp is None else lambda name, a: shard_state({name: a}, tp)[name])
    if cfg.has_multipliers:
        if (cfg.embedding_multiplier, cfg.logit_multiplier) != (model.embedding_multiplier, model.logit_multiplier):
            raise MsLlmError(f"{model_dir}: its μP multipliers ({cfg.embedding_multiplier}, {cfg.logit_multiplier}) "
                             f"differ from the model's ({model.embedding_multiplier}, {model.logit_multiplier})")
        tensors = unfold_multipliers(tensors, cfg, model_dir)
    if getattr(model, "pp", None) is not None:                 # pipeline stage: its own layers
        tensors = model.select(tensors)
    return load_state_dict(model, tensors, strict=strict, source=model_dir)


def load_pretrained(path, dtype: str = "float32", strict: bool = True, param_dtype: str = "float32",
                    tp=None) -> CausalLM:
    """Build a CausalLM from a Hugging Face or ms_llm directory.

    Args:
        path: model dir, checkpoint dir or run dir (see module docstring).
        dtype: compute dtype of the matmuls (float32, float16, bfloat16).
        strict: fail on any missing, unexpected or mis-shaped key.
        param_dtype: dtype the parameters are held in (float32 unless the model is frozen: `to_param_dtype`).
        tp: a TPGroup: this rank's tensor-parallel part only (models/tensor_parallel.py), read from the whole files.
    """
    model_dir = resolve_model_dir(path)
    cfg = read_config(model_dir).replace(compute_dtype=dtype)
    model = CausalLM(cfg, tp=tp)
    load_weights(model, model_dir, strict)
    if param_dtype != "float32":
        to_param_dtype(model, param_dtype)
    model.set_train(False)
    return model


def frozen_dtype(dtype: str, key: str = "frozen model") -> str:
    """The dtype a frozen model's weights are held and computed in: `auto` is bfloat16 on Ascend and float32 on
    CPU; bfloat16 is refused on CPU, where MindSpore's matmul does not take it (float16 does)."""
    device = "ascend" if ms.get_context("device_target") == "Ascend" else "cpu"
    if dtype == "auto":
        return "bfloat16" if device == "ascend" else "float32"
    if dtype == "bfloat16" and device == "cpu":
        raise MsLlmError(f"{key}.dtype: bfloat16 does not compute on CPU (MindSpore's CPU matmul has no bfloat16 "
                         "kernel); use float16 or float32")
    return dtype


def to_param_dtype(model, dtype: str, keep=None):
    """Hold every parameter of `model` in `dtype` (float16 or bfloat16): half the memory of a frozen model.

    Each Parameter is replaced, in the cell that owns it, by one of the same name holding its values rounded to
    `dtype` (a Parameter keeps the dtype it was made with). Call it before the model runs, so the device never
    holds the float32 copies. The matmuls then read the weights as they are when the compute dtype is `dtype`;
    embeddings and norms read them into float32 (models/decoder.py). Not for trained weights: an optimizer
    needs float32 masters (`keep(name)` true: a parameter left as it is, e.g. LoRA's adapters)."""
    want = DTYPES[dtype]
    for _, cell in model.cells_and_names():
        for key, p in list(cell._params.items()):
            if p is None or p.dtype == want or (keep is not None and keep(p.name)):
                continue
            replaced = Parameter(ms.Tensor(p.asnumpy(), want), name=p.name, requires_grad=p.requires_grad)
            setattr(cell, key, replaced)
    return model


def save_pretrained(model, path, max_shard_bytes: int = 5 * 2**30, metadata: dict = None) -> list:
    """Write config.json and float32 weights in the Hugging Face layout; returns the written file names.

    Tied models do not store lm_head.weight (as transformers does); μP multipliers are folded into the
    embedding and lm_head (fold_multipliers), so any Llama/Qwen reader gets the same logits. Above `max_shard_bytes` the weights are
    split into model-0000i-of-0000n.safetensors with an index.
    """
    return save_state_dict(model_state_dict(model), model.config, path, max_shard_bytes, metadata)


def save_state_dict(state: dict, config: ModelConfig, path, max_shard_bytes: int = 5 * 2**30, metadata: dict = None) -> list:
    """save_pretrained for a {Hugging Face name: array} dict of the whole model described by `config`."""
    os.makedirs(path, exist_ok=True)
    state = fold_multipliers(state, config)
    shards, cur, size = [], {}, 0
    for name, arr in state.items():
        if cur and size + arr.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = arr
        size += arr.nbytes
    shards.append(cur)
    meta = {"format": "pt", **(metadata or {})}
    files = []
    if len(shards) == 1:
        write_safetensors(os.path.join(path, WEIGHTS), shards[0], meta)
        files.append(WEIGHTS)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, fname), shard, meta)
            weight_map.update({k: fname for k in shard})
            files.append(fname)
        total = sum(a.nbytes for a in state.values())
        write_json_atomic(os.path.join(path, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
        files.append(INDEX)
    write_json_atomic(os.path.join(path, "config.json"), config.to_hf_config())
    files.append("config.json")
    return files


def check_init_hash(path: str, expected: str) -> str:
    """Refuse to start from weights whose manifest hash differs from `expected` (stage hand-off)."""
    model_dir = resolve_model_dir(path)
    manifest_path = os.path.join(model_dir, "MANIFEST.json")
    if not os.path.isfile(manifest_path):
        raise MsLlmError(f"model.init_sha256 is set but {model_dir} has no MANIFEST.json to check it against")
    manifest = verify(model_dir)
    got = manifest.get("model_sha256")
    if got != expected:
        raise MsLlmError(f"{manifest_path}: model_sha256 {got} does not match model.init_sha256 {expected}; "
                         "refusing to start from different weights")
    return got
