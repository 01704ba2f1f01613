# SPDX-License-Identifier: Apache-2.0
"""Checkpoints: atomic layout, pruning, refusal of corrupt files, skipping of half-written ones."""
import errno
import logging
import os
import subprocess

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


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_half_written_checkpoint_is_ignored_and_a_dead_writers_is_removed(saved, caplog):
    root, model, opt = saved
    dead = os.path.join(root, f".tmp_step_000040_{_dead_pid()}")           # a crash before the rename
    live = os.path.join(root, f".tmp_step_000040_{os.getppid()}")          # another process, still writing
    for d in (dead, live):
        os.makedirs(d)
        open(os.path.join(d, "model.safetensors"), "wb").write(b"partial")
    os.makedirs(os.path.join(root, "step_000050"))                          # rename without a manifest
    open(os.path.join(root, "step_000050", "model.safetensors"), "wb").write(b"partial")
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_resume(root).endswith("step_000030")
    assert "incomplete checkpoint" in caplog.text and "half-written" in caplog.text
    assert not os.path.exists(dead) and os.path.isfile(os.path.join(live, "model.safetensors"))


@pytest.mark.parametrize("what", ["export", "cache"])
def test_stale_temporary_folders_go_wherever_folders_are_written(tmp_path, what):
    """Exports and caches are written through the same storage.writing_dir: a dead writer's leftovers beside
    them go when the next one is written; a live writer's stay."""
    from ms_llm import storage
    final = tmp_path / ("final" if what == "export" else "teacher_cache")
    dead, live = tmp_path / f".tmp_{final.name}_{_dead_pid()}", tmp_path / f".tmp_{final.name}_{os.getppid()}"
    dead.mkdir()
    live.mkdir()
    with storage.writing_dir(str(final), what) as tmp:
        open(os.path.join(tmp, "x"), "w").write("whole")
    assert (final / "x").read_text() == "whole"
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([final.name, live.name])


def test_disk_full_mid_checkpoint_removes_the_partial_write_and_keeps_the_last_good(saved):
    """A writer that fails with ENOSPC after some bytes: one WriteFailed naming the file, the free space and the
    last good checkpoint; no .tmp_* left; the previous checkpoint still verifies and is still the resume point."""
    from ms_llm import storage
    root, model, opt = saved

    def fills_the_disk(folder):
        path = os.path.join(folder, "model.safetensors")
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    with pytest.raises(storage.WriteFailed) as e:
        ckpt.save_checkpoint(root, 40, {"model": fills_the_disk}, opt.state_tensors(), {"step": 40, "data_position": 40},
                             keep=2)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "model.safetensors" in msg and " free" in msg
    assert msg.count(os.path.join(root, "step_000030")) == 1 and "unchanged" in msg
    assert not [d for d in os.listdir(root) if d.startswith(".tmp_")]
    assert ckpt.find_resume(root).endswith("step_000030")
    ckpt.verify(os.path.join(root, "step_000030"))
    assert open(os.path.join(root, "latest")).read() == "step_000030"


def test_a_checkpoint_is_refused_before_writing_when_the_previous_ones_size_is_not_free(saved, monkeypatch):
    from ms_llm import storage
    root, model, opt = saved
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    with pytest.raises(storage.WriteFailed, match=r"not enough space to write .*step_000040: .* needed .*1000 B free"):
        ckpt.save_checkpoint(root, 40, {"model": model}, opt.state_tensors(), {"step": 40, "data_position": 40})
    assert sorted(os.listdir(root)) == ["latest", "step_000020", "step_000030"]


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
