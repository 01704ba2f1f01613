# SPDX-License-Identifier: Apache-2.0
"""Preference pairs: encoding through the chat template, prompt-first truncation, bad pairs named by file:line
(or counted), and tag mixing at the configured shares."""
import json

import numpy as np
import pytest

from ms_llm.config.schema import DataSource
from ms_llm.data.chat import render
from ms_llm.data.preference import PreferenceData, read_pairs, tag_weights
from ms_llm.data.synthetic import synthesize
from ms_llm.data.tokenizer import Tokenizer
from ms_llm.errors import MsLlmError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefdata")
    synthesize(str(d), n_text=50, n_sft=300, n_eval=60)
    return d, Tokenizer.load(d / "tokenizer")


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_pair_rows_are_prompt_plus_answer_right_padded(synth, tmp_path):
    _, tok = synth
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."},
            {"role": "user", "content": "And 2 + 4?"}]
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": msgs, "chosen": "6.", "rejected": "7.", "margin": 1.5,
                                          "tag": "math"}])
    (pair,) = read_pairs(path, tok, "chatml", 96)
    want = render(msgs + [{"role": "assistant", "content": "6."}], tok, "chatml").ids
    n = int(pair["chosen_mask"].sum())
    assert pair["chosen_ids"][:n].tolist() == want and not pair["chosen_mask"][n:].any()
    assert pair["margin"] == np.float32(1.5) and pair["tag"] == "math"


def test_long_prompt_is_cut_from_its_start_and_counted(synth, tmp_path):
    _, tok = synth
    from ms_llm.data.preference import PairStats
    answer = "The answer is 5 and not 6."

    def lengths(n):
        msgs = [{"role": "user", "content": "pump " * n + "What is 2 + 3?"}]
        return (len(render(msgs, tok, "chatml", add_generation_prompt=True).ids),
                render(msgs + [{"role": "assistant", "content": answer}], tok, "chatml").ids)
    n = next(n for n in range(60) if lengths(n)[0] < 64 < len(lengths(n)[1]))      # fits alone, not with the answer
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "pump " * n + "What is 2 + 3?", "chosen": answer,
                                          "rejected": "The answer is 6."}])
    stats = PairStats()
    (pair,) = read_pairs(path, tok, "chatml", 64, stats=stats)
    assert stats.truncated_prompts == 1 and pair["chosen_mask"].all()
    assert pair["chosen_ids"].tolist() == lengths(n)[1][-64:]          # the answer and the prompt's end are kept


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "a"}, "field 'rejected' must be a non-empty string"),
    ({"prompt": "pump " * 200, "chosen": "a", "rejected": "b"}, "the prompt .or an answer. alone is longer than data.seq_len=64"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin' must be a number"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}, "a multi-turn prompt must end with a user"),
])
def test_bad_pairs_are_named_by_file_and_line_or_counted(synth, tmp_path, record, reason):
    _, tok = synth
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(MsLlmError, match=r"bad\.jsonl:2: " + reason):
        read_pairs(path, tok, "chatml", 64)
    from ms_llm.data.preference import PairStats
    stats = PairStats()
    assert len(read_pairs(path, tok, "chatml", 64, on_error="skip", stats=stats)) == 1
    assert stats.skipped == 1 and "bad.jsonl:2" in stats.reasons[0]


def test_tags_are_drawn_at_their_shares(synth):
    d, tok = synth
    src = [DataSource(path=str(d / "preference.jsonl"), format="preference")]
    data = PreferenceData(src, tok, "chatml", 96, {"safety_boundary": 0.25, "logical_contradiction": 0.15}, seed=3)
    assert data.tags == ["correctness", "logical_contradiction", "safety_boundary"]
    assert data.shares == pytest.approx({"correctness": 0.6, "logical_contradiction": 0.15, "safety_boundary": 0.25})
    got = data.realised_shares(8000)
    for tag, share in data.shares.items():
        assert abs(got[tag] - share) < 0.02
    b0, b1 = data.batch(5, 4, rank=0, world=2), data.batch(5, 4, rank=1, world=2)
    assert b0["chosen_ids"].shape == (4, 96) and not np.array_equal(b0["chosen_ids"], b1["chosen_ids"])
    np.testing.assert_array_equal(b0["chosen_ids"], data.batch(5, 4, rank=0, world=2)["chosen_ids"])   # resumable


