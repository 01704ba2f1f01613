# SPDX-License-Identifier: Apache-2.0
"""Vocabulary expansion: each term becomes one token, old logits unchanged, new rows = mean of sub-tokens."""
import random

import mindspore as ms
import numpy as np

from ms_llm.data.tokenizer import train_sentencepiece
from ms_llm.models import CausalLM, preset
from ms_llm.models.vocab import expand_vocabulary


def test_expand_vocabulary(tmp_path):
    rnd = random.Random(0)
    words = "reactor coolant steam generator pump valve core".split()
    (tmp_path / "c.txt").write_text("\n".join(" ".join(rnd.choice(words) for _ in range(8)) for _ in range(500)))
    tok = train_sentencepiece(str(tmp_path / "c.txt"), str(tmp_path / "tok"), 300)
    model = CausalLM(preset("tiny", vocab_size=tok.vocab_size, tie_word_embeddings=False))
    model.set_train(False)
    text_ids = tok.encode("pump valve core")
    old_pieces = tok.encode("reactor coolant")
    before = model(ms.Tensor([text_ids], ms.int32)).asnumpy()
    emb_before = model.model.embed_tokens.weight.asnumpy()
    grown, added = expand_vocabulary(model, tok, ["reactor coolant", "steam generator"], pad_to_multiple=16)
    assert added == ["reactor coolant", "steam generator"]
    assert len(tok.encode("reactor coolant")) == 1 and len(tok.encode("steam generator")) == 1
    assert grown.config.vocab_size % 16 == 0 and grown.config.vocab_size >= tok.vocab_size
    after = grown(ms.Tensor([text_ids], ms.int32)).asnumpy()
    assert np.array_equal(after[..., :before.shape[-1]], before)
    new_row = grown.model.embed_tokens.weight.asnumpy()[tok.token_to_id("reactor coolant")]
    np.testing.assert_allclose(new_row, emb_before[old_pieces].mean(0), rtol=1e-6)


def test_tokenizer_expand_cli_mines_terms_and_keeps_old_logits(tmp_path):
    """`ms-llm tokenizer expand`: frequent multi-piece words become single tokens; text without them keeps its
    logits; the output directory is a loadable model with a manifest."""
    import json
    import subprocess
    import sys
    from ms_llm.data.synthetic import synthesize
    from ms_llm.data.tokenizer import Tokenizer
    from ms_llm.models import load_pretrained, save_pretrained
    data = tmp_path / "data"
    synthesize(str(data), n_text=300, n_sft=40, n_eval=10)
    tok = Tokenizer.load(data / "tokenizer")
    model = CausalLM(preset("tiny", vocab_size=tok.vocab_size))
    save_pretrained(model, str(tmp_path / "base"))
    tok.save(str(tmp_path / "base"))
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "tokenizer", "expand", "--model", str(tmp_path / "base"),
                        "--corpus", str(data / "pretrain_science.jsonl"), "--max-terms", "5", "--min-count", "3",
                        "--out", str(tmp_path / "grown")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "grown" / "MANIFEST.json").read_text())
    added = manifest["added_terms"]
    assert 1 <= len(added) <= 5
    old_tok, new_tok = Tokenizer.load(tmp_path / "base"), Tokenizer.load(tmp_path / "grown")
    for term in added:
        assert len(old_tok.encode(term)) >= 2 and len(new_tok.encode(term)) == 1
    grown = load_pretrained(str(tmp_path / "grown"))
    assert grown.config.vocab_size == model.config.vocab_size + len(added)
    text = "Ana went to the market and bought 3 apples."
    assert not any(t in text for t in added)
    ids = ms.Tensor([new_tok.encode(text)], ms.int32)
    assert new_tok.encode(text) == old_tok.encode(text)
    model.set_train(False)
    grown.set_train(False)
    before, after = model(ids).asnumpy(), grown(ids).asnumpy()
    assert np.array_equal(after[..., :before.shape[-1]], before)
    bad = subprocess.run([sys.executable, "-m", "ms_llm.cli", "tokenizer", "expand", "--model", str(tmp_path / "base"),
                          "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "missing.txt" in bad.stderr
