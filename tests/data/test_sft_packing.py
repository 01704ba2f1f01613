# SPDX-License-Identifier: Apache-2.0
"""SFT packing (data/packing.py): first-fit bins, and packed rows that give every token the loss and gradient it
has alone in a padded row, with no attention across a conversation boundary."""
import glob
import json
import os

import numpy as np
import pytest
from mindspore import Tensor

from ms_llm.config.schema import DataSource, SFTSection
from ms_llm.data.chat import render
from ms_llm.data.examples import supervised_example
from ms_llm.data.packing import IGNORE, first_fit, pack_supervised
from ms_llm.data.sft import KEYS, SFTData, turn_weights
from ms_llm.data.synthetic import synthesize
from ms_llm.data.tokenizer import Tokenizer

SEQ = 128


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftpack")
    synthesize(str(d), n_text=50, n_sft=200, n_eval=10)
    return d


@pytest.fixture(scope="module")
def tok(synth):
    return Tokenizer.load(synth / "tokenizer")


def _conversations(tok, n=9):
    """n multi-turn conversations of uneven lengths, each a supervised example with turn weights."""
    out = []
    for i in range(n):
        msgs = []
        for j in range(1 + i % 3):
            msgs += [{"role": "user", "content": f"question {i} part {j} " + "more " * (i % 4)},
                     {"role": "assistant", "content": "answer " * (1 + (3 * i + j) % 9) + str(i)}]
        ex = supervised_example(render(msgs, tok, "chatml"), SEQ, tok.pad_id)
        ex["weights"], ex["row_weight"] = turn_weights(ex, 1.0 + 0.25 * (i % 3), 0.6)
        out.append(ex)
    return out


def _naive_first_fit(lengths, capacity):
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def test_first_fit_equals_the_plain_quadratic_first_fit_decreasing():
    rng = np.random.default_rng(0)
    for n, cap in ((1, 10), (7, 10), (300, 64), (1000, 512)):
        lengths = [int(x) for x in rng.integers(1, cap + 1, n)]
        bins = first_fit(lengths, cap)
        assert bins == _naive_first_fit(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(n))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    with pytest.raises(ValueError, match="document 1 has 11 tokens"):
        first_fit([3, 11], 10)


def test_packed_rows_hold_each_conversation_whole_with_its_own_positions_and_segment(tok):
    docs = _conversations(tok)
    rows = pack_supervised(docs, SEQ, tok.pad_id)
    lengths = [d["tokens"] if "tokens" in d else int(d["attention_mask"].sum()) for d in docs]
    assert len(rows) < len(docs) and sum(r["documents"] for r in rows) == len(docs)
    for row, members in zip(rows, first_fit(lengths, SEQ)):
        at = 0
        for seg, i in enumerate(members):
            n = lengths[i]
            np.testing.assert_array_equal(row["input_ids"][at:at + n], docs[i]["input_ids"][:n])
            np.testing.assert_array_equal(row["labels"][at:at + n], docs[i]["labels"][:n])
            np.testing.assert_array_equal(row["weights"][at:at + n], docs[i]["weights"][:n])
            np.testing.assert_array_equal(row["position_ids"][at:at + n], np.arange(n))
            assert (row["segment_ids"][at:at + n] == seg).all()
            at += n
        assert row["tokens"] == at and (row["labels"][at:] == IGNORE).all() and (row["weights"][at:] == 0).all()
        assert (row["segment_ids"][at:] == len(members)).all()          # padding: a segment of its own
        assert row["row_weight"] == pytest.approx(sum(docs[i]["row_weight"] for i in members), rel=1e-6)


def _model(tok, backend):
    import mindspore as ms
    from ms_llm.models import CausalLM, preset
    from ms_llm.ops import backend as B
    B.configure(backend)
    try:
        ms.set_seed(3)
        return CausalLM(preset("tiny", vocab_size=tok.vocab_size))
    finally:
        B.configure("auto")


def _stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "attention_mask", "weights",
                                                         "row_weight", "position_ids", "segment_ids")}


def _unpacked(docs):
    rows = []
    for d in docs:
        rows.append(dict(d, position_ids=np.arange(SEQ, dtype=np.int32), segment_ids=np.zeros(SEQ, np.int32)))
    return _stack(rows)


