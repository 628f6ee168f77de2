"""llama.cpp's own tokenizer test data (models/ggml-vocab-*.gguf with .inp/.out in the pinned tree),
rebuilt as the tokenizer files each model family publishes, converted back by gguforge.

For each vocabulary: tokenizer.json (or tokenizer.model) is written from the vocab file's tokens and
merges with the pre-tokenizer definition that family's tokenizer.json has; the HF tokenizers library
must tokenize every .inp test to the .out ids with it (so the definition here is the real one), then
gguforge must name the pre-tokenizer as llama.cpp does, write the same tokens, types, scores and merges,
and llama.cpp must tokenize every test input to the expected ids with gguforge's metadata.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import pytest

from gguforge.convert.vocab import vocabulary
from gguforge.format.reader import open_reader  # gguf.GGUFReader, with arrays parsed in one pass
from gguforge.format.writer import Metadata, encode_header

from helpers import llama_cpp_source

tokenizers = pytest.importorskip("tokenizers")


def byte_level(use_regex: bool | None) -> dict:
    step = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    return step if use_regex is None else {**step, "use_regex": use_regex}


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def seq(*steps) -> dict:
    return {"type": "Sequence", "pretokenizers": list(steps)}


NFC = {"type": "NFC"}
DIGIT_BYTES = seq({"type": "Digits", "individual_digits": True}, byte_level(True))
CJK = "[一-龥ࠀ-一가-퟿]+"
# (config.json model_type, normalizer, pre_tokenizer) as the family's published tokenizer.json has them
FAMILIES = {
    "llama-bpe": ("llama", None, seq(split(
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
        "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"), byte_level(False))),
    "qwen2": ("qwen2", NFC, seq(split(
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
        "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"), byte_level(False))),
    "gpt-2": ("gpt2", None, byte_level(True)),
    "mpt": ("mpt", NFC, byte_level(None)),  # GPT-NeoX's tokenizer.json
    "starcoder": ("starcoder2", None, DIGIT_BYTES),
    "refact": ("gpt_refact", None, DIGIT_BYTES),
    "command-r": ("cohere", NFC, DIGIT_BYTES),
    "falcon": ("falcon", None, seq({"type": "Punctuation", "behavior": "Contiguous"}, byte_level(True),
                                   {"type": "Digits", "individual_digits": False}, split("[0-9][0-9][0-9]"))),
    "deepseek-coder": ("llama", None, seq(split("[\r\n]"), split("\\s?\\p{L}+"), split("\\s?\\p{P}+"), split(CJK),
                                          {"type": "Digits", "individual_digits": True}, byte_level(False))),
    # deepseek-llm-7b-base: the Splits llama.cpp runs as they are (llm_tokenizer_bpe DEEPSEEK_LLM, read from the
    # pinned tree when used), then one digit a piece (llama.cpp's \p{N}+ gives the same ids: the vocabulary has
    # no multi-digit token)
    "deepseek-llm": ("llama", None, lambda: seq(*(split(r) for r in deepseek_llm_splits()),
                                                {"type": "Digits", "individual_digits": True}, byte_level(False))),
}


def deepseek_llm_splits() -> list[str]:
    from test_pretokenizers import regexes_of
    _, active = regexes_of((source_tree() / "src" / "llama-vocab.cpp").read_text(encoding="utf-8"),
                           "LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM")
    assert active[-1] == "\\p{N}+"
    return active[:-1]


def source_tree() -> Path:
    return llama_cpp_source()


def vocab_file(name: str) -> Path:
    path = source_tree() / "models" / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.skip(f"{path.name} is not in the pinned llama.cpp tree")
    return path


def field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


def cases_of(path: Path) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs of test-tokenizer-0's .inp/.out files."""
    sep = "\n__ggml_vocab_test__\n"
    raw = path.with_name(path.name + ".inp").read_text(encoding="utf-8")
    texts = raw.removesuffix(sep).split(sep)  # as read_tests() in tests/test-tokenizer-0.cpp
    outs = path.with_name(path.name + ".out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(outs)
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


def rebuild_bpe(ref, family: str, out: Path) -> dict:
    """tokenizer.json, tokenizer_config.json and config.json of the vocabulary in `ref`."""
    model_type, normalizer, pre = FAMILIES[family]
    pre = pre() if callable(pre) else pre
    tokens, types = field(ref, "tokenizer.ggml.tokens"), field(ref, "tokenizer.ggml.token_type")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": ty != 3, "special": ty == 3}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4) and t != f"[PAD{i}]"]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty not in (3, 4) and t != f"[PAD{i}]"}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
           "pre_tokenizer": pre, "post_processor": byte_level(False) | {"trim_offsets": False},
           "decoder": byte_level(True),
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                     "ignore_merges": family == "llama-bpe", "vocab": vocab,
                     "merges": field(ref, "tokenizer.ggml.merges")}}
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    config = {"model_type": model_type, "vocab_size": len(tokens)}
    config.update({f"{k}_token_id": field(ref, f"tokenizer.ggml.{k}_token_id")
                   for k in ("bos", "eos") if field(ref, f"tokenizer.ggml.{k}_token_id") is not None})
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return tok


