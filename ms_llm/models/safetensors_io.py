# SPDX-License-Identifier: Apache-2.0
"""Read and write .safetensors files with numpy only, including bfloat16 (which numpy lacks).

Real Qwen/Llama checkpoints are bf16; `safetensors.numpy` refuses them, so the reader parses the format
itself: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then data.
bf16 is widened to float32 exactly (shift into the high half of a 32-bit word).
"""
import json
import os
import struct

import numpy as np

from ms_llm.errors import MsLlmError

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST = {np.dtype(v).str: k for k, v in _NP.items()}


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets)."""
    if not os.path.isfile(path):
        raise MsLlmError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MsLlmError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise MsLlmError(f"{path}: corrupt safetensors header (declares {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise MsLlmError(f"{path}: corrupt safetensors header ({e})") from None
    data_len = size - 8 - n
    for name, info in header.items():
        if name != "__metadata__" and (info.get("data_offsets", [0, 0])[1] > data_len or info["dtype"] not in (*_NP, "BF16")):
            raise MsLlmError(f"{path}: tensor '{name}' has dtype {info['dtype']} or offsets beyond the file "
                             f"(truncated or corrupt)")
    return header


def read_safetensors(path: str, names=None, keep=None) -> dict:
    """Load tensors as numpy arrays (bf16 -> float32). `names` restricts which tensors are read; `keep(name,
    array)` returns what to keep of each as it is read (a tensor-parallel slice), so one whole tensor at a time
    is in memory."""
    header = read_header(path)
    offset = 8 + struct.unpack("<Q", open(path, "rb").read(8))[0]
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset) if os.path.getsize(path) > offset else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or (names is not None and name not in names):
            continue
        a, b = info["data_offsets"]
        raw = np.array(data[a:b])
        if info["dtype"] == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view(_NP[info["dtype"]])
        shape = tuple(info["shape"])
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise MsLlmError(f"{path}: tensor '{name}' holds {arr.size} values but its shape is {list(shape)}")
        out[name] = arr.reshape(shape) if keep is None else keep(name, arr.reshape(shape))
    return out


def write_safetensors(path: str, tensors: dict, metadata: dict = None):
    """Write numpy arrays atomically (temp file + fsync + rename) in insertion order."""
    header, arrays, pos = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, arr in tensors.items():
        arr = np.asarray(arr, order="C")    # (ascontiguousarray would turn scalars into [1])
        if arr.dtype.str not in _ST:
            raise ValueError(f"cannot store dtype {arr.dtype} for '{name}'")
        header[name] = {"dtype": _ST[arr.dtype.str], "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
        arrays.append(arr)
        pos += arr.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for arr in arrays:            # the arrays' own bytes: no second copy of the state in memory
            f.write(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
