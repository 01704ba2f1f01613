# SPDX-License-Identifier: Apache-2.0
"""MindSpore process setup: execution mode, device, seeds, memory pool and compile level, in one call."""
import inspect
import random

import mindspore as ms
import numpy as np

from ms_llm.ascend import check_ascend
from ms_llm.errors import MsLlmError
from ms_llm.ops import backend, kernels

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
DEVICES = {"cpu": "CPU", "ascend": "Ascend"}


def setup_context(mode: str = "graph", device: str = "cpu", seed: int = 0, kernels="auto",
                  loss_chunk_tokens: int = 1024, lazy_inline: str = "auto"):
    """Set execution mode ('graph' or 'pynative'), device ('cpu' or 'ascend'), every RNG seed, and which
    implementation the model's primitives use from now on (`context.kernels` and `context.loss_chunk_tokens`,
    ms_llm/ops/backend.py)."""
    if mode not in MODES:
        raise MsLlmError(f"context.mode: '{mode}' is not one of {sorted(MODES)}")
    if device.lower() not in DEVICES:
        raise MsLlmError(f"context.device_target: '{device}' is not one of {sorted(DEVICES)}")
    if device.lower() == "ascend":
        check_ascend()               # never fall back to CPU silently
    ms.set_context(mode=MODES[mode])
    ms.set_device(DEVICES[device.lower()])
    ms.set_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    backend.configure(kernels)
    backend.set_loss_chunk_tokens(loss_chunk_tokens)
    backend.set_lazy_inline(lazy_inline)


def setup_for(cfg):
    """setup_context with everything a config's `context` section and `train.seed` say."""
    c = cfg.context
    setup_context(c.mode, c.device_target, cfg.train.seed, c.kernels, c.loss_chunk_tokens, c.lazy_inline)
    apply_runtime_settings(c)


def _needs(fn, names, key: str):
    """MsLlmError naming `key` when the installed MindSpore's `fn` lacks a keyword it is handed."""
    have = inspect.signature(fn).parameters
    missing = [n for n in names if n not in have]
    if missing:
        raise MsLlmError(f"context.{key}: the installed MindSpore {ms.__version__} has no {fn.__module__}."
                         f"{fn.__qualname__}({', '.join(missing)}=...); this release is written against MindSpore 2.7")


def apply_runtime_settings(c):
    """Hand `context.max_device_memory`, `memory_optimize_level` and `jit_level` to MindSpore (and check the
    `mindspore.lazy_inline` that `context.lazy_inline` uses, models/decoder.py). Each keyword is
    checked against the installed MindSpore's signature on every device (so a CPU run catches an API change
    before a node is rented); the memory pool settings apply on Ascend only."""
    _needs(ms.runtime.set_memory, ("max_size", "optimize_level"), "max_device_memory")
    _needs(ms.JitConfig.__init__, ("jit_level",), "jit_level")
    _needs(ms.lazy_inline, ("fn", "attrs", "policy"), "lazy_inline")
    if c.device_target == "ascend":
        ms.runtime.set_memory(max_size=c.max_device_memory, optimize_level=c.memory_optimize_level)
    if c.jit_level != "default":
        ms.set_context(jit_config={"jit_level": c.jit_level})


def set_cpu_threads(n: int):
    """Threads of MindSpore's CPU ops (settable once per process) and of the CPU kernels, for a process that
    shares the cores with another. Returns False when MindSpore had already fixed its own."""
    kernels.set_threads(n)
    try:
        ms.device_context.cpu.op_tuning.threads_num(n)
    except RuntimeError:
        return False
    return True
