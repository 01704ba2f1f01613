# SPDX-License-Identifier: Apache-2.0
"""`ms-llm eval <benchmark> ...`: run one evaluation, print its metrics as JSON, optionally save results.

    ms-llm eval humaneval --samples samples.jsonl [--k 1,10] [--timeout 5] [--unsafe-no-isolation]
    ms-llm eval humaneval --model DIR [--n 1] [--limit 20]
    ms-llm eval mc --model DIR --data DIR_OR_JSONL --layout mmlu|ceval|cmmlu|jsonl [--k-shot 5] [--method letter|choice|cloze]
    ms-llm eval ppl --model DIR --data held_out.jsonl
    ms-llm eval em --model DIR --data prompts.jsonl [--template chatml]
    ms-llm eval rm --model REWARD_DIR --data pairs.jsonl [--seq-len 512]
    ms-llm eval em --model DIR --data prompts.jsonl --answer-style math      # math-verify decides equivalence
    ms-llm eval tools --model DIR --data agent_eval.jsonl     # held-out tool-call accuracy (eval/agent.py)
    ms-llm eval tools --model DIR --data agent_prompts_eval.jsonl --tool-source agent_tools.py   # task success
    ms-llm eval bfcl --model DIR --out DIR [--categories simple_python,multiple,parallel,irrelevance] [--limit N]
Add --out DIR to write <DIR>/<benchmark>.json (model hash, dataset hash, settings) and DIR/results.md.
"""
import argparse
import json
import os
import sys

from ms_llm.data.preference import read_pairs
from ms_llm.data.readers import read_records
from ms_llm.data.tokenizer import Tokenizer
from ms_llm.errors import MsLlmError
from ms_llm.eval import humaneval as he
from ms_llm.eval.results import write_result
from ms_llm.eval.sandbox import require_isolation


def _model(a):
    # MindSpore-backed: loads only for the benchmark that runs
    from ms_llm.context import setup_context
    from ms_llm.models.io import load_pretrained, resolve_model_dir
    setup_context(a.mode, seed=0)
    return load_pretrained(a.model), Tokenizer.load(a.tokenizer or resolve_model_dir(a.model))


def _reward_metrics(a) -> dict:
    """Accuracy, AUC, per-tag accuracy and ECE (raw and with the model's stored Platt coefficients)."""
    # MindSpore-backed: loads only for the benchmark that runs
    from ms_llm.context import setup_context
    from ms_llm.eval.reward import pair_metrics, score_pairs
    from ms_llm.models.reward import load_reward_model
    if not a.model or not a.data:
        raise MsLlmError("eval rm: --model and --data are required")
    setup_context(a.mode, seed=0)
    scorer = load_reward_model(a.model)
    pairs = read_pairs(a.data, scorer.tokenizer, scorer.chat_template, a.seq_len)
    pairs = pairs[:a.limit] if a.limit else pairs
    chosen, rejected = score_pairs(scorer.rm, pairs, a.batch_size)
    return pair_metrics(chosen, rejected, [p["tag"] for p in pairs], {"a": scorer.a, "b": scorer.b})