def _token_log_probs_and_grads(model, batch):
    """Per-token log p(label) [B, S] and the gradient of the SFT loss numerator for every parameter."""
    import mindspore as ms
    from ms_llm.losses.lm import label_log_probs
    from ms_llm.losses.sft import SFTLoss
    t = [Tensor(np.ascontiguousarray(batch[k])) for k in KEYS]
    hidden = model.hidden_states(t[0], t[2], t[5], t[6])
    logp = label_log_probs(model, hidden, t[1], IGNORE)[0].asnumpy()
    net = SFTLoss(model)
    params = model.trainable_params()
    grads = ms.grad(lambda *x: net(*x)[0], grad_position=None, weights=params)(*t)
    return logp, {p.name: g.asnumpy() for p, g in zip(params, grads)}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_packed_rows_give_every_token_its_unpacked_loss_and_gradient(tok, backend):
    """Packed and one-conversation-per-row batches of the same conversations: the same log p of every label
    token and the same gradient of the summed weighted loss (≤ 1e-5), on the reference ops and the CPU kernels
    (whose flash attention skips the key blocks a document mask hides)."""
    docs = _conversations(tok)
    lengths = [int(d["attention_mask"].sum()) for d in docs]
    rows = pack_supervised(docs, SEQ, tok.pad_id)
    model = _model(tok, backend)
    alone, g_alone = _token_log_probs_and_grads(model, _unpacked(docs))
    packed, g_packed = _token_log_probs_and_grads(model, _stack(rows))
    compared = 0
    for r, members in enumerate(first_fit(lengths, SEQ)):
        at = 0
        for i in members:
            n = lengths[i]
            scored = docs[i]["labels"][:n] != IGNORE
            np.testing.assert_allclose(packed[r, at:at + n][scored], alone[i, :n][scored], atol=1e-5, rtol=0)
            compared += int(scored.sum())
            at += n
    assert compared == sum(int((d["labels"] != IGNORE).sum()) for d in docs)
    for name, g in g_alone.items():
        np.testing.assert_allclose(g_packed[name], g, atol=1e-5, rtol=1e-4, err_msg=name)
    assert max(float(np.abs(g).max()) for g in g_alone.values()) > 1e-3            # gradients are not all ~0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_attention_crosses_a_conversation_boundary(tok, backend):
    """Changing the tokens of a row's first conversation leaves every later conversation's log-probs as they
    were; with the conversations merely concatenated (data.document_mask: false) the same change reaches them."""
    docs = _conversations(tok)
    model = _model(tok, backend)
    from ms_llm.losses.lm import label_log_probs

    lengths = [int(d["attention_mask"].sum()) for d in docs]
    r, members = max(enumerate(first_fit(lengths, SEQ)), key=lambda x: len(x[1]))
    first = lengths[members[0]]                          # where the row's second conversation starts

    def later_log_probs(mode, change):
        row = dict(pack_supervised(docs, SEQ, tok.pad_id, document_mask=mode == "documents")[r])
        row["input_ids"] = row["input_ids"].copy()
        if change:
            row["input_ids"][:first - 1] = (row["input_ids"][:first - 1] + 7) % tok.vocab_size
        b = _stack([row])
        t = [Tensor(np.ascontiguousarray(b[k])) for k in KEYS]
        hidden = model.hidden_states(t[0], t[2], t[5], t[6])
        logp = label_log_probs(model, hidden, t[1], IGNORE)[0].asnumpy()[0]
        return logp[first:row["tokens"]][row["labels"][first:row["tokens"]] != IGNORE]

    same = later_log_probs("documents", False), later_log_probs("documents", True)
    assert len(members) >= 2 and len(same[0]) > 0
    np.testing.assert_array_equal(same[0], same[1])
    mixed = later_log_probs("concatenated", False), later_log_probs("concatenated", True)
    assert float(np.abs(mixed[0] - mixed[1]).max()) > 1e-4


def test_sft_data_packs_each_group_and_keeps_the_loss_denominators(synth, tok):
    """Packed SFTData: each (source, task) group is packed on its own, every conversation lands in exactly one
    row, a row's loss denominator is its conversations' sum, and batches carry the real-token count."""
    src = [DataSource(path=str(synth / "sft_alpaca.jsonl"), format="alpaca"),
           DataSource(path=str(synth / "sft_sharegpt.jsonl"), format="sharegpt", weight=0.5)]
    plain = SFTData(src, tok, "chatml", SEQ, SFTSection())
    packed = SFTData(src, tok, "chatml", SEQ, SFTSection(), packing="documents")
    assert packed.keys == plain.keys and packed.conversations == plain.conversations
    for pg, g in zip(packed.groups, plain.groups):
        assert sum(r["documents"] for r in pg) == len(g) and len(pg) < len(g)
        assert sum(r["tokens"] for r in pg) == sum(int(x["attention_mask"].sum()) for x in g)
        assert sum(float(r["row_weight"]) for r in pg) == pytest.approx(sum(float(x["row_weight"]) for x in g), rel=1e-5)
    # rows are drawn so that each group's share of conversations is the unpacked one, however densely it packs
    per_draw = np.array([c / len(g) for c, g in zip(packed.group_conversations, packed.groups)])
    assert per_draw.max() > 1.2 * per_draw.min()                 # the groups do pack unevenly
    shares = packed.sampler.p * per_draw
    np.testing.assert_allclose(shares / shares.sum(), plain.sampler.p, rtol=1e-9)
    b, u = packed.batch(3, 4, rank=1, world=2), plain.batch(3, 4, rank=1, world=2)
    assert set(b) == set(u) == set(KEYS) | {"tokens"}
    assert b["tokens"] == int(sum(packed.sample(k)["tokens"] for k in packed.batch_indices(3, 4, 1, 2)))
    assert b["tokens"] > u["tokens"] == int(u["attention_mask"].sum())
    np.testing.assert_array_equal(u["position_ids"], np.broadcast_to(np.arange(SEQ), (4, SEQ)))
    assert not u["segment_ids"].any()
    again = SFTData(src, tok, "chatml", SEQ, SFTSection(), packing="documents")
    np.testing.assert_array_equal(again.batch(3, 4, 1, 2)["input_ids"], b["input_ids"])     # deterministic


