# SPDX-License-Identifier: Apache-2.0
"""Sandbox cost, side by side in one run.

`ms-llm bench sandbox [--repeats 30]`: mean wall time per program that does nothing, run one after another, as
a plain `python -I` subprocess, in the sandbox without isolation (the --unsafe-no-isolation path) and in the
namespace sandbox; then all 164 canonical HumanEval solutions in the namespace sandbox on one worker and on
every available core (the pool), with the unisolated pool for comparison.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from ms_llm.eval.humaneval import check_program, read_problems
from ms_llm.eval.sandbox import require_isolation, run_program, run_programs


def _mean_seconds(fn, repeats: int) -> float:
    fn()                                                     # warm the page cache
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def run(argv):
    p = argparse.ArgumentParser(prog="ms-llm bench sandbox", description=__doc__.split("\n\n")[1])
    p.add_argument("--repeats", type=int, default=30, help="programs per per-sample measurement")
    a = p.parse_args(argv)
    require_isolation()

    def plain():
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)

    def unisolated():
        assert run_program("pass", isolation="none").status == "passed"

    def isolated():
        assert run_program("pass").status == "passed"

    per = {name: _mean_seconds(fn, a.repeats) for name, fn in
           (("plain python", plain), ("guard only (unsafe)", unisolated), ("namespace sandbox", isolated))}
    cores = len(os.sched_getaffinity(0))
    problems = read_problems()
    programs = [check_program(pr, pr["canonical_solution"]) for pr in problems.values()]
    humaneval = {}
    for name, workers, isolation in (("sandbox, 1 worker", 1, "namespaces"),
                                     (f"sandbox, {cores} workers", cores, "namespaces"),
                                     (f"guard only (unsafe), {cores} workers", cores, "none")):
        t0 = time.perf_counter()
        results = run_programs(programs, timeout=10, workers=workers, isolation=isolation)
        humaneval[name] = {"seconds": time.perf_counter() - t0,
                           "passed": sum(r.status == "passed" for r in results)}
    print(f"per program (mean of {a.repeats}, one at a time):")
    for name, s in per.items():
        print(f"  {name:<22} {s * 1000:7.1f} ms")
    print(f"  sandbox overhead over plain python: {(per['namespace sandbox'] - per['plain python']) * 1000:.1f} ms")
    print(f"164 canonical HumanEval solutions ({cores} cores):")
    for name, r in humaneval.items():
        print(f"  {name:<32} {r['seconds']:6.1f} s  {r['passed']}/164 passed")
    print(json.dumps({"per_program_ms": {k: round(v * 1000, 1) for k, v in per.items()},
                      "humaneval_164": {k: {"seconds": round(v["seconds"], 1), "passed": v["passed"]}
                                        for k, v in humaneval.items()}}))
