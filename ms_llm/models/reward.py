# SPDX-License-Identifier: Apache-2.0
"""Reward model (seed 000 §1.2.5.4.1): the first N decoder layers of a language model, its final norm, and a
2-layer MLP head (hidden -> h -> 1) read at the last real token. The output is not squashed.

    rm = RewardModel(truncate(load_pretrained("runs/tiny_sft/final"), 2), head_hidden=64)
    rewards = rm(input_ids, attention_mask)                      # [B] float32

    scorer = load_reward_model("runs/tiny_reward")             # an exported reward model
    scorer(ids, mask).raw, scorer.score(["What is 2 + 2?"], ["4"]).calibrated

An exported reward model is a directory with the backbone in the Hugging Face layout (config.json,
model.safetensors: a CausalLM with N layers that `load_pretrained` reads, so a value model can start from
it), `reward_head.safetensors`, `reward_config.json` (layers, head size, activation, Platt coefficients,
chat template) and the tokenizer, all under MANIFEST.json.
"""
import os
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ms_llm.data.chat import render
from ms_llm.data.tokenizer import Tokenizer
from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_json, write_json_atomic
from ms_llm.manifest import verify as verify_manifest
from ms_llm.models.decoder import CausalLM, Linear
from ms_llm.models.io import load_pretrained, resolve_model_dir
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors
from ms_llm.models.shards import local_value, shape_of

HEAD_FILE, CONFIG_FILE = "reward_head.safetensors", "reward_config.json"
ACTIVATIONS = {"gelu": ops.gelu, "relu": ops.relu, "tanh": ops.tanh, "silu": ops.silu}


def truncate(model: CausalLM, num_layers: int = None) -> CausalLM:
    """Keep the first `num_layers` decoder layers (None: all) and the final norm, in place."""
    total = model.config.num_hidden_layers
    n = total if num_layers is None else int(num_layers)
    if not 1 <= n <= total:
        raise MsLlmError(f"reward.num_layers={num_layers}: the model has {total} layers; choose 1..{total}")
    if n < total:
        model.model.layers = nn.CellList(list(model.model.layers)[:n])
        model.num_layers = n
        model.config = model.config.replace(num_hidden_layers=n)
    return model


class RewardHead(nn.Cell):
    """hidden -> h -> 1 with an activation in between; float32."""

    def __init__(self, hidden: int, inner: int, activation: str = "gelu", std: float = 0.02):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise MsLlmError(f"reward.activation '{activation}' is not one of {sorted(ACTIVATIONS)}")
        self.dense = Linear(hidden, inner, True, ms.float32, std)
        self.out_proj = Linear(inner, 1, True, ms.float32, std)
        self.act = ACTIVATIONS[activation]

    def construct(self, h):
        return self.out_proj(self.act(self.dense(h))).squeeze(-1)

    def load(self, tensors: dict, source: str, what: str = "head"):
        """Set the weights from {name: array} (names as `parameters_and_names` gives them); a missing key or a
        shape that does not fit this head's hidden size is refused, naming `source`."""
        params = dict(self.parameters_and_names())
        if set(params) != set(tensors):
            raise MsLlmError(f"{source}: {what} keys {sorted(tensors)} do not match {sorted(params)}")
        for name, p in params.items():
            if tuple(tensors[name].shape) != shape_of(p):
                raise MsLlmError(f"{source}: '{name}' has shape {list(tensors[name].shape)}, the {what} on a backbone "
                                 f"of hidden size {self.dense.in_features} needs {list(shape_of(p))}")
            p.set_data(Tensor(local_value(p, np.asarray(tensors[name], np.float32))))


class RewardModel(nn.Cell):
    """(input_ids [B, S] int32, attention_mask [B, S] int32) -> rewards [B] float32, read at each row's last real
    token (right or left padding alike)."""

    def __init__(self, backbone: CausalLM, head_hidden: int = None, activation: str = "gelu"):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head_hidden, self.activation = int(head_hidden or hidden), activation
        self.score_head = RewardHead(hidden, self.head_hidden, activation, backbone.config.initializer_range)
        for name, p in backbone.parameters_and_names():
            if name == "lm_head.weight":
                p.requires_grad = False           # kept so the backbone stays a loadable CausalLM; never read

    def construct(self, input_ids, attention_mask):
        mask = attention_mask.astype(ms.int32)
        positions = ops.maximum(ops.cumsum(mask, 1) - 1, 0)                      # left padding: real tokens from 0
        hidden = self.backbone.hidden_states(input_ids, attention_mask, positions)   # [B, S, H]
        s = input_ids.shape[1]
        slots = ops.arange(s, dtype=ms.int32).reshape(1, s)
        last = ops.amax(mask * slots, -1)                                          # [B] last real token, any padding
        pick = ops.equal(slots, last.reshape(-1, 1)).astype(ms.float32)
        h = (hidden * pick.expand_dims(-1)).sum(1)                                # [B, H]
        return self.score_head(h)

    def head_state(self, weights: dict = None) -> dict:
        """{name: array} of the head; `weights`: values to take instead of the parameters' own where it has them
        (ZeRO-3's gathered matrices, named as the head names them)."""
        weights = weights or {}
        return {n: weights[n] if n in weights else p.asnumpy() for n, p in self.score_head.parameters_and_names()}

    def load_head(self, tensors: dict, source: str):
        self.score_head.load(tensors, source, "reward head")

    def config_dict(self, calibration: dict = None, chat_template: str = None) -> dict:
        return {"num_layers": self.backbone.config.num_hidden_layers, "head_hidden": self.head_hidden,
                "activation": self.activation, "calibration": calibration or {"a": 1.0, "b": 0.0},
                "chat_template": chat_template}


