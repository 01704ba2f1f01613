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
