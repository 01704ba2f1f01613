# SPDX-License-Identifier: Apache-2.0
"""Tokenizers: SentencePiece models and Hugging Face `tokenizer.json`, behind one small interface.

    tok = Tokenizer.load("path/to/dir_or_file")   # tokenizer.json (tokenizers) or tokenizer.model (sentencepiece)
    ids = tok.encode("text")                      # no bos/eos unless asked
    tok.add_tokens(["reactor coolant"])           # vocabulary expansion; see models/vocab.py for the model side
    tok.save("out_dir")

`ms-llm tokenizer train --input corpus.txt --vocab-size N --output DIR` trains a SentencePiece BPE model
with byte fallback and the chat templates' special tokens. Added tokens of a SentencePiece model live in
`added_tokens.json` (as Hugging Face slow tokenizers keep them) and are matched before SentencePiece runs.
"""
import json
import os
import re
import shutil

from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_json

CHAT_SPECIAL_TOKENS = ["\n", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>", "<think>", "</think>"]


class Tokenizer:
    """Text <-> ids with bos/eos/pad/unk ids, added tokens and a vocabulary view."""

    def __init__(self, backend: str, impl, special: dict, added: dict = None, source: str = ""):
        self.backend, self.impl, self.source = backend, impl, source
        self.added = dict(added or {})               # sentencepiece only: token string -> id
        self.bos_token, self.eos_token = special.get("bos_token"), special.get("eos_token")
        self.pad_token, self.unk_token = special.get("pad_token"), special.get("unk_token")
        self._split = None

    # ----- loading and saving -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Load from a directory (tokenizer.json preferred, else tokenizer.model) or a file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            for name in ("tokenizer.json", "tokenizer.model"):
                if os.path.isfile(os.path.join(path, name)):
                    return cls.load(os.path.join(path, name))
            raise MsLlmError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
        if not os.path.isfile(path):
            raise MsLlmError(f"{path}: tokenizer file not found")
        folder = os.path.dirname(path)
        special = _read_json(os.path.join(folder, "tokenizer_config.json"), {})
        special = {k: _token_text(special.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        if path.endswith(".json"):
            # each tokenizer library loads only for its own format
            from tokenizers import Tokenizer as HFTokenizer
            try:
                impl = HFTokenizer.from_file(path)
            except Exception as e:   # the tokenizers package raises a bare Exception on parse errors
                raise MsLlmError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
            return cls("hf", impl, special, source=path)
        # each tokenizer library loads only for its own format
        import sentencepiece as spm
        impl = spm.SentencePieceProcessor()
        try:
            impl.Load(path)
        except (OSError, RuntimeError) as e:
            raise MsLlmError(f"{path}: not a valid SentencePiece model ({str(e).splitlines()[0]})") from None
        for key, pid in (("bos_token", impl.bos_id()), ("eos_token", impl.eos_id()), ("pad_token", impl.pad_id()),
                         ("unk_token", impl.unk_id())):
            if special.get(key) is None and pid >= 0:
                special[key] = impl.IdToPiece(pid)
        added = {k: int(v) for k, v in _read_json(os.path.join(folder, "added_tokens.json"), {}).items()}
        return cls("sentencepiece", impl, special, added, source=path)

    def _decode_run(self, ids) -> str:
        pieces = [self.impl.IdToPiece(i) for i in ids]
        text = self.impl.DecodeIds(ids)
        return (" " + text) if pieces and pieces[0].startswith("\u2581") and not text.startswith(" ") else text

    def save(self, out_dir: str):
        """Write the tokenizer files and tokenizer_config.json into `out_dir`."""
        os.makedirs(out_dir, exist_ok=True)
        if self.backend == "hf":
            self.impl.save(os.path.join(out_dir, "tokenizer.json"))
        else:
            dst = os.path.join(out_dir, "tokenizer.model")
            if os.path.abspath(self.source) != os.path.abspath(dst):
                shutil.copyfile(self.source, dst)
            with open(os.path.join(out_dir, "added_tokens.json"), "w") as f:
                json.dump(self.added, f, ensure_ascii=False, indent=1)
        cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
               "unk_token": self.unk_token, "tokenizer_class": "ms_llm"}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=1)

    # ----- vocabulary ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.backend == "hf":
            return self.impl.get_vocab_size(with_added_tokens=True)
        return self.impl.GetPieceSize() + len(self.added)

    def token_to_id(self, token: str):
        """Id of a token string, or None."""
        if token is None:
            return None
        if self.backend == "hf":
            return self.impl.token_to_id(token)
        if token in self.added:
            return self.added[token]
        pid = self.impl.PieceToId(token)
        return None if pid == self.impl.unk_id() and token != self.impl.IdToPiece(pid) else pid

    def id_to_token(self, idx: int) -> str:
        if self.backend == "hf":
            return self.impl.id_to_token(idx)
        inv = {v: k for k, v in self.added.items()}
        return inv[idx] if idx in inv else self.impl.IdToPiece(idx)

    def get_vocab(self) -> dict:
        """{token string: id} for every token, added ones included."""
        if self.backend == "hf":
            return self.impl.get_vocab(with_added_tokens=True)
        vocab = {self.impl.IdToPiece(i): i for i in range(self.impl.GetPieceSize())}
        vocab.update(self.added)
        return vocab

    bos_id = property(lambda self: self.token_to_id(self.bos_token))
    eos_id = property(lambda self: self.token_to_id(self.eos_token))
    unk_id = property(lambda self: self.token_to_id(self.unk_token))

    @property
    def pad_id(self):
        pid = self.token_to_id(self.pad_token)
        return self.eos_id if pid is None else pid

    def add_tokens(self, tokens, special: bool = False) -> list:
        """Add tokens that are not yet single tokens; returns the ones added (in id order)."""
        new = [t for t in dict.fromkeys(tokens) if t and self.token_to_id(t) is None]
        if self.backend == "hf":
            # each tokenizer library loads only for its own format
            from tokenizers import AddedToken
            toks = [AddedToken(t, special=special, normalized=not special) for t in new]
            (self.impl.add_special_tokens if special else self.impl.add_tokens)(toks)
        else:
            for t in new:
                self.added[t] = self.vocab_size
            self._split = None
        return new

    # ----- encoding -----------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list:
        if self.backend == "hf":
            ids = self.impl.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_spm(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def _encode_spm(self, text: str) -> list:
        if not self.added:
            return self.impl.EncodeAsIds(text)
        if self._split is None:
            self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")
        ids = []
        for part in self._split.split(text):
            if part in self.added:
                ids.append(self.added[part])
            elif part:
                ids.extend(self.impl.EncodeAsIds(part))
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.backend == "hf":
            return self.impl.decode(ids, skip_special_tokens=skip_special)
        inv = {v: k for k, v in self.added.items()}
        out, run = [], []
        for i in ids:
            if i in inv:
                out.append(self._decode_run(run))
                out.append(inv[i])
                run = []
            elif not (skip_special and (self.impl.IsControl(i))):
                run.append(i)
        out.append(self._decode_run(run))
        return "".join(out)


def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v


def _read_json(path: str, default):
    return read_json(path, "a tokenizer file") if os.path.isfile(path) else default


def train_sentencepiece(input_files, out_dir: str, vocab_size: int, model_type: str = "bpe",
                        special_tokens=CHAT_SPECIAL_TOKENS) -> Tokenizer:
    """Train a SentencePiece model (pad=0, bos=1, eos=2, unk=3, byte fallback) into out_dir/tokenizer.model."""
    # each tokenizer library loads only for its own format
    import sentencepiece as spm
    files = [input_files] if isinstance(input_files, str) else list(input_files)
    for f in files:
        if not os.path.isfile(f):
            raise MsLlmError(f"{f}: training corpus not found")
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    try:
        spm.SentencePieceTrainer.Train(
            input=",".join(files), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>",
            unk_piece="<unk>", byte_fallback=True, character_coverage=1.0, user_defined_symbols=list(special_tokens),
            hard_vocab_limit=False, num_threads=2, minloglevel=2, split_digits=True,
            # keep text byte-exact so chat templates can be encoded piece by piece: no NFKC, no whitespace
            # folding, no dummy leading space, and newlines as their own symbol
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True)
    except RuntimeError as e:
        raise MsLlmError(f"tokenizer train: SentencePiece failed on {files}: {e}") from None
    os.remove(prefix + ".vocab")
    tok = Tokenizer.load(prefix + ".model")
    tok.save(out_dir)
    return tok
