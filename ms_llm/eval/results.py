# SPDX-License-Identifier: Apache-2.0
"""Evaluation results: one JSON file per evaluation (with model hash, dataset hash and settings) and a
markdown table of all results in the same folder. Stages read these for their gates."""
import hashlib
import json
import os
import time

from ms_llm.fileio import sha256_file, write_json_atomic
from ms_llm.manifest import model_identity  # noqa: F401  (results name the models they scored)


def dataset_identity(path: str) -> str:
    if os.path.isfile(path):
        return sha256_file(path)
    names = sorted(os.path.join(r, n) for r, _, fs in os.walk(path) for n in fs)
    return sha256_file_list(names)


def sha256_file_list(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def write_result(out_dir: str, name: str, metrics: dict, model: str = None, dataset: str = None,
                 settings: dict = None) -> str:
    """Write <out_dir>/<name>.json and refresh <out_dir>/results.md; returns the JSON path."""
    os.makedirs(out_dir, exist_ok=True)
    record = {"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "model": model, "model_sha256": model_identity(model) if model and os.path.isdir(model) else None,
              "dataset": dataset, "dataset_sha256": dataset_identity(dataset) if dataset and os.path.exists(dataset) else None,
              "settings": settings or {}, "metrics": metrics}
    path = os.path.join(out_dir, f"{name}.json")
    write_json_atomic(path, record)
    write_markdown(out_dir)
    return path


def write_markdown(out_dir: str):
    rows = []
    for fname in sorted(os.listdir(out_dir)):
        if fname.endswith(".json"):
            with open(os.path.join(out_dir, fname)) as f:
                r = json.load(f)
            headline = {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            shown = ", ".join(f"{k} {v:.4g}" for k, v in headline.items())
            rows.append(f"| {r['name']} | {shown} | {(r.get('model_sha256') or '')[:12]} | {(r.get('dataset_sha256') or '')[:12]} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("| evaluation | metrics | model | dataset |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


_OPS = {">=": lambda v, t: v >= t, ">": lambda v, t: v > t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t}


def gate(value, threshold: float, op: str = ">=") -> dict:
    """A stage gate in summary.json's form: {"value", "threshold", "op", "passed"}; a value that could not be
    measured (None) does not pass."""
    if value is None:
        return {"value": None, "threshold": float(threshold), "op": op, "passed": False}
    return {"value": float(value), "threshold": float(threshold), "op": op, "passed": bool(_OPS[op](value, threshold))}
