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
