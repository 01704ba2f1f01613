# SPDX-License-Identifier: Apache-2.0
"""Logits parity with Hugging Face transformers (PyTorch CPU, fp32), both directions, all three families."""
import json

import mindspore as ms
import numpy as np
import pytest

from conftest import make_hf_model, torch_logits
from ms_llm.models import load_pretrained, preset, save_pretrained

FAMILIES = ["llama", "qwen2", "qwen3"]


def _ids(b=2, s=19, v=256, seed=0):
    return np.random.RandomState(seed).randint(0, v, (b, s)).astype(np.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_hf_matches_transformers(tmp_path, family):
    ref_model = make_hf_model(family, tmp_path / "hf")
    ids = _ids()
    model = load_pretrained(tmp_path / "hf")
    out = model(ms.Tensor(ids)).asnumpy()
    assert out.dtype == np.float32 and out.shape == (2, 19, 256)
    assert np.abs(out - torch_logits(ref_model, ids)).max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_in_transformers(tmp_path, family):
    import transformers
    make_hf_model(family, tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = _ids(seed=1)
    assert np.abs(model(ms.Tensor(ids)).asnumpy() - torch_logits(back, ids)).max() <= 1e-4


def test_sharded_checkpoint_round_trip(tmp_path):
    import transformers
    make_hf_model("llama", tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    files = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=100_000)
    assert "model.safetensors.index.json" in files and len(files) > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {p.name for p in model.get_parameters()}
    again = load_pretrained(tmp_path / "sharded")
    ids = _ids(seed=2)
    ref = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval(), ids)
    assert np.abs(again(ms.Tensor(ids)).asnumpy() - ref).max() <= 1e-4


def test_padding_mask_and_positions_match_transformers(tmp_path):
    """Left padding: with the same attention mask and position ids, real positions match transformers."""
    import torch
    ref_model = make_hf_model("qwen2", tmp_path / "hf")
    ids = _ids(s=12)
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    model = load_pretrained(tmp_path / "hf")
    out = model(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(pos)).asnumpy()
    ref = torch_logits(ref_model, ids, attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos, dtype=torch.long))
    real = mask.astype(bool)
    assert np.abs(out[real] - ref[real]).max() <= 1e-4


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "dynamic", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    # max_position_embeddings 16 < sequence 24, so dynamic NTK actually rescales
    ref_model = make_hf_model("llama", tmp_path / "hf", rope_scaling=scaling, max_position_embeddings=16)
    ids = _ids(s=24)
    model = load_pretrained(tmp_path / "hf")
    assert np.abs(model(ms.Tensor(ids)).asnumpy() - torch_logits(ref_model, ids)).max() <= 1e-4


def test_graph_mode_matches_pynative(tmp_path, graph_mode):
    make_hf_model("qwen3", tmp_path / "hf")
    ids = _ids()
    graph = load_pretrained(tmp_path / "hf")(ms.Tensor(ids)).asnumpy()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    eager = load_pretrained(tmp_path / "hf")(ms.Tensor(ids)).asnumpy()
    assert np.abs(graph - eager).max() <= 1e-5


def test_low_precision_compute_stays_close(tmp_path):
    """fp16 matmuls (the O2 compute dtype on CPU) keep logits float32 and close to the fp32 model."""
    make_hf_model("llama", tmp_path / "hf")
    ids = _ids()
    ref = load_pretrained(tmp_path / "hf")(ms.Tensor(ids)).asnumpy()
    half = load_pretrained(tmp_path / "hf", dtype="float16")(ms.Tensor(ids)).asnumpy()
    assert half.dtype == np.float32
    assert 0 < np.abs(half - ref).max() < 5e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_matches_built_models(tmp_path, family):
    """ModelConfig.num_parameters (what memory arithmetic is built on) counts what both frameworks build."""
    ref_model = make_hf_model(family, tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    built = sum(int(p.size) for p in model.get_parameters())
    assert model.config.num_parameters() == built == sum(p.numel() for p in ref_model.parameters())


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-7b", "qwen3-8b", "llama3-8b"])
def test_preset_parameter_count_matches_transformers(name):
    """Each full-size preset's count against transformers' own model built on the meta device (no memory);
    Qwen2.5-7B's is the 7.62B of its model card: 7,615,616,512 with the q/k/v biases."""
    import torch
    import transformers
    hf = preset(name).to_hf_config()
    cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(cfg)
    assert preset(name).num_parameters() == sum(p.numel() for p in ref.parameters())
    if name == "qwen2.5-7b":
        assert preset(name).num_parameters() == 7_615_616_512
