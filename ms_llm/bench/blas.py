# SPDX-License-Identifier: Apache-2.0
"""Which BLAS core each library runs on this CPU, as the benches state it beside their GEMM figures.

OpenBLAS picks its kernels at load time from the CPU it finds; on a CPU newer than the library it may fall back
to a generic core (numpy's bundled OpenBLAS on a Xeon of CPU model 207 ran its Prescott kernels: 33 GFLOPS
against 194 with OPENBLAS_CORETYPE=SKYLAKEX). A GEMM figure from such a library says nothing about the machine,
so the benches name the core and leave a generic one out of the peak they compare against.
"""
import ctypes
import re

import numpy as np

GENERIC = {"prescott", "generic", "core2", "katmai", "banias", "atom", "nehalem"}   # OpenBLAS's fallback cores


def _corename(path: str):
    """OpenBLAS's core name from its shared library (whatever symbol prefix the build used), or None."""
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    for sym in ("openblas_get_corename", "openblas_get_corename64_", "scipy_openblas_get_corename",
                "scipy_openblas_get_corename64_"):
        fn = getattr(lib, sym, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            return fn().decode()
    return None


def loaded_openblas() -> dict:
    """{library file: core name} of every OpenBLAS this process has loaded (/proc/self/maps)."""
    out = {}
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if re.search(r"openblas[^/]*\.so", line)}
    except OSError:
        return out
    for path in sorted(paths):
        core = _corename(path)
        if core:
            out[path] = core
    return out


def cores() -> dict:
    """{library: description of its GEMM's core}: numpy's OpenBLAS, the CPU kernels' (scipy-openblas32), torch's
    (as torch reports its build and CPU capability) and MindSpore's (its own CPU matmul)."""
    (np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)).sum()            # numpy's BLAS loaded
    out = {}
    for path, core in loaded_openblas().items():
        if "numpy" in path:
            out["numpy"] = f"OpenBLAS {core}"
    try:
        import scipy_openblas32        # (the kernels' BLAS and torch: optional here, loaded only to be asked)
        core = _corename(f"{scipy_openblas32.get_lib_dir()}/libscipy_openblas.so")
        if core:
            out["ms_llm kernels"] = f"OpenBLAS (scipy-openblas32) {core}"
    except ImportError:
        pass
    try:
        import torch
        blas = "MKL" if torch.backends.mkl.is_available() else "OpenBLAS or other"
        out["torch"] = f"{blas}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    except (ImportError, AttributeError):
        pass
    out["mindspore"] = "its own CPU matmul kernels"
    return out


def generic(description: str) -> bool:
    """Whether a `cores()` description names an OpenBLAS fallback core."""
    return description.startswith("OpenBLAS") and description.split()[-1].lower() in GENERIC
