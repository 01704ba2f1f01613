# SPDX-License-Identifier: Apache-2.0
"""Rollouts for RL stages: resumable generation state, chunk-wise generation and scoring windows, KL
controllers and reward functions."""
from ms_llm.rollout.chunks import ChunkPlan, generate_chunked
from ms_llm.rollout.kl_control import KLController
from ms_llm.rollout.state_cache import StateCache

__all__ = ["ChunkPlan", "KLController", "StateCache", "generate_chunked"]
