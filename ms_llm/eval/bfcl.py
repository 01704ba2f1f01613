# SPDX-License-Identifier: Apache-2.0
"""The Berkeley Function Calling Leaderboard (BFCL v4), on its own data and with its own checker.

    ms-llm eval bfcl --model DIR --categories simple_python,multiple,parallel,irrelevance --out DIR [--limit N]

Everything BFCL-specific comes from the installed `bfcl-eval` package: the test entries and possible answers
(bfcl_eval/data), the conversion of its function docs to JSON-schema tools (`convert_to_tool`), the decoder of
a call list (`default_decode_ast_prompting`) and the AST checker. What this module adds is the model side:

  1. each entry's question is rendered with its functions as tools, in the model's own tool template
     (data/tools.py), and answered greedily;
  2. the completion's tool calls (data/tools.py:parse_tool_calls) are written as BFCL's prompt-format result,
     a Python list of calls such as "[get_weather(city='Paris')]", "[]" when there is none;
  3. that string is decoded and checked exactly as BFCL's evaluation runner does for a prompting model:
     decode failures and wrong shapes count as wrong, irrelevance passes when no call decodes.

Results land in BFCL's layout, `<out>/result/<model>/<group>/BFCL_v4_<category>_result.json` (one
{"id", "result"} per line, plus the raw completion), so BFCL's own `bfcl evaluate` can score them again with
any prompting model's handler. Scoring BFCL's possible answers as outputs (`possible_answer_result`) gives
100% on the AST categories, which tests the harness (tests/eval/test_bfcl.py).

Installing: `pip install 'ms_llm[agent]'`. bfcl-eval's own requirements pull in ~30 vendor SDKs its model
handlers use; the data and the checker need only tree-sitter and tenacity. To install lean:
    pip install --no-deps bfcl-eval==2026.3.23 && pip install tree_sitter==0.21.3 tree-sitter-java==0.21.0 \\
        tree-sitter-javascript==0.21.4 tenacity filelock mpmath
When `bfcl_eval.constants.model_config` cannot import its SDKs, a stand-in that answers the one setting the
checker reads (function names keep their dots) takes its place.
"""
import importlib
import json
import os
import sys
import types

from ms_llm.data.chat import parse_tool_calls
from ms_llm.errors import MsLlmError
from ms_llm.fileio import write_json_atomic

AST_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                  "live_parallel", "live_parallel_multiple")
IRRELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance")
CATEGORIES = AST_CATEGORIES + IRRELEVANCE_CATEGORIES
DEFAULT_CATEGORIES = ("simple_python", "multiple", "parallel", "irrelevance")
CHECKER_MODEL = "ms-llm"          # the model name BFCL's checker is given (it looks up its config, "_" read as "/")


class _OpenModel:
    # as for BFCL's open-weight function-calling models: tools are offered with "." in names written "_"
    # (convert_to_tool, ModelStyle.OSSMODEL), and the checker compares names in that form
    underscore_to_dot = True


def bfcl():
    """The bfcl_eval modules this harness uses, imported once (see module docstring for the lean install)."""
    if "bfcl_eval" not in sys.modules:
        # bfcl_eval creates result/, score/ and lock folders under its project root at import time
        os.environ.setdefault("BFCL_PROJECT_ROOT", os.path.join(os.path.expanduser("~"), ".cache", "ms_llm", "bfcl"))
    try:
        importlib.import_module("bfcl_eval")
    except ImportError:
        raise MsLlmError("eval bfcl needs the bfcl-eval package: pip install 'ms_llm[agent]' (or the lean install "
                         "in ms_llm/eval/bfcl.py)") from None
    name = "bfcl_eval.constants.model_config"
    if name not in sys.modules:
        try:
            importlib.import_module(name)
        except Exception:                          # its vendor SDKs are missing: stand in for the one lookup
            stub = types.ModuleType(name)
            stub.MODEL_CONFIG_MAPPING = {}
            sys.modules[name] = stub
    sys.modules[name].MODEL_CONFIG_MAPPING.setdefault(CHECKER_MODEL, _OpenModel())
    # bfcl-eval is optional (the agent extra): imported when a BFCL evaluation runs
    from bfcl_eval import utils
    from bfcl_eval.constants.enums import Language, ModelStyle, ReturnFormat
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    from bfcl_eval.model_handler.utils import convert_to_tool, default_decode_ast_prompting
    return types.SimpleNamespace(utils=utils, Language=Language, ModelStyle=ModelStyle, ReturnFormat=ReturnFormat,
                                 GORILLA_TO_OPENAPI=GORILLA_TO_OPENAPI, ast_checker=ast_checker,
                                 convert_to_tool=convert_to_tool, decode=default_decode_ast_prompting)


