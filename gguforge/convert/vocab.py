"""Vocabulary: tokenizer.json (byte-level BPE) to GGUF tokenizer metadata.

The pre-tokenizer name is read off the tokenizer's own pre-tokenizer definition
(the split regex and its settings) instead of hashing the token ids of a test
string against a table of known models, so a fine-tune with a known tokenizer
never needs a table update.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gguf import GGUFValueType, TokenType

from ..errors import UserError
from ..checkpoint.read import read_json_object
from ..format.writer import Metadata

# llama.cpp's pre-tokenizer names and the definitions they are recognised from (convert/pretokenizers.py)
from .pretokenizers import QWEN2_REGEX, all_names, recognise  # noqa: F401,E402 (QWEN2_REGEX: the tests' name)

SPECIAL_TOKEN_KINDS = {  # tokenizer_config key prefix -> GGUF key
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's spelling
    "pad": "tokenizer.ggml.padding_token_id",
    "cls": "tokenizer.ggml.cls_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    add_flags: dict[str, bool]
    chat_template: str | None
    scores: list[float] | None = None  # SentencePiece-style vocabularies
    model: str = "gpt2"  # tokenizer.ggml.model
    add_space_prefix: bool | None = None  # written first, as LlamaModel.set_vocab does


def detect_pre_tokenizer(tokenizer: dict, model_type: str | None = None, bos_token: str | None = None) -> str:
    """Name llama.cpp uses for this tokenizer's pre-tokenization, derived from its definition (and, where
    several names share one, from the model family: config.json model_type, the BOS token)."""
    name = recognise(tokenizer, model_type, bos_token)
    if name is not None:
        return name
    found = json.dumps(tokenizer.get("pre_tokenizer"), ensure_ascii=False)
    raise UserError(f"unrecognised pre-tokenizer: {found[:400]}",
                    hint="if it matches one llama.cpp knows, name it with --pre-tokenizer "
                         f"(known here: {', '.join(all_names())})")


def looks_special(token: str) -> bool:
    """Control-like text such as <|im_start|> or <pad>, even when not flagged special."""
    return ((token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))
            or token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or token.startswith("<unused"))


def _merges(model: dict) -> list[str]:
    merges = model.get("merges") or []
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        else:  # transformers >= 4.45 writes pairs; a literal space inside a part is byte-level encoded
            a, b = m
            out.append(f"{a.replace(' ', chr(0x120))} {b.replace(' ', chr(0x120))}")
    return out


def _token_content(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# -- tokenizer.json checked before use: every value of the wrong kind is one error naming it --------

MAX_TOKEN_ID = (1 << 24) - 1  # far beyond any vocabulary; keeps padding loops and arrays bounded


def _token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_ID


def _check_merge(m) -> bool:
    """"a b" (a space after the first character, as llama.cpp splits it) or a pair of strings."""
    if isinstance(m, str):
        return m.find(" ", 1) > 0
    return isinstance(m, list) and len(m) == 2 and all(isinstance(part, str) and part for part in m)


def _check_nodes(node, what: str, path: Path, children: str) -> None:
    """A pre-tokenizer or post-processor: an object (or null) whose Sequence holds objects."""
    if node is None:
        return
    if not isinstance(node, dict):
        raise UserError(f"{path}: {what} must be an object, got {json.dumps(node)[:80]}")
    if node.get("type") == "Sequence":
        subs = node.get(children, [])
        if not isinstance(subs, list):
            raise UserError(f"{path}: {what}.{children} must be a list")
        for sub in subs:
            _check_nodes(sub, what, path, children)


def check_tokenizer(tok: dict, path: Path) -> None:
    """The parts of tokenizer.json conversion reads, of the kinds it expects."""
    model = tok.get("model")
    if not isinstance(model, dict):
        raise UserError(f"{path}: 'model' must be an object")
    vocab = model.get("vocab", {})
    if not isinstance(vocab, dict):
        raise UserError(f"{path}: model.vocab must be an object of token -> id")
    bad = next(((t, i) for t, i in vocab.items() if not _token_id(i)), None)
    if bad is not None:
        raise UserError(f"{path}: token {bad[0]!r} has id {bad[1]!r}; ids must be integers from 0 to {MAX_TOKEN_ID}")
    if len(set(vocab.values())) != len(vocab):
        raise UserError(f"{path}: model.vocab gives two tokens the same id")
    merges = model.get("merges", [])
    if not isinstance(merges, list):
        raise UserError(f"{path}: model.merges must be a list")
    bad = next((i for i, m in enumerate(merges) if not _check_merge(m)), None)
    if bad is not None:
        raise UserError(f"{path}: merge {json.dumps(merges[bad])[:80]} is not two tokens ('a b' or [\"a\", \"b\"])")
    added = tok.get("added_tokens", [])
    if not isinstance(added, list):
        raise UserError(f"{path}: added_tokens must be a list")
    for i, t in enumerate(added):
        if not isinstance(t, dict) or not _token_id(t.get("id")) or not isinstance(t.get("content"), str):
            found = f"id {t.get('id')!r}, content {t.get('content')!r}" if isinstance(t, dict) else repr(t)
            raise UserError(f"{path}: added_tokens[{i}] needs an integer id from 0 to {MAX_TOKEN_ID} and a "
                            f"string content (got {found[:80]})")
    _check_nodes(tok.get("pre_tokenizer"), "pre_tokenizer", path, "pretokenizers")
    _check_nodes(tok.get("post_processor"), "post_processor", path, "processors")


def load_vocab(root: Path, hparams: dict, pre_tokenizer: str | None = None) -> Vocab:
    path = root / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{root}: no tokenizer.json found",
                        hint="byte-level BPE tokenizers are read from tokenizer.json")
    tok = read_json_object(path)
    check_tokenizer(tok, path)
    model = tok["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{path}: tokenizer model {model.get('type')!r} is not supported (only byte-level BPE)")
    vocab = model.get("vocab") or {}
    added = {int(t["id"]): t for t in tok.get("added_tokens", [])}
    max_id = max([*vocab.values(), *added.keys()], default=-1)
    size = int(hparams.get("vocab_size") or max_id + 1)
    if size > MAX_TOKEN_ID + 1:
        raise UserError(f"config.json: vocab_size {size} is more than any tokenizer holds (at most {MAX_TOKEN_ID + 1})")
    if max_id >= size:
        raise UserError(f"tokenizer has token id {max_id} but config vocab_size is {size}")

    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):  # padded to the config's vocab_size, like the embedding matrix
        if i in added:
            a = added[i]
            text = a["content"]
            if a.get("special") or looks_special(text):
                types.append(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
            tokens.append(text)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)

    merges = _merges(model)
    if not merges:
        raise UserError(f"{path}: BPE model has no merges (llama.cpp cannot load a BPE vocabulary without them)")

    tok_config = read_tokenizer_config(root)
    special_ids, add_flags = special_tokens(tok, tok_config, hparams, size)
    return Vocab(tokens, [int(t) for t in types], merges,
                 pre_tokenizer or detect_pre_tokenizer(tok, hparams.get("model_type"),
                                                       _token_content(tok_config.get("bos_token"))),
                 special_ids, add_flags,
                 _chat_template(root, tok_config))


def read_tokenizer_config(root: Path) -> dict:
    return read_json_object(root / "tokenizer_config.json") if (root / "tokenizer_config.json").is_file() else {}


def special_tokens(tok: dict, tok_config: dict, hparams: dict, size: int) -> tuple[dict[str, int], dict[str, bool]]:
    """({kind: token id}, {kind: add it}) as gguf-py's SpecialVocab finds them: token contents named in
    tokenizer_config.json resolved through tokenizer.json's added tokens, then config.json's *_token_id;
    the add flags from tokenizer.json's post-processor, then tokenizer_config.json's add_*_token."""
    content_ids = {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}
    special_ids: dict[str, int] = {}
    for kind in SPECIAL_TOKEN_KINDS:
        content = _token_content(tok_config.get(f"{kind}_token"))
        if content is not None and content in content_ids and content_ids[content] < size:
            special_ids[kind] = content_ids[content]
    for kind in SPECIAL_TOKEN_KINDS:  # config ids only fill kinds the tokenizer config left open
        value = hparams.get(f"{kind}_token_id")
        if kind not in special_ids and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size:
            special_ids[kind] = value

    add_flags: dict[str, bool] = {}
    post = tok.get("post_processor") or {}
    post_steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    bos, eos = (_token_content(tok_config.get(f"{k}_token")) for k in ("bos", "eos"))
    for step in post_steps:
        if not isinstance(step, dict):
            continue
        if step.get("type") == "ByteLevel":
            add_flags.setdefault("bos", False)
            add_flags.setdefault("eos", False)
        elif step.get("type") == "TemplateProcessing":
            single = [t for t in step.get("single") or [] if isinstance(t, dict)]
            if len(single) > 1:  # [special] $A [special]: a special token at either end is added
                first, last = (s.get("SpecialToken", {}).get("id") for s in (single[0], single[-1]))
                if first:
                    add_flags["bos"] = first in (bos, _token_content(tok_config.get("cls_token"))) or not tok_config
                if last:
                    add_flags["eos"] = last == eos or not tok_config
    for kind in ("bos", "eos", "sep"):
        if kind not in add_flags and isinstance(tok_config.get(f"add_{kind}_token"), bool):
            add_flags[kind] = tok_config[f"add_{kind}_token"]
    return special_ids, add_flags


def _chat_template(root: Path, tok_config: dict) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template
    if (root / "chat_template.jinja").is_file():
        try:
            return (root / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{root / 'chat_template.jinja'}: cannot read as UTF-8 text ({e})") from None
    if (root / "chat_template.json").is_file():
        template = read_json_object(root / "chat_template.json").get("chat_template")
        return template if isinstance(template, str) else None
    return None


def add_vocab_metadata(md: Metadata, vocab: Vocab) -> None:
    if vocab.add_space_prefix is not None:
        md.bool("tokenizer.ggml.add_space_prefix", vocab.add_space_prefix)
    md.str("tokenizer.ggml.model", vocab.model)
    md.str("tokenizer.ggml.pre", vocab.pre)
    md.array("tokenizer.ggml.tokens", vocab.tokens, GGUFValueType.STRING)
    if vocab.scores is not None:
        md.array("tokenizer.ggml.scores", vocab.scores, GGUFValueType.FLOAT32)
    md.array("tokenizer.ggml.token_type", vocab.types, GGUFValueType.INT32)
    if vocab.merges:
        md.array("tokenizer.ggml.merges", vocab.merges, GGUFValueType.STRING)
    for kind, token_id in vocab.special_ids.items():  # in the order found, as gguf.SpecialVocab writes them
        md.u32(SPECIAL_TOKEN_KINDS[kind], token_id)
    for kind, flag in vocab.add_flags.items():
        md.bool(f"tokenizer.ggml.add_{kind}_token", flag)
    if vocab.chat_template is not None:
        md.str("tokenizer.chat_template", vocab.chat_template)


# -- vocabulary kinds: an architecture names its kind (DecoderArch.vocab); plugins may add kinds -------

VocabLoader = Callable[[Path, dict, "str | None"], Callable[[Metadata], None]]
VOCABULARIES: dict[str, VocabLoader] = {}


def register_vocab(kind: str):
    """Decorator: `fn(model_dir, hparams, pre_tokenizer) -> writer(md)` loads a vocabulary of `kind`
    (checking it before anything is written) and returns what writes its tokenizer.* keys."""
    def add(fn: VocabLoader) -> VocabLoader:
        VOCABULARIES[kind] = fn
        return fn
    return add


@register_vocab("bpe")
def bpe_vocabulary(root: Path, hparams: dict, pre_tokenizer: str | None) -> Callable[[Metadata], None]:
    """Byte-level BPE from tokenizer.json (tokenizer.ggml.model = gpt2), the Qwen family's tokenizer."""
    vocab = load_vocab(root, hparams, pre_tokenizer)
    return lambda md: add_vocab_metadata(md, vocab)


def load_vocab_of(kind: str, root: Path, hparams: dict, pre_tokenizer: str | None = None) -> Vocab:
    """The vocabulary of a built-in kind as data (for tokenizing: its BOS and add flags)."""
    from . import spm
    loaders = {"llama": spm.load_llama_family, "spm": lambda r, h, p: spm.load_sentencepiece(r, h)}
    return loaders.get(kind, load_vocab)(root, hparams, pre_tokenizer)


def vocabulary(kind: str) -> VocabLoader:
    from . import spm  # noqa: F401  (registers the SentencePiece kinds)
    if kind not in VOCABULARIES:
        raise UserError(f"no vocabulary loader for {kind!r}", hint="known: " + ", ".join(sorted(VOCABULARIES)))
    return VOCABULARIES[kind]
