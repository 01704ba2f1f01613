# SPDX-License-Identifier: Apache-2.0
"""Math primitives the decoder calls, each a plain function with a reference MindSpore version.

Each takes a `backend` ("reference" | "cpu" | "ascend") that the calling cell chose once, when it was built,
from the table in `ms_llm.ops.backend`: the reference versions run everywhere in PyNative and GRAPH_MODE,
"cpu" calls the C++ kernels of `kernels/cpu` (ms_llm/ops/kernels.py builds and loads them), "ascend" calls
MindSpore's fused Ascend ops.
"""
from ms_llm.ops.core import (adamw_fused_op, adamw_in_place, attention, causal_mask, cross_entropy, kv_attend, linear, linear_distill,
                             linear_rows3, swiglu_rows,
                             linear_log_probs, mask_bias, rms_norm, rope_inv_freq, rope_cos_sin, apply_rotary, swiglu,
                             token_log_probs)

__all__ = ["adamw_fused_op", "adamw_in_place", "linear_distill",
           "attention", "kv_attend", "linear_rows3", "swiglu_rows", "causal_mask", "mask_bias", "cross_entropy", "linear", "linear_log_probs", "rms_norm",
           "rope_inv_freq", "rope_cos_sin", "apply_rotary", "swiglu", "token_log_probs"]
