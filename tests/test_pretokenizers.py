r"""Every entry of the pre-tokenizer table that is only Split regexes before the byte-level mapping
(convert/pretokenizers.py TABLE: tokenizer.json regexes -> llama.cpp pre-tokenizer name), checked against the
pinned llama.cpp tree, whatever entries the table holds:

- llama.cpp knows the name (src/llama-vocab.cpp llama_vocab::impl::load: `tokenizer_pre == "NAME"` gives a
  LLAMA_VOCAB_PRE_TYPE), and the regex is the tokenizer.json regex llama.cpp records for that type (the
  "original regex from tokenizer.json" comment of llm_tokenizer_bpe's constructor, or its active regex);
- on every test input of llama.cpp's vocab tests (models/ggml-vocab-*.gguf.inp), the regexes split text
  exactly as llama.cpp's own regex list for that type does (applied one after the other, as
  unicode_regex_split does). The one known difference: where llama.cpp replaces the tokenizer.json's case
  classes ([\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]...) by lookaheads over ASCII ((?=[\p{L}])([^a-z]), std::regex
  has no \p classes), its split differs from the original only on text with non-ASCII letters or marks;
  on any other input a difference fails;
- where llama.cpp ships the vocabulary of that name (models/ggml-vocab-NAME.gguf), a byte-level BPE
  tokenizer built from it with the regex as its split gives the token ids of models/ggml-vocab-NAME.gguf.out
  (written by convert_hf_to_gguf_update.py from the original tokenizer, add_special_tokens=False).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from gguforge.convert.pretokenizers import BOS_FAMILIES, BYTES, TABLE, all_names, recognise

from helpers import llama_cpp_source

regex = pytest.importorskip("regex")  # the engine Hugging Face tokenizers' Split regexes behave like
tokenizers = pytest.importorskip("tokenizers")

SEPARATOR = "\n__ggml_vocab_test__\n"
# (tokenizer.json split regexes in order, llama.cpp name) of every entry that is Splits + byte-level mapping
ENTRIES = sorted(((tuple(step[1] for step in e.steps[:-1]), e.name) for e in TABLE
                  if e.steps[-1] == BYTES and all(step[0] == "Split" for step in e.steps[:-1])),
                 key=lambda item: item[1])
# llama.cpp's rewrite of a case class into ASCII lookaheads (llm_tokenizer_bpe, GPT4O / TEKKEN)
CASE_LOOKAHEAD = "(?=[\\p{L}])([^a-z])"


@pytest.fixture(scope="module")
def tree() -> Path:
    return llama_cpp_source()


@pytest.fixture(scope="module")
def vocab_cpp(tree) -> str:
    return (tree / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")


def cpp_string(body: str) -> str:
    """The text of a C++ string literal's body (the escapes llama-vocab.cpp's regexes use)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r", "t": "\t"}.get(m.group(1), m.group(1)), body)


def loader_branch(vocab_cpp: str, name: str) -> tuple[str, str]:
    """(the LLAMA_VOCAB_PRE_TYPE_* llama.cpp's loader gives tokenizer.ggml.pre == name, the settings it
    makes with it: ignore_merges, add_bos ...)."""
    for names, pre_type, settings in re.findall(
            r"if\s*\(((?:\s*(?:\|\|)?\s*tokenizer_pre\s*==\s*\"[^\"]*\")+)\s*\)\s*\{\s*"
            r"pre_type\s*=\s*(LLAMA_VOCAB_PRE_TYPE_\w+);([^}]*)", vocab_cpp):
        if name in re.findall(r"\"([^\"]*)\"", names):
            return pre_type, settings
    pytest.fail(f"llama.cpp does not know the pre-tokenizer {name!r}")


def pre_type_of(vocab_cpp: str, name: str) -> str:
    return loader_branch(vocab_cpp, name)[0]


def regexes_of(vocab_cpp: str, pre_type: str) -> tuple[list[str], list[str]]:
    """(tokenizer.json regexes quoted in comments, regexes llama.cpp runs) of the constructor's case; a
    quoted original is a commented literal in the list, or one after "original regex from tokenizer.json"
    anywhere in the case (tekken, tiny_aya note theirs before the list or after a colon)."""
    start = vocab_cpp.index(f"case {pre_type}:", vocab_cpp.index("struct llm_tokenizer_bpe"))
    body = vocab_cpp[start:vocab_cpp.index("break;", start)]
    exprs = body[body.index("regex_exprs = {") + len("regex_exprs = {"):body.index("};")]
    original, active = [], []
    for line in exprs.splitlines():
        line = line.strip()
        commented = line.startswith("//")
        literal = re.fullmatch(r"(?://\s*)?\"((?:[^\"\\]|\\.)*)\",?", line)
        if literal:
            (original if commented else active).append(cpp_string(literal.group(1)))
    for quoted in re.findall(r"//\s*original regex from tokenizer\.json:?\s*\n?\s*(?://\s*)?\"((?:[^\"\\]|\\.)*)\"", body):
        original += [cpp_string(quoted)] if cpp_string(quoted) not in original else []
    assert active, f"no regex for {pre_type}"
    return original, active


