# SPDX-License-Identifier: Apache-2.0
"""Frozen auxiliary models (a distillation teacher; later the RLHF reference, reward and value-init models),
all declared by one config section type (`FrozenModelSection`: path, sha256, dtype, tokenizer) and loaded
by one function:

    aux = load_frozen(cfg.distill.teacher, "distill.teacher")
    aux.model, aux.tokenizer, aux.sha256, aux.path

With `policy_without_adapter: true` the section names no path: the frozen model is the stage's LoRA policy seen
with its adapter switched off (peft.lora.AdapterDisabled) — the base weights the policy already holds, so a
reference model costs no second copy.

A frozen model has no trainable parameters and stays in eval mode whatever mode the cell that holds it is
switched to (CausalLM.frozen), so a loss cell's set_train(True) never puts a teacher into training.
"""
from dataclasses import dataclass

from ms_llm.data.tokenizer import Tokenizer
from ms_llm.errors import MsLlmError
from ms_llm.manifest import model_identity
from ms_llm.models.io import check_init_hash, frozen_dtype, load_pretrained, resolve_model_dir
from ms_llm.peft.lora import AdapterDisabled


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


def load_frozen(section, key: str, policy=None, policy_dir: str = None, policy_tokenizer=None) -> FrozenModel:
    """Load the model a FrozenModelSection names (`key` is its config key, for messages), refusing one whose
    manifest hash differs from `section.sha256` when that is set. `policy` (a LoRA CausalLM), its base model
    directory and tokenizer serve `policy_without_adapter`."""
    if section.policy_without_adapter:
        return _policy_base(section, key, policy, policy_dir, policy_tokenizer)
    model_dir, sha = frozen_source(section, key)
    model = load_frozen_weights(model_dir, frozen_dtype(section.dtype, key))
    return FrozenModel(model, Tokenizer.load(section.tokenizer or model_dir), sha, model_dir)


def frozen_source(section, key: str) -> tuple:
    """(model directory, sha256) of the model a section names, its hash checked when the section gives one —
    what a stage needs to know about a frozen model before (or instead of) loading its weights."""
    if not section.path:
        raise MsLlmError(f"{key}.path is not set")
    model_dir = resolve_model_dir(section.path)
    if section.sha256:
        try:
            return model_dir, check_init_hash(model_dir, section.sha256)
        except MsLlmError as e:
            raise MsLlmError(f"{key}: {e}".replace("model.init_sha256", f"{key}.sha256")) from None
    return model_dir, model_identity(model_dir)


def load_frozen_weights(model_dir: str, dtype: str, tp=None):
    """The frozen model's weights from `model_dir`, in `dtype` (`tp`: this rank's tensor-parallel part)."""
    return freeze(load_pretrained(model_dir, dtype=dtype, param_dtype=dtype, tp=tp))


def _policy_base(section, key: str, policy, policy_dir, tokenizer) -> FrozenModel:
    if section.path:
        raise MsLlmError(f"{key}: set {key}.path or {key}.policy_without_adapter, not both")
    if policy is None or getattr(policy, "lora_config", None) is None:
        raise MsLlmError(f"{key}.policy_without_adapter needs a LoRA policy (enable the stage's lora section)")
    sha = model_identity(policy_dir) if policy_dir else None
    if section.sha256 and sha != section.sha256:
        raise MsLlmError(f"{key}.sha256 {section.sha256} does not match the policy's base model {policy_dir} ({sha})")
    return FrozenModel(AdapterDisabled(policy), tokenizer, sha, policy_dir)
