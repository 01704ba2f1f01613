# SPDX-License-Identifier: Apache-2.0
"""`ms-llm bench layouts`: every parallel layout against one process, side by side.

Each layout trains the same model on the same global batch (8 sequences: 2 micro-batches of 4, split over the
data-parallel ranks) for a few steps under msrun. The table gives how far its losses, gradient norms,
final weights and checkpointed Adam state are from a one-process run, and how many parameters and Adam
moment values rank 0 holds. Layouts with 4 workers need 4 CPU processes. The 2-core test suite therefore runs only the 2-worker
layouts; this is where the 4-worker ones are checked.

Expect weights about 1e-5 apart when the data-parallel or tensor-parallel split changes the order of a sum:
Adam's first update is lr * g / (|g| + eps), so an element whose gradient is at round-off level (1.3e-9 in one
process, 1.5e-9 summed from two ranks, with eps 1e-8) moves by a visibly different amount. The pipeline split
does not reorder sums within a micro-batch, hence its 1e-7.

    ms-llm data synth --out data/tiny
    ms-llm bench layouts --layouts dp2,tp2,pp2,dp2xtp2,dp2xpp2
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_json
from ms_llm.models.safetensors_io import read_safetensors
from ms_llm.training.metrics import read_metrics

# name -> (data_parallel, tensor_parallel, pipeline_stages, extra overrides)
LAYOUTS = {
    "dp2": (2, 1, 1, []),
    "zero2": (2, 1, 1, ["parallel.optimizer_shard=zero1"]),
    "zero3x2": (2, 1, 1, ["parallel.optimizer_shard=zero3", "parallel.recompute=true"]),
    "tp2": (1, 2, 1, []),
    "pp2": (1, 1, 2, []),
    "dp2xtp2": (2, 2, 1, []),
    "dp2xpp2": (2, 1, 2, []),
}


def _parse(argv):
    p = argparse.ArgumentParser(prog="ms-llm bench layouts", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny/pretrain.yaml")
    p.add_argument("--layouts", default="dp2,zero2,zero3x2,tp2,pp2,dp2xtp2,dp2xpp2",
                   help=f"comma list of {sorted(LAYOUTS)}")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, default=3, help="decoder layers (3: the pipeline split is uneven)")
    p.add_argument("--out", default="runs/bench_layouts")
    p.add_argument("--port", type=int, default=8190)
    return p.parse_args(argv)


def _cli(*args) -> float:
    tic = time.time()
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", *args], capture_output=True, text=True)
    if r.returncode:
        raise MsLlmError(f"ms-llm {' '.join(args[:2])} failed:\n{r.stderr[-2000:]}")
    return time.time() - tic


def _rows(run: str, key: str) -> list:
    return [row[key] for row in read_metrics(run) if key in row]


def _gap(a_path: str, b_path: str) -> float:
    a, b = read_safetensors(a_path), read_safetensors(b_path)
    if set(a) != set(b):
        raise MsLlmError(f"{b_path}: tensors differ from {a_path}: {sorted(set(a) ^ set(b))[:5]}")
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def run(argv):
    a = _parse(argv)
    names = [n for n in a.layouts.split(",") if n]
    bad = [n for n in names if n not in LAYOUTS]
    if bad:
        raise MsLlmError(f"--layouts: unknown {bad}; choose from {sorted(LAYOUTS)}")
    if not os.path.isfile(a.config):
        raise MsLlmError(f"{a.config}: not found (run from the project root, after `ms-llm data synth --out data/tiny`)")
    common = ["data.seq_len=64", "data.eval_fraction=0", "train.progress_bar=false", "log.plots=false",
              "lr_schedule.warmup_steps=2", "train.log_every=1", f"train.max_steps={a.steps}",
              f"checkpoint.every={a.steps}", f"model.overrides.num_hidden_layers={a.layers}",
              "model.overrides.tie_word_embeddings=true", "train.grad_accum_steps=2"]
    ref = os.path.join(a.out, "one_process")
    shutil.rmtree(a.out, ignore_errors=True)
    ref_seconds = _cli("train", a.config, *common, "train.micro_batch_size=4", f"train.output_dir={ref}")
    last = f"step_{a.steps:06d}"
    print(f"{'layout':<9} {'workers':>7} {'loss rel':>9} {'norm rel':>9} {'weights':>9} {'Adam':>9} "
          f"{'params rank 0':>13} {'Adam rank 0':>11} {'seconds':>8}")
    ref_loss, ref_norm = np.array(_rows(ref, "loss")), np.array(_rows(ref, "grad_norm"))
    ref_m = read_json(os.path.join(ref, "summary.json"), "the run summary")["metrics"]
    ref_params, ref_moments = ref_m["parameters_on_rank"], ref_m["optimizer_state_elements"]
    print(f"{'1 process':<9} {1:>7} {'-':>9} {'-':>9} {'-':>9} {'-':>9} {ref_params:>13} {ref_moments:>11} "
          f"{ref_seconds:>8.1f}")
    results = {}
    for i, name in enumerate(names):
        dp, tp, pp, extra = LAYOUTS[name]
        workers = dp * tp * pp
        run_dir = os.path.join(a.out, name)
        secs = _cli("launch", a.config, *common, *extra, f"train.micro_batch_size={4 // dp}",
                    f"parallel.tensor_parallel={tp}", f"parallel.pipeline_stages={pp}", f"train.output_dir={run_dir}",
                    "--nproc-per-node", str(workers), "--master-port", str(a.port + i),
                    "--log-dir", os.path.join(a.out, f"logs_{name}"), "--cluster-timeout", "60")
        loss = float(np.max(np.abs(np.array(_rows(run_dir, "loss")) / ref_loss - 1)))
        norm = float(np.max(np.abs(np.array(_rows(run_dir, "grad_norm")) / ref_norm - 1)))
        weights = _gap(os.path.join(ref, "final", "model.safetensors"), os.path.join(run_dir, "final", "model.safetensors"))
        adam = _gap(os.path.join(ref, "checkpoints", last, "optimizer.safetensors"),
                    os.path.join(run_dir, "checkpoints", last, "optimizer.safetensors"))
        m = read_json(os.path.join(run_dir, "summary.json"), "the run summary")["metrics"]
        params, moments = m["parameters_on_rank"], m["optimizer_state_elements"]
        results[name] = {"workers": workers, "loss_rel": loss, "grad_norm_rel": norm, "weights": weights,
                         "adam": adam, "parameters_rank0": params, "adam_elements_rank0": moments, "seconds": secs}
        print(f"{name:<9} {workers:>7} {loss:>9.1e} {norm:>9.1e} {weights:>9.1e} {adam:>9.1e} {params:>13} "
              f"{moments:>11} {secs:>8.1f}", flush=True)
    with open(os.path.join(a.out, "layouts.json"), "w") as f:
        json.dump({"steps": a.steps, "layers": a.layers, "parameters_one_process": ref_params,
                   "adam_elements_one_process": ref_moments, "layouts": results}, f, indent=1)
    print(f"max absolute differences after {a.steps} steps; results in {os.path.join(a.out, 'layouts.json')}")
