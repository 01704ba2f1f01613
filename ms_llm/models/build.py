# SPDX-License-Identifier: Apache-2.0
"""The model a stage trains, from its config: `model.init_from` (hash-checked) or a preset with overrides, with
μP, this process's part of a split layout, recompute and the AMP level applied."""
from ms_llm.errors import MsLlmError
from ms_llm.models import mup
from ms_llm.models.amp import apply_amp
from ms_llm.models.config import preset
from ms_llm.models.decoder import CausalLM
from ms_llm.models.io import check_init_hash, load_pretrained


def build_model(cfg, layout=None) -> CausalLM:
    """The stage's model: init_from (hash-checked) or a preset with overrides, at the configured AMP level.
    Under a split layout every rank builds the same whole model and keeps its part (Layout.localize)."""
    m = cfg.model
    if m.init_from:
        if m.init_sha256:
            check_init_hash(m.init_from, m.init_sha256)
        if m.overrides:
            raise MsLlmError("model.overrides cannot change a model loaded with model.init_from")
        model = load_pretrained(m.init_from)
    else:
        try:
            model = CausalLM(preset(m.preset, **m.overrides))
        except TypeError as e:
            raise MsLlmError(f"model.overrides: {e}") from None
    if cfg.mup.enabled:
        mup.apply(model, cfg.mup, fresh=not m.init_from, init_std=cfg.mup.init_std)
    if layout is not None:
        model = layout.localize(model, m.init_from or "model")
    if cfg.parallel.recompute:
        for layer in model.model.layers:
            layer.recompute()          # keep only layer inputs; recompute the rest in the backward pass
    return apply_amp(model, cfg.train.amp_level, cfg.train.compute_dtype)
