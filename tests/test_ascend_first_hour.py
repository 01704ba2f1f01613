# SPDX-License-Identifier: Apache-2.0
"""The first hour on a 910B node (docs/launch.md): after the fused ops (tests/ops/test_device_ops.py), whole runs.

    MS_LLM_TEST_DEVICE=ascend pytest -m ascend

* one 2-NPU msrun data-parallel run equals one process at the same global batch;
* a 50-step tiny pretraining on the NPU follows the same run on the host CPU.

On CPU these are collected and skipped with the reason below; `test_npu_only_tests_skip_cleanly_on_cpu` (not
marked ascend) checks that, in a `pytest -m ascend` of its own.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import DEVICE, make_workdir, run_cli

NEEDS_NPU = "needs an Ascend NPU: MS_LLM_TEST_DEVICE=ascend"
COMMON = ("train.log_every=1", "train.eval_every=0", "checkpoint.every=0", "data.eval_fraction=0",
          "train.progress_bar=false", "log.plots=false")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory, "npu")


def _losses(run) -> list:
    return [r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]


@pytest.mark.ascend
@pytest.mark.skipif(DEVICE != "Ascend", reason=NEEDS_NPU)
def test_two_npu_msrun_data_parallel_equals_one_process(workdir):
    """Batch 8 in one process against 2 msrun ranks of 4 on two NPUs, float32 weights: the same per-step losses
    and final weights (to 1e-4: the NPUs' reductions may order sums differently from one process)."""
    from ms_llm.models.safetensors_io import read_safetensors
    over = (*COMMON, "train.max_steps=4", "context.device_target=ascend")
    run_cli(workdir, "train", "configs/tiny/pretrain.yaml", *over, "train.micro_batch_size=8",
            "train.output_dir=runs/npu_one")
    run_cli(workdir, "launch", "configs/tiny/pretrain.yaml", *over, "train.micro_batch_size=4",
            "train.output_dir=runs/npu_dp2", "--nproc-per-node", "2", "--master-port", "8215", "--log-dir",
            "logs_npu_dp2", "--cluster-timeout", "300")
    one, two = (workdir / "runs" / n for n in ("npu_one", "npu_dp2"))
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-4)
    a, b = (read_safetensors(str(r / "final" / "model.safetensors")) for r in (one, two))
    assert set(a) == set(b) and max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-4


@pytest.mark.ascend
@pytest.mark.skipif(DEVICE != "Ascend", reason=NEEDS_NPU)
def test_fifty_step_tiny_pretraining_follows_the_cpu(workdir):
    """The tiny pretraining for 50 steps on the NPU and on this host's CPU (a child process can still choose the
    CPU): float32 weights on both, attention in bfloat16 on the NPU (ops/core.py), so the two trajectories agree
    to 5% per step and to 3% at the end, and both fall below 70% of their first loss."""
    over = (*COMMON, "train.max_steps=50")
    run_cli(workdir, "train", "configs/tiny/pretrain.yaml", *over, "context.device_target=ascend",
            "train.output_dir=runs/pt_npu")
    run_cli(workdir, "train", "configs/tiny/pretrain.yaml", *over, "context.device_target=cpu",
            "train.output_dir=runs/pt_cpu")
    npu, cpu = (_losses(workdir / "runs" / n) for n in ("pt_npu", "pt_cpu"))
    assert len(npu) == len(cpu) == 50
    np.testing.assert_allclose(npu, cpu, rtol=0.05)
    assert abs(npu[-1] - cpu[-1]) <= 0.03 * cpu[-1]
    assert npu[-1] < 0.7 * npu[0] and cpu[-1] < 0.7 * cpu[0]


@pytest.mark.skipif(DEVICE == "Ascend", reason="checks how the NPU tests skip elsewhere")
def test_npu_only_tests_skip_cleanly_on_cpu():
    """`pytest -m ascend` on CPU: the NPU-only tests (this file's and tests/ops/test_ascend_dispatch.py's) are
    collected and every one is skipped with the reason that says what to run instead; none errors."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, "test_ascend_first_hour.py"), os.path.join(here, "ops", "test_ascend_dispatch.py")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "ascend", "-rs", "-q", "-p", "no:cacheprovider",
                        "-p", "no:xdist", *files], cwd=here, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MS_LLM_TEST_DEVICE": "cpu"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    skipped = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all(NEEDS_NPU in line for line in skipped), r.stdout[-3000:]
    tail = r.stdout.strip().splitlines()[-1]
    assert "passed" not in tail and "error" not in tail and "5 skipped" in tail, tail