def split(text: str, expressions: list[str]) -> list[str]:
    """Split as Split(behavior=Isolated) / unicode_regex_split: matches and the gaps between them."""
    pieces = [text]
    for expression in expressions:
        compiled, out = regex.compile(expression), []
        for piece in pieces:
            at = 0
            for m in compiled.finditer(piece):
                out += [piece[at:m.start()]] if m.start() > at else []
                out += [m.group()] if m.end() > m.start() else []
                at = m.end()
            out += [piece[at:]] if at < len(piece) else []
        pieces = out
    return pieces


def vocab_test(tree: Path, name: str) -> tuple[list[str], list[list[int]]] | None:
    inp, out = tree / "models" / f"ggml-vocab-{name}.gguf.inp", tree / "models" / f"ggml-vocab-{name}.gguf.out"
    if not (inp.is_file() and out.is_file()):
        return None
    texts = inp.read_text(encoding="utf-8").split(SEPARATOR)[:-1]
    ids = [[int(i) for i in line.split()] for line in out.read_text(encoding="utf-8").split("\n")[:-1]]
    assert len(texts) == len(ids)
    return texts, ids


def all_test_inputs(tree: Path) -> list[str]:
    texts = set()
    for path in sorted((tree / "models").glob("ggml-vocab-*.gguf.inp")):
        texts.update(path.read_text(encoding="utf-8").split(SEPARATOR)[:-1])
    return sorted(texts)


def test_the_table_is_checked_at_all():
    assert {"qwen2", "llama-bpe", "gpt-4o", "tiny_aya"} <= {name for _, name in ENTRIES}


def test_every_name_the_table_writes_is_one_llama_cpp_loads(vocab_cpp):
    for name in all_names():
        loader_branch(vocab_cpp, name)


def test_a_family_name_is_one_llama_cpp_splits_as_the_definition_name(vocab_cpp):
    """A name picked by model_type or BOS for a shared definition runs the same regexes in llama.cpp."""
    def runs(name):
        return regexes_of(vocab_cpp, pre_type_of(vocab_cpp, name))[1]
    picked = [(e.name, n) for e in TABLE for n in e.families.values()] + [(d, n) for (d, _), n in BOS_FAMILIES.items()]
    assert len(picked) > 20
    for default, name in picked:
        assert runs(name) == runs(default), (default, name)


def _definition(*regexes: str) -> dict:
    """A pre_tokenizer as the tokenizer.json files of these models write it: Splits, then ByteLevel."""
    return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        *({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes),
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}


# (llama.cpp pre-tokenizer name, config.json model_type) of the models convert_hf_to_gguf.py's hash table names
# (its `# ref:` lines): Xenova/gpt-4o (no config), Llama-4-Scout, MiniMax-M2, Mistral-Nemo, tiny-aya-base,
# North-Mini-Code; the pinned tree notes each one's tokenizer.json regexes in llm_tokenizer_bpe.
@pytest.mark.parametrize("name, model_type", [("gpt-4o", None), ("llama4", "llama4"), ("minimax-m2", "minimax_m2"),
                                              ("tekken", "mistral"), ("tiny_aya", "cohere2"),
                                              ("cohere2moe", "cohere2_moe")])
def test_case_split_definitions_are_named_as_llama_cpp_names_them(vocab_cpp, name, model_type):
    original, active = regexes_of(vocab_cpp, pre_type_of(vocab_cpp, name))
    assert len(original) == len(active)  # llama.cpp notes the tokenizer.json regex of each one it runs
    assert recognise(_definition(*original), model_type) == name


@pytest.mark.parametrize("ours, name", ENTRIES, ids=[name for _, name in ENTRIES])
def test_regex_is_the_one_llama_cpp_records(vocab_cpp, ours, name):
    original, active = regexes_of(vocab_cpp, pre_type_of(vocab_cpp, name))
    assert len(ours) == len(active), f"{name}: {len(ours)} regexes, llama.cpp runs {len(active)}"
    for expression in ours:
        assert expression in original + active, f"{name}: {expression!r} is none of llama.cpp's {original + active}"


