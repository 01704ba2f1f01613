# SPDX-License-Identifier: Apache-2.0
"""Vocabulary expansion (seed 002 §3.3): add domain terms as tokens and grow the model to match.

Each new row of the embedding (and of an untied lm_head) starts as the mean of the rows of the sub-tokens
the term used to split into, so the model's first guess for the new token is what it already knew.
Logits of text that uses no new token are unchanged (the old rows are copied bit for bit).
"""
import numpy as np

from ms_llm.models.decoder import CausalLM
from ms_llm.models.io import load_state_dict, model_state_dict


def expand_vocabulary(model: CausalLM, tokenizer, terms, pad_to_multiple: int = 1):
    """Add `terms` to the tokenizer (in place) and return (new model, list of added terms).

    `pad_to_multiple` rounds the new vocabulary size up (Ascend kernels prefer multiples of 16/128); the
    padding rows are the mean embedding and are never produced by the tokenizer.
    """
    pieces = {t: tokenizer.encode(t) for t in dict.fromkeys(terms)}
    added = tokenizer.add_tokens(list(pieces))
    state = model_state_dict(model)
    old_v = model.config.vocab_size
    need = max(old_v, tokenizer.vocab_size)
    new_v = -(-need // pad_to_multiple) * pad_to_multiple
    if new_v == old_v:
        return model, added
    keys = ["model.embed_tokens.weight"] + ([] if model.config.tie_word_embeddings else ["lm_head.weight"])
    for key in keys:
        old = state[key]
        grown = np.concatenate([old, np.repeat(old.mean(0, keepdims=True), new_v - old_v, 0)], 0)
        for term in added:
            grown[tokenizer.token_to_id(term)] = old[pieces[term]].mean(0)
        state[key] = grown
    new_model = CausalLM(model.config.replace(vocab_size=new_v))
    load_state_dict(new_model, state, strict=True, source="expand_vocabulary")
    new_model.set_train(model.training)
    return new_model, added
