# SPDX-License-Identifier: Apache-2.0
"""Which way imports point, read from the source (imports inside functions included): no cycle anywhere in
ms_llm; the layers below the stages (training, models, losses, rollout, config) never import a stage; no stage
imports another stage (what two stages share lives in a layer below them)."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ms_llm")
STAGE_MODULES = ("pretrain", "cpt", "distill", "sft", "reward", "dpo", "ppo", "grpo")


def _modules() -> dict:
    found = {}
    for top, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(top, f)
                name = "ms_llm" + path[len(ROOT):-3].replace(os.sep, ".")
                found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def _graph() -> dict:
    mods = _modules()

    def resolve(name):
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("ms_llm")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ms_llm"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else resolve(node.module))
        graph[name] = deps - {None, name}
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return _graph()


def test_the_graph_is_read(graph):
    assert "ms_llm.stages.ppo" in graph and "ms_llm.rollout.batch" in graph["ms_llm.stages.ppo"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]      # the detector detects


def test_no_import_cycle(graph):
    assert _cycles(graph) == []


@pytest.mark.parametrize("layer", ["training", "models", "losses", "rollout", "config"])
def test_lower_layers_never_import_a_stage(graph, layer):
    bad = {m: sorted(d for d in deps if d.startswith("ms_llm.stages")) for m, deps in graph.items()
           if m.startswith(f"ms_llm.{layer}")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_no_stage_imports_another_stage(graph):
    stages = {f"ms_llm.stages.{s}" for s in STAGE_MODULES}
    assert stages <= set(graph)
    assert {m: sorted(graph[m] & (stages - {m})) for m in stages if graph[m] & (stages - {m})} == {}


def test_config_imports_only_config_and_the_bottom_helpers(graph):
    """config/ is the bottom layer: the names it validates (losses, rewards, text rules) live in config.schema and
    the implementing modules read them from there. models is the one lazy exception (a preset's shapes)."""
    allowed = ("ms_llm.config", "ms_llm.errors", "ms_llm.fileio", "ms_llm.models")
    bad = {m: sorted(d for d in deps if not d.startswith(allowed)) for m, deps in graph.items()
           if m.startswith("ms_llm.config")}
    assert {m: d for m, d in bad.items() if d} == {}


def _function_imports():
    """(module path, line, commented) of the first import statement of every function that imports."""
    out = []
    for top, _, files in os.walk(ROOT):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(top, f)
            text = open(path, encoding="utf-8").read()
            lines = text.splitlines()
            for fn in ast.walk(ast.parse(text)):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                inner = {n for n in ast.walk(fn) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))} - {fn}
                nested = {id(n) for g in inner for n in ast.walk(g)}
                first = min((n.lineno for n in ast.walk(fn)
                             if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in nested), default=None)
                if first is not None:
                    commented = "#" in lines[first - 1] or lines[first - 2].strip().startswith("#")
                    out.append((os.path.relpath(path, os.path.dirname(ROOT)), first, commented))
    return out


def test_imports_inside_functions_say_why():
    """An import inside a function defers a heavy or optional library (MindSpore for the CLI, matplotlib,
    tensorboardX, PyTorch in a bench worker); a comment at the function's first import says which."""
    found = _function_imports()
    assert len(found) > 20                                 # the walk reaches the CLI and the benches
    assert [f"{p}:{line}" for p, line, ok in found if not ok] == []


def test_msrun_ports_differ_between_test_files():
    """pytest-xdist runs test files side by side, so two files launching msrun on one master port make one
    of the jobs time out building its topology. A port literal (8100-8299, quoted or passed as an int to a
    launch helper) belongs to one test file only."""
    import re
    tests = os.path.dirname(os.path.abspath(__file__))
    owner, clashes = {}, []
    for top, _, files in os.walk(tests):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            text = open(os.path.join(top, f)).read()
            if "master-port" not in text and "master_port" not in text:
                continue
            for port in set(re.findall(r'"(8[12]\d\d)"|\b_two_nodes\([^,]+, (8[12]\d\d)', text)):
                port = "".join(port)
                if port != "8118" and owner.setdefault(port, f) != f:
                    clashes.append(f"{port}: {owner[port]} and {f}")
    assert not clashes, clashes
