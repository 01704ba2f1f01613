# SPDX-License-Identifier: Apache-2.0
"""Benchmarks behind `ms-llm bench <name>`: each prints its figures, measured side by side in one run."""
import json
import subprocess
import sys


def run_worker(bench: str, worker: str, args, keys) -> dict:
    """Run `ms-llm bench <bench> --worker <worker>` in a child process (its own peak memory) with the given
    attributes of `args` as flags; return the JSON line it prints, or None after printing why it failed."""
    cmd = [sys.executable, "-m", "ms_llm.cli", "bench", bench, "--worker", worker] + [
        f"--{k}={getattr(args, k)}" for k in keys]
    r = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not line:
        print(f"{worker}: failed\n{r.stderr[-2000:]}")
        return None
    return json.loads(line[-1])
