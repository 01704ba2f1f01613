# SPDX-License-Identifier: Apache-2.0
"""Weight name conversion between Hugging Face (ms_llm's own names) and MindFormers Llama/Qwen2.

The map is a readable table of name templates; weights need no reshaping (both use [out, in] matrices and
the rotate-half rotary layout). Command line:

    ms-llm convert --from hf --to mindformers SRC_DIR DST.safetensors|DST.ckpt
    ms-llm convert --from mindformers --to hf SRC.ckpt|SRC.safetensors DST_DIR --config config.json
"""
import json
import os
import re

import mindspore as ms
import numpy as np

from ms_llm.errors import MsLlmError
from ms_llm.models.config import ModelConfig
from ms_llm.models.decoder import CausalLM
from ms_llm.models.io import load_state_dict, read_config, read_weights, resolve_model_dir, save_pretrained
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors

# Hugging Face name template -> MindFormers name template ({} is the layer index)
HF_TO_MINDFORMERS = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.layers.{}.self_attn.q_proj.weight": "model.layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.q_proj.bias": "model.layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.weight": "model.layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.k_proj.bias": "model.layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.weight": "model.layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.v_proj.bias": "model.layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.weight": "model.layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "model.layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "model.layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "model.layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "model.layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "model.layers.{}.ffn_norm.weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}
MINDFORMERS_TO_HF = {v: k for k, v in HF_TO_MINDFORMERS.items()}


def _compile(table: dict):
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


_RULES = {"hf->mindformers": _compile(HF_TO_MINDFORMERS), "mindformers->hf": _compile(MINDFORMERS_TO_HF)}


def rename(name: str, direction: str) -> str:
    """Map one parameter name; `direction` is 'hf->mindformers' or 'mindformers->hf'."""
    for pattern, dst in _RULES[direction]:
        m = pattern.match(name)
        if m:
            return dst.format(*m.groups())
    raise MsLlmError(f"parameter '{name}' has no {direction} mapping (Qwen3 q/k norms have no MindFormers Llama "
                     "equivalent)")


def hf_to_mindformers(state: dict) -> dict:
    return {rename(k, "hf->mindformers"): v for k, v in state.items()}


def mindformers_to_hf(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if k.startswith(("adam_", "global_step", "learning_rate", "epoch_num", "step_num", "loss_scale")) or ".moments" in k:
            continue                     # optimizer state and counters that MindFormers stores alongside
        out[rename(k, "mindformers->hf")] = v
    return out


def read_mindformers(path: str) -> dict:
    """Tensors of a MindFormers checkpoint (.ckpt or .safetensors) as numpy arrays."""
    if not os.path.isfile(path):
        raise MsLlmError(f"{path}: checkpoint not found")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        params = ms.load_checkpoint(path)
    except (ValueError, RuntimeError) as e:
        raise MsLlmError(f"{path}: not a readable MindSpore checkpoint ({e})") from None
    return {k: v.asnumpy().astype(np.float32) for k, v in params.items()}


def write_mindformers(state: dict, path: str):
    """Write MindFormers-named tensors as .safetensors or .ckpt (chosen by the extension)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        write_safetensors(path, state)
        return
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], path)


def convert(src: str, dst: str, src_format: str, dst_format: str, config: str = None) -> str:
    """Convert a checkpoint between formats; returns `dst`. See the module docstring for the forms."""
    pair = f"{src_format}->{dst_format}"
    if pair == "hf->mindformers":
        model_dir = resolve_model_dir(src)
        cfg = read_config(model_dir)
        if cfg.qk_norm:
            raise MsLlmError(f"{model_dir}: Qwen3 (q/k norm) has no MindFormers Llama layout to convert to")
        write_mindformers(hf_to_mindformers(read_weights(model_dir)), dst)
        return dst
    if pair == "mindformers->hf":
        if not config:
            raise MsLlmError("convert --from mindformers needs --config: a Hugging Face config.json (or a "
                             "directory holding one) describing the model")
        cfg_path = os.path.join(config, "config.json") if os.path.isdir(config) else config
        try:
            with open(cfg_path) as f:
                cfg = ModelConfig.from_hf_config(json.load(f), source=cfg_path)
        except (OSError, ValueError) as e:
            raise MsLlmError(f"{cfg_path}: cannot read the model config ({e})") from None
        model = CausalLM(cfg)
        load_state_dict(model, mindformers_to_hf(read_mindformers(src)), strict=True, source=src)
        save_pretrained(model, dst)
        return dst
    raise MsLlmError(f"convert: --from {src_format} --to {dst_format} is not supported "
                     "(use hf->mindformers or mindformers->hf)")
