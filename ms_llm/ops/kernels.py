# SPDX-License-Identifier: Apache-2.0
"""The CPU kernels of `kernels/cpu/`: built once into a cache, loaded as MindSpore `ops.Custom` (aot) ops.

`load()` compiles the C++ sources with g++ against OpenBLAS from the `scipy-openblas32` wheel (a dependency
of the package) into `~/.cache/ms_llm/kernels/<digest>/` (or `$MS_LLM_KERNEL_CACHE`), the digest covering the
sources, the compiler, the flags and the processor. A second process waits on a file lock and reuses the
library; a failed or impossible build returns None with the reason in `unavailable_reason()`, and the ops
fall back to the reference versions (ms_llm/ops/backend.py says so once).

Every op computes in float32 and has a hand-written backward (`bprop`) that calls its backward kernel, so it
runs in GRAPH_MODE and PyNative alike. Threads: `set_threads(n)`, by default the cores this process may use.
"""
import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mindspore as ms
from mindspore import ops

from ms_llm.ops import table

SOURCE_DIR = Path(__file__).resolve().parents[2] / "kernels" / "cpu"
LIB_NAME = "libms_llm_kernels.so"
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-std=c++17", "-fPIC", "-shared",
         "-fvisibility=hidden", "-pthread"]      # no FP traps or errno: the exp and reduction loops vectorize

_state = {"loaded": False, "path": None, "reason": None, "lib": None}
OPS = None          # the loaded ops (`load()`); GRAPH_MODE code refers to `kernels.OPS.<op>`


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _blas():
    """(include dir, lib dir) of the scipy-openblas32 wheel, or raise ImportError."""
    # an ImportError here is a reason the kernels cannot be built, not a failed import of ms_llm
    import scipy_openblas32
    return scipy_openblas32.get_include_dir(), scipy_openblas32.get_lib_dir()


def cache_dir() -> Path:
    root = os.environ.get("MS_LLM_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ms_llm",
                                                                  "kernels")
    return Path(root)


def _digest(sources, compiler: str, include: str) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    for part in (version, " ".join(FLAGS), include, _cpu_id(), platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build(verbose: bool = False) -> str:
    """Compile the kernels if the cache has no library for these sources; returns the library's path.

    Raises RuntimeError naming what is missing (compiler, sources, BLAS) or the compiler's error.
    """
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++) on PATH; install g++ or set CXX")
    if not shutil.which(compiler):
        raise RuntimeError(f"the C++ compiler {compiler} (from CXX) is not an executable")
    sources = sorted(SOURCE_DIR.glob("*.cc"))
    if not sources:
        raise RuntimeError(f"no kernel sources in {SOURCE_DIR}")
    try:
        include, libdir = _blas()
    except ImportError:
        raise RuntimeError("the scipy-openblas32 package is not installed (pip install scipy-openblas32)")
    out_dir = cache_dir() / _digest(sources + sorted(SOURCE_DIR.glob("*.h")), compiler, include)
    lib = out_dir / LIB_NAME
    if lib.exists():
        return str(lib)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)              # another process may be building the same library
        if lib.exists():
            return str(lib)
        tmp = tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so.tmp", delete=False).name
        cmd = [compiler, *FLAGS, f"-I{include}", f"-I{SOURCE_DIR}", *map(str, sources), f"-L{libdir}",
               "-lscipy_openblas", f"-Wl,-rpath,{libdir}", "-o", tmp]
        if verbose:
            print("building CPU kernels: " + " ".join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"building the CPU kernels failed ({compiler}):\n{done.stderr[-4000:]}")
        os.replace(tmp, lib)                          # whole file or nothing
    return str(lib)


def load():
    """The kernel ops (a namespace of ops.Custom primitives), or None when they cannot be built here."""
    global OPS
    if _state["loaded"]:
        return OPS
    _state["loaded"] = True
    try:
        path = build()
        _state["lib"] = ctypes.CDLL(path)
    except (RuntimeError, OSError) as e:
        _state["reason"] = str(e)
        return None
    _state["path"] = path
    set_threads(default_threads())
    OPS = _Ops(path)
    return OPS


def unavailable_reason():
    return _state["reason"]


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n: int):
    """Threads every kernel (and OpenBLAS under it) may use in this process."""
    if _state["lib"] is not None:
        _state["lib"].MsLlmSetThreads(int(n))


def threads() -> int:
    return int(_state["lib"].MsLlmThreads()) if _state["lib"] is not None else 0


class _Ops:
    """The aot primitives of `table.KERNELS`, built once per process as attributes (`OPS.<name>`), so GRAPH_MODE
    resolves them as module-level objects. A backward entry point shared by several forwards is built once."""

    def __init__(self, so: str):
        backward = {}
        for k in table.KERNELS:
            kw = {}
            if k.backward is not None:
                b = k.backward
                if b.symbol not in backward:
                    backward[b.symbol] = ops.Custom(f"{so}:{b.symbol}", out_shape=b.shape, out_dtype=b.dtype,
                                                    func_type="aot")
                kw["bprop"] = k.bprop(backward[b.symbol])
            prim = ops.Custom(f"{so}:{k.symbol}", out_shape=k.shape, out_dtype=k.dtype, func_type="aot", **kw)
            if k.in_place:          # a memory side effect on its inputs: the graph keeps it, ordered like an Assign
                prim.add_prim_attr("side_effect_mem", True)
            setattr(self, k.name, prim)


def scalar(value: float):
    """A [1] float32 tensor holding a kernel's scalar argument (a scale, an epsilon)."""
    return ops.fill(ms.float32, (1,), value)