def test_packing_is_on_by_default_where_it_is_exact_and_refused_elsewhere(tmp_path):
    from ms_llm.config import load_config
    from ms_llm.errors import MsLlmError
    path = tmp_path / "c.yaml"
    path.write_text("stage: sft\nmodel: {preset: tiny}\ndata:\n  sources: [{path: x.jsonl, format: alpaca}]\n")
    assert load_config(str(path)).packing == "documents"
    assert load_config(str(path), ["data.document_mask=false"]).packing == "concatenated"
    assert load_config(str(path), ["data.packing=false"]).packing is None
    path.write_text("stage: dpo\nmodel: {init_from: sft_final}\ndata:\n  sources: [{path: x.jsonl, format: preference}]\n")
    assert load_config(str(path)).packing is None
    with pytest.raises(MsLlmError, match=r"data.packing is supported by the pretrain, cpt, sft stages, not by stage 'dpo'"):
        load_config(str(path), ["data.packing=true"])


def test_sft_data_is_encoded_once_into_a_cache_that_ranks_starting_together_share(synth, tok, tmp_path):
    """With a cache_dir the first process encodes and packs the data into memory-mapped files; a process that
    asks while the first holds the folder's lock waits, then reads them instead of encoding (built_here False,
    counted by the log line it writes while it waits), with the same batches; a changed source encodes anew."""
    import subprocess
    import sys
    import time
    from ms_llm.data.cache import building
    src = [DataSource(path=str(synth / "sft_alpaca.jsonl"), format="alpaca"),
           DataSource(path=str(synth / "sft_sharegpt.jsonl"), format="sharegpt", weight=0.5)]
    cache = str(tmp_path / "cache")
    memory = SFTData(src, tok, "chatml", SEQ, SFTSection(), packing="documents")
    probe = ("import json, logging, sys; logging.basicConfig(level=logging.INFO); from ms_llm.config.schema import "
             "DataSource, SFTSection; from ms_llm.data.sft import SFTData; from ms_llm.data.tokenizer import Tokenizer; "
             "src = [DataSource(path=sys.argv[1], format='alpaca'), DataSource(path=sys.argv[2], format='sharegpt', "
             f"weight=0.5)]; d = SFTData(src, Tokenizer.load(sys.argv[3]), 'chatml', {SEQ}, SFTSection(), "
             "packing='documents', cache_dir=sys.argv[4]); "
             "print(json.dumps([d.built_here, d.batch(5, 4, 1, 2)['input_ids'].tolist()]))")
    first = SFTData(src, tok, "chatml", SEQ, SFTSection(), packing="documents", cache_dir=str(tmp_path / "where"))
    folder = os.path.join(cache, os.path.basename(glob.glob(str(tmp_path / "where" / "sft.*[!k]"))[0]))
    with building(folder, "the SFT data"):
        other = subprocess.Popen([sys.executable, "-c", probe, *(s.path for s in src), str(synth / "tokenizer"), cache],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline, waited = time.time() + 120, False
        while time.time() < deadline and not waited:
            line = other.stderr.readline()
            waited = "another process is tokenizing it; waiting" in line
            if not line:
                break
        assert waited and other.poll() is None, other.stderr.read()
        # (this process holds the lock: it writes the cache as SFTData does under it)
        built = SFTData(src, tok, "chatml", SEQ, SFTSection(), packing="documents")
        built._write(folder, built.weights)
    out, err = other.communicate(timeout=120)
    built = SFTData(src, tok, "chatml", SEQ, SFTSection(), packing="documents", cache_dir=cache)
    theirs, ids = json.loads(out.strip().splitlines()[-1])
    assert first.built_here and not built.built_here and not theirs
    assert isinstance(built.groups[0].columns["input_ids"], np.memmap)
    for k in (0, 17, 401):
        for key, value in memory.sample(k).items():
            np.testing.assert_array_equal(np.asarray(built.sample(k)[key]), np.asarray(value), err_msg=key)
    np.testing.assert_array_equal(np.asarray(ids), memory.batch(5, 4, 1, 2)["input_ids"])
    assert built.stats.read == memory.stats.read and built.conversations == memory.conversations
    assert built.group_conversations == memory.group_conversations
    np.testing.assert_allclose(built.sampler.p, memory.sampler.p, rtol=1e-12)
    assert SFTData(src, tok, "chatml", SEQ, SFTSection(), cache_dir=cache).built_here          # unpacked: its own
