# SPDX-License-Identifier: Apache-2.0
"""Where paused generations wait: `StateCache` holds `generation.GenerationState`s by key between the chunks
of a rollout, and writes them to (and reads them from) a folder, so a rollout paused in one process continues
in another and draws the same tokens.

    cache = StateCache()
    out = generate(policy, prompts, max_new_tokens=256, seed=7)
    cache.put("round3", out.state)
    cache.save("runs/x/rollout_state")                 # caches, slots, finished flags, history, RNG
    later = StateCache.load("runs/x/rollout_state", policy)
    more = generate(policy, None, max_new_tokens=256, state=later.pop("round3"))
"""
import json
import os

import mindspore as ms
import numpy as np
from mindspore import Tensor

from ms_llm import storage
from ms_llm.errors import MsLlmError
from ms_llm.generation import GenerationState, rng_from_state, rng_state
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors

ARRAYS, META = "state.safetensors", "state.json"


class StateCache:
    def __init__(self):
        self.states = {}

    def put(self, key: str, state: GenerationState):
        self.states[key] = state

    def pop(self, key: str) -> GenerationState:
        if key not in self.states:
            raise MsLlmError(f"no paused generation under '{key}' (have {sorted(self.states)})")
        return self.states.pop(key)

    def __contains__(self, key):
        return key in self.states

    def __len__(self):
        return len(self.states)

    def save(self, folder: str):
        """Every state into `folder` (written beside it, then renamed: a reader never sees half a cache)."""
        with storage.writing_dir(folder, "generation state cache") as tmp:
            meta = {}
            for key, st in self.states.items():
                os.makedirs(os.path.join(tmp, key))
                arrays = {f"cache.{i}": c.astype(ms.float32).asnumpy() for i, c in enumerate(st.caches)}
                arrays.update(starts=np.asarray(st.starts, np.int32), slots=np.asarray(st.slots, np.int32),
                              next_tokens=np.asarray(st.next_tokens, np.int32), finished=st.finished.astype(np.int8))
                write_safetensors(os.path.join(tmp, key, ARRAYS), arrays)
                meta[key] = {"history": st.history, "n_caches": len(st.caches), "rng": rng_state(st.rng)}
            with open(os.path.join(tmp, "index.json"), "w") as f:
                json.dump(meta, f)

    @classmethod
    def load(cls, folder: str, model) -> "StateCache":
        """States saved by `save`, their caches in `model`'s compute dtype."""
        index = os.path.join(folder, "index.json")
        if not os.path.isfile(index):
            raise MsLlmError(f"{folder}: no index.json; not a saved generation state cache")
        with open(index) as f:
            meta = json.load(f)
        cache = cls()
        for key, m in meta.items():
            a = read_safetensors(os.path.join(folder, key, ARRAYS))
            caches = tuple(Tensor(a[f"cache.{i}"], model.compute_dtype) for i in range(m["n_caches"]))
            rng = rng_from_state(m["rng"])
            if "starts" in a:
                starts, slots = a["starts"], a["slots"]
            else:                  # saved before per-row slots: every row's next slot was next_slot
                starts, slots = a["pads"], np.full(len(a["pads"]), m["next_slot"])
            cache.put(key, GenerationState(caches, starts.astype(np.int32), slots.astype(np.int32),
                                           a["next_tokens"].astype(np.int32), a["finished"].astype(bool),
                                           m["history"], rng))
        return cache
