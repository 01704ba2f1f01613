# SPDX-License-Identifier: Apache-2.0
"""Readers, synthetic data, tokenized cache, packing and the mixture sampler."""
import json
import os

import numpy as np
import pytest

from ms_llm.data.cache import build_text_cache
from ms_llm.data.mixture import MixtureSampler
from ms_llm.data.packing import IGNORE, PackedSource
from ms_llm.data.readers import ReadStats, read_records
from ms_llm.data.synthetic import synthesize
from ms_llm.data.tokenizer import Tokenizer
from ms_llm.errors import MsLlmError


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_formats_normalize(tmp_path):
    a = read_records(_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3",
                                                    "system": "S", "history": [["q", "a"]], "task": "qa"}]), "alpaca")
    assert [m["role"] for m in a[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert a[0]["messages"][3]["content"] == "Add\n1 2" and a[0]["task"] == "qa"
    s = read_records(_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "function_call", "value": "f()"},
        {"from": "observation", "value": "42"}, {"from": "gpt", "value": "42!"}], "system": "S"}]), "sharegpt")
    assert [m["role"] for m in s[0]["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    p = read_records(_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]), "preference")
    assert p[0]["chosen"] == "a" and p[0]["messages"][0]["content"] == "q"
    q = read_records(_jsonl(tmp_path / "q.jsonl", [{"prompt": "1+1?", "answer": 2}]), "prompts")
    assert q[0]["answer"] == "2"


def test_malformed_lines_name_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{broken", {"text": ""}, {"text": "fine"}])
    with pytest.raises(MsLlmError, match=r"bad.jsonl:2: malformed JSON"):
        read_records(path, "text")
    stats = ReadStats()
    rows = read_records(path, "text", on_error="skip", stats=stats)
    assert [r["text"] for r in rows] == ["ok", "fine"] and stats.skipped == 2
    assert stats.reasons[1].endswith("bad.jsonl:3: needs a non-empty string field 'text'")


@pytest.mark.parametrize("conv,reason", [
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "conversations[0]: roles out of order"),
    ([], "'conversations' must be a non-empty list"),
    ([{"from": "human", "value": "q"}], "conversation must end with a gpt/function_call turn"),
])
def test_sharegpt_role_order(tmp_path, conv, reason):
    path = _jsonl(tmp_path / "c.jsonl", [{"conversations": conv}])
    with pytest.raises(MsLlmError, match=r"c.jsonl:1: " + reason.replace("[", r"\[").replace("]", r"\]")):
        read_records(path, "sharegpt")


def test_synthetic_data_is_deterministic(tmp_path):
    a = synthesize(str(tmp_path / "a"), seed=3, n_text=50, n_sft=40, n_eval=10, vocab_size=512)
    b = synthesize(str(tmp_path / "b"), seed=3, n_text=50, n_sft=40, n_eval=10, vocab_size=512)
    c = synthesize(str(tmp_path / "c"), seed=4, n_text=50, n_sft=40, n_eval=10, vocab_size=512)
    assert a["files"] == b["files"] and a["files"] != c["files"]
    tasks = {r["task"] for r in read_records(str(tmp_path / "a" / "sft_alpaca.jsonl"), "alpaca")}
    assert tasks == {"qa", "code", "translation", "reasoning"}
    pref = read_records(str(tmp_path / "a" / "preference.jsonl"), "preference")
    assert all(p["chosen"] != p["rejected"] for p in pref)
    prompts = read_records(str(tmp_path / "a" / "prompts_eval.jsonl"), "prompts")
    add = [p for p in prompts if p["task"] == "arithmetic"][0]
    x, y = map(int, add["prompt"][len("What is "):-1].split(" + "))
    assert add["answer"] == str(x + y)


@pytest.fixture
def tiny_data(tmp_path):
    synthesize(str(tmp_path / "d"), seed=0, n_text=100, n_sft=20, n_eval=5, vocab_size=512)
    return tmp_path / "d", Tokenizer.load(tmp_path / "d" / "tokenizer")


def test_cache_is_reused_and_invalidated(tmp_path, tiny_data):
    folder, tok = tiny_data
    src = str(folder / "pretrain_code.jsonl")
    c1 = build_text_cache(src, tok, str(tmp_path / "cache"))
    stamp = os.path.getmtime(os.path.join(c1.folder, "tokens.bin"))
    c2 = build_text_cache(src, tok, str(tmp_path / "cache"))
    assert c2.folder == c1.folder and os.path.getmtime(os.path.join(c2.folder, "tokens.bin")) == stamp
    first = json.loads(open(src).readline())["text"]
    assert c1.doc(0).tolist() == tok.encode(first) + [tok.eos_id]
    with open(src, "a") as f:
        f.write(json.dumps({"text": "def new():\n    pass"}) + "\n")
    c3 = build_text_cache(src, tok, str(tmp_path / "cache"))
    assert c3.folder != c1.folder and c3.num_docs == c1.num_docs + 1


def test_ranks_starting_together_tokenize_a_source_once(tmp_path, tiny_data):
    """While one process holds the cache's build lock (here: this test, building it), another that asks for the
    same cache waits instead of tokenizing too, then reads the files the first wrote (built_here False); a
    process that takes the lock first builds it (built_here True)."""
    import subprocess
    import sys
    import time
    from ms_llm.data.cache import building
    folder, tok = tiny_data
    src, cache_dir = str(folder / "pretrain_code.jsonl"), str(tmp_path / "cache")
    probe = ("import json, logging, sys; logging.basicConfig(level=logging.INFO); from ms_llm.data.cache import "
             "build_text_cache; from ms_llm.data.tokenizer import Tokenizer; c = build_text_cache(sys.argv[1], "
             "Tokenizer.load(sys.argv[2]), sys.argv[3]); print(json.dumps([c.built_here, c.folder, c.num_docs]))")
    mine = build_text_cache(src, tok, str(tmp_path / "elsewhere"))        # where the cache's folder will be
    target = os.path.join(cache_dir, os.path.basename(mine.folder))
    with building(target, src):
        other = subprocess.Popen([sys.executable, "-c", probe, src, str(folder / "tokenizer"), cache_dir],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:                                    # until it says it waits on the lock
            line = other.stderr.readline()
            if not line or "another process is tokenizing it; waiting" in line:
                break
        assert line and other.poll() is None, other.stderr.read()
        from ms_llm.data.cache import _tokenize
        from ms_llm.fileio import sha256_file
        _tokenize(src, tok, target, sha256_file(src), "raise", lambda r: r["text"])
    out, _ = other.communicate(timeout=60)
    built, got, docs = json.loads(out.strip().splitlines()[-1])
    assert not built and got == target and docs == mine.num_docs
    assert mine.built_here and not build_text_cache(src, tok, str(tmp_path / "elsewhere")).built_here


def test_packing_document_mask(tmp_path, tiny_data):
    folder, tok = tiny_data
    cache = build_text_cache(str(folder / "pretrain_general.jsonl"), tok, str(tmp_path / "cache"))
    packed = PackedSource(cache, 64, document_mask=True)
    w = packed.window(3)
    start = 3 * 64
    assert np.array_equal(w["input_ids"], cache.tokens[start:start + 64])
    boundaries = np.nonzero(np.diff(w["segment_ids"]))[0] + 1
    assert len(boundaries) >= 1
    for b in boundaries:                          # a new document starts at position 0 after the eos
        assert w["position_ids"][b] == 0 and w["input_ids"][b - 1] == tok.eos_id
        assert w["labels"][b - 1] == IGNORE       # eos does not predict the next document
    assert (w["labels"][w["labels"] != IGNORE] == cache.tokens[start + 1:start + 65][w["labels"] != IGNORE]).all()


def test_mixture_proportions_and_resumability():
    sampler = MixtureSampler([500, 300, 200], [0.6, 0.3, 0.1], seed=5)
    picks = [sampler.lookup(k) for k in range(10_000)]
    share = np.bincount([s for s, _ in picks], minlength=3) / 10_000
    assert np.abs(share - [0.6, 0.3, 0.1]).max() < 0.01
    fresh = MixtureSampler([500, 300, 200], [0.6, 0.3, 0.1], seed=5)
    assert [fresh.lookup(k) for k in range(9_000, 9_050)] == picks[9_000:9_050]     # no history needed
    first_epoch = [i for s, i in picks if s == 2][:200]
    assert sorted(first_epoch) == list(range(200)) and first_epoch != list(range(200))   # shuffled, each item once
