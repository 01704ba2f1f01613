# SPDX-License-Identifier: Apache-2.0
"""A run whose output directory fills up: the tiny pretrain on a real 3 MB tmpfs (in a private mount namespace),
where the first checkpoint fits and the second does not. One line and exit status 3, no half-written folder, the
last good checkpoint still verifies, and a rerun with space resumes to the uninterrupted run's exact weights."""
import os
import subprocess
import sys

import numpy as np
import pytest

from ms_llm.models.safetensors_io import read_safetensors
from ms_llm.training import checkpoint as ckpt
from conftest import make_workdir, run_cli

ARGS = ["train", "configs/tiny/pretrain.yaml", "train.max_steps=40", "checkpoint.every=20", "train.progress_bar=false",
        "log.plots=false"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory, "disk_full")


def _run_on_small_tmpfs(workdir, size: str, keep_as):
    """`ms-llm train` with train.output_dir on a fresh tmpfs of `size`; the run directory is copied out to
    `keep_as` before the mount namespace (and the tmpfs) go. Returns the CompletedProcess."""
    mnt = workdir / "small_disk"
    mnt.mkdir(exist_ok=True)
    keep_as.parent.mkdir(parents=True, exist_ok=True)
    cli = " ".join([sys.executable, "-m", "ms_llm.cli", *ARGS, f"train.output_dir={mnt}/run"])
    script = (f"mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99; {cli}; rc=$?; "
              f"cp -a {mnt}/run {keep_as}; exit $rc")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=workdir,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 99, "cannot mount a tmpfs here: " + r.stderr
    return r


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_a_rerun_resumes_exactly(workdir):
    run_cli(workdir, *ARGS, "train.output_dir=runs/uninterrupted")
    want = read_safetensors(str(workdir / "runs/uninterrupted/final/model.safetensors"))

    kept = workdir / "runs" / "filled"
    r = _run_on_small_tmpfs(workdir, "3m", kept)
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "checkpoint step 40" in errors[0] and "free" in errors[0] and "step_000020" in errors[0], errors[0]
    root = kept / "checkpoints"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp_")], list(root.iterdir())
    assert [s for s, _ in ckpt.list_checkpoints(str(root))] == [20]
    ckpt.verify(str(root / "step_000020"))
    assert not (kept / "final").exists()

    # the same run directory, now on a disk with space: resumes from step 20, ends where the uninterrupted run did
    r = run_cli(workdir, *ARGS, f"train.output_dir={kept}")
    assert "resumed from" in r.stderr and "step_000020" in r.stderr, r.stderr[-2000:]
    got = read_safetensors(str(kept / "final/model.safetensors"))
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_a_disk_too_small_for_the_first_checkpoint_leaves_nothing_half_written(workdir):
    """No earlier checkpoint to size against: the write itself meets ENOSPC, mid-file."""
    kept = workdir / "runs" / "tiny_disk"
    r = _run_on_small_tmpfs(workdir, "1600k", kept)     # the token caches fit
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "No space left on device" in errors[0] and "checkpoint step 20" in errors[0], errors[0]
    root = kept / "checkpoints"
    assert kept.is_dir() and (not root.exists() or not list(root.iterdir())), list(root.iterdir())
