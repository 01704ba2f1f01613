# SPDX-License-Identifier: Apache-2.0
"""Bad checkpoints and configs: one clear MsLlmError naming the key or file, and exit code 2 from the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_hf_model
from ms_llm.errors import MsLlmError
from ms_llm.models import CausalLM, load_pretrained, preset, save_pretrained
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors


def test_wrong_shape_is_named(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = read_safetensors(str(path))
    state["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 64), np.float32)
    del state["model.norm.weight"]
    state["model.extra.weight"] = np.zeros(2, np.float32)
    write_safetensors(str(path), state)
    with pytest.raises(MsLlmError) as e:
        load_pretrained(tmp_path / "hf")
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight: shape [3, 64] but the model needs [96, 64]" in msg
    assert "missing model.norm.weight" in msg and "unexpected model.extra.weight" in msg
    model = load_pretrained(tmp_path / "hf", strict=False)      # non-strict loads what fits
    assert np.array_equal(model.model.layers[0].mlp.up_proj.weight.asnumpy(),
                          state["model.layers.0.mlp.up_proj.weight"])


def test_missing_shard_is_named(tmp_path):
    model = CausalLM(preset("tiny"))
    files = save_pretrained(model, tmp_path / "m", max_shard_bytes=50_000)
    shard = files[1]
    assert shard.startswith("model-00002-of-")
    os.remove(tmp_path / "m" / shard)
    with pytest.raises(MsLlmError, match=f"{shard}: shard listed in .* is missing"):
        load_pretrained(tmp_path / "m")


def test_unsupported_architecture_is_named(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MsLlmError, match=r"config.json: key 'architectures' = \['GPT2LMHeadModel'\] is not supported"):
        load_pretrained(tmp_path / "hf")


def test_truncated_safetensors_is_refused(tmp_path):
    model = CausalLM(preset("tiny"))
    save_pretrained(model, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(MsLlmError, match="truncated or corrupt"):
        load_pretrained(tmp_path / "m")


def test_cli_exit_code_2_with_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "generate", "--model", str(tmp_path / "bad"),
                        "--prompt", "hi"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "'architectures'" in r.stderr
    assert "Traceback" not in r.stderr


def test_bf16_checkpoint_is_widened_exactly(tmp_path):
    """Real Qwen/Llama releases are bf16; the reader widens them to the same float32 torch gives."""
    import torch
    from safetensors.torch import save_file
    t = torch.randn(4, 8).to(torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "x.safetensors"))
    got = read_safetensors(str(tmp_path / "x.safetensors"))["w"]
    assert got.dtype == np.float32 and np.array_equal(got, t.float().numpy())
