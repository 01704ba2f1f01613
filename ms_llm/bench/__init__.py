# SPDX-License-Identifier: Apache-2.0
"""Benchmarks behind `ms-llm bench <name>`: each prints its figures, measured side by side in one run."""
import json
import os
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


def _children(pid: int) -> list:
    """Direct children of a live process (/proc/<pid>/task/*/children)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def process_tree_peaks(cmd, env=None, cwd=None, every: float = 0.02) -> tuple:
    """Run `cmd` and sample, from outside, the kernel's resident-set high-water mark (VmHWM in
    /proc/<pid>/status) of it and every process it starts, every `every` seconds until it exits.
    Returns (exit status, {pid: {"cmd": command line, "role": its MS_ROLE (msrun's MS_WORKER / MS_SCHED, or
    ""), "ppid": its parent, "peak_mb": the last VmHWM read}}, stderr's tail).
    A process's VmHWM only rises, so the last read is its peak up to within one sampling interval of its end."""
    child = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = []
    threading.Thread(target=lambda: err.append(child.stderr.read()), daemon=True).start()
    seen = {}
    while child.poll() is None:
        todo = [child.pid]
        while todo:
            pid = todo.pop()
            try:
                kb = _status_kb(pid).get("VmHWM")
                if pid not in seen or not seen[pid]["role"]:      # (re-read: a forked child may not have exec'd yet)
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        penv = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                    with open(f"/proc/{pid}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    seen[pid] = {"cmd": cmdline, "role": penv.get(b"MS_ROLE", b"").decode(), "ppid": ppid,
                                 "peak_mb": seen.get(pid, {}).get("peak_mb", 0.0)}
                if kb:
                    seen[pid]["peak_mb"] = max(seen[pid]["peak_mb"], kb / 1024)
                todo += _children(pid)
            except (OSError, ValueError):        # the process ended between two reads
                continue
        time.sleep(every)
    return child.wait(), seen, "".join(err)[-3000:]


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
