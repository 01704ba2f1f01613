# SPDX-License-Identifier: Apache-2.0
"""The domain-tagged shard index: contents round-trip, the curriculum samples it by domain tag, and bad
input (another tokenizer, a truncated shard, malformed JSONL, an existing index) is one clear error."""
import json
import math
import os

import numpy as np
import pytest

from conftest import make_workdir
from ms_llm.cli import main
from ms_llm.data.curriculum import CurriculumSampler, Phase, Schedule
from ms_llm.data.loader import PretrainData
from ms_llm.data.shard_index import build_index, open_index, parse_input
from ms_llm.data.tokenizer import Tokenizer, train_sentencepiece
from ms_llm.errors import MsLlmError


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = make_workdir(tmp_path_factory, "index", n_text=300, n_sft=40)
    return d, Tokenizer.load(str(d / "data" / "tiny" / "tokenizer"))


def _texts(path):
    return [json.loads(x)["text"] for x in open(path)]


def test_shards_hold_each_domains_documents_in_order(work, tmp_path):
    d, tok = work
    data = d / "data" / "tiny"
    mixed = tmp_path / "mixed.jsonl"       # no domain field: takes the :code suffix; one record names its own
    mixed.write_text(json.dumps({"text": "def f(x): return x"}) + "\n" + json.dumps({"text": "Water boils.",
                                                                                     "domain": "science"}) + "\n")
    index = build_index([(str(data / "pretrain_science.jsonl"), None), parse_input(f"{mixed}:code")], tok,
                        str(tmp_path / "idx"), shard_tokens=2000, progress=False)
    assert set(index["domains"]) == {"science", "code"} and index["domains"]["science"]["shards"] > 2
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    by_domain = {}
    for cache, domain, _ in open_index(str(tmp_path / "idx"), tok, verify=True):
        assert cache.index["num_tokens"] < 2000 + 200             # documents are not split across shards
        by_domain.setdefault(domain, []).extend(tok.decode(cache.doc(i)[:-1].tolist()) for i in range(cache.num_docs))
    assert by_domain["science"] == _texts(data / "pretrain_science.jsonl") + ["Water boils."]
    assert by_domain["code"] == ["def f(x): return x"]


def test_curriculum_over_the_index_draws_shards_by_domain_tag(work, tmp_path):
    d, tok = work
    data = d / "data" / "tiny"
    build_index([(str(data / f"pretrain_{x}.jsonl"), None) for x in ("general", "science", "code")], tok,
                str(tmp_path / "idx"), shard_tokens=1500, progress=False)
    pd = PretrainData([], tok, 32, str(tmp_path / "cache"), index=str(tmp_path / "idx"),
                      index_domains=["general", "science", "code"])
    assert len(pd.domains) > 6 and set(pd.domains) == {"general", "science", "code"}
    schedule = Schedule([Phase("p1", 32 * 10_000, {"general": 60, "science": 30, "code": 10}),
                         Phase("p2", math.inf, {"general": 40, "science": 30, "code": 30})])
    pd.sampler = CurriculumSampler(pd.n_train, pd.domains, pd.weights, schedule, 32, seed=1)
    for lo, want in ((0, (0.6, 0.3, 0.1)), (10_000, (0.4, 0.3, 0.3))):
        drawn = [pd.domains[pd.sampler.lookup(k)[0]] for k in range(lo, lo + 10_000)]
        got = [drawn.count(x) / len(drawn) for x in ("general", "science", "code")]
        assert np.allclose(got, want, atol=0.01), got
    src, item = pd.sampler.lookup(123)
    shard = pd.packed[src].cache
    np.testing.assert_array_equal(pd.sample(123)["input_ids"], shard.tokens[item * 32:item * 32 + 32])
    # within a domain, shards are drawn in proportion to their tokens
    sci = [i for i, x in enumerate(pd.domains) if x == "science"]
    counts = np.bincount([pd.sampler.lookup(k)[0] for k in range(30_000)], minlength=len(pd.domains))[sci]
    tokens = np.array([pd.weights[i] for i in sci])
    assert np.allclose(counts / counts.sum(), tokens / tokens.sum(), atol=0.02)


def test_bad_inputs_are_one_clear_error(work, tmp_path, capsys):
    d, tok = work
    data = d / "data" / "tiny"
    idx = str(tmp_path / "idx")
    build_index([(str(data / "pretrain_code.jsonl"), None)], tok, idx, shard_tokens=5000, progress=False)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(_texts(data / "pretrain_code.jsonl")))
    other = train_sentencepiece(str(corpus), str(tmp_path / "tok2"), 400)
    with pytest.raises(MsLlmError, match="index.json: built with tokenizer"):
        open_index(idx, other)
    assert main(["data", "index", "--tokenizer", str(data / "tokenizer"), "--out", idx,
                 str(data / "pretrain_code.jsonl")]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    out2 = str(tmp_path / "idx2")
    assert main(["data", "index", "--tokenizer", str(data / "tokenizer"), "--out", out2, str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not os.path.exists(out2) and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    shard = os.path.join(idx, "code", "shard_00000", "tokens.bin")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 8)
    with pytest.raises(MsLlmError, match="shard_00000/tokens.bin.*truncated"):
        open_index(idx, tok)