def save_head(rm: RewardModel, folder: str, calibration: dict = None, chat_template: str = None, weights: dict = None):
    """reward_head.safetensors + reward_config.json into `folder` (the backbone is saved separately); `weights`:
    see RewardModel.head_state."""
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, HEAD_FILE), rm.head_state(weights), {"format": "pt"})
    write_json_atomic(os.path.join(folder, CONFIG_FILE), rm.config_dict(calibration, chat_template))


def read_head_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise MsLlmError(f"{folder}: no {CONFIG_FILE}; is this a reward model exported by the reward stage?")
    cfg = read_json(path, "the reward model config")
    for key in ("head_hidden", "activation", "calibration"):
        if key not in cfg:
            raise MsLlmError(f"{path}: missing key '{key}'")
    return cfg


@dataclass
class Rewards:
    raw: np.ndarray           # [B] the head's output
    calibrated: np.ndarray    # [B] a * raw + b (Platt): sigmoid(calibrated_c - calibrated_r) = P(c preferred)


class RewardScorer:
    """A loaded reward model: `scorer(ids, mask)` and `scorer.score(prompts, responses)` -> Rewards."""

    def __init__(self, rm: RewardModel, tokenizer, chat_template: str, calibration: dict, source: str):
        self.rm, self.tokenizer, self.chat_template, self.source = rm, tokenizer, chat_template, source
        self.a, self.b = float(calibration["a"]), float(calibration["b"])
        rm.set_train(False)

    def __call__(self, input_ids, attention_mask) -> Rewards:
        ids = np.asarray(input_ids, np.int32)
        mask = np.asarray(attention_mask, np.int32)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise MsLlmError(f"reward model input: ids {ids.shape} and mask {mask.shape} must both be [B, S]")
        if (mask.sum(-1) < 1).any():
            raise MsLlmError("reward model input: every row needs at least one real token")
        raw = self.rm(Tensor(ids), Tensor(mask)).asnumpy().astype(np.float64)
        return Rewards(raw, self.a * raw + self.b)

    def score(self, prompts: list, responses: list, batch_size: int = 16, bucket: int = 64) -> Rewards:
        """Rewards of (prompt, response) text pairs through the model's tokenizer and chat template.
        A prompt is a string or a list of chat messages. Rows are padded to a multiple of `bucket`."""
        if len(prompts) != len(responses):
            raise MsLlmError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        rows = []
        for p, r in zip(prompts, responses):
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            rows.append(render(msgs + [{"role": "assistant", "content": r}], self.tokenizer, self.chat_template).ids)
        raw = np.zeros(len(rows))
        pad = self.tokenizer.pad_id or 0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = -(-max(len(x) for x in chunk) // bucket) * bucket
            ids = np.full((len(chunk), width), pad, np.int32)
            mask = np.zeros_like(ids)
            for i, x in enumerate(chunk):
                ids[i, :len(x)], mask[i, :len(x)] = x, 1
            raw[start:start + len(chunk)] = self(ids, mask).raw
        return Rewards(raw, self.a * raw + self.b)


def load_reward_model(path: str, verify: bool = True, dtype: str = "float32") -> RewardScorer:
    """An exported reward model (a `final/` directory or its run directory); with `verify`, every file is
    checked against MANIFEST.json first. `dtype`: the backbone's weights and matmuls (float16/bfloat16 for a
    frozen scorer: models/io.to_param_dtype); the head stays float32."""
    folder = resolve_model_dir(path)
    cfg = read_head_config(folder)
    if verify and os.path.isfile(os.path.join(folder, "MANIFEST.json")):
        verify_manifest(folder)
    rm = RewardModel(load_pretrained(folder, dtype=dtype, param_dtype=dtype), cfg["head_hidden"], cfg["activation"])
    rm.load_head(read_safetensors(os.path.join(folder, HEAD_FILE)), os.path.join(folder, HEAD_FILE))
    return RewardScorer(rm, Tokenizer.load(folder), cfg.get("chat_template") or "chatml", cfg["calibration"], folder)
