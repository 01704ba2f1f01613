# SPDX-License-Identifier: Apache-2.0
"""How much margin a pipeline's stop-gates have, across seeds and kernels.

`ms-llm bench gates [--pipeline configs/tiny/pipeline.yaml] [--seeds 0-19] [--kernels cpu|reference]
[--out runs/bench_gates] [--jobs 1]` runs the whole chain once per seed (the pipeline's `seed`: every stage's
train.seed), with context.kernels set in every stage and every gate set to warn, so each stage runs and records
its gate values whatever the one before it scored. Each seed's chain lives in OUT/<kernels>/seed_<S>; a rerun
skips the stages that finished (the pipeline's own resume), so a sweep can be stopped and continued.

It prints, for every gate the pipeline stops on: the value per seed, min / 5th percentile / median, and how many
seeds pass the threshold; and writes OUT/<kernels>/gates.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from ms_llm.errors import MsLlmError
from ms_llm.pipeline import load_pipeline


def parse_seeds(text: str) -> list:
    seeds = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise MsLlmError(f"--seeds: '{text}' is not a list like 0-19 or 0,3,5") from None
    return seeds


def stop_gates(pipeline) -> dict:
    """{stage: policy lookup} for the gates that stop `pipeline` (its own policies, not the sweep's warn)."""
    return {s.name: s.gate_policy for s in pipeline.stages}


def collect(run_dir: str, policies: dict) -> dict:
    """{stage/gate: {"value", "threshold", "op", "passed"}} of the stop-gates a finished chain recorded."""
    path = os.path.join(run_dir, "pipeline.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        state = json.load(f)
    out = {}
    for rec in state.get("stages", []):
        policy = policies.get(rec["stage"], {"*": "stop"})
        for name, g in (rec.get("gates") or {}).items():
            if policy.get(name, policy["*"]) == "stop":
                out[f"{rec['stage']}/{name}"] = g
    return out


def summarize(per_seed: dict) -> dict:
    """{gate: {"values": {seed: value}, "min", "p5", "median", "passed", "seeds", "threshold", "op"}}."""
    gates = {}
    for seed, found in sorted(per_seed.items()):
        for name, g in found.items():
            row = gates.setdefault(name, {"values": {}, "passes": {}, "threshold": g.get("threshold"),
                                          "op": g.get("op", ">=")})
            row["values"][seed] = g.get("value")
            row["passes"][seed] = bool(g.get("passed"))
    for row in gates.values():
        v = np.array([x for x in row["values"].values() if x is not None], float)
        row.update({"seeds": len(row["values"]), "passed": sum(row["passes"].values()),
                    "min": float(v.min()) if v.size else None, "max": float(v.max()) if v.size else None,
                    "p5": float(np.percentile(v, 5)) if v.size else None,
                    "median": float(np.median(v)) if v.size else None})
    return gates


def _chain(a, seed: int, stages) -> list:
    out = os.path.join(a.out, a.kernels, f"seed_{seed}")
    return [sys.executable, "-m", "ms_llm.cli", "pipeline", a.pipeline, f"seed={seed}", f"output_dir={out}",
            "gate_policy=warn", *[f"{s.name}.context.kernels={a.kernels}" for s in stages], *a.overrides]


def run(argv):
    p = argparse.ArgumentParser(prog="ms-llm bench gates", description=__doc__.split("\n\n")[1])
    p.add_argument("--pipeline", default="configs/tiny/pipeline.yaml")
    p.add_argument("--seeds", default="0-19", help="seeds, e.g. 0-19 or 0,3,5")
    p.add_argument("--kernels", default="cpu", choices=["cpu", "reference"], help="context.kernels of every stage")
    p.add_argument("--out", default="runs/bench_gates")
    p.add_argument("--jobs", type=int, default=1, help="chains at once (each keeps about one core busy)")
    p.add_argument("overrides", nargs="*", help="further pipeline overrides (<stage>.<key>=<value>)")
    a = p.parse_args(argv)
    seeds = parse_seeds(a.seeds)
    pipeline = load_pipeline(a.pipeline, a.overrides)
    policies = stop_gates(pipeline)
    os.makedirs(os.path.join(a.out, a.kernels), exist_ok=True)
    logs = os.path.join(a.out, a.kernels, "logs")
    os.makedirs(logs, exist_ok=True)
    pending, running, t0 = list(seeds), {}, time.time()
    while pending or running:
        while pending and len(running) < max(1, a.jobs):
            seed = pending.pop(0)
            with open(os.path.join(logs, f"seed_{seed}.log"), "a") as f:
                running[seed] = subprocess.Popen(_chain(a, seed, pipeline.stages), stdout=f, stderr=subprocess.STDOUT)
        for seed, proc in list(running.items()):
            if proc.poll() is not None:
                del running[seed]
                found = collect(os.path.join(a.out, a.kernels, f"seed_{seed}"), policies)
                print(f"seed {seed}: exit {proc.returncode} after {time.time() - t0:.0f} s; " + ", ".join(
                    f"{k} {g.get('value'):.4g}" for k, g in found.items() if g.get("value") is not None), flush=True)
        time.sleep(1)
    per_seed = {s: collect(os.path.join(a.out, a.kernels, f"seed_{s}"), policies) for s in seeds}
    gates = summarize(per_seed)
    report = {"pipeline": a.pipeline, "kernels": a.kernels, "seeds": seeds, "overrides": a.overrides, "gates": gates}
    with open(os.path.join(a.out, a.kernels, "gates.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nstop-gates of {a.pipeline}, context.kernels={a.kernels}, seeds {a.seeds}:")
    print(f"{'gate':<36} {'need':>10} {'min':>8} {'p5':>8} {'median':>8} {'max':>8} {'passed':>8}")
    for name, g in gates.items():
        def f(x):
            return "-" if x is None else f"{x:.4g}"
        print(f"{name:<36} {g['op'] + ' ' + f(g['threshold']):>10} {f(g['min']):>8} {f(g['p5']):>8} "
              f"{f(g['median']):>8} {f(g['max']):>8} {g['passed']:>4}/{g['seeds']:<3}")