def main(argv):
    p = argparse.ArgumentParser(prog="ms-llm eval", description="Evaluate a model or scored samples.")
    p.add_argument("benchmark", choices=["humaneval", "mc", "ppl", "em", "rm", "bfcl", "tools"])
    p.add_argument("--model", help="model dir, checkpoint dir or run dir")
    p.add_argument("--tokenizer", help="tokenizer (default: the model dir)")
    p.add_argument("--data", help="benchmark file or directory")
    p.add_argument("--samples", help="humaneval: completions to score ({task_id, completion} per line)")
    p.add_argument("--k", default="1,10,100", help="humaneval: pass@k values")
    p.add_argument("--n", type=int, default=1, help="humaneval: samples per task when generating")
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument("--timeout", type=float, default=5.0, help="humaneval: seconds per program")
    p.add_argument("--unsafe-no-isolation", action="store_true",
                   help="humaneval: run completions without the namespace sandbox (only an in-process guard and "
                        "limits, which code written to escape can leave); for machines that cannot isolate")
    p.add_argument("--layout", default="jsonl", choices=["mmlu", "ceval", "cmmlu", "jsonl"])
    p.add_argument("--k-shot", type=int, default=0)
    p.add_argument("--method", default="letter", choices=["letter", "choice", "cloze"])
    p.add_argument("--template", default="chatml", help="em: chat template for the prompts")
    p.add_argument("--max-new-tokens", type=int, help="generation length (default 64; tools 96, bfcl 128: a call in "
                                                         "JSON needs room)")
    p.add_argument("--answer-style", default="auto", choices=["auto", "number", "text", "math"],
                   help="em: how answers are compared (math: equivalence by math-verify, e.g. \\frac{1}{2} = 0.5)")
    p.add_argument("--seq-len", type=int, default=512, help="rm: tokens per scored row (the prompt is cut first)")
    p.add_argument("--batch-size", type=int, default=16, help="rm: pairs per scoring batch")
    p.add_argument("--tool-source", help="tools: run whole episodes on prompts with tools (--data in the prompts "
                                         "format), the tools being this Python file's functions, run in the sandbox")
    p.add_argument("--max-turns", type=int, default=4, help="tools: model turns per episode")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="tools with --tool-source: sample episodes at this temperature (0: greedy)")
    p.add_argument("--episodes-per-prompt", type=int, default=1,
                   help="tools with --tool-source: episodes per prompt (task success is their mean), seeded by --seed")
    p.add_argument("--seed", type=int, default=0, help="tools with --tool-source: the episodes' sampling seed")
    p.add_argument("--categories", help="bfcl: comma-separated BFCL v4 categories (default simple_python,multiple,"
                                        "parallel,irrelevance)")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument("--out", help="write results JSON + results.md here")
    a = p.parse_args(argv)
    if a.max_new_tokens is None:
        a.max_new_tokens = {"tools": 96, "bfcl": 128}.get(a.benchmark, 64)
    settings = {k: v for k, v in vars(a).items() if k not in ("out",)}
    if a.benchmark == "humaneval":
        problems = he.read_problems()
        if not a.unsafe_no_isolation:
            require_isolation()                     # before anything is generated
        if a.samples:
            samples = he.read_samples(a.samples, problems)
        elif a.model:
            model, tok = _model(a)
            chosen = dict(list(problems.items())[:a.limit]) if a.limit else problems
            samples = he.generate_samples(model, tok, chosen, a.n, a.max_new_tokens, 0.0 if a.n == 1 else 0.8)
        else:
            raise MsLlmError("eval humaneval: give --samples FILE or --model DIR")
        res = he.score_samples(samples, problems, tuple(int(k) for k in a.k.split(",")), a.timeout,
                               isolation="none" if a.unsafe_no_isolation else "namespaces")
        metrics = {k: v for k, v in res.items() if k != "results"}
        dataset = he.dataset_path()
    elif a.benchmark == "rm":
        metrics, dataset = _reward_metrics(a), a.data
    elif a.benchmark == "bfcl":
        # bfcl-eval (optional, the agent extra) loads only for this benchmark
        from ms_llm.eval import bfcl
        categories = bfcl.parse_categories(a.categories)
        if not a.model or not a.out:
            raise MsLlmError("eval bfcl: --model and --out are required (results are written in BFCL's layout "
                             "under --out)")
        model, tok = _model(a)
        metrics = bfcl.evaluate(model, tok, categories, a.template, a.out,
                                "ms_llm-" + os.path.basename(os.path.abspath(a.model)), a.limit, a.max_new_tokens,
                                min(a.batch_size, 8), progress=lambda m: print(m, file=sys.stderr))
        dataset = None
    else:
        if not a.model or not a.data:
            raise MsLlmError(f"eval {a.benchmark}: --model and --data are required")
        model, tok = _model(a)
        dataset = a.data
        if a.benchmark == "mc":
            # MindSpore-backed: loads only for the benchmark that runs
            from ms_llm.eval.multiple_choice import evaluate, load_benchmark
            items, dev = load_benchmark(a.data, a.layout)
            metrics = evaluate(model, tok, items[:a.limit] if a.limit else items, dev, a.k_shot, a.method)
            metrics.pop("predictions")
        elif a.benchmark == "tools" and a.tool_source:
            # MindSpore-backed: loads only for the benchmark that runs
            from ms_llm.rollout.agent import ToolSet, episode_metrics, run_episodes
            tools = ToolSet.from_file(a.tool_source, timeout=a.timeout,
                                      isolation="none" if a.unsafe_no_isolation else "namespaces")
            records = read_records(a.data, "prompts")
            records = records[:a.limit] if a.limit else records
            records = [r for r in records for _ in range(max(1, a.episodes_per_prompt))]
            episodes = run_episodes(model, tok, records, a.template, tools, a.max_turns, a.max_new_tokens,
                                    temperature=a.temperature, seed=a.seed)
            metrics = episode_metrics(episodes, records, a.answer_style)
        elif a.benchmark == "tools":
            # MindSpore-backed: loads only for the benchmark that runs
            from ms_llm.eval.agent import tool_call_accuracy
            records = read_records(a.data, "openai")
            metrics = tool_call_accuracy(model, tok, records[:a.limit] if a.limit else records, a.template,
                                         a.max_new_tokens)
            metrics.pop("outputs")
        elif a.benchmark == "ppl":
            # MindSpore-backed: loads only for the benchmark that runs
            from ms_llm.eval.generative import perplexity
            metrics = perplexity(model, tok, a.data, max_docs=a.limit)
        else:
            # MindSpore-backed: loads only for the benchmark that runs
            from ms_llm.eval.generative import exact_match
            records = read_records(a.data, "prompts")
            metrics = exact_match(model, tok, records[:a.limit] if a.limit else records, a.template, a.max_new_tokens,
                                  style=a.answer_style)
            metrics.pop("outputs")
    print(json.dumps(metrics))
    if a.out:
        write_result(a.out, a.benchmark, metrics, a.model, dataset, settings)
    return metrics
