# SPDX-License-Identifier: Apache-2.0
"""Benchmarks behind `ms-llm bench <name>`: each prints its figures, measured side by side in one run."""
import json
import subprocess
import sys
import threading
import time

READY, DONE = "MEMORY-READY", "MEMORY-DONE"


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


def _status_kb(pid: int) -> dict:
    """{"VmRSS": kB, "VmHWM": kB} of a live process, read from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            key = row.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(row.split()[1])
    return out


def run_worker_sampled(bench: str, worker: str, args, keys) -> dict:
    """`run_worker`, with the child's memory measured from outside, from /proc: the child prints READY when
    its inputs exist, runs the measured work, prints DONE and waits for stdin to close. The growth is the
    peak resident set after READY (the kernel's high-water mark VmHWM when it rose after READY, else the
    highest VmRSS sampled every 2 ms) minus the resident set at READY. Returns the child's JSON line with
    "peak_mb" set to that growth in MB, or None after printing why it failed."""
    cmd = [sys.executable, "-m", "ms_llm.cli", "bench", bench, "--worker", worker] + [
        f"--{k}={getattr(args, k)}" for k in keys]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    threading.Thread(target=lambda: err.append(child.stderr.read()), daemon=True).start()
    state = {"sampling": False, "max": 0, "stop": False}

    def sample():
        while not state["stop"]:
            if state["sampling"]:
                try:
                    state["max"] = max(state["max"], _status_kb(child.pid)["VmRSS"])
                except (OSError, KeyError):
                    return
            time.sleep(0.002)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ready = done = None
    lines = []
    for line in child.stdout:
        line = line.strip()
        if line == READY:
            ready = _status_kb(child.pid)
            state["max"], state["sampling"] = ready["VmRSS"], True
        elif line == DONE:
            done = _status_kb(child.pid)
            state["stop"] = True
            child.stdin.close()
        elif line.startswith("{"):
            lines.append(line)
    state["stop"] = True
    child.wait()
    sampler.join(1)
    if child.returncode or not lines or ready is None or done is None:
        print(f"{worker}: failed\n{''.join(err)[-2000:]}")
        return None
    peak = done["VmHWM"] if done["VmHWM"] > ready["VmHWM"] else state["max"]
    result = json.loads(lines[-1])
    result["peak_mb"] = (peak - ready["VmRSS"]) / 1024
    return result
