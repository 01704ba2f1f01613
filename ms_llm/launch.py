# SPDX-License-Identifier: Apache-2.0
"""`ms-llm launch`: build and run the msrun command for a config, with the Ascend environment set up.

    ms-llm launch CONFIG [k=v ...] --nproc-per-node 8 [--nnodes 2 --node-rank 0 --master-addr HOST]
                  [--master-port 8118] [--log-dir logs] [--cluster-timeout 600] [--bind-core] [--device ascend|cpu]
                  [--node-local-checkpoints] [--force] [--dry-run]

Every flag is named; nothing is inferred from how many arguments there are. With --nnodes above 1, --node-rank
and --master-addr are required; HCCL_IF_IP / HCCL_SOCKET_IFNAME pass from the caller's environment to the
workers, and the workers check that every node sees the run directory (training/trainer.py) unless
--node-local-checkpoints is given. One process on one device runs without msrun. `--dry-run` prints the environment it would set and the
exact command. The memory plan (ms_llm/plan.py) runs first: a config it says does not fit is refused (exit 2,
with the plan's table) unless --force. When the job fails, the last lines name each rank that died and its log file (from the workers'
status files).

The same launcher runs `ms-llm distill cache-teacher CONFIG --nproc-per-node N ...` (task "cache-teacher":
the workers build a teacher cache instead of training; no memory plan, which is a training plan).
"""
import argparse
import ctypes
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback

from ms_llm import storage
from ms_llm.ascend import check_ascend, find_cann
from ms_llm.config import load_config
from ms_llm.errors import MsLlmError
from ms_llm.fileio import write_json_atomic
from ms_llm.plan import plan, table
from ms_llm.stages import run_stage
from ms_llm.training.layout import rollout_ranks


HCCL_NETWORK = ("HCCL_IF_IP", "HCCL_SOCKET_IFNAME")   # which address / interface HCCL binds on multi-NIC nodes


def job_env(cfg) -> dict:
    """What the launcher adds for an Ascend job: HCCL timeouts, visible devices, and HCCL_IF_IP /
    HCCL_SOCKET_IFNAME from the caller's environment, handed to every worker as they are."""
    env = {"HCCL_CONNECT_TIMEOUT": str(cfg.parallel.hccl_connect_timeout),
           "HCCL_EXEC_TIMEOUT": str(cfg.parallel.hccl_exec_timeout)}
    if cfg.parallel.visible_devices:
        env["ASCEND_RT_VISIBLE_DEVICES"] = cfg.parallel.visible_devices
    env.update({k: os.environ[k] for k in HCCL_NETWORK if os.environ.get(k)})
    return env


def ascend_env(cann: str, cfg) -> dict:
    """Environment variables for an Ascend job: CANN's set_env.sh plus `job_env`."""
    r = subprocess.run(["bash", "-c", f"source {shlex.quote(cann)} >/dev/null 2>&1 && env -0"],
                       capture_output=True)
    env = dict(item.split("=", 1) for item in r.stdout.decode().split("\0") if "=" in item)
    env.setdefault("GLOG_v", "2")
    env.update(job_env(cfg))
    return env


def worker_script(log_dir: str) -> str:
    """scripts/train.py of a source checkout, else a three-line shim written into the log dir."""
    repo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train.py")
    if os.path.isfile(repo):
        return repo
    shim = os.path.join(log_dir, "ms_llm_train.py")
    with open(shim, "w") as f:
        f.write("import sys\nfrom ms_llm.launch import worker_main\nsys.exit(worker_main())\n")
    return shim


def build_command(a, script: str) -> list:
    world = a.nproc_per_node * a.nnodes
    return ["msrun", f"--worker_num={world}", f"--local_worker_num={a.nproc_per_node}",
            f"--master_addr={a.master_addr}", f"--master_port={a.master_port}", f"--node_rank={a.node_rank}",
            f"--log_dir={a.log_dir}", f"--join={a.join}", f"--cluster_time_out={a.cluster_timeout}",
            *(["--bind_core=True"] if a.bind_core else []), script, a.config, *a.overrides]


TASKS = {"train": ["train"], "cache-teacher": ["distill", "cache-teacher"]}     # task -> its one-process command


