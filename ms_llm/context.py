# SPDX-License-Identifier: Apache-2.0
"""MindSpore process setup: execution mode, device and seeds, in one call."""
import random

import mindspore as ms
import numpy as np

from ms_llm.errors import MsLlmError

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
DEVICES = {"cpu": "CPU", "ascend": "Ascend"}


def setup_context(mode: str = "graph", device: str = "cpu", seed: int = 0):
    """Set execution mode ('graph' or 'pynative'), device ('cpu' or 'ascend') and every RNG seed."""
    if mode not in MODES:
        raise MsLlmError(f"context.mode: '{mode}' is not one of {sorted(MODES)}")
    if device.lower() not in DEVICES:
        raise MsLlmError(f"context.device_target: '{device}' is not one of {sorted(DEVICES)}")
    if device.lower() == "ascend":
        from ms_llm.launch import check_ascend
        check_ascend()               # never fall back to CPU silently
    ms.set_context(mode=MODES[mode])
    ms.set_device(DEVICES[device.lower()])
    ms.set_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
