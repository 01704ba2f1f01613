# SPDX-License-Identifier: Apache-2.0
"""PPO's value model (critic): a decoder backbone and the reward model's head shape (hidden -> h -> 1) read at
every position, unsquashed: V(s_t) lives at the position whose logits sample token t.

    critic = value_from_reward("runs/tiny_reward")     # backbone and head of an exported reward model
    critic = value_from_policy("runs/tiny_sft/final")  # the policy's weights and a fresh head
    values = critic(ids, attention_mask, position_ids)   # [B, S] float32

Saved (checkpoints' value/ folder) as the backbone in the Hugging Face layout plus value_head.safetensors and
value_config.json, and read back with `load_value_model`.
"""
import os

from mindspore import nn

from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_json, write_json_atomic
from ms_llm.models.decoder import CausalLM
from ms_llm.models.io import load_pretrained, load_weights, resolve_model_dir, save_pretrained
from ms_llm.models.reward import HEAD_FILE, RewardHead, read_head_config
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors

VALUE_HEAD, VALUE_CONFIG = "value_head.safetensors", "value_config.json"


class ValueModel(nn.Cell):
    def __init__(self, backbone: CausalLM, head_hidden: int = None, activation: str = "gelu"):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head_hidden, self.activation = int(head_hidden or hidden), activation
        self.value_head = RewardHead(hidden, self.head_hidden, activation, backbone.config.initializer_range)
        for name, p in backbone.parameters_and_names():
            if name == "lm_head.weight":
                p.requires_grad = False                # the backbone stays a loadable CausalLM; never read

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        return self.value_head(self.backbone.hidden_states(input_ids, attention_mask, position_ids))

    def load_head(self, tensors: dict, source: str):
        self.value_head.load(tensors, source, "value head")

    def save(self, folder: str):
        save_pretrained(self.backbone, folder)
        write_safetensors(os.path.join(folder, VALUE_HEAD),
                          {n: p.asnumpy() for n, p in self.value_head.parameters_and_names()}, {"format": "pt"})
        write_json_atomic(os.path.join(folder, VALUE_CONFIG), {"head_hidden": self.head_hidden,
                                                               "activation": self.activation})

    def load(self, folder: str):
        """Weights of a saved value model into this one (same shapes), e.g. on resume."""
        load_weights(self.backbone, folder, strict=True)
        self.load_head(read_safetensors(os.path.join(folder, VALUE_HEAD)), os.path.join(folder, VALUE_HEAD))


def value_from_reward(path: str, dtype: str = "float32") -> ValueModel:
    """A critic that starts as the reward model (its truncated backbone and its head)."""
    folder = resolve_model_dir(path)
    cfg = read_head_config(folder)
    vm = ValueModel(load_pretrained(folder, dtype=dtype), cfg["head_hidden"], cfg["activation"])
    head = read_safetensors(os.path.join(folder, HEAD_FILE))
    vm.load_head({k.replace("score_head.", "value_head."): v for k, v in head.items()},
                 os.path.join(folder, HEAD_FILE))
    return vm


def value_from_policy(path: str, dtype: str = "float32", head_hidden: int = None) -> ValueModel:
    """A critic that starts as the policy's weights with a freshly initialised head."""
    return ValueModel(load_pretrained(resolve_model_dir(path), dtype=dtype), head_hidden)


def load_value_model(folder: str, dtype: str = "float32") -> ValueModel:
    path = os.path.join(folder, VALUE_CONFIG)
    if not os.path.isfile(path):
        raise MsLlmError(f"{folder}: no {VALUE_CONFIG}; is this a value model saved by the PPO stage?")
    cfg = read_json(path, "the value model config")
    vm = ValueModel(load_pretrained(folder, dtype=dtype), cfg["head_hidden"], cfg["activation"])
    vm.load_head(read_safetensors(os.path.join(folder, VALUE_HEAD)), os.path.join(folder, VALUE_HEAD))
    return vm
