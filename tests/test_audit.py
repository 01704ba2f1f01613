# SPDX-License-Identifier: Apache-2.0
"""The PPO audit loop: seeded sampling of rollouts into round files, overdue rounds, and reviewed problems
imported into the preference pool under the next version without ever leaving it half-written."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ms_llm.data.readers import read_records
from ms_llm.errors import MsLlmError
from ms_llm.manifest import verify, write_manifest
from ms_llm.rollout.audit import AuditSampler, audit_status, import_reviews, next_version, read_audit


def _round(tmp_path, steps=4, share=0.25):
    s = AuditSampler(share, seed=0)
    for step in range(steps):
        prompts = [{"messages": [{"role": "user", "content": f"q{step}.{i}"}], "tag": "t"} for i in range(16)]
        s.add(step, prompts, [f"a{step}.{i}" for i in range(16)], {"rm": np.arange(16.0)}, np.arange(16.0) / 2)
    return s, s.flush(str(tmp_path), 1)


def test_sampler_keeps_a_seeded_share_with_empty_reviews(tmp_path):
    s, path = _round(tmp_path)
    recs = read_audit(path)
    assert os.path.basename(path) == "round_0001.jsonl" and s.pending == []
    assert 8 <= len(recs) <= 24                               # about 25% of 64
    r = recs[0]
    assert r["round"] == 1 and r["review"] == {"reviewer": None, "verdict": None, "better_response": None, "notes": None}
    i = int(r["response"].split(".")[1])
    assert r["reward"] == {"rm": float(i), "total": i / 2} and r["prompt"][0]["content"] == f"q{r['step'] - 1}.{i}"
    again, _ = _round(tmp_path / "again")
    assert read_audit(str(tmp_path / "again" / "audit" / "round_0001.jsonl")) == recs    # seeded: same picks


def test_unreviewed_rounds_become_overdue(tmp_path):
    _, path = _round(tmp_path)
    now = os.path.getmtime(path)
    assert audit_status(str(tmp_path), 48, now + 47 * 3600)[0]["overdue"] is False
    assert audit_status(str(tmp_path), 48, now + 49 * 3600)[0]["overdue"] is True
    recs = read_audit(path)
    recs[0]["review"]["verdict"] = "ok"
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    st = audit_status(str(tmp_path), 48, time.time() + 49 * 3600)[0]
    assert st["reviewed"] == 1 and st["overdue"] is False


def _pool(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    write_manifest(str(pool), "DATASET_v1.0_rm")
    return pool


def test_reviewed_problems_become_pairs_under_the_next_version(tmp_path):
    _, path = _round(tmp_path)
    recs = read_audit(path)
    recs[0]["review"].update(verdict="problem", better_response="a better answer", reviewer="ana")
    recs[1]["review"].update(verdict="ok")
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    pool = _pool(tmp_path)
    got = import_reviews(path, str(pool))
    assert got == {"version": "DATASET_v1.1_rm", "added": 1, "pairs": 2}
    m = verify(str(pool))
    assert m["version"] == got["version"] and m["previous_version"] == "DATASET_v1.0_rm" and m["added_pairs"] == 1
    pairs = read_records(str(pool / "pairs.jsonl"), "preference")
    assert pairs[1]["chosen"] == "a better answer" and pairs[1]["rejected"] == recs[0]["response"]
    assert pairs[1]["messages"] == recs[0]["prompt"]
    assert not (tmp_path / "pool.tmp").exists() and not (tmp_path / "pool.old").exists()


def test_bad_audit_input_is_refused_and_the_pool_is_untouched(tmp_path):
    _, path = _round(tmp_path)
    pool = _pool(tmp_path)
    before = (pool / "MANIFEST.json").read_text()
    with pytest.raises(MsLlmError, match="no reviewed problem"):
        import_reviews(path, str(pool))
    bad = tmp_path / "bad.jsonl"
    rec = read_audit(path)[0]
    rec["review"]["verdict"] = "problem"
    bad.write_text(json.dumps(rec) + "\n")
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "rlhf", "audit-import", str(bad), "--pool", str(pool)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "bad.jsonl:1" in r.stderr and "better_response" in r.stderr
    bad.write_text("{not json\n")
    with pytest.raises(MsLlmError, match=r"bad.jsonl:1: malformed JSON"):
        import_reviews(str(bad), str(pool))
    assert (pool / "MANIFEST.json").read_text() == before
    assert next_version("v2.9") == "v2.10"
    with pytest.raises(MsLlmError, match="no vMAJOR.MINOR"):
        next_version("release-a")


def test_a_rerun_round_never_overwrites_reviews(tmp_path):
    s, path = _round(tmp_path)
    recs = read_audit(path)
    recs[0]["review"].update(verdict="ok", reviewer="bo")
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    again, _ = _round(tmp_path)                          # a resumed run flushes the same round again
    assert read_audit(path)[0]["review"]["reviewer"] == "bo" and again.pending == []