def test_tag_weights_rules():
    assert tag_weights({"a": 10, "b": 30, "s": 5}, {"s": 0.4}) == pytest.approx({"s": 0.4, "a": 0.15, "b": 0.45})
    with pytest.raises(MsLlmError, match="no pairs with that tag"):
        tag_weights({"a": 10}, {"safety_boundary": 0.25})
    with pytest.raises(MsLlmError, match="add up to 1.200"):
        tag_weights({"a": 1, "b": 1}, {"a": 0.6, "b": 0.6})
    with pytest.raises(MsLlmError, match=r"name every tag in the data \(\['a', 'b'\]\) but add up to 0.500"):
        tag_weights({"a": 1, "b": 1}, {"a": 0.25, "b": 0.25})
    assert tag_weights({"a": 1, "b": 3}, {}) == pytest.approx({"a": 0.25, "b": 0.75})     # no shares: by size


def test_synthetic_pairs_carry_signal_in_every_tag(synth):
    d, _ = synth
    rows = [json.loads(line) for line in open(d / "preference.jsonl")]
    by_tag = {}
    for r in rows:
        by_tag.setdefault(r["tag"], []).append(r)
    assert sorted(by_tag) == ["correctness", "logical_contradiction", "safety_boundary"]
    refusals = {r["chosen"].startswith("I can not") for r in by_tag["safety_boundary"]}
    assert refusals == {True, False}          # refusing is right for harmful requests only
    for r in by_tag["logical_contradiction"]:
        stated, concluded = r["chosen"].split(" = ")[-1].split(".")[0], r["chosen"].rstrip(".").split()[-1]
        if " + " in r["prompt"]:
            assert stated == concluded and r["rejected"].rstrip(".").split()[-1] != concluded
    assert (d / "preference_eval.jsonl").is_file()


def test_answer_labels_cover_exactly_the_answer_tokens(synth, tmp_path):
    from ms_llm.data.preference import answer_labels
    _, tok = synth
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 3?", "chosen": "It is 5.", "rejected": "It is 6."}])
    (pair,) = read_pairs(path, tok, "chatml", 64)
    ids, mask, start = pair["chosen_ids"][None], pair["chosen_mask"][None], pair["chosen_start"][None]
    labels = answer_labels(ids, mask, start)[0]
    n = int(mask.sum())
    answer = render([{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."}],
                    tok, "chatml").ids[int(start[0]):]
    assert labels[labels != -100].tolist() == answer == ids[0, int(start[0]):n].tolist()
    assert (labels[:int(start[0]) - 1] == -100).all() and (labels[n - 1:] == -100).all()


def test_unpaired_completions_and_their_kl_partners(synth, tmp_path):
    from ms_llm.data.preference import CompletionData
    _, tok = synth
    rows = [{"prompt": f"Q{i}?", "completion": f"answer {i}", "label": i % 3 != 0} for i in range(6)]
    src = DataSource(path=_jsonl(tmp_path / "u.jsonl", rows), format="unpaired")
    data = CompletionData([src], tok, "chatml", 48, seed=1)
    b = data.batch(0, 3)
    assert b["ids"].shape == b["kl_ids"].shape == (3, 48) and b["desirable"].dtype == np.float32
    text = [tok.decode([t for t in r if t != (tok.pad_id or 0)]) for r in b["ids"]]
    kl = [tok.decode([t for t in r if t != (tok.pad_id or 0)]) for r in b["kl_ids"]]
    after = tok.decode([t for t in data.batch(1, 3)["ids"][0] if t != (tok.pad_id or 0)])
    following = text[1:] + [after]          # the examples after rows 0, 1, 2 in the data stream
    for j in range(3):              # row j's partner: its own prompt with the next example's completion
        prompt_j = text[j].split("answer")[0]
        assert kl[j].startswith(prompt_j) and kl[j].split("answer")[1] == following[j].split("answer")[1]
        assert b["desirable"][j] == float(int(text[j].split("answer ")[1][0]) % 3 != 0)
    # ... wherever the micro-batch boundaries fall: one micro-batch of 6 pairs the rows as two of 3 do, and as
    # two ranks of 3 do
    whole = data.batch(0, 6)
    for key in ("ids", "kl_ids", "labels", "kl_labels", "desirable"):
        np.testing.assert_array_equal(whole[key], np.concatenate([b[key], data.batch(1, 3)[key]]))
        np.testing.assert_array_equal(whole[key], np.concatenate([data.batch(0, 3, r, 2)[key] for r in (0, 1)]))
    pairs = CompletionData([DataSource(path=_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "a", "rejected": "b"}]),
                                       format="preference")], tok, "chatml", 48)
    assert [c.desirable for c in pairs.rows] == [True, False]            # a pair splits into two completions
    bad = _jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": "Q?", "completion": "a", "label": "yes"}])
    with pytest.raises(MsLlmError, match=r"bad.jsonl:2.*'label' must be true"):
        CompletionData([DataSource(path=bad, format="unpaired")], tok, "chatml", 48)