def sentencepiece_model(tokens, scores, types) -> bytes:
    """A ModelProto written by hand: its pieces (field 1: piece = 1, score = 2, type = 3) and a trainer spec
    (field 2) saying BPE (model_type = 3: 2) with byte fallback (byte_fallback = 35), as Llama 2's has."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    def length_delimited(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    body = b""
    for t, s, ty in zip(tokens, scores, types):
        piece = length_delimited(1, t.encode("utf-8")) + varint(2 << 3 | 5) + struct.pack("<f", s) + varint(3 << 3) + varint(ty)
        body += length_delimited(1, piece)
    return body + length_delimited(2, varint(3 << 3) + varint(2) + varint(35 << 3) + varint(1))


def write_vocab_gguf(ref, kind: str, model_dir: Path, out: Path) -> Metadata:
    """A vocab-only GGUF: the reference's model keys, then gguforge's tokenizer keys."""
    hparams = json.loads((model_dir / "config.json").read_text())
    md = Metadata()
    for key, f in ref.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            md.set(key, f.contents(), f.types[0], f.types[-1])
        else:
            md.set(key, f.contents(), f.types[0])
    vocabulary(kind)(model_dir, hparams, None)(md)
    out.write_bytes(encode_header(md, []))
    return md


def assert_same_types(tokens, ours, ref) -> None:
    """Token types equal, except where the vocab file is older than two rules of today's converter
    (conversion/base.py): added tokens that look like control tokens (<|...|>, <｜...｜>, <pad>) are
    CONTROL, and the padding up to vocab_size ([PADn]) is UNUSED; the file has USER_DEFINED for both."""
    newer = {i for i, t in enumerate(tokens) if ref[i] == 4 and (
        (ours[i] == 3 and (t.startswith(("<|", "<｜")) and t.endswith(("|>", "｜>")) or t == "<pad>"))
        or (ours[i] == 5 and t == f"[PAD{i}]"))}
    assert len(ours) == len(ref)
    assert [i for i in range(len(ref)) if ours[i] != ref[i] and i not in newer] == []


def assert_llama_cpp_tokenizes(path: Path, cases) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    wrong = [(text, model.tokenize(text.encode(), add_bos=False, special=False), ids) for text, ids in cases
             if model.tokenize(text.encode(), add_bos=False, special=False) != ids]
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bpe_vocab_files(family, tmp_path):
    path = vocab_file(family)
    ref = open_reader(path)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tok = rebuild_bpe(ref, family, model_dir)
    cases = cases_of(path)
    hf = tokenizers.Tokenizer.from_str(json.dumps(tok))
    assert [hf.encode(t, add_special_tokens=False).ids for t, _ in cases] == [ids for _, ids in cases]

    out = tmp_path / "vocab.gguf"
    md = write_vocab_gguf(ref, "bpe", model_dir, out)
    assert md.get("tokenizer.ggml.pre") == field(ref, "tokenizer.ggml.pre")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert md.get(key) == field(ref, key), key
    assert_same_types(md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.token_type"),
                      field(ref, "tokenizer.ggml.token_type"))
    assert_llama_cpp_tokenizes(out, cases)


def test_sentencepiece_vocab_file(tmp_path):
    path = vocab_file("llama-spm")
    ref = open_reader(path)
    tokens, scores, types = (field(ref, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes(sentencepiece_model(tokens, scores, types))
    ids = {k: field(ref, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown")}
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": len(tokens), "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
        "unk_token_id": ids["unknown"]}))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": field(ref, "tokenizer.ggml.add_bos_token"),
        "add_eos_token": field(ref, "tokenizer.ggml.add_eos_token")}))
    out = tmp_path / "vocab.gguf"
    md = write_vocab_gguf(ref, "llama", model_dir, out)
    for key in ("model", "pre", "tokens", "scores", "token_type", "bos_token_id", "eos_token_id",
                "unknown_token_id", "add_bos_token", "add_eos_token"):
        assert md.get(f"tokenizer.ggml.{key}") == pytest.approx(field(ref, f"tokenizer.ggml.{key}")), key
    assert_llama_cpp_tokenizes(out, cases_of(path))


def test_llama_with_tokenizer_model_equals_reference_converter(tree, mock_model, tmp_path):
    """A Llama 2 layout (tokenizer.model, no tokenizer.json; added_tokens.json; added_tokens_decoder with
    a special and a user-defined token; add_prefix_space): the whole file equals llama.cpp's converter's."""
    import shutil

    from gguforge.cli import main

    from helpers import run_reference_converter
    pytest.importorskip("sentencepiece")  # the reference reads tokenizer.model with it
    ref_vocab = open_reader(vocab_file("llama-spm"))
    model = tmp_path / "model"
    shutil.copytree(mock_model("llama"), model)
    (model / "tokenizer.json").unlink()
    tokens, scores, types = (field(ref_vocab, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    (model / "tokenizer.model").write_bytes(sentencepiece_model(tokens, scores, types))
    (model / "added_tokens.json").write_text(json.dumps({"<extra_a>": 509}))
    (model / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": True, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": {"1": {"content": "<s>", "special": True},
                                 "510": {"content": "<|tool|>", "special": False},
                                 "511": {"content": "\u2581user\u2581text", "special": False}}}))
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", "f16", "--quiet"]) == 0
    r = run_reference_converter(tree, model, ref, "f16", "default")
    assert r.returncode == 0, r.stderr[-2000:]
    a = open_reader(ours)
    assert field(a, "tokenizer.ggml.token_type")[509:512] == [4, 3, 4]
    assert field(a, "tokenizer.ggml.tokens")[511] == " user text"
    assert ours.read_bytes() == ref.read_bytes()


def _edited_copy(src: Path, dst: Path, tokenizer_edit=None, config_edit=None) -> Path:
    import shutil
    shutil.copytree(src, dst)
    for name, edit in (("tokenizer.json", tokenizer_edit), ("tokenizer_config.json", config_edit)):
        if edit is not None:
            data = json.loads((dst / name).read_text(encoding="utf-8"))
            edit(data)
            (dst / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dst


def test_deepseek_r1_distill_qwen_is_named_by_its_bos(mock_model, tmp_path):
    """Qwen2's definition with DeepSeek's BOS: llama.cpp's hash names it deepseek-r1-qwen; so does gguforge."""
    pytest.importorskip("torch")
    src = mock_model("qwen2")
    model = _edited_copy(src, tmp_path / "m", config_edit=lambda c: c.update(bos_token="<｜begin▁of▁sentence｜>"))
    hparams = json.loads((model / "config.json").read_text())
    for path, name in ((src, "qwen2"), (model, "deepseek-r1-qwen")):
        md = Metadata()
        vocabulary("bpe")(path, hparams, None)(md)
        assert md.get("tokenizer.ggml.pre") == name


