# SPDX-License-Identifier: Apache-2.0
"""Frozen auxiliary models: one loader with a hash check, eval mode that a parent's set_train cannot undo,
and generate() giving the caller its mode back."""
import pytest
from mindspore import nn

from ms_llm.config.schema import FrozenModelSection
from ms_llm.errors import MsLlmError
from ms_llm.models import CausalLM, preset
from ms_llm.models.frozen import load_frozen
from ms_llm.stages.common import export_final


class _Holder(nn.Cell):
    """A loss-like cell holding a trainable model and a frozen one."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher


@pytest.fixture
def exported(tmp_path):
    from ms_llm.data.synthetic import synthesize
    from ms_llm.data.tokenizer import Tokenizer
    synthesize(str(tmp_path / "data"), n_text=20, n_sft=20, n_eval=5)
    final = export_final(str(tmp_path / "run"), CausalLM(preset("tiny")), Tokenizer.load(tmp_path / "data" / "tokenizer"))
    return tmp_path / "run", final


def test_frozen_model_is_hash_checked_and_stays_in_eval_mode(exported):
    run, final = exported
    aux = load_frozen(FrozenModelSection(path=str(run), sha256=final["sha256"]), "reference")
    assert aux.sha256 == final["sha256"] and aux.path.endswith("final") and aux.tokenizer.vocab_size > 0
    assert not any(p.requires_grad for p in aux.model.get_parameters())
    holder = _Holder(CausalLM(preset("tiny")), aux.model)
    holder.set_train(True)
    assert holder.student.training and holder.student.model.layers[0].training
    assert not aux.model.training and not any(c.training for _, c in aux.model.cells_and_names())
    with pytest.raises(MsLlmError, match=r"reference: .*does not match reference.sha256"):
        load_frozen(FrozenModelSection(path=str(run), sha256="0" * 64), "reference")
    with pytest.raises(MsLlmError, match=r"reference.path is not set"):
        load_frozen(FrozenModelSection(), "reference")


def test_generate_restores_the_callers_mode():
    from ms_llm.generation import generate
    model = CausalLM(preset("tiny"))
    model.set_train(True)
    out = generate(model, [[5, 6, 7]], 3, temperature=0.0)
    assert out.tokens.shape == (1, 3) and model.training
    model.set_train(False)
    generate(model, [[5, 6, 7]], 2, temperature=0.0)
    assert not model.training


def test_reference_can_be_the_lora_policy_without_its_adapter(exported):
    import numpy as np
    from mindspore import Tensor
    from ms_llm.models.io import load_pretrained
    from ms_llm.peft import LoRAConfig, apply_lora
    run, final = exported
    policy = load_pretrained(str(run / "final"))
    apply_lora(policy, LoRAConfig(4, 8, 0.0, ["q_proj", "v_proj"]))
    for n, p in policy.parameters_and_names():
        if ".lora_B" in n:
            p.set_data(Tensor(np.full(p.shape, 0.05, np.float32)))
    section = FrozenModelSection(policy_without_adapter=True, sha256=final["sha256"])
    aux = load_frozen(section, "ppo.reference", policy, str(run / "final"))
    ids = Tensor(np.arange(12, dtype=np.int32).reshape(2, 6))
    base = load_pretrained(str(run / "final"))(ids).asnumpy()
    assert aux.sha256 == final["sha256"] and np.abs(policy(ids).asnumpy() - base).max() > 1e-4
    np.testing.assert_allclose(aux.model(ids).asnumpy(), base, atol=1e-5)
    with pytest.raises(MsLlmError, match="needs a LoRA policy"):
        load_frozen(section, "ppo.reference", CausalLM(preset("tiny")), str(run / "final"))
    with pytest.raises(MsLlmError, match="not both"):
        load_frozen(FrozenModelSection(path=str(run), policy_without_adapter=True), "ppo.reference", policy)
    with pytest.raises(MsLlmError, match="does not match the policy's base"):
        load_frozen(FrozenModelSection(policy_without_adapter=True, sha256="0" * 64), "ppo.reference", policy,
                    str(run / "final"))
