# SPDX-License-Identifier: Apache-2.0
"""`ms_llm/ops/table.py` against what it describes: the entry points in the C++ sources, the symbols the built
library exports, the reference versions it names, the backend's primitive list, and the rule that only
`ms_llm.ops` touches `kernels.OPS` (everyone else calls an `ms_llm.ops` function)."""
import ctypes
import importlib
import os
import re

from mindspore import ops

from ms_llm.ops import backend, kernels, table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _source_entry_points() -> set:
    found = set()
    for f in sorted(os.listdir(os.path.join(ROOT, "kernels", "cpu"))):
        if f.endswith(".cc"):
            text = open(os.path.join(ROOT, "kernels", "cpu", f), encoding="utf-8").read()
            found |= set(re.findall(r"^MS_LLM_AOT\s+(\w+)\s*\(", text, re.M))
    return found


def _table_symbols() -> set:
    return {k.symbol for k in table.KERNELS} | {k.backward.symbol for k in table.KERNELS if k.backward}


def test_every_entry_point_in_the_sources_has_a_table_entry_and_back():
    sources = _source_entry_points()
    assert len(sources) == 24                        # the count the sources have today: the regex found them all
    assert sources == _table_symbols()


def test_the_built_library_exports_every_symbol_and_ops_has_every_kernel():
    assert kernels.load() is not None, kernels.unavailable_reason()
    lib = ctypes.CDLL(kernels._state["path"])
    for symbol in sorted(_table_symbols()):
        assert hasattr(lib, symbol), symbol
    for k in table.KERNELS:
        prim = getattr(kernels.OPS, k.name)
        assert isinstance(prim, ops.Custom) and prim.func.endswith(":" + k.symbol), k.name
        assert (k.bprop is None) == (k.backward is None), k.name
        assert prim.attrs.get("side_effect_mem", False) == k.in_place, k.name


def test_every_kernel_names_a_reference_and_a_primitive_that_lists_it():
    names = [k.name for k in table.KERNELS]
    assert len(names) == len(set(names))
    prims = {p.name: p for p in table.PRIMITIVES}
    for k in table.KERNELS:
        module, _, attr = k.reference.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), k.reference
        assert k.primitive in prims, k.name
        assert re.search(rf"\b{k.name}\b", prims[k.primitive].cpu.split(":")[0]), (k.name, k.primitive)
    for p in table.PRIMITIVES:                       # a primitive without a kernel has nothing to choose on CPU
        assert any(k.primitive == p.name for k in table.KERNELS), p.name
    assert backend.OPS == tuple(prims) and set(backend.ASCEND_OPS) == {p.name for p in table.PRIMITIVES if p.ascend}


def test_only_ms_llm_ops_touches_the_kernel_primitives():
    offenders = []
    for top, _, files in os.walk(os.path.join(ROOT, "ms_llm")):
        if os.path.relpath(top, ROOT).split(os.sep)[:2] == ["ms_llm", "ops"]:
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(top, f)
                text = open(path, encoding="utf-8").read()
                if re.search(r"\bOPS\.\w", text) or re.search(r"import kernels as", text):
                    offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_the_benches_name_each_librarys_blas_core_and_know_a_fallback():
    """bench/blas.py reads the core OpenBLAS chose from each loaded library (numpy's and the CPU kernels' own
    scipy-openblas32 here), and treats OpenBLAS's generic fallback cores as such (a Xeon numpy's OpenBLAS did not
    know ran Prescott kernels: its GEMM figure is left out of the bench's peak)."""
    from ms_llm.bench.blas import cores, generic, loaded_openblas
    c = cores()
    assert c["numpy"].startswith("OpenBLAS ") and c["ms_llm kernels"].startswith("OpenBLAS (scipy-openblas32) ")
    assert any("numpy" in path for path in loaded_openblas())
    assert generic("OpenBLAS Prescott") and generic("OpenBLAS (scipy-openblas32) Generic")
    assert not generic("OpenBLAS SkylakeX") and not generic("MKL, CPU capability AVX512")
    assert c["numpy"].split()[-1].lower() not in ("", "unknown")