def parse(argv, prog: str = "ms-llm launch"):
    p = argparse.ArgumentParser(prog=prog, description="Run a config on one or more devices via msrun.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides passed to every worker")
    p.add_argument("--nproc-per-node", type=int, default=1, help="workers (devices) on this node")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, help="this node's index, 0 .. nnodes - 1 (required with --nnodes > 1)")
    p.add_argument("--master-addr", help="node 0's address (required with --nnodes > 1; one node: 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=8118)
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--join", default="True", choices=["True", "False"], help="wait for the workers")
    p.add_argument("--cluster-timeout", type=int, default=600, help="seconds msrun waits for a lost worker")
    p.add_argument("--bind-core", action="store_true", help="pin workers to CPU cores")
    p.add_argument("--node-local-checkpoints", action="store_true",
                   help="with --nnodes > 1: the run directory is not on shared storage; skip the check that every "
                        "node sees it (rank 0 still writes every checkpoint: copy them between nodes yourself)")
    p.add_argument("--device", choices=["ascend", "cpu"], help="default: the config's context.device_target")
    p.add_argument("--dry-run", action="store_true", help="print the environment and command, run nothing")
    p.add_argument("--force", action="store_true", help="start even when `ms-llm plan` says the config does not fit")
    a = p.parse_intermixed_args(argv)          # overrides may follow the flags too
    if a.nnodes > 1:
        missing = [flag for flag, v in (("--node-rank", a.node_rank), ("--master-addr", a.master_addr)) if v is None]
        if missing:
            raise MsLlmError(f"--nnodes {a.nnodes}: {' and '.join(missing)} must be given (every node runs the same "
                             "command with its own --node-rank and node 0's --master-addr; a default would start "
                             "every node as node 0 of its own job)")
    a.node_rank = 0 if a.node_rank is None else a.node_rank
    a.master_addr = a.master_addr or "127.0.0.1"
    if not 0 <= a.node_rank < a.nnodes:
        raise MsLlmError(f"--node-rank {a.node_rank} must be in 0 .. {a.nnodes - 1} for --nnodes {a.nnodes}")
    return a


def die_with_parent():
    """preexec_fn: the child is SIGKILLed when its parent dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)         # PR_SET_PDEATHSIG: msrun or the worker ends with us


def main(argv, task: str = "train", prog: str = "ms-llm launch") -> int:
    """Launch `task` (TASKS) on the ranks the flags ask for."""
    a = parse(argv, prog)
    world = a.nproc_per_node * a.nnodes
    overrides = list(a.overrides)
    if a.device:
        overrides.append(f"context.device_target={a.device}")
    if task == "train":
        par = load_config(a.config, overrides, check=False).parallel if world > 1 else None
        tp = max(1, par.tensor_parallel) if par else 1
        pp = max(1, par.pipeline_stages) if par else 1
        if world % (tp * pp):
            raise MsLlmError(f"{world} workers do not split into groups of parallel.tensor_parallel ({tp}) x "
                             f"parallel.pipeline_stages ({pp}) ranks")
        generators = rollout_ranks(load_config(a.config, overrides, check=False)) if world > 1 else 0
        if generators >= world:
            raise MsLlmError(f"grpo.async_rollout.rollout_ranks ({generators}) leaves none of the {world} workers "
                             "to train")
        overrides.append(f"parallel.data_parallel={(world - generators) // (tp * pp)}")
    cfg = load_config(a.config, overrides)
    a.overrides = overrides
    if task == "train":
        memory = plan(cfg, a.nproc_per_node, a.nnodes)
        if not memory["fits"]:
            message = f"{a.config}: the memory plan does not fit (ms-llm plan):\n{table(memory)}"
            if not a.force:
                raise MsLlmError(message + "\n(--force starts it anyway)")
            print(message, file=sys.stderr)
    env = {}
    if cfg.context.device_target == "ascend":
        if a.dry_run and find_cann() is None:
            env = {"# CANN": "not found on this machine; the real run sources its set_env.sh", **job_env(cfg)}
        else:
            env = ascend_env(check_ascend(), cfg)
    log_dir = os.path.abspath(a.log_dir)
    a.log_dir = log_dir
    env["MS_LLM_STATUS_DIR"] = log_dir
    if task != "train":
        env["MS_LLM_TASK"] = task                      # (msrun reads flags after the script as its own)
    if a.nnodes > 1:
        env["MS_LLM_NNODES"] = str(a.nnodes)          # the workers check the run directory is shared (trainer)
        if a.node_local_checkpoints:
            env["MS_LLM_NODE_LOCAL_CHECKPOINTS"] = "1"
    if world == 1:
        cmd = [sys.executable, "-m", "ms_llm.cli", *TASKS[task], a.config, *overrides]
    else:
        os.makedirs(log_dir, exist_ok=True)
        cmd = build_command(a, worker_script(log_dir) if not a.dry_run else "scripts/train.py")
    if a.dry_run:
        for k in sorted(env):
            print(f"export {k}={shlex.quote(env[k])}" if not k.startswith("#") else f"{k}: {env[k]}")
        print(shlex.join(cmd))
        return 0
    os.makedirs(log_dir, exist_ok=True)
    for old in glob.glob(os.path.join(log_dir, "rank_*.status")) + glob.glob(os.path.join(log_dir, "result.json")):
        os.remove(old)
    rc = subprocess.run(cmd, env={**os.environ, **{k: v for k, v in env.items() if not k.startswith("#")}},
                        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None).returncode
    result = os.path.join(log_dir, "result.json")
    if rc == 0 and task != "train" and world > 1 and os.path.isfile(result):
        with open(result) as f:
            print(json.dumps(json.load(f)))
    if rc != 0:
        first = a.node_rank * a.nproc_per_node           # this node's workers (the others report on their nodes)
        for line in failure_report(log_dir, range(first, first + a.nproc_per_node)):
            print(line, file=sys.stderr)
    return rc


def failure_report(log_dir: str, ranks) -> list:
    """One line per rank (of `ranks`, this node's) that did not complete, with its status and log file."""
    lines = []
    for rank in ranks:
        path = os.path.join(log_dir, f"rank_{rank}.status")
        log = os.path.join(log_dir, f"worker_{rank}.log")
        try:
            with open(path) as f:
                status = json.load(f)["status"]
        except (OSError, ValueError):
            status = "never started"
        status = status.strip().splitlines()[0] if status.strip() else "no status"
        if status == "running":
            status = "died without reporting an exit status (killed by a signal or out of memory?)"
        if status != "completed":
            lines.append(f"rank {rank}: {status} — log: {log}")
    lines.append(f"job failed; worker logs are in {log_dir}")
    return lines


def result_path() -> str:
    """Where rank 0 of a task other than training leaves its result (the launcher prints it)."""
    return os.path.join(os.environ.get("MS_LLM_STATUS_DIR", "."), "result.json")


def status_path(rank: int) -> str:
    return os.path.join(os.environ.get("MS_LLM_STATUS_DIR", "."), f"rank_{rank}.status")


def write_status(rank: int, status: str):
    """Atomically (re)write rank_<rank>.status; only workers report: msrun's scheduler process runs the same script
    without a RANK_ID and would otherwise race worker 0 for rank_0.status."""
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return
    path = status_path(rank)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"rank": rank, "status": status, "pid": os.getpid(), "time": time.time()}, f)
    os.replace(tmp, path)


def worker_main(argv=None) -> int:
    """Entry point of one msrun worker: `scripts/train.py CONFIG [k=v ...]`."""
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK_ID", "0"))
    write_status(rank, "running")
    try:
        if not argv:
            raise MsLlmError("usage: train.py CONFIG [section.key=value ...]")
        cfg = load_config(argv[0], argv[1:])
        task = os.environ.get("MS_LLM_TASK", "train")
        if task == "cache-teacher":
            # MindSpore-backed: the launcher itself imports this module without it
            from ms_llm.stages.distill import cache_teacher
            out = cache_teacher(cfg)
            if rank == 0:              # what the one-process command prints; the launcher prints it from here
                write_json_atomic(result_path(), out)
        else:
            run_stage(cfg)
    except MsLlmError as e:
        write_status(rank, f"failed: {e}")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except storage.WriteFailed as e:
        write_status(rank, f"failed: {e}")
        print(f"error: {e}", file=sys.stderr)
        return storage.EXIT_STATUS
    except BaseException as e:            # internal errors keep their traceback in the worker log
        write_status(rank, f"failed: {type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    write_status(rank, "completed")
    return 0