@pytest.mark.parametrize("ours, name", ENTRIES, ids=[name for _, name in ENTRIES])
def test_regex_splits_llama_cpp_test_inputs_as_llama_cpp(tree, vocab_cpp, ours, name):
    _, active = regexes_of(vocab_cpp, pre_type_of(vocab_cpp, name))
    adapted_case = any(CASE_LOOKAHEAD in expression for expression in active)
    texts = all_test_inputs(tree)
    assert len(texts) > 40
    compared = 0
    for text in texts:
        if split(text, list(ours)) != split(text, active):
            assert adapted_case and regex.search(r"[\p{L}\p{M}]", regex.sub(r"[\x00-\x7f]", "", text)), (name, text)
        else:
            compared += 1
    assert compared > 40


def bpe_tokenizer(vocab_gguf: Path, expressions: tuple[str, ...], ignore_merges: bool):
    """A byte-level BPE tokenizer from a llama.cpp vocab file, pre-tokenizing with `expressions`;
    ignore_merges: a whole pre-token that is a token is taken as is (llama.cpp's flag for the type)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from gguforge.format.reader import open_reader  # (gguf-py's own reader takes ~10x as long on 150k strings)
    fields = open_reader(vocab_gguf).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(expression), behavior="isolated") for expression in expressions),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@pytest.mark.parametrize("ours, name", ENTRIES, ids=[name for _, name in ENTRIES])
def test_vocab_test_inputs_tokenize_to_llama_cpp_expected_ids(tree, vocab_cpp, ours, name):
    found = vocab_test(tree, name)
    if found is None:
        pytest.skip(f"llama.cpp ships no vocab test for {name}")
    texts, expected = found
    ignore_merges = "ignore_merges = true" in loader_branch(vocab_cpp, name)[1]
    tokenizer = bpe_tokenizer(tree / "models" / f"ggml-vocab-{name}.gguf", ours, ignore_merges)
    for text, ids in zip(texts, expected):
        assert tokenizer.encode(text, add_special_tokens=False).ids == ids, (name, text)


def vocab_named(tree: Path, name: str, out: Path) -> Path:
    """models/ggml-vocab-llama-bpe.gguf (a byte-level BPE vocabulary, no tensors) with tokenizer.ggml.pre = name."""
    data = (tree / "models" / "ggml-vocab-llama-bpe.gguf").read_bytes()
    key, string = b"tokenizer.ggml.pre", 8  # GGUF value type 8: a u64-length-prefixed string
    value = key + struct.pack("<IQ", string, len(b"llama-bpe")) + b"llama-bpe"
    assert data.count(value) == 1
    out.write_bytes(data.replace(value, key + struct.pack("<IQ", string, len(name.encode())) + name.encode()))
    return out


# llama.cpp runs `\b` as std::regex's ASCII word boundary, the tokenizers library as Unicode's: a digit group
# split (tiny_aya's) differs where digits touch a non-ASCII letter ("工作1314151天").
DIGITS_BY_LETTER = r"\d[^\x00-\x7f]|[^\x00-\x7f]\d"


@pytest.mark.parametrize("ours, name", ENTRIES, ids=[name for _, name in ENTRIES])
def test_llama_cpp_tokenizes_test_inputs_as_the_definition_does(tree, vocab_cpp, ours, name, tmp_path):
    """llama.cpp's own runtime (its regexes as it really runs them, adapted or not) on a vocabulary carrying the
    name gives the ids the tokenizers library gives with the entry's definition, on every test input."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama_cpp.Llama(str(vocab_named(tree, name, tmp_path / "vocab.gguf")), vocab_only=True, verbose=False)
    ignore_merges = "ignore_merges = true" in loader_branch(vocab_cpp, name)[1]
    tokenizer = bpe_tokenizer(tree / "models" / "ggml-vocab-llama-bpe.gguf", ours, ignore_merges)
    word_boundary = any("\\b" in expression for expression in ours)
    texts = all_test_inputs(tree)
    wrong = [text for text in texts if model.tokenize(text.encode(), add_bos=False, special=False)
             != tokenizer.encode(text, add_special_tokens=False).ids]
    assert [text for text in wrong if not (word_boundary and regex.search(DIGITS_BY_LETTER, text))] == []
    assert len(wrong) < len(texts) / 10
