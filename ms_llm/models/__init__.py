# SPDX-License-Identifier: Apache-2.0
"""The decoder, its presets, and weight I/O (Hugging Face layout, ms_llm checkpoints, MindFormers names)."""
from ms_llm.models.config import ModelConfig, PRESETS, preset
from ms_llm.models.decoder import CausalLM
from ms_llm.models.io import load_pretrained, save_pretrained, load_state_dict, model_state_dict
from ms_llm.models.reward import RewardModel, load_reward_model

__all__ = ["ModelConfig", "PRESETS", "preset", "CausalLM", "load_pretrained", "save_pretrained",
           "load_state_dict", "model_state_dict", "RewardModel", "load_reward_model"]