def parse_categories(text: str) -> list:
    cats = [c.strip() for c in (text or ",".join(DEFAULT_CATEGORIES)).split(",") if c.strip()]
    bad = [c for c in cats if c not in CATEGORIES]
    if bad:
        raise MsLlmError(f"--categories: {bad} not supported; choose from {', '.join(CATEGORIES)}")
    return cats


def load(category: str, limit: int = None) -> tuple:
    """(entries, possible answers by id) of one category, as BFCL's own generation loads them."""
    b = bfcl()
    entries = b.utils.load_dataset_entry(category)[:limit]
    answers = {} if category in IRRELEVANCE_CATEGORIES else {
        g["id"]: g["ground_truth"] for g in b.utils.load_ground_truth_entry(category)}
    return entries, answers


def tools_of(entry: dict) -> list:
    """The entry's function docs as JSON-schema tools, converted by BFCL's own `convert_to_tool` as for its
    open-weight models ("." in names becomes "_")."""
    b = bfcl()
    return [{"type": "function", "function": t}
            for t in b.convert_to_tool(entry["function"], b.GORILLA_TO_OPENAPI, b.ModelStyle.OSSMODEL)]


def result_string(calls) -> str:
    """Calls ([ToolCall] or [{name: {arg: value}}]) as BFCL's prompt-format result: "[f(a=1), g(b='x')]"."""
    parts = []
    for c in calls:
        name, args = (c.name, c.arguments) if hasattr(c, "name") else next(iter(c.items()))
        parts.append(f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})")
    return "[" + ", ".join(parts) + "]"


def possible_answer_result(ground_truth: list, functions: list = ()) -> str:
    """A result built from BFCL's possible answer: for every argument its first allowed value other than ""
    ("" means the argument may be absent). It is left out when "" is its only allowed value, or when "" is
    allowed and the entry's function docs do not list it (a few possible answers name parameters the
    function lacks). Objects nested in values, whose fields list allowed values in turn, likewise."""
    absent = object()
    params = {f["name"]: set(f.get("parameters", {}).get("properties", {})) for f in functions}

    def choose(options, known=True):
        if not isinstance(options, list):
            return options
        given = [o for o in options if o != ""]
        if not given or (not known and len(given) < len(options)):
            return absent if options else []
        return value(given[0])

    def value(v):
        if isinstance(v, dict):
            return {k: c for k, c in ((k, choose(o)) for k, o in v.items()) if c is not absent}
        if isinstance(v, list):
            return [value(x) if isinstance(x, dict) else x for x in v]
        return v

    def call(name, args):
        known = params.get(name)
        return {name.replace(".", "_"): {k: c for k, c in ((k, choose(o, known is None or k in known)) for k, o in args.items())
                       if c is not absent}}
    # functions named as the model sees them (tools_of)
    return result_string([call(name, args) for c in ground_truth for name, args in c.items()])


