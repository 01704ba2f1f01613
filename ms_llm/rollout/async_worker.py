# SPDX-License-Identifier: Apache-2.0
"""One-step off-policy rollouts in a second process (seed 004: asynchronous rollout, one-step off-policy).

    worker = RolloutWorker(cfg, sampling, threads=1)     # spawns the process; it builds the policy as the trainer does
    worker.submit(version, weights_path, rows, seed)     # generate with these weights, in the background
    batch = worker.result()                              # wait: tokens, log-probs, lengths, finished, version
    worker.close()

The mechanism: a `multiprocessing` spawn child holds its own copy of the policy (built from the same config,
LoRA included). Each step the trainer writes its trainable parameters to a safetensors file (in /dev/shm when
there is one: written, then renamed, so the worker never reads half a file) and sends the request over a pipe;
the worker loads the weights when their version changed, generates with the request's seed and sends the
batch back. So while the trainer runs step t, the worker generates step t + 1's completions with θ_t; their
sampled log-probs travel with them and are π_old in the importance ratio. The cores are split between the two
processes (the worker's CPU affinity and kernel threads, `cores` and `threads`), so neither preempts the other.
"""
import ctypes
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

import mindspore as ms
import numpy as np

from ms_llm.context import set_cpu_threads, setup_for
from ms_llm.errors import MsLlmError
from ms_llm.generation import generate
from ms_llm.models.build import build_model
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors
from ms_llm.peft.lora import LoRAConfig, apply_lora


def _serve(conn, cfg, sampling: dict, threads: int, cores=None, parent: int = None):
    """The worker process: build the policy, then answer requests until told to stop."""
    try:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG: never outlive the trainer
            if os.getppid() != parent:
                return
        if cores:
            os.sched_setaffinity(0, cores)
        setup_for(cfg)
        if threads:
            set_cpu_threads(threads)
        policy = build_model(cfg)
        lo = cfg.grpo.lora
        if lo.enabled:
            apply_lora(policy, LoRAConfig(lo.r, lo.alpha, lo.dropout, list(lo.targets)))
        params = {p.name: p for p in policy.trainable_params()}
        version = None
        conn.send({"ready": True})
        while True:
            msg = conn.recv()
            if msg is None:
                return
            if msg["version"] != version:
                for name, arr in read_safetensors(msg["weights"]).items():
                    params[name].set_data(ms.Tensor(arr, params[name].dtype))
                os.remove(msg["weights"])                  # loaded: the only copy left is in this process
                version = msg["version"]
            tic = time.perf_counter()
            out = generate(policy, msg["rows"], msg["max_new_tokens"], seed=msg["seed"], cache_len=msg["cache_len"],
                           prompt_width=msg["prompt_width"], rows=range(len(msg["rows"])), **sampling)
            conn.send({"tokens": out.tokens, "logprobs": out.logprobs, "lengths": out.lengths,
                       "finished": out.state.finished.copy(), "version": version,
                       "generate_s": time.perf_counter() - tic})
    except Exception as e:                    # noqa: BLE001 - reported to the trainer, which raises it
        conn.send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


class RolloutWorker:
    def __init__(self, cfg, sampling: dict, threads: int = 1, cores=None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _sweep(shm or tempfile.gettempdir())
        self.dir = tempfile.mkdtemp(prefix=f"ms_llm_rollout_{os.getpid()}_", dir=shm)
        self.proc = ctx.Process(target=_serve, args=(child, cfg, sampling, threads, cores, os.getpid()), daemon=True)
        self.proc.start()
        child.close()
        self.pending, self.peeked = False, None
        self._check(self._recv())

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            raise MsLlmError(f"the rollout worker (pid {self.proc.pid}) died; exit code {self.proc.exitcode}") from None

    @staticmethod
    def _check(msg):
        if "error" in msg:
            raise MsLlmError(f"rollout worker failed: {msg['error']}\n{msg['traceback']}")
        return msg

    def publish(self, params, version: int) -> str:
        """Write the trainer's weights (a callable returning {name: array}, called only when this version is not
        written yet) as version `version`; returns the file the worker reads."""
        path = os.path.join(self.dir, f"weights_{version}.safetensors")
        if not os.path.exists(path):                          # the worker deletes each version once loaded
            write_safetensors(path + ".tmp", params())
            os.replace(path + ".tmp", path)
        return path

    def submit(self, version: int, weights: str, rows: list, seed, max_new_tokens: int, cache_len: int,
               prompt_width: int):
        if self.pending:
            raise MsLlmError("the rollout worker already has a request in flight")
        try:
            self.conn.send({"version": version, "weights": weights, "rows": rows, "seed": seed,
                            "max_new_tokens": max_new_tokens, "cache_len": cache_len, "prompt_width": prompt_width})
        except OSError:
            raise MsLlmError(f"the rollout worker (pid {self.proc.pid}) is gone; exit code {self.proc.exitcode}") from None
        self.pending = True

    def result(self) -> dict:
        if self.peeked is not None:
            msg, self.peeked = self.peeked, None
            return msg
        if not self.pending:
            raise MsLlmError("no rollout request in flight")
        msg = self._check(self._recv())
        self.pending = False
        return msg

    def peek(self) -> dict:
        """The batch in flight, waited for, without taking it: the next `result` returns it (a checkpoint keeps it)."""
        if self.peeked is None:
            tic = time.perf_counter()
            self.peeked = self.result()
            self.peeked["wait_s"] = time.perf_counter() - tic
        return self.peeked

    @property
    def has_batch(self) -> bool:
        """A request in flight, or its batch waited for and not yet taken."""
        return self.pending or self.peeked is not None

    def close(self, wait: bool = True):
        """Stop the worker: after its request in flight (wait), or at once."""
        try:
            if self.proc.is_alive() and wait:
                if self.pending:
                    self.result()
                self.conn.send(None)
                self.proc.join(10)
        except (OSError, EOFError, MsLlmError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __del__(self):
        try:
            self.close()
        except Exception:                     # noqa: BLE001 - interpreter shutdown
            pass


def _sweep(folder: str):
    """Remove weight folders left by trainers that were killed (their pid is in the folder name)."""
    for name in os.listdir(folder):
        if not name.startswith("ms_llm_rollout_"):
            continue
        pid = name[len("ms_llm_rollout_"):].split("_", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def trainable_arrays(model) -> dict:
    return {p.name: np.ascontiguousarray(p.asnumpy()) for p in model.trainable_params()}
