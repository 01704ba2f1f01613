# SPDX-License-Identifier: Apache-2.0
"""BFCL v4 through the installed bfcl-eval package: its data, its possible answers and its own AST checker.

The harness tests feed BFCL's possible answers back as model outputs: every item any output can pass must pass,
and the items that fail must be exactly those whose possible answer no output can satisfy, found here by an
independent reading of the function docs. Shuffled answers must mostly fail."""
import json
import os

import pytest

from ms_llm.cli import main
from ms_llm.data.chat import parse_tool_calls
from ms_llm.eval import bfcl as B


def _unsatisfiable(entry, ground_truth):
    """Why no output can match this possible answer under BFCL's checker, or None."""
    docs = {f["name"]: f["parameters"] for f in entry["function"]}
    for call in ground_truth:
        for name, args in call.items():
            props, required = docs[name].get("properties", {}), docs[name].get("required", [])
            for k, options in args.items():
                if options == []:
                    return f"{name}.{k} allows no value"
                if k not in props and "" not in options:
                    return f"{name}.{k} is not a parameter of {name}, and may not be left out"
            for k in required:
                if k not in args or all(o == "" for o in args[k]):
                    return f"{name}.{k} is required, and the answer allows only leaving it out"
    return None


@pytest.mark.parametrize("category", B.AST_CATEGORIES)
def test_possible_answers_as_outputs_pass_every_satisfiable_item(category):
    entries, answers = B.load(category)
    res = B.score(category, entries, {e["id"]: B.possible_answer_result(answers[e["id"]], e["function"])
                                      for e in entries}, answers)
    failed = {v["id"] for v in res["verdicts"] if not v["valid"]}
    unsatisfiable = {e["id"]: why for e in entries if (why := _unsatisfiable(e, answers[e["id"]]))}
    assert failed == set(unsatisfiable), (failed, unsatisfiable)
    assert res["n"] == len(entries) > 0
    # BFCL v4's data as shipped in bfcl-eval 2026.3.23: 5 of 2,409 AST items cannot be passed
    assert len(unsatisfiable) == {"live_simple": 2, "live_multiple": 3}.get(category, 0)


@pytest.mark.parametrize("category", ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple"])
def test_shuffled_possible_answers_mostly_fail(category):
    entries, answers = B.load(category)
    shifted = {e["id"]: B.possible_answer_result(answers[o["id"]], o["function"])
               for e, o in zip(entries, entries[7:] + entries[:7])}
    assert B.score(category, entries, shifted, answers)["accuracy"] < 0.2


def test_irrelevance_passes_only_without_a_call():
    entries, _ = B.load("irrelevance", 2)
    name = B.tools_of(entries[0])[0]["function"]["name"]
    assert B.check("irrelevance", entries[0], "[]")["valid"]
    assert B.check("irrelevance", entries[0], "I cannot answer that with these tools.")["valid"]
    assert not B.check("irrelevance", entries[0], f"[{name}(x=1)]")["valid"]


def test_a_tool_call_completion_becomes_a_result_bfcl_accepts():
    """The model side: a completion in the template's tool-call format, parsed and written as BFCL's result."""
    entries, answers = B.load("simple_python", 1)          # calculate_triangle_area(base=10, height=5)
    good = '<tool_call>\n{"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}\n</tool_call>'
    wrong = good.replace('"base": 10', '"base": 11')
    for text, valid in ((good, True), (wrong, False), ("The area is 25.", False)):
        result = B.result_string(parse_tool_calls(text, "chatml").calls)
        assert B.check("simple_python", entries[0], result, answers[entries[0]["id"]])["valid"] is valid
    assert B.result_string(parse_tool_calls(good, "qwen").calls) == "[calculate_triangle_area(base=10, height=5)]"


def test_eval_bfcl_end_to_end_writes_bfcl_results_and_scores(tiny_model_dir, tmp_path, capsys):
    cats = ["simple_python", "multiple", "parallel", "irrelevance"]
    out = tmp_path / "bfcl"
    assert main(["eval", "bfcl", "--model", str(tiny_model_dir / "model"), "--out", str(out), "--categories", ",".join(cats),
                 "--limit", "3", "--max-new-tokens", "24", "--mode", "pynative"]) == 0
    record = json.loads((out / "bfcl.json").read_text())
    per = record["metrics"]["categories"]
    assert sorted(per) == sorted(cats) and all(per[c]["n"] == 3 for c in cats)
    from bfcl_eval.utils import load_file
    for cat in cats:
        path = out / "result" / "ms_llm-model" / "non_live" / f"BFCL_v4_{cat}_result.json"
        assert per[cat]["results"] == str(path)
        rows = load_file(path)                              # BFCL's own reader
        entries, answers = B.load(cat, 3)
        assert [r["id"] for r in rows] == [e["id"] for e in entries]
        # the written results score again to the reported accuracy
        again = B.score(cat, entries, {r["id"]: r["result"] for r in rows}, answers)
        assert again["correct"] == per[cat]["correct"]
        assert os.path.isfile(out / "score" / f"BFCL_v4_{cat}_score.json")
    assert record["metrics"]["accuracy"] == pytest.approx(sum(per[c]["accuracy"] for c in cats) / 4)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["categories"].keys() == per.keys()


def test_eval_bfcl_refuses_unknown_categories_and_a_missing_out(tiny_model_dir, capsys):
    assert main(["eval", "bfcl", "--model", str(tiny_model_dir / "model"), "--out", "x", "--categories", "simple_python,web_search"]) == 2
    assert "web_search" in capsys.readouterr().err
    assert main(["eval", "bfcl", "--model", str(tiny_model_dir / "model")]) == 2
    assert "--out" in capsys.readouterr().err
