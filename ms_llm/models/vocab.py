# SPDX-License-Identifier: Apache-2.0
"""Vocabulary expansion (seed 002 §3.3): add domain terms as tokens and grow the model to match.

Each new row of the embedding (and of an untied lm_head) starts as the mean of the rows of the sub-tokens
the term used to split into, so the model's first guess for the new token is what it already knew.
Logits of text that uses no new token are unchanged (the old rows are copied bit for bit).
"""
import re
from collections import Counter

import numpy as np

from ms_llm.errors import MsLlmError
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


def domain_terms(tokenizer, texts, max_terms: int = 100, min_count: int = 5, min_pieces: int = 2,
                 min_length: int = 4) -> list:
    """Frequent domain words the tokenizer splits into several tokens (seed 002 §3.3), best first.

    Counts words (letters, digits, '-', '_'; at least `min_length` characters) over `texts`; keeps those seen
    `min_count` times that encode to `min_pieces` or more tokens; ranks them by tokens saved over the corpus,
    count x (pieces - 1). Returns [(term, count, pieces)].
    """
    counts = Counter(w for text in texts for w in re.findall(r"[^\W_][\w\-]*[^\W_]", text) if len(w) >= min_length)
    found = []
    for word, c in counts.items():
        if c < min_count:
            continue
        pieces = len(tokenizer.encode(word))
        if pieces >= min_pieces:
            found.append((word, c, pieces))
    found.sort(key=lambda t: (-t[1] * (t[2] - 1), t[0]))
    return found[:max_terms]


def vocab_alignment(student_tok, teacher_tok, student_size: int, teacher_size: int):
    """Map every student token id to the teacher id of the same string (seed 000 §1.2.5.1.1).

    Returns (vocab_map, stats): vocab_map is None when the vocabularies are identical, else a list of length
    `student_size` holding a teacher id or None; stats has the coverage figures the stage logs. A student token
    the teacher lacks gets no teacher probability; the teacher's mass on tokens the student lacks is given to
    the student's unknown token by the loss. No common token at all is an error.
    """
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab == t_vocab and student_size == teacher_size:
        return None, {"identical": True, "student_coverage": 1.0, "teacher_coverage": 1.0}
    vocab_map = [None] * student_size
    for token, sid in s_vocab.items():
        tid = t_vocab.get(token)
        if sid < student_size and tid is not None and tid < teacher_size:
            vocab_map[sid] = tid
    mapped = sum(t is not None for t in vocab_map)
    if mapped == 0:
        raise MsLlmError("the student and teacher tokenizers share no token; distillation needs the student's "
                         "vocabulary to be (mostly) a subset of the teacher's")
    if student_tok.unk_id is None:
        raise MsLlmError("the vocabularies differ and the student tokenizer has no unknown token to receive the "
                         "teacher's probability of tokens the student lacks")
    stats = {"identical": False, "student_coverage": mapped / max(len(s_vocab), 1),
             "teacher_coverage": mapped / max(len(t_vocab), 1), "mapped_tokens": mapped}
    return vocab_map, stats
