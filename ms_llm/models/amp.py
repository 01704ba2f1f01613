# SPDX-License-Identifier: Apache-2.0
"""Mixed-precision levels, applied by setting the compute dtype of the model's cells (no source rewriting).

    O0  everything float32
    O1  attention and MLP matmuls in `dtype`; lm_head and the loss in float32
    O2  every matmul in `dtype`, lm_head included; parameters (master weights), norms, softmax, rotary and the
        loss stay float32 — the seed's Ascend setting (bf16 on 910B, fp16 + loss scaling on 910A and CPU)
    O3  half-precision master weights: refused by config validation on this release

Dtypes are read when a cell is first compiled, so call `apply_amp` before the first step.
"""
import mindspore as ms

from ms_llm.models.decoder import DTYPES, Attention, Linear


def apply_amp(model, level: str, dtype: str = "float16"):
    """Set matmul dtypes for `level` on a CausalLM (in place); returns the model."""
    low = DTYPES[dtype]
    body = ms.float32 if level == "O0" else low
    head = low if level == "O2" else ms.float32
    for name, cell in model.cells_and_names():
        if isinstance(cell, (Linear, Attention)):
            cell.compute_dtype = head if name == "lm_head" else body
    model.compute_dtype = head            # the tied-embedding head reads this
    model.config = model.config.replace(compute_dtype="float32" if level == "O0" else dtype)
    return model
