# SPDX-License-Identifier: Apache-2.0
"""Math primitives the decoder calls, each a plain function with a reference MindSpore version.

The reference versions run on CPU in PyNative and GRAPH_MODE. On Ascend the cells pass `fused=True`
(decided once, at cell construction, by `use_fused()`), and the same function calls MindSpore's fused
Ascend op instead. A fused CPU kernel from `kernels/` plugs in the same way without touching model code.
"""
from ms_llm.ops.core import (attention, causal_mask, cross_entropy, mask_bias, rms_norm, rope_inv_freq, rope_cos_sin,
                             apply_rotary, swiglu, use_fused, token_log_probs)

__all__ = ["attention", "causal_mask", "mask_bias", "cross_entropy", "rms_norm", "rope_inv_freq", "rope_cos_sin",
           "apply_rotary", "swiglu", "use_fused", "token_log_probs"]