def test_imatrix_names_the_pre_tokenizer_option_it_has(mock_model, tmp_path, capsys):
    """An unknown definition: `gguforge imatrix` says to use --pre-tokenizer, and accepts it."""
    from gguforge.cli import main
    pytest.importorskip("torch")

    def other_digits(tok):
        tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] += "|\\p{N}{1,7}"

    model = _edited_copy(mock_model("qwen2"), tmp_path / "m", tokenizer_edit=other_digits)
    text = tmp_path / "calib.txt"
    text.write_text("Hello world, 1234 tokens of calibration text. " * 12)
    run = ["imatrix", str(model), "-f", str(text), "-c", "64", "-q"]
    capsys.readouterr()  # (what building the mock printed)
    assert main(run + ["-o", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err
    assert "--pre-tokenizer" in err and len(err.strip().splitlines()) <= 2 and not (tmp_path / "a.gguf").exists()
    assert main(run + ["-o", str(tmp_path / "b.gguf"), "--pre-tokenizer", "qwen2"]) == 0
    assert (tmp_path / "b.gguf").is_file()


def byte_fallback_tokenizer(corpus) -> dict:
    """A Llama-2-style tokenizer.json: BPE over '▁'-joined text with <0xXX> byte fallback, <unk>/<s>/</s>
    added at ids 0-2, a Sequence decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces])
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    tok.add_special_tokens([AddedToken("<pad>", special=True, normalized=False)])
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in byte_pieces]  # plain pieces
    return data


def test_llama_with_byte_fallback_tokenizer_json_equals_reference_converter(tree, mock_model, tmp_path):
    import shutil

    import make_mocks
    from gguforge.cli import main

    from helpers import run_reference_converter
    model = tmp_path / "model"
    shutil.copytree(mock_model("llama"), model)
    tok = byte_fallback_tokenizer(make_mocks.CORPUS * 4)
    (model / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    (model / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", "f16", "--quiet"]) == 0
    r = run_reference_converter(tree, model, ref, "f16", "default")
    assert r.returncode == 0, r.stderr[-2000:]
    a = open_reader(ours)
    assert field(a, "tokenizer.ggml.model") == "llama" and field(a, "tokenizer.ggml.token_type")[3] == 6
    assert ours.read_bytes() == ref.read_bytes()
