# SPDX-License-Identifier: Apache-2.0
"""`ms-llm bench sft-packing [--config configs/tiny/sft_lora.yaml] [--steps 40] [overrides]`: the same SFT
config trained with one conversation per padded row (data.packing=false) and with conversations packed into
rows under document masks (the default), in the order unpacked, packed, packed, unpacked on this machine.

Printed per mode: real (non-padding) tokens per second and all tokens per second over the steady-state steps
(from each step's logged update time, the first 3 steps — compilation — left out), the rows' real-token share,
and the ratio packed / unpacked of real tokens per second. The model is the config's architecture from random
weights (model.preset, tiny by default): speed does not depend on the weights, so no pretraining is needed.
Needs the config's data (for the tiny configs: `ms-llm data synth --out data/tiny`).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from ms_llm.errors import MsLlmError

MODES = {"unpacked": "data.packing=false", "packed": "data.packing=true"}


def _run(config: str, out: str, steps: int, extra) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ms_llm.cli", "train", config, f"train.output_dir={out}", f"train.max_steps={steps}",
           "train.log_every=1", "train.eval_every=0", "checkpoint.every=0", "train.progress_bar=false",
           "log.plots=false", "model.init_from=null", "sft.eval_prompts=null", "sft.eval_dialogues=null",
           "lr_schedule.warmup_steps=0", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise MsLlmError(f"bench sft-packing: {' '.join(cmd[3:])} failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    rows = [x for x in rows if x.get("step", 0) > 3 and "real_tokens_per_s" in x]
    if not rows:
        raise MsLlmError(f"bench sft-packing: {out}/metrics.jsonl has no steady-state steps; raise --steps above 4")
    # every step trains the same number of row tokens T: its time is T / tokens_per_s
    seconds = sum(1.0 / x["tokens_per_s"] for x in rows)            # in units of T
    real = sum(x["real_tokens_per_s"] / x["tokens_per_s"] for x in rows)
    return {"real_tokens_per_s": real / seconds, "tokens_per_s": len(rows) / seconds,
            "real_share": real / len(rows), "final_loss": rows[-1]["loss"]}


def run(argv):
    ap = argparse.ArgumentParser(prog="ms-llm bench sft-packing")
    ap.add_argument("--config", default="configs/tiny/sft_lora.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preset", default="tiny", help="model.preset of the random-weight model")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("overrides", nargs="*", help="section.key=value for every run")
    a = ap.parse_intermixed_args(argv)
    if not os.path.isfile(a.config):
        raise MsLlmError(f"{a.config}: no such config")
    if a.steps < 5:
        raise MsLlmError("--steps: give at least 5 (the first 3 steps are compilation)")
    work = a.workdir or tempfile.mkdtemp(prefix="ms_llm_bench_packing_")
    extra = [f"model.preset={a.preset}", *a.overrides]
    got = {m: [] for m in MODES}
    for mode in ("unpacked", "packed", "packed", "unpacked"):
        got[mode].append(_run(a.config, os.path.join(work, f"{mode}_{len(got[mode])}"), a.steps,
                              [MODES[mode], *extra]))
    print(f"bench sft-packing: {a.config}, {a.steps} steps per run, order unpacked, packed, packed, unpacked")
    print(f"{'mode':<10} {'real tok/s':>11} {'all tok/s':>10} {'real share':>11}   per run (real tok/s)")
    mean = {}
    for mode, runs in got.items():
        mean[mode] = sum(r["real_tokens_per_s"] for r in runs) / len(runs)
        print(f"{mode:<10} {mean[mode]:>11.0f} {sum(r['tokens_per_s'] for r in runs) / len(runs):>10.0f} "
              f"{sum(r['real_share'] for r in runs) / len(runs):>11.3f}   "
              + ", ".join(f"{r['real_tokens_per_s']:.0f}" for r in runs))
    print(f"packed / unpacked real tokens per second: {mean['packed'] / mean['unpacked']:.2f}x")
    print(json.dumps({"bench": "sft-packing", "config": a.config, "steps": a.steps, "runs": got,
                      "ratio": mean["packed"] / mean["unpacked"]}))
