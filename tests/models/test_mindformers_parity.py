# SPDX-License-Identifier: Apache-2.0
"""Parity with mindformers' LlamaForCausalLM for the same weights, through `ms_llm.models.convert`."""
import mindspore as ms
import numpy as np
import pytest

from conftest import make_hf_model
from ms_llm.cli import main
from ms_llm.models import load_pretrained
from ms_llm.models.convert import read_mindformers

mindformers = pytest.importorskip("mindformers", reason="the [mindformers] extra is not installed")


def _mindformers_model(cfg, qkv_bias):
    from mindformers import LlamaConfig, LlamaForCausalLM
    mf_cfg = LlamaConfig(
        batch_size=2, seq_length=17, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size, max_position_embedding=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        theta=cfg.rope_theta, compute_dtype="float32", param_init_type="float32", layernorm_compute_type="float32",
        softmax_compute_type="float32", rotary_dtype="float32", fused_rms_norm=False, use_rope_slice=True,
        use_flash_attention=False, qkv_has_bias=qkv_bias)
    return LlamaForCausalLM(mf_cfg)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_match_mindformers(tmp_path, family):
    make_hf_model(family, tmp_path / "hf")
    assert main(["convert", "--from", "hf", "--to", "mindformers", str(tmp_path / "hf"),
                 str(tmp_path / "mf.ckpt")]) == 0
    ours = load_pretrained(tmp_path / "hf")
    state = read_mindformers(str(tmp_path / "mf.ckpt"))
    assert "model.layers.1.attention.wq.weight" in state
    if "lm_head.weight" not in state:          # tied model: mindformers' Llama keeps a separate head
        state["lm_head.weight"] = state["model.tok_embeddings.embedding_weight"]
    net = _mindformers_model(ours.config, family == "qwen2")
    not_loaded, unused = ms.load_param_into_net(net, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in state.items()})
    assert not_loaded == [] and unused == []
    net.set_train(False)
    ids = np.random.RandomState(0).randint(0, 256, (2, 17)).astype(np.int32)
    ref = net(ms.Tensor(ids))[0].asnumpy()
    assert np.abs(ours(ms.Tensor(ids)).asnumpy() - ref).max() <= 1e-4


def test_mindformers_checkpoint_converts_back_to_hf(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    assert main(["convert", "--from", "hf", "--to", "mindformers", str(tmp_path / "hf"),
                 str(tmp_path / "mf.safetensors")]) == 0
    assert main(["convert", "--from", "mindformers", "--to", "hf", str(tmp_path / "mf.safetensors"),
                 str(tmp_path / "back"), "--config", str(tmp_path / "hf" / "config.json")]) == 0
    a, b = load_pretrained(tmp_path / "hf"), load_pretrained(tmp_path / "back")
    for pa, pb in zip(a.get_parameters(), b.get_parameters()):
        assert pa.name == pb.name and np.array_equal(pa.asnumpy(), pb.asnumpy())
