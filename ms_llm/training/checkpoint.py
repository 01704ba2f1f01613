# SPDX-License-Identifier: Apache-2.0
"""Crash-safe checkpoints.

    checkpoints/step_000200/{model.safetensors, config.json, optimizer.safetensors, trainer_state.json, MANIFEST.json}
    checkpoints/step_000200/value/{model.safetensors, config.json}      (a stage's further models, by name)
    checkpoints/latest        -> "step_000200" (updated last, atomically)

A checkpoint holds named models (the stage's main model at the top level, loadable as a model directory; the
others in subfolders named after them), every updater's optimizer and loss-scale state in
optimizer.safetensors under `<updater>/`, and the stage's state (data position, RNG positions, controllers,
queues) in trainer_state.json.

A checkpoint is written into `.tmp_step_..._<pid>` (ms_llm.storage), every file fsynced, MANIFEST.json (SHA256
of every file) written last, then the directory is renamed into place and `latest` replaced. Before writing,
the free space is checked against the previous checkpoint's size; a write that fails for lack of space (or
another I/O error) removes its partial folder and stops the run with one line naming the last good checkpoint
(storage.WriteFailed, exit status 3). A `.tmp_*` of a process that no longer runs is removed on resume. A directory without a
manifest (a crash mid-write) is skipped by `find_resume` with a warning; a file whose SHA256 does not match
its manifest is refused with an error, since silently training on corrupt weights is worse than stopping.
"""
import logging
import os
import re
import shutil

import mindspore as ms
import numpy as np
from mindspore import nn

from ms_llm import storage
from ms_llm.errors import MsLlmError
from ms_llm.fileio import fsync_dir, read_json, write_json_atomic
from ms_llm.manifest import verify, write_manifest  # noqa: F401  (checkpoints are verified through these)
from ms_llm.models.io import save_pretrained
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors
from ms_llm.models.shards import local_value, shape_of

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(root: str, step: int, models: dict, optimizer_state: dict, trainer_state: dict,
                    keep: int = 5) -> str:
    """Write checkpoint `step` atomically, point `latest` at it, prune to `keep`; returns its path.

    models: {name: CausalLM, or writer(folder)} — the first at the top level, the others in `<name>/`
    (a writer replaces the full-model export, e.g. LoRA writes only its adapter).
    """
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:06d}"
    previous = list_checkpoints(root)
    last_good = previous[0][1] if previous else None
    need = storage.folder_bytes(last_good) if last_good else None     # refuse early rather than half-write
    with storage.writing_dir(os.path.join(root, name), f"checkpoint step {step}", need, last_good) as tmp:
        for i, (model_name, model) in enumerate(models.items()):
            folder = tmp if i == 0 else os.path.join(tmp, model_name)
            os.makedirs(folder, exist_ok=True)
            if isinstance(model, nn.Cell):
                save_pretrained(model, folder)
            else:
                model(folder)
        write_safetensors(os.path.join(tmp, "optimizer.safetensors"),
                          {k: v if isinstance(v, np.ndarray) else np.asarray(v.asnumpy()) for k, v in optimizer_state.items()})
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), trainer_state)
        write_manifest(tmp, extra={"step": step}, recursive=True)
    final = os.path.join(root, name)
    latest_tmp = os.path.join(root, "latest.tmp")
    try:
        fsync_dir(root)
        with open(latest_tmp, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, os.path.join(root, "latest"))
    except OSError as e:                      # the checkpoint itself is whole: resume finds it without `latest`
        if os.path.exists(latest_tmp):
            os.remove(latest_tmp)
        if e.errno in storage.IO_ERRORS:
            raise storage.write_failed(e, f"checkpoint step {step}", latest_tmp, last_good=final) from None
        raise
    _prune(root, keep, name)
    return final


def list_checkpoints(root: str) -> list:
    """Step directories under root, newest first, as (step, path)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := STEP_DIR.match(d))]
    return sorted(found, reverse=True)


def _prune(root: str, keep: int, protect: str):
    for _, path in list_checkpoints(root)[keep:]:
        if os.path.basename(path) != protect:
            shutil.rmtree(path, ignore_errors=True)


def find_resume(root: str, main: bool = True):
    """Newest complete checkpoint, or None; incomplete ones are skipped with a warning. `main` (rank 0, or one
    process) also verifies it and sweeps stale half-written directories; the other ranks of a job only look (on
    shared storage another node's writer is not a process they can see, and one verification is enough: the
    trainer shares its result)."""
    if main and os.path.isdir(root):
        storage.sweep_stale(root)                  # half-written by a process that is gone: give the space back
        for d in os.listdir(root):
            if d.startswith(".tmp_"):
                log.warning("ignoring checkpoint directory %s, being written by a running process", os.path.join(root, d))
    for step, path in list_checkpoints(root):
        if not os.path.isfile(os.path.join(path, "MANIFEST.json")):
            log.warning("ignoring incomplete checkpoint %s (no MANIFEST.json)", path)
            continue
        if main:
            verify(path)
        return path
    return None


def load_optimizer_state(folder: str, optimizer_state: dict, transform=None):
    """Copy optimizer.safetensors into the given {name: Parameter}; every name must be present.
    `transform` maps the saved {name: array} first (an updater's part, tensor parallel: this rank's slices)."""
    saved = read_safetensors(os.path.join(folder, "optimizer.safetensors"))
    if transform is not None:
        saved = transform(saved)
    missing = sorted(set(optimizer_state) - set(saved))
    if missing:
        raise MsLlmError(f"{folder}/optimizer.safetensors: missing optimizer state {missing[:5]} "
                         "(was the checkpoint written by a different model or optimizer?)")
    for name, param in optimizer_state.items():
        if tuple(saved[name].shape) != shape_of(param):
            raise MsLlmError(f"{folder}/optimizer.safetensors: '{name}' has shape {list(saved[name].shape)}, "
                             f"expected {list(shape_of(param))}")
        param.set_data(ms.Tensor(local_value(param, saved[name]).astype(param.asnumpy().dtype)))


def read_trainer_state(folder: str) -> dict:
    return read_json(os.path.join(folder, "trainer_state.json"), "the trainer state")
