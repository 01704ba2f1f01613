# SPDX-License-Identifier: Apache-2.0
"""Tokenizers (SentencePiece and tokenizer.json), chat templates and their loss masks."""
import random

import pytest

from ms_llm.cli import main
from ms_llm.data.chat import render, stop_token_ids
from ms_llm.data.tokenizer import Tokenizer, train_sentencepiece
from ms_llm.errors import MsLlmError

WORDS = "the reactor coolant pump pressure valve loop core fuel rod steam generator turbine safety".split()


@pytest.fixture
def corpus(tmp_path):
    rnd = random.Random(0)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rnd.choice(WORDS) for _ in range(10)) + f" {rnd.randint(0, 9999)}"
                              for _ in range(2000)))
    return path


@pytest.fixture
def spm_tok(tmp_path, corpus):
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--output",
                 str(tmp_path / "tok")]) == 0
    return Tokenizer.load(tmp_path / "tok")


def test_sentencepiece_round_trip_and_specials(spm_tok):
    text = "the reactor coolant\n\n  pump 1234 中文 ü"
    assert spm_tok.decode(spm_tok.encode(text)) == text        # byte fallback, whitespace kept
    assert (spm_tok.pad_id, spm_tok.bos_id, spm_tok.eos_id) == (0, 1, 2)
    assert len(spm_tok.encode("<|im_start|>")) == 1
    assert spm_tok.encode("x", add_bos=True, add_eos=True)[::len(spm_tok.encode("x")) + 1] == [1, 2]


def test_added_tokens_persist(tmp_path, spm_tok):
    before = spm_tok.vocab_size
    assert spm_tok.add_tokens(["reactor coolant", "the"]) == ["reactor coolant"]   # "the" is already a token
    ids = spm_tok.encode("the reactor coolant pump")
    assert before in ids and spm_tok.decode(ids) == "the reactor coolant pump"
    spm_tok.save(tmp_path / "saved")
    again = Tokenizer.load(tmp_path / "saved")
    assert again.encode("the reactor coolant pump") == ids and again.vocab_size == before + 1


def test_hf_tokenizer_json(tmp_path, corpus):
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    hf = HFTok(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"]))
    (tmp_path / "hf").mkdir()
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|im_end|>"}}')
    tok = Tokenizer.load(tmp_path / "hf")
    assert tok.backend == "hf" and tok.eos_id == tok.token_to_id("<|im_end|>")
    assert tok.decode(tok.encode("the valve 42")) == "the valve 42"
    added = tok.add_tokens(["steam generator"])
    assert added == ["steam generator"] and len(tok.encode("steam generator")) == 1


def test_chat_template_masks_only_assistant_output(spm_tok):
    msgs = [{"role": "user", "content": "the pump"}, {"role": "assistant", "content": "valve 12"},
            {"role": "user", "content": "core"}, {"role": "assistant", "content": "rod"}]
    r = render(msgs, spm_tok, "chatml")
    assert len(r.ids) == len(r.assistant_mask) == len(r.turn)
    trained = spm_tok.decode([i for i, m in zip(r.ids, r.assistant_mask) if m], skip_special=False)
    assert trained == "valve 12<|im_end|>rod<|im_end|>"
    assert sorted(set(r.turn)) == [-1, 0, 1]
    full = spm_tok.decode(r.ids)
    assert full == ("<|im_start|>user\nthe pump<|im_end|>\n<|im_start|>assistant\nvalve 12<|im_end|>\n"
                    "<|im_start|>user\ncore<|im_end|>\n<|im_start|>assistant\nrod<|im_end|>\n")
    # inference renders the same prefix the model was trained on
    prompt = render(msgs[:3], spm_tok, "chatml", add_generation_prompt=True).ids
    assert r.ids[:len(prompt)] == prompt
    assert spm_tok.token_to_id("<|im_end|>") in stop_token_ids("chatml", spm_tok)


def test_qwen_default_system_and_llama2(spm_tok):
    r = render([{"role": "user", "content": "hi"}], spm_tok, "qwen", add_generation_prompt=True)
    assert spm_tok.decode(r.ids).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    r2 = render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                 {"role": "assistant", "content": "A"}], spm_tok, "llama2")
    assert r2.ids[0] == spm_tok.bos_id and r2.ids[-1] == spm_tok.eos_id and r2.assistant_mask[-1] == 1
    assert spm_tok.decode(r2.ids) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A "


def test_template_needs_its_special_tokens(tmp_path, corpus):
    train_sentencepiece(str(corpus), str(tmp_path / "bare"), 300, special_tokens=[])
    tok = Tokenizer.load(tmp_path / "bare")
    with pytest.raises(MsLlmError, match=r"chat template 'llama3' needs special tokens \['<\|begin_of_text\|>'"):
        render([{"role": "user", "content": "x"}], tok, "llama3")


def test_broken_tokenizer_files_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer.json").write_text("{broken")
    with pytest.raises(MsLlmError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(MsLlmError, match="tokenizer.model: not a valid SentencePiece model"):
        Tokenizer.load(tmp_path / "b")


def test_supervised_example_labels_only_assistant_tokens(spm_tok):
    from ms_llm.data.examples import supervised_example
    msgs = [{"role": "user", "content": "the pump"}, {"role": "assistant", "content": "valve 12"}]
    r = render(msgs, spm_tok, "chatml")
    ex = supervised_example(r, 64, spm_tok.pad_id)
    n = len(r.ids) - 1
    assert ex["attention_mask"].sum() == n and not ex["truncated"]
    targets = ex["labels"][ex["labels"] != -100]
    assert spm_tok.decode(targets, skip_special=False) == "valve 12<|im_end|>"
    # each label is the next input token
    pos = (ex["labels"] != -100).nonzero()[0]
    assert (ex["labels"][pos[:-1]] == ex["input_ids"][pos[:-1] + 1]).all()
    assert set(ex["turn"][pos].tolist()) == {0} and (ex["turn"][ex["labels"] == -100] == -1).all()
    short = supervised_example(r, 8, spm_tok.pad_id)
    assert short["truncated"] and short["input_ids"].tolist() == r.ids[:8]
