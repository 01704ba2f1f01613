# SPDX-License-Identifier: Apache-2.0
"""Checkpoints: atomic layout, pruning, refusal of corrupt files, skipping of half-written ones."""
import logging
import os

import mindspore as ms
import numpy as np
import pytest

from ms_llm.errors import MsLlmError
from ms_llm.models import CausalLM, preset
from ms_llm.training import checkpoint as ckpt
from ms_llm.training.optim import AdamW


@pytest.fixture
def saved(tmp_path):
    model = CausalLM(preset("tiny"))
    opt = AdamW(model.trainable_params())
    root = str(tmp_path / "checkpoints")
    for step in (10, 20, 30):
        ckpt.save_checkpoint(root, step, {"model": model}, opt.state_tensors(), {"step": step, "data_position": step}, keep=2)
    return root, model, opt


def test_layout_latest_and_pruning(saved):
    root, _, _ = saved
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [30, 20]
    assert open(os.path.join(root, "latest")).read() == "step_000030"
    files = set(os.listdir(os.path.join(root, "step_000030")))
    assert {"model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json", "MANIFEST.json"} <= files
    assert ckpt.find_resume(root).endswith("step_000030")


def test_flipped_byte_is_refused(saved):
    root, _, _ = saved
    path = os.path.join(root, "step_000030", "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(MsLlmError, match=r"step_000030/model.safetensors: SHA256 .* does not match MANIFEST.json"):
        ckpt.find_resume(root)


def test_half_written_checkpoint_is_ignored(saved, caplog):
    root, model, opt = saved
    os.makedirs(os.path.join(root, ".tmp_step_000040_999"))                 # crash before the rename
    os.makedirs(os.path.join(root, "step_000050"))                          # rename without a manifest
    open(os.path.join(root, "step_000050", "model.safetensors"), "wb").write(b"partial")
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_resume(root).endswith("step_000030")
    assert "incomplete checkpoint" in caplog.text and "half-written" in caplog.text


def test_optimizer_state_round_trip(saved):
    """Every moment and the step count come back as saved: distinct random values, not zeros into zeros, and
    not a later change to the live optimizer."""
    root, model, opt = saved
    rng = np.random.default_rng(0)
    state = opt.state_tensors()
    for p in state.values():
        p.set_data(ms.Tensor(rng.normal(size=p.shape).astype(p.asnumpy().dtype) if p.shape else np.array(7, p.asnumpy().dtype)))
    want = {n: p.asnumpy().copy() for n, p in state.items()}
    ckpt.save_checkpoint(root, 40, {"model": model}, state, {"step": 40, "data_position": 40})
    for p in state.values():                                         # change the live state after saving
        p.set_data(ms.Tensor(p.asnumpy() + 1))
    fresh = AdamW(model.trainable_params())
    ckpt.load_optimizer_state(os.path.join(root, "step_000040"), fresh.state_tensors())
    got = {n: p.asnumpy() for n, p in fresh.state_tensors().items()}
    assert set(got) == set(want) and len(want) > 2
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert any(np.abs(v).sum() > 0 for v in want.values() if v.shape)
