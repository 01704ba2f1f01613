# SPDX-License-Identifier: Apache-2.0
"""Frozen auxiliary models (a distillation teacher; later the RLHF reference, reward and value-init models),
all declared by one config section type (`FrozenModelSection`: path, sha256, dtype, tokenizer) and loaded
by one function:

    aux = load_frozen(cfg.distill.teacher, "distill.teacher")
    aux.model, aux.tokenizer, aux.sha256, aux.path

A frozen model has no trainable parameters and stays in eval mode whatever mode the cell that holds it is
switched to (CausalLM.frozen), so a loss cell's set_train(True) never puts a teacher into training.
"""
from dataclasses import dataclass

from ms_llm.errors import MsLlmError


@dataclass
class FrozenModel:
    model: object            # CausalLM in eval mode, frozen
    tokenizer: object        # data.tokenizer.Tokenizer
    sha256: str              # model_sha256 of its MANIFEST.json (or of its weight files when it has none)
    path: str                # the resolved model directory


def freeze(model):
    """No gradients, eval mode now and whenever a parent cell changes mode; returns the model."""
    for p in model.get_parameters():
        p.requires_grad = False
    model.frozen = True
    model.set_train(False)
    return model


def load_frozen(section, key: str) -> FrozenModel:
    """Load the model a FrozenModelSection names (`key` is its config key, for messages), refusing one whose
    manifest hash differs from `section.sha256` when that is set."""
    from ms_llm.data.tokenizer import Tokenizer
    from ms_llm.eval.results import model_identity
    from ms_llm.models.io import load_pretrained, resolve_model_dir
    from ms_llm.stages.common import check_init_hash
    if not section.path:
        raise MsLlmError(f"{key}.path is not set")
    model_dir = resolve_model_dir(section.path)
    if section.sha256:
        try:
            sha = check_init_hash(model_dir, section.sha256)
        except MsLlmError as e:
            raise MsLlmError(f"{key}: {e}".replace("model.init_sha256", f"{key}.sha256")) from None
    else:
        sha = model_identity(model_dir)
    model = freeze(load_pretrained(model_dir, dtype=section.dtype))
    return FrozenModel(model, Tokenizer.load(section.tokenizer or model_dir), sha, model_dir)
