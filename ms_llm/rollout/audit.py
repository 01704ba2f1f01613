# SPDX-License-Identifier: Apache-2.0
"""The human audit loop of PPO (seed 000 §1.2.5.4.4).

During training, `AuditSampler` keeps a seeded share (`ppo.audit.share`, the seed's 5%) of every step's rollouts;
after each round of `ppo.audit.every` steps they go to `audit/round_K.jsonl` in the run directory, one record
per rollout with its reward components and empty reviewer fields:

    {"round": 3, "step": 57, "tag": "safety_boundary", "prompt": [...messages...], "response": "...",
     "reward": {"rm": 1.2, "safety": -1.0, "total": 0.9},
     "review": {"reviewer": null, "verdict": null, "better_response": null, "notes": null}}

A reviewer sets verdict to "ok" or "problem" (and, for a problem, the response that should have been given).
`ms-llm rlhf audit-import FILE --pool DIR` turns the reviewed problems into preference pairs (better_response
chosen over the rollout's response) appended to the pool under its next version (v1.0 -> v1.1, a new
MANIFEST.json); the pool folder is rebuilt beside the old one and swapped in, so it is never half-written.
`audit_status` lists the rounds; a round with no reviewed record `review_hours` after it was written is
overdue, and the run's report.md flags it.
"""
import json
import os
import re
import shutil
import time

import numpy as np

from ms_llm.errors import MsLlmError
from ms_llm.manifest import verify, write_manifest

EMPTY_REVIEW = {"reviewer": None, "verdict": None, "better_response": None, "notes": None}


class AuditSampler:
    def __init__(self, share: float, seed: int):
        self.share, self.seed, self.pending = float(share), int(seed), []

    def add(self, step: int, prompts: list, texts: list, parts: dict, total):
        """Keep each of this step's rollouts with probability `share` (a generator seeded by the step)."""
        keep = np.random.default_rng([self.seed, 31337, step]).random(len(prompts)) < self.share
        for i in np.nonzero(keep)[0]:
            reward = {k: float(np.asarray(v)[i]) for k, v in parts.items()}
            reward["total"] = float(np.asarray(total)[i])
            self.pending.append({"step": step + 1, "tag": prompts[i].get("tag"), "prompt": prompts[i]["messages"],
                                 "response": texts[i], "reward": reward, "review": dict(EMPTY_REVIEW)})

    def flush(self, run_dir: str, round_index: int) -> str:
        """Write the round's records to audit/round_K.jsonl (atomically) and start the next round."""
        folder = os.path.join(run_dir, "audit")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"round_{round_index:04d}.jsonl")
        if os.path.isfile(path) and any(r["review"].get("verdict") is not None for r in read_audit(path)):
            self.pending = []                  # re-run after a resume: never overwrite reviews already entered
            return path
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in self.pending:
                f.write(json.dumps({"round": round_index, **rec}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        self.pending = []
        return path

    def state(self) -> list:
        return list(self.pending)

    def load_state(self, pending: list):
        self.pending = list(pending or [])


def read_audit(path: str) -> list:
    if not os.path.isfile(path):
        raise MsLlmError(f"{path}: audit file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MsLlmError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("review"), dict) or "response" not in rec:
                raise MsLlmError(f"{path}:{lineno}: not an audit record (needs 'response' and a 'review' object)")
            verdict = rec["review"].get("verdict")
            if verdict not in (None, "ok", "problem"):
                raise MsLlmError(f"{path}:{lineno}: review.verdict must be \"ok\", \"problem\" or null, got {verdict!r}")
            if verdict == "problem" and not isinstance(rec["review"].get("better_response"), str):
                raise MsLlmError(f"{path}:{lineno}: a problem needs review.better_response (the answer to prefer)")
            out.append(rec)
    return out


def audit_status(run_dir: str, review_hours: float = 48.0, now: float = None) -> list:
    """[{"round", "path", "records", "reviewed", "overdue"}] for every audit round of a run."""
    folder = os.path.join(run_dir, "audit")
    if not os.path.isdir(folder):
        return []
    now = time.time() if now is None else now
    rows = []
    for name in sorted(n for n in os.listdir(folder) if re.fullmatch(r"round_\d+\.jsonl", n)):
        path = os.path.join(folder, name)
        recs = read_audit(path)
        reviewed = sum(r["review"].get("verdict") is not None for r in recs)
        age_h = (now - os.path.getmtime(path)) / 3600
        rows.append({"round": int(name[6:-6]), "path": path, "records": len(recs), "reviewed": reviewed,
                     "overdue": bool(recs) and reviewed == 0 and age_h > review_hours})
    return rows


def next_version(version: str) -> str:
    """"DATASET_v1.0_rm" -> "DATASET_v1.1_rm"; "v2.9" -> "v2.10" (the last vMAJOR.MINOR in the tag)."""
    m = re.fullmatch(r"(.*v)(\d+)\.(\d+)(\D.*)?", version or "")
    if not m:
        raise MsLlmError(f"preference pool version {version!r} holds no vMAJOR.MINOR to bump")
    return f"{m.group(1)}{m.group(2)}.{int(m.group(3)) + 1}{m.group(4) or ''}"


def import_reviews(audit_file: str, pool_dir: str, pairs_name: str = "pairs.jsonl") -> dict:
    """Add the reviewed problems of `audit_file` to the preference pool `pool_dir` (pairs.jsonl + MANIFEST.json)
    as new pairs under the next version; returns {"version", "added", "pairs"}."""
    recs = read_audit(audit_file)
    if not os.path.isfile(os.path.join(pool_dir, "MANIFEST.json")):
        raise MsLlmError(f"{pool_dir}: no MANIFEST.json; not a versioned preference pool")
    manifest = verify(pool_dir)
    version = next_version(manifest.get("version"))
    pairs_path = os.path.join(pool_dir, pairs_name)
    if not os.path.isfile(pairs_path):
        raise MsLlmError(f"{pool_dir}: no {pairs_name}")
    new = [{"prompt": r["prompt"], "chosen": r["review"]["better_response"], "rejected": r["response"],
            "tag": r.get("tag"), "source": f"audit:{os.path.basename(audit_file)}:step{r.get('step')}"}
           for r in recs if r["review"].get("verdict") == "problem"]
    if not new:
        raise MsLlmError(f"{audit_file}: no reviewed problem to import (review.verdict \"problem\" with a "
                         "better_response)")
    tmp = pool_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pool_dir, tmp)
    with open(os.path.join(tmp, pairs_name), "a", encoding="utf-8") as f:
        for pair in new:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    with open(os.path.join(tmp, pairs_name), encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    write_manifest(tmp, version, extra={"previous_version": manifest.get("version"), "added_pairs": len(new),
                                        "added_from": os.path.abspath(audit_file)})
    old = pool_dir.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(pool_dir, old)
    os.rename(tmp, pool_dir)
    shutil.rmtree(old)
    return {"version": version, "added": len(new), "pairs": total}