def check(category: str, entry: dict, result: str, ground_truth=None) -> dict:
    """BFCL's verdict on one result string: {"valid": bool, "error": [...], "error_type": str}."""
    b = bfcl()
    try:
        decoded = b.decode(result, b.ReturnFormat.PYTHON)
    except Exception as e:                 # BFCL's runner: a result that does not decode is no call
        decoded, error = None, f"Invalid syntax. Failed to decode AST. {e}"
    if category in IRRELEVANCE_CATEGORIES:
        called = decoded is not None and not b.utils.is_empty_output(decoded)
        return {"valid": not called, "error": ["a function was called"] if called else [],
                "error_type": "irrelevance_error:decoder_success" if called else ""}
    if decoded is None:
        return {"valid": False, "error": [error], "error_type": "ast_decoder:decoder_failed"}
    if not b.utils.is_function_calling_format_output(decoded):
        return {"valid": False, "error": ["Did not output in the specified format."],
                "error_type": "ast_decoder:decoder_wrong_output_format"}
    return b.ast_checker(entry["function"], decoded, ground_truth, b.Language.PYTHON, category, CHECKER_MODEL)


def score(category: str, entries: list, results: dict, answers: dict) -> dict:
    """Accuracy of results {id: result string} on `entries`, with the per-entry verdicts."""
    verdicts = [dict(check(category, e, results[e["id"]], answers.get(e["id"])), id=e["id"]) for e in entries]
    correct = sum(v["valid"] for v in verdicts)
    return {"accuracy": correct / len(verdicts) if verdicts else 0.0, "correct": correct, "n": len(verdicts),
            "verdicts": verdicts}


def generate_results(model, tokenizer, entries: list, template: str, max_new_tokens: int = 128,
                     batch_size: int = 8) -> list:
    """[{"id", "result", "raw", "malformed"}] for each entry: the model's calls in BFCL's result format."""
    # MindSpore-backed: scoring alone (tests, re-scoring results) does not load it
    from ms_llm.eval.generative import chat_answers
    texts = chat_answers(model, tokenizer, [e["question"][0] for e in entries], template, max_new_tokens,
                         batch_size, tools=[tools_of(e) for e in entries])
    out = []
    for e, text in zip(entries, texts):
        parsed = parse_tool_calls(text, template)
        out.append({"id": e["id"], "result": result_string(parsed.calls), "raw": text, "malformed": len(parsed.errors)})
    return out


def write_results(out_dir: str, model_name: str, category: str, rows: list) -> str:
    """BFCL's result file for one category: one JSON object per line, sorted by id."""
    b = bfcl()
    folder = os.path.join(out_dir, "result", model_name.replace("/", "_"),
                          b.utils.get_directory_structure_by_category(category))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, b.utils.get_file_name_by_category(category, is_result_file=True))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in sorted(rows, key=lambda r: b.utils.sort_key(r)):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def evaluate(model, tokenizer, categories: list, template: str, out_dir: str, model_name: str, limit: int = None,
             max_new_tokens: int = 128, batch_size: int = 8, progress=print) -> dict:
    """Generate, write and score every category; {"accuracy" (mean over categories), "categories": {...}}."""
    per = {}
    for cat in categories:
        entries, answers = load(cat, limit)
        rows = generate_results(model, tokenizer, entries, template, max_new_tokens, batch_size)
        path = write_results(out_dir, model_name, cat, rows)
        res = score(cat, entries, {r["id"]: r["result"] for r in rows}, answers)
        os.makedirs(os.path.join(out_dir, "score"), exist_ok=True)
        write_json_atomic(os.path.join(out_dir, "score", f"BFCL_v4_{cat}_score.json"), res)
        per[cat] = {"accuracy": res["accuracy"], "correct": res["correct"], "n": res["n"],
                    "malformed_calls": sum(r["malformed"] for r in rows), "results": path}
        progress(f"bfcl {cat}: {res['correct']}/{res['n']} = {res['accuracy']:.3f}")
    return {"accuracy": sum(p["accuracy"] for p in per.values()) / len(per) if per else 0.0, "categories": per}
