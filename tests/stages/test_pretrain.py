# SPDX-License-Identifier: Apache-2.0
"""The pretraining stage through the real CLI: loss falls, outputs exist, and a SIGKILLed run resumes exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import make_workdir
from ms_llm.models.safetensors_io import read_safetensors



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = make_workdir(tmp_path_factory, "pretrain", seed=0, n_text=600, n_sft=50, n_eval=20)
    return d


def _train(workdir, *overrides, wait=True):
    cmd = [sys.executable, "-m", "ms_llm.cli", "train", "configs/tiny/pretrain.yaml", "train.progress_bar=false",
           *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _rows(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


@pytest.mark.slow
def test_tiny_pretraining_learns_and_writes_its_run_dir(workdir):
    _train(workdir, "train.output_dir=runs/full", "train.max_steps=150", "train.eval_every=50")
    run = workdir / "runs" / "full"
    summary = json.loads((run / "summary.json").read_text())
    m = summary["metrics"]
    assert summary["status"] == "completed" and summary["steps"] == 150
    assert m["loss"] < 0.7 * m["first_loss"] and m["eval/loss"] < 0.7 * m["first_loss"]
    rows = _rows(run)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "loss_scale", "skipped"} <= set(rows[0])
    assert any("eval/loss" in r for r in rows)
    assert os.listdir(run / "tensorboard") and (run / "plots" / "loss.png").is_file()
    assert (run / "config.resolved.yaml").is_file() and (run / "report.md").is_file()
    manifest = json.loads((run / "final" / "MANIFEST.json").read_text())
    assert summary["final"]["sha256"] == manifest["model_sha256"]
    from ms_llm.models import load_pretrained
    assert load_pretrained(str(run)).config.num_hidden_layers == 2        # run dir resolves to final/
    (run / "report.md").unlink()
    from ms_llm.cli import main
    assert main(["report", str(run)]) == 0 and "| loss |" in (run / "report.md").read_text()
    assert main(["report", str(workdir)]) == 2                            # not a run directory
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "generate", "--model", str(run), "--prompt",
                        "The atomic number of", "--max-new-tokens", "12", "--json"],
                       cwd=workdir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == len(out["logprobs"]) > 0 and all(lp <= 0 for lp in out["logprobs"])
    assert " is " in out["completion"] or any(ch.isdigit() for ch in out["completion"])   # it learned the pattern


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(workdir):
    common = ["train.max_steps=40", "train.log_every=1", "checkpoint.every=10", "data.seq_len=64",
              "train.micro_batch_size=4", "data.eval_fraction=0"]
    _train(workdir, "train.output_dir=runs/a", *common)
    proc = _train(workdir, "train.output_dir=runs/b", *common, wait=False)
    marker = workdir / "runs" / "b" / "checkpoints" / "step_000020" / "MANIFEST.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((workdir / "runs" / "b" / "checkpoints" / "step_000020" / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["data_position"] == 20
    assert not (workdir / "runs" / "b" / "final").exists()
    _train(workdir, "train.output_dir=runs/b", *common)
    a = read_safetensors(str(workdir / "runs" / "a" / "final" / "model.safetensors"))
    b = read_safetensors(str(workdir / "runs" / "b" / "final" / "model.safetensors"))
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
    ra, rb = _rows(workdir / "runs" / "a"), _rows(workdir / "runs" / "b")
    assert [r["step"] for r in rb] == list(range(1, 41))                  # no duplicate lines after resume
    la, lb = [r["loss"] for r in ra], [r["loss"] for r in rb]
    np.testing.assert_allclose(lb[20:], la[20:], atol=1e-6)              # same data order after the resume


def test_init_sha256_mismatch_refuses_to_start(tmp_path):
    """The stage hand-off: model.init_sha256 must equal the manifest's model_sha256 of init_from."""
    from ms_llm.errors import MsLlmError
    from ms_llm.models import CausalLM, preset
    from ms_llm.models.io import check_init_hash
    from ms_llm.stages.common import export_final
    final = export_final(str(tmp_path), CausalLM(preset("tiny")), None, version="DATASET_v2.1_distill")
    assert check_init_hash(str(tmp_path), final["sha256"]) == final["sha256"]
    with pytest.raises(MsLlmError, match="does not match model.init_sha256"):
        check_init_hash(str(tmp_path), "0" * 64)
    weights = tmp_path / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(MsLlmError, match="does not match MANIFEST.json"):
        check_init_hash(str(tmp_path), final["sha256"])
