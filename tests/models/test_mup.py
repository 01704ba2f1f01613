# SPDX-License-Identifier: Apache-2.0
"""μP: multipliers survive export (folded for Hugging Face readers), init and learning-rate rules, the
trainer's optimizer gets the per-group rates, and the coordinate check is flat under μP."""
import mindspore as ms
import numpy as np
import pytest
import torch

from ms_llm.config import load_config
from ms_llm.errors import MsLlmError
from ms_llm.models import CausalLM, load_pretrained, mup, preset, save_pretrained
from ms_llm.models.config import MUP_KEY
from ms_llm.training.optim import AdamW
from ms_llm.training.step import LossScaleState, TrainStep
from ms_llm.training.updater import Updater


class Section:
    def __init__(self, **kw):
        self.base_width, self.lr_exponent, self.embedding_multiplier = 64, 0.85, 12.0
        self.output_multiplier, self.zero_readout = 1.0, True
        self.__dict__.update(kw)


def wide(tied=False, width=128):
    return CausalLM(preset("tiny", hidden_size=width, intermediate_size=width * 11 // 4, num_attention_heads=width // 16,
                           num_key_value_heads=width // 32, tie_word_embeddings=tied))


def ids():
    return ms.Tensor(np.random.default_rng(0).integers(0, 512, (2, 12)), ms.int32)


@pytest.mark.parametrize("tied", [False, True])
def test_export_folds_multipliers_and_reload_restores_them(tmp_path, tied):
    import transformers
    model = mup.apply(wide(tied), Section(zero_readout=False), fresh=True)
    assert (model.embedding_multiplier, model.logit_multiplier) == (12.0, 0.5)
    ref = model(ids()).asnumpy()
    save_pretrained(model, tmp_path / "m")
    back = load_pretrained(tmp_path / "m")
    assert (back.embedding_multiplier, back.logit_multiplier, back.tied) == (12.0, 0.5, tied)
    np.testing.assert_allclose(back(ids()).asnumpy(), ref, atol=1e-6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")    # a plain Llama, multipliers folded
    with torch.no_grad():
        got = hf(torch.tensor(ids().asnumpy()).long()).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert hf.config.tie_word_embeddings is False and getattr(hf.config, MUP_KEY)["tie_word_embeddings"] is tied


def test_fresh_init_and_learning_rate_rules():
    ms.set_seed(3)
    model = mup.apply(wide(width=256), Section(), fresh=True, init_std=0.1)
    m = 256 / 64
    named = dict(model.parameters_and_names())
    q = named["model.layers.0.self_attn.q_proj.weight"].asnumpy()
    assert abs(q.std() - 0.1 / np.sqrt(m)) < 0.005
    assert not named["lm_head.weight"].asnumpy().any()                        # zero readout
    assert abs(named["model.embed_tokens.weight"].asnumpy().std() - 0.02) < 0.002   # embedding keeps its std
    params = model.trainable_params()
    scales = dict(zip([p.name for p in params], mup.lr_scales(model, params, Section())))
    hidden = [n for n in scales if mup.is_hidden_matrix(n, named[n].shape)]
    assert len(hidden) == 2 * 7
    assert all(scales[n] == pytest.approx(m ** -0.85) for n in hidden)
    assert all(v == 1.0 for n, v in scales.items() if n not in hidden)     # embedding, lm_head, norms


def test_one_adam_step_moves_hidden_matrices_by_the_scaled_rate(graph_mode):
    """Adam's first step is lr x sign(g): hidden matrices must move by lr x m^-α, the rest by lr."""
    from ms_llm.losses.lm import LMLoss
    model = mup.apply(wide(width=256), Section(zero_readout=False), fresh=True)
    before = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    params = model.trainable_params()
    step = TrainStep(LMLoss(model), AdamW(params, (0.9, 0.95), 1e-12, 0.0, mup.lr_scales(model, params, Section())),
                     LossScaleState(False), clip=0.0)
    x = np.random.default_rng(1).integers(0, 512, (2, 17)).astype(np.int32)
    step([(ms.Tensor(x[:, :-1]), ms.Tensor(x[:, 1:]))], 1e-3)
    for name, p in model.parameters_and_names():
        moved = np.abs(p.asnumpy() - before[name])
        moved = moved[moved > 0]
        want = 1e-3 * (4 ** -0.85 if mup.is_hidden_matrix(name, p.shape) else 1.0)
        assert np.median(moved) == pytest.approx(want, rel=1e-3), name


def test_loaded_model_is_reparametrized_without_changing_its_function():
    model = wide()
    ref = model(ids()).asnumpy()
    mup.apply(model, Section(), fresh=False)
    assert model.logit_multiplier == 0.5
    np.testing.assert_allclose(model(ids()).asnumpy(), ref, atol=1e-6)
    with pytest.raises(MsLlmError, match="ties its embedding"):
        mup.apply(wide(tied=True), Section(), fresh=False)


def test_trainer_optimizer_gets_mup_rates_and_config_is_validated(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {preset: tiny}\ndata: {sources: [{path: x.jsonl}]}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["mup.enabled=true", "mup.base_width=32", "mup.lr_exponent=0.85"])
    model = CausalLM(preset("tiny", hidden_size=128))
    opt = Updater("model", cfg, model, model).optimizer
    scales = sorted({round(float(s.asnumpy()), 6) for s in opt.lr_scales})
    assert scales == [round(4 ** -0.85, 6), 1.0]
    with pytest.raises(MsLlmError, match="mup.base_width"):
        load_config(str(tmp_path / "c.yaml"), ["mup.enabled=true", "mup.base_width=0"])


@pytest.mark.slow
def test_coordinate_check_is_flat_under_mup_and_grows_under_standard(graph_mode):
    from ms_llm.bench import coord_check as cc
    result = cc.coord_check([64, 256], steps=3, lr=1e-2, progress=False)
    for name in result["names"][1:]:
        assert 0.75 < cc.growth(result, "mup", name) < 1.33, (name, cc.growth(result, "mup", name))
    for name, least in (("layer 1 attention out", 3.0), ("layer 1 MLP out", 3.0), ("logits", 1.5)):  # 4x wider
        assert cc.growth(result, "sp", name) > least, (name, cc.growth(result, "sp", name))


@pytest.mark.slow
def test_tiny_mup_pretraining_learns_and_exports_a_plain_llama(tmp_path_factory):
    import json
    import subprocess
    import sys
    import transformers
    from conftest import make_workdir
    d = make_workdir(tmp_path_factory, "mup", n_text=300, n_sft=40)
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "train", "configs/tiny/pretrain_mup.yaml", "train.max_steps=30",
                        "train.eval_every=0", "data.eval_fraction=0", "train.progress_bar=false", "log.plots=false"],
                       cwd=d, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in open(d / "runs" / "tiny_pretrain_mup" / "metrics.jsonl")]
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"]
    final = d / "runs" / "tiny_pretrain_mup" / "final"
    model = load_pretrained(final)
    assert (model.embedding_multiplier, model.logit_multiplier, model.config.hidden_size) == (1.0, 0.5, 128)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        got = hf(torch.tensor(ids().asnumpy()).long()).logits.numpy()
    np.testing.assert_allclose(got, model(ids()).asnumpy(), atol=1e-5)
