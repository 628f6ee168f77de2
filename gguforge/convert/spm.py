"""SentencePiece-style vocabularies (tokenizer.ggml.model = "llama"), and the Llama family's choice of kind.

- `tokenizer.model` (a SentencePiece ModelProto) is read by a small protobuf reader of its own: no
  sentencepiece dependency. Tokens, scores and types are written as llama.cpp's converter writes them
  (conversion/base.py `_create_vocab_sentencepiece`): padded to config.json's vocab_size with `[PADn]`
  (score -10000, UNUSED); USER_DEFINED pieces count as NORMAL; added_tokens.json and tokenizer_config.json's
  added_tokens_decoder override entries with score -1000.
- tokenizer.json BPE with byte fallback (gguf-py `LlamaHfVocab`): the base vocabulary then the added tokens
  beyond it, every score -1000, `<0xXX>` pieces BYTE, the named special tokens CONTROL.
- The Llama family (conversion/llama.py `LlamaModel.set_vocab`) tries tokenizer.model first, then the
  byte-fallback tokenizer.json, then a byte-level BPE tokenizer.json (Llama 3, SmolLM, DeepSeek-R1-Distill);
  tokenizer_config.json's add_prefix_space becomes tokenizer.ggml.add_space_prefix for all three.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Callable, Iterator

from gguf import TokenType

from ..checkpoint.read import read_json_object
from ..errors import UserError
from ..format.writer import Metadata
from .vocab import (MAX_TOKEN_ID, Vocab, _chat_template, add_vocab_metadata, check_tokenizer, load_vocab, looks_special,
                    read_tokenizer_config, register_vocab, special_tokens)

# SentencePiece's piece types (sentencepiece_model.proto ModelProto.SentencePiece.Type) -> what llama.cpp's
# converter writes for them: USER_DEFINED pieces of the model itself are written as NORMAL.
PIECE_TYPES = {1: TokenType.NORMAL, 2: TokenType.UNKNOWN, 3: TokenType.CONTROL, 4: TokenType.NORMAL,
               5: TokenType.UNUSED, 6: TokenType.BYTE}
MAX_PIECES = MAX_TOKEN_ID + 1


# -- a protobuf reader for the one message we need ---------------------------------------------------------

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of one protobuf message: ints for varints, bytes for
    length-delimited fields, raw 4/8 bytes for fixed32/fixed64."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            n, pos = _varint(data, pos)
            if pos + n > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos:pos + n], pos + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if pos + n > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos:pos + n], pos + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """[(piece, score, SentencePiece type)] of a tokenizer.model, in id order."""
    try:
        data = path.read_bytes()
        pieces = []
        for number, wire, value in _fields(data):
            if number != 1 or wire != 2:  # ModelProto.pieces = 1; trainer/normalizer specs are not needed
                continue
            piece, score, kind = "", 0.0, 1
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            pieces.append((piece, score, kind))
            if len(pieces) > MAX_PIECES:
                raise ValueError(f"more than {MAX_PIECES} pieces")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not pieces:
        raise UserError(f"{path}: not a SentencePiece model (no pieces)")
    return pieces


def _vocab_size(hparams: dict, default: int) -> int:
    size = hparams.get("vocab_size") or default
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_PIECES:
        raise UserError(f"config.json: vocab_size must be a positive integer up to {MAX_PIECES}, got {size!r}")
    return size


def _token_json(root: Path) -> dict:
    """tokenizer.json when present (for the special tokens' ids and the post-processor), else {}."""
    path = root / "tokenizer.json"
    if not path.is_file():
        return {}
    tok = read_json_object(path)
    check_tokenizer(tok, path)
    return tok


def load_sentencepiece(root: Path, hparams: dict) -> Vocab:
    """tokenizer.model (+ added_tokens.json, tokenizer_config.json) as _create_vocab_sentencepiece writes it."""
    pieces = read_sentencepiece(root / "tokenizer.model")
    size = _vocab_size(hparams, len(pieces))
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [int(TokenType.UNUSED)] * size
    for i, (piece, score, kind) in enumerate(pieces[:size]):
        tokens[i], scores[i], types[i] = piece, score, int(PIECE_TYPES.get(kind, TokenType.NORMAL))
    if (root / "added_tokens.json").is_file():
        for text, i in read_json_object(root / "added_tokens.json").items():
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size:
                tokens[i], scores[i], types[i] = text, -1000.0, int(TokenType.USER_DEFINED)
    tok_config = read_tokenizer_config(root)
    decoder = tok_config.get("added_tokens_decoder")
    for key, entry in (decoder.items() if isinstance(decoder, dict) else ()):
        if not (str(key).isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise UserError(f"{root / 'tokenizer_config.json'}: added_tokens_decoder[{key!r}] needs a numeric id "
                            "and a string content")
        i, text = int(key), entry["content"]
        if i >= size:
            continue
        if entry.get("special") or looks_special(text):
            types[i] = int(TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[i] = int(TokenType.USER_DEFINED)
        tokens[i], scores[i] = text, -1000.0
    tok = _token_json(root)
    special_ids, add_flags = special_tokens(tok, tok_config, hparams, size)
    return Vocab(tokens, types, [], "default", special_ids, add_flags, _chat_template(root, tok_config),
                 scores=scores, model="llama")


BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def is_byte_fallback_bpe(tok: dict) -> bool:
    """gguf-py LlamaHfVocab's test: BPE with byte fallback and a Sequence decoder (Llama 2/Mistral layouts)."""
    model = tok.get("model") or {}
    decoder = tok.get("decoder") if isinstance(tok.get("decoder"), dict) else {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and decoder.get("type") == "Sequence"


def load_llama_hf(root: Path, hparams: dict) -> Vocab:
    """A byte-fallback BPE tokenizer.json as gguf-py's LlamaHfVocab lists it: the base vocabulary (ids in
    model.vocab), then the added tokens beyond it; every score -1000."""
    tok = _token_json(root)
    tok_config = read_tokenizer_config(root)
    base = {i: t for t, i in tok["model"].get("vocab", {}).items()}
    n_base = len(base)
    if sorted(base) != list(range(n_base)):
        raise UserError(f"{root / 'tokenizer.json'}: model.vocab ids are not 0..{n_base - 1}")
    named = [tok_config.get(f"{k}_token") for k in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")]
    named += tok_config.get("additional_special_tokens") or []
    special_text = {t["content"] if isinstance(t, dict) else t for t in named if isinstance(t, (str, dict))}
    added = sorted((int(t["id"]), t["content"]) for t in tok.get("added_tokens", []) if int(t["id"]) >= n_base)
    ids = {t: i for i, t in base.items()} | {t: i for i, t in added}
    special_ids_set = {ids[t] for t in special_text if t in ids}
    tokens, types = [], []
    for i in range(n_base):
        text = base[i]
        tokens.append(text)
        types.append(int(TokenType.BYTE if BYTE_PIECE.fullmatch(text) else
                         TokenType.CONTROL if i in special_ids_set else TokenType.NORMAL))
    for i, text in added:
        tokens.append(text)
        types.append(int(TokenType.CONTROL if text in special_text else TokenType.USER_DEFINED))
    special_ids, add_flags = special_tokens(tok, tok_config, hparams, len(tokens))
    return Vocab(tokens, types, [], "default", special_ids, add_flags, _chat_template(root, tok_config),
                 scores=[-1000.0] * len(tokens), model="llama")


@register_vocab("spm")
def spm_vocabulary(root: Path, hparams: dict, pre_tokenizer: str | None) -> Callable[[Metadata], None]:
    """tokenizer.model (SentencePiece)."""
    vocab = load_sentencepiece(root, hparams)
    return lambda md: add_vocab_metadata(md, vocab)


def load_llama_family(root: Path, hparams: dict, pre_tokenizer: str | None = None) -> Vocab:
    """LlamaModel.set_vocab's order: tokenizer.model, a byte-fallback tokenizer.json, a byte-level one."""
    tok = _token_json(root) if not (root / "tokenizer.model").is_file() else None
    if tok is None:
        vocab = load_sentencepiece(root, hparams)
    elif is_byte_fallback_bpe(tok):
        vocab = load_llama_hf(root, hparams)
    else:
        vocab = load_vocab(root, hparams, pre_tokenizer)
    prefix = read_tokenizer_config(root).get("add_prefix_space")
    if isinstance(prefix, bool):
        vocab.add_space_prefix = prefix
    if hparams.get("vocab_size") == 49152:  # LlamaModel.set_vocab: granite's small models (and SmolLM's size)
        vocab.add_flags["bos"] = False
    return vocab


@register_vocab("llama")
def llama_vocabulary(root: Path, hparams: dict, pre_tokenizer: str | None) -> Callable[[Metadata], None]:
    vocab = load_llama_family(root, hparams, pre_tokenizer)
    return lambda md: add_vocab_metadata(md, vocab)
