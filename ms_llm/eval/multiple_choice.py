# SPDX-License-Identifier: Apache-2.0
"""Multiple-choice benchmarks from local files: MMLU, C-Eval and CMMLU layouts, and generic JSONL.

    MMLU   <dir>/{dev,test}/<subject>_{dev,test}.csv     no header: question, A, B, C, D, answer
    C-Eval <dir>/{dev,val}/<subject>_{dev,val}.csv       header: id, question, A, B, C, D, answer[, explanation]
    CMMLU  <dir>/{dev,test}/<subject>.csv                header: (index), Question, A, B, C, D, Answer
    JSONL  {"question", "choices": [...], "answer": "B" | 1, "subject"?}

Each question is scored zero- or k-shot (k examples from the dev split of its subject) either by the
log-probability of each answer letter after "Answer:" (`method="letter"`), by the log-likelihood of each
choice's text after that prompt (`method="choice"`, length-normalized), or by the log-likelihood of each
choice right after the bare question (`method="cloze"`, length-normalized: what small models can answer).
Accuracy per subject, per category and on average.
"""
import csv
import glob
import io
import json
import os
from collections import defaultdict

import numpy as np

from ms_llm.errors import MsLlmError
from ms_llm.fileio import numbered_lines, read_text, utf8
from ms_llm.eval.scoring import continuation_scores

LETTERS = "ABCDEFGHIJ"


def _row_item(row, path, lineno, subject):
    question, choices, answer = row[0], row[1:-1], row[-1].strip()
    if len(choices) < 2 or any(c is None for c in choices):
        raise MsLlmError(f"{path}:{lineno}: expected question, choices and answer columns, got {len(row)} columns")
    if answer not in LETTERS[:len(choices)]:
        raise MsLlmError(f"{path}:{lineno}: answer '{answer}' is not one of {', '.join(LETTERS[:len(choices)])}")
    return {"question": question, "choices": list(choices), "answer": LETTERS.index(answer), "subject": subject}


def read_csv(path: str, layout: str, subject: str) -> list:
    """Questions of one subject file; layout is mmlu (no header), ceval or cmmlu (header row)."""
    rows = list(csv.reader(io.StringIO(read_text(path, "question file"), newline="")))
    items = []
    if layout == "mmlu":
        for i, row in enumerate(rows, 1):
            if len(row) != 6:
                raise MsLlmError(f"{path}:{i}: MMLU rows have 6 columns (question, A, B, C, D, answer), got {len(row)}")
            items.append(_row_item(row, path, i, subject))
        return items
    header = [h.strip().lower() for h in rows[0]] if rows else []
    need = ["question", "a", "b", "c", "d", "answer"]
    missing = [h for h in need if h not in header]
    if missing:
        raise MsLlmError(f"{path}:1: missing column(s) {missing} in the header {rows[0] if rows else []}")
    idx = [header.index(h) for h in need]
    for i, row in enumerate(rows[1:], 2):
        if len(row) < len(header):
            raise MsLlmError(f"{path}:{i}: {len(row)} columns, the header has {len(header)}")
        items.append(_row_item([row[j] for j in idx], path, i, subject))
    return items


def read_jsonl(path: str) -> list:
    items = []
    for i, raw, offset in numbered_lines(path):
        if not raw.strip():
            continue
        try:
            r = json.loads(utf8(raw, offset))
            choices, ans = r["choices"], r["answer"]
            q = r["question"]
        except (ValueError, KeyError, TypeError) as e:
            raise MsLlmError(f"{path}:{i}: needs 'question', 'choices' and 'answer' ({e})") from None
        ans = LETTERS.index(ans) if isinstance(ans, str) and ans in LETTERS[:len(choices)] else ans
        if not isinstance(ans, int) or not 0 <= ans < len(choices):
            raise MsLlmError(f"{path}:{i}: answer {r['answer']!r} does not name one of the {len(choices)} choices")
        items.append({"question": q, "choices": choices, "answer": ans, "subject": r.get("subject", "all")})
    return items


def load_benchmark(path: str, layout: str) -> tuple:
    """(test items, dev items by subject) for a benchmark directory (or a JSONL file)."""
    if layout == "jsonl":
        return read_jsonl(path), {}
    splits = {"mmlu": ("dev", "test"), "ceval": ("dev", "val"), "cmmlu": ("dev", "test")}
    if layout not in splits:
        raise MsLlmError(f"eval: layout '{layout}' is not one of mmlu, ceval, cmmlu, jsonl")
    dev_dir, test_dir = (os.path.join(path, s) for s in splits[layout])
    files = sorted(glob.glob(os.path.join(test_dir, "*.csv")))
    if not files:
        raise MsLlmError(f"{test_dir}: no .csv files for the {layout} layout")
    suffix = {"mmlu": "_test", "ceval": "_val", "cmmlu": ""}[layout]
    test, dev = [], {}
    for f in files:
        subject = os.path.basename(f)[:-4]
        subject = subject[:-len(suffix)] if suffix and subject.endswith(suffix) else subject
        test += read_csv(f, layout, subject)
        dev_file = os.path.join(dev_dir, f"{subject}_dev.csv" if layout != "cmmlu" else f"{subject}.csv")
        if os.path.isfile(dev_file):
            dev[subject] = read_csv(dev_file, layout, subject)
    return test, dev


def format_question(item: dict, with_answer: bool) -> str:
    lines = [item["question"]] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"])]
    return "\n".join(lines) + "\nAnswer:" + (f" {LETTERS[item['answer']]}\n\n" if with_answer else "")


def build_prompt(item: dict, shots: list) -> str:
    head = f"The following are multiple choice questions (with answers) about {item['subject'].replace('_', ' ')}.\n\n"
    return head + "".join(format_question(s, True) for s in shots) + format_question(item, False)


def evaluate(model, tokenizer, items: list, dev: dict = None, k_shot: int = 0, method: str = "letter",
             categories: dict = None) -> dict:
    """Accuracy overall, per subject and per category (categories: {subject: category})."""
    per_subject = defaultdict(list)
    predictions = []
    for item in items:
        shots = (dev or {}).get(item["subject"], [])[:k_shot]
        if method == "cloze":         # the bare question continued by each choice (no lettered list)
            context = tokenizer.encode(item["question"], add_bos=True)
        else:
            context = tokenizer.encode(build_prompt(item, shots), add_bos=True)
        if method == "letter":
            conts = [tokenizer.encode(f" {LETTERS[i]}") for i in range(len(item["choices"]))]
            scores = continuation_scores(model, context, conts)
        else:
            conts = [tokenizer.encode(f" {c}") for c in item["choices"]]
            scores = continuation_scores(model, context, conts, normalize=True)
        pred = int(np.argmax(scores))
        predictions.append(pred)
        per_subject[item["subject"]].append(pred == item["answer"])
    cats = defaultdict(list)
    for subject, hits in per_subject.items():
        cats[(categories or {}).get(subject, "all")].extend(hits)
    return {"accuracy": float(np.mean([p == it["answer"] for p, it in zip(predictions, items)])) if items else 0.0,
            "subjects": {s: float(np.mean(h)) for s, h in sorted(per_subject.items())},
            "categories": {c: float(np.mean(h)) for c, h in sorted(cats.items())},
            "n": len(items), "predictions": predictions}
