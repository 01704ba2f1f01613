# SPDX-License-Identifier: Apache-2.0
"""Which implementation each primitive runs: the reference MindSpore ops, the CPU kernels, or Ascend's fused ops.

The primitives, what each backend runs for them and the CPU kernels behind them are declared once, in
`ms_llm/ops/table.py` (docs/kernels.md tabulates them).

`configure(setting)` is called by `setup_context` from the config's `context.kernels`: "auto" (default: the
fastest available on the device), "reference", "cpu", or a mapping {op: backend} over "auto". A cell asks
`choose(op, dtype)` once, when it is built, and keeps the answer (a Python string, so GRAPH_MODE folds the
branch). The CPU kernels compute in float32: a cell computing in float16/bfloat16 gets the reference op.
"""
import warnings

import mindspore as ms

from ms_llm.errors import MsLlmError
from ms_llm.ops import kernels, table

OPS = table.PRIMITIVE_NAMES
BACKENDS = ("reference", "cpu", "ascend")
ASCEND_OPS = table.ASCEND_FUSED

_settings = {"default": "auto", "ops": {}, "loss_chunk_tokens": 1024, "lazy_inline": False}
_warned = []


def configure(setting="auto"):
    """Set the backends for cells built from now on. setting: "auto" | "reference" | "cpu" | {op: backend}."""
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - set(OPS))
        if unknown:
            raise MsLlmError(f"context.kernels: unknown op(s) {unknown}; ops are {list(OPS)}")
        bad = {k: v for k, v in setting.items() if v not in ("auto",) + BACKENDS}
        if bad:
            raise MsLlmError(f"context.kernels: {bad} — a backend is one of {['auto', *BACKENDS]}")
        _settings.update(default="auto", ops=dict(setting))
        return
    if setting not in ("auto",) + BACKENDS:
        raise MsLlmError(f"context.kernels: '{setting}' is not one of {['auto', *BACKENDS]} or a mapping op: backend")
    _settings.update(default=setting, ops={})


def set_loss_chunk_tokens(n: int):
    """Tokens per chunk of the chunked log-prob readout (models/readout.py) of models built from now on;
    0 computes whole [B, S, V] logits (`context.loss_chunk_tokens`)."""
    if int(n) < 0:
        raise MsLlmError(f"context.loss_chunk_tokens: {n} is negative")
    _settings["loss_chunk_tokens"] = int(n)


def loss_chunk_tokens() -> int:
    return _settings["loss_chunk_tokens"]


def set_lazy_inline(setting: str = "auto"):
    """Whether decoder layers built from now on are lazy-inlined (`context.lazy_inline`; auto: on Ascend)."""
    _settings["lazy_inline"] = setting == "always" or (setting == "auto" and device() == "ascend")


def lazy_inline() -> bool:
    return _settings["lazy_inline"]


def device() -> str:
    return "ascend" if ms.get_context("device_target") == "Ascend" else "cpu"


def cpu_kernels():
    """The loaded CPU kernel ops, or None (with a one-time warning naming why) when they cannot be built."""
    ops = kernels.load()
    if ops is None and not _warned:
        _warned.append(True)
        warnings.warn(f"ms_llm CPU kernels unavailable, using the reference ops: {kernels.unavailable_reason()}")
    return ops


def choose(op: str, dtype=ms.float32) -> str:
    """The backend a cell built now uses for `op` with compute dtype `dtype`."""
    want = _settings["ops"].get(op, _settings["default"])
    dev = device()
    if want == "auto":
        if dev == "ascend":
            return "ascend" if op in ASCEND_OPS else "reference"
        if dtype != ms.float32:
            return "reference"
        return "cpu" if cpu_kernels() is not None else "reference"
    if want == "ascend":
        if dev != "ascend":
            raise MsLlmError(f"context.kernels: '{op}' set to ascend, but the device is {dev}")
        return "ascend" if op in ASCEND_OPS else "reference"
    if want == "cpu":
        if dev != "cpu":
            raise MsLlmError(f"context.kernels: '{op}' set to cpu, but the device is {dev}")
        if cpu_kernels() is None:
            raise MsLlmError(f"context.kernels: '{op}' set to cpu, but the CPU kernels cannot be built: "
                             f"{kernels.unavailable_reason()}")
        return "cpu" if dtype == ms.float32 else "reference"
    return "reference"


def table() -> dict:
    """{op: backend} a float32 cell built now would use (for logs and `ms-llm bench kernels`)."""
    return {op: choose(op) for op in OPS}
