# SPDX-License-Identifier: Apache-2.0
"""MindSpore process setup: execution mode, device and seeds, in one call."""
import random

import mindspore as ms
import numpy as np

from ms_llm.ascend import check_ascend
from ms_llm.errors import MsLlmError
from ms_llm.ops import backend, kernels

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
DEVICES = {"cpu": "CPU", "ascend": "Ascend"}


def setup_context(mode: str = "graph", device: str = "cpu", seed: int = 0, kernels="auto"):
    """Set execution mode ('graph' or 'pynative'), device ('cpu' or 'ascend'), every RNG seed, and which
    implementation the model's primitives use from now on (`context.kernels`, ms_llm/ops/backend.py)."""
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


def set_cpu_threads(n: int):
    """Threads of MindSpore's CPU ops (settable once per process) and of the CPU kernels, for a process that
    shares the cores with another. Returns False when MindSpore had already fixed its own."""
    kernels.set_threads(n)
    try:
        ms.device_context.cpu.op_tuning.threads_num(n)
    except RuntimeError:
        return False
    return True
