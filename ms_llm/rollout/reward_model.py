# SPDX-License-Identifier: Apache-2.0
"""A reward model for an RL stage (PPO, GRPO's reward_model reward), loaded the one way both use: path checked,
manifest hash checked against the hand-off's SHA256, tokenizer checked against the policy's."""
import os

from ms_llm.errors import MsLlmError
from ms_llm.models.frozen import frozen_dtype
from ms_llm.models.io import check_init_hash, resolve_model_dir
from ms_llm.models.reward import load_reward_model


def same_tokenizer(a, b, probe: int = 4096) -> bool:
    if a.vocab_size != b.vocab_size:
        return False
    ids = list(range(min(a.vocab_size, probe)))
    return all(a.decode([i]) == b.decode([i]) for i in ids)


def load_reward(path: str, sha256: str, tokenizer, key: str, dtype: str = "float32"):
    """The reward model at `path` (an exported reward run) for a policy with `tokenizer`: refused when its manifest
    hash differs from `sha256` (when set) or when it reads another tokenizer. `key` names the config key."""
    if not path or not os.path.exists(path):
        raise MsLlmError(f"{key}: {path} does not exist")
    if sha256:
        sha_key = key.rsplit(".", 1)[0] + ".reward_sha256"
        try:
            check_init_hash(resolve_model_dir(path), sha256)
        except MsLlmError as e:
            raise MsLlmError(f"{sha_key}: {e}") from None
    rm = load_reward_model(path, dtype=frozen_dtype(dtype, key.rsplit(".", 1)[0] + ".reward"))
    if not same_tokenizer(rm.tokenizer, tokenizer):
        raise MsLlmError(f"{key}: {rm.source} has another tokenizer ({rm.tokenizer.vocab_size} tokens) "
                         f"than the policy ({tokenizer.vocab_size} tokens); its scores would not read the policy's "
                         "responses as the policy wrote them. Train the reward model with the policy's tokenizer")
    return rm
