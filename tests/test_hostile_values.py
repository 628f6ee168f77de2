"""Config, tokenizer and GGUF values checked before use (issue 16, class 2).

Property-based (in the style of test_fuzz.py): a value of any kind in any place a checkpoint, tokenizer,
override file or GGUF file holds one gives exit 0 or a clear exit 2, never an internal error or a hang;
and what is accepted is sound (finite floats, valid Unicode, types llama.cpp expects). Then each case
the issue names, as a regression test with its message.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from gguf import GGMLQuantizationType as T, GGUFValueType as V  # noqa: E402

from gguforge.cli import main  # noqa: E402
from gguforge.errors import EXIT_BAD_INPUT  # noqa: E402
from gguforge.format.writer import INT_RANGES, Metadata, TensorEntry, write_gguf_shards  # noqa: E402

from helpers import qwen2moe_config, qwen2moe_tensors, tiny_qwen2moe_config, write_checkpoint  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OK_CODES = (0, EXIT_BAD_INPUT)

TINY = tiny_qwen2moe_config()

SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800"])
VALUES = st.one_of(
    st.integers(min_value=-2**65, max_value=2**65), st.sampled_from([0, 1, -1, 2**31, 2**32, 10**9, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), SURROGATES, st.none(), st.booleans(),
    st.lists(st.one_of(st.integers(-2, 2**33), st.text(max_size=3)), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("values") / "model", TINY, qwen2moe_tensors(TINY))


def fresh_copy(tiny_model: Path, tmp_path: Path) -> Path:
    model = tmp_path / "m"
    if model.exists():
        shutil.rmtree(model)
    return Path(shutil.copytree(tiny_model, model))


def convert(model: Path, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    target = out / "x.gguf"
    target.unlink(missing_ok=True)
    code = main(["convert-hf", str(model), "--outfile", str(target), "-q", "-t", "1", *extra])
    assert code in OK_CODES
    assert not any(p.name.endswith(".part") for p in out.iterdir())
    assert target.exists() == (code == 0)
    return code, target


def gguf_fields(path: Path) -> dict:
    """key -> (types, value) of a GGUF file."""
    from gguf import GGUFReader
    return {k: (f.types, f.contents()) for k, f in GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def assert_sound(path: Path) -> None:
    """An accepted file holds only finite floats, and the validated reader opens it."""
    for key, (types, value) in gguf_fields(path).items():
        if types[-1] in (V.FLOAT32, V.FLOAT64):
            assert all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])), key
    assert main(["inspect", str(path)]) == 0


# -- config.json ------------------------------------------------------------------------------------------

ROPE_KEYS = ("rope_type", "factor", "original_max_position_embeddings", "mrope_section", "rope_theta",
             "beta_fast", "attention_factor", "partial_rotary_factor")


@FUZZ
@given(key=st.sampled_from(ROPE_KEYS), value=st.one_of(VALUES, st.sampled_from(["yarn", "linear", "mrope", "default"])),
       kind=st.sampled_from(["default", "yarn", "linear"]))
def test_fuzz_rope_parameters(tiny_model, tmp_path, key, value, kind, capsys):
    capsys.readouterr()  # only this example's output
    model = fresh_copy(tiny_model, tmp_path)
    config = {**TINY, "rope_parameters": {"rope_theta": 1e6, "rope_type": kind, "factor": 2.0,
                                          "original_max_position_embeddings": 128, key: value}}
    (model / "config.json").write_text(json.dumps(config))
    code, target = convert(model, tmp_path)
    if code == 0:
        assert_sound(target)
    else:
        assert capsys.readouterr().err.startswith("error: ")


COUNT_KEYS = ("num_hidden_layers", "num_experts", "num_experts_per_tok", "vocab_size", "max_position_embeddings",
              "rms_norm_eps", "rope_theta", "moe_intermediate_size", "hidden_size", "head_dim", "_name_or_path",
              "text_config", "layer_types", "tie_word_embeddings", "architectures")


@FUZZ
@given(key=st.sampled_from(COUNT_KEYS), value=VALUES, vocab_only=st.booleans())
def test_fuzz_config_counts_never_hang(tiny_model, tmp_path, key, value, vocab_only):
    """Huge counts are refused before anything is sized by them (10**9 layers used to hang)."""
    model = fresh_copy(tiny_model, tmp_path)
    (model / "config.json").write_text(json.dumps({**TINY, key: value}))
    code, target = convert(model, tmp_path, *(["--vocab-only"] if vocab_only else []))
    if code == 0:
        assert_sound(target)


# -- tokenizer.json ---------------------------------------------------------------------------------------

TOKENIZER_PLACES = ("merge", "added_id", "added_content", "added_entry", "vocab_value", "vocab_key",
                    "pre_tokenizer", "post_processor", "model", "merges", "added_tokens", "chat_template")


def edit_tokenizer(model: Path, place: str, value) -> None:
    tok = json.loads((model / "tokenizer.json").read_text())
    if place == "merge":
        tok["model"]["merges"][0] = value
    elif place in ("added_id", "added_content"):
        tok["added_tokens"][0][place.split("_")[1]] = value
    elif place == "added_entry":
        tok["added_tokens"].append(value)
    elif place == "vocab_value":
        tok["model"]["vocab"][next(iter(tok["model"]["vocab"]))] = value
    elif place == "vocab_key":
        vocab = tok["model"]["vocab"]
        first = next(iter(vocab))
        vocab[str(value)] = vocab.pop(first)
    elif place in ("pre_tokenizer", "post_processor", "model", "added_tokens"):
        tok[place] = value
    elif place == "merges":
        tok["model"]["merges"] = value
    else:
        config = json.loads((model / "tokenizer_config.json").read_text())
        config["chat_template"] = value
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "tokenizer.json").write_text(json.dumps(tok))  # ensure_ascii: surrogates survive as \\udXXX


@FUZZ
@given(place=st.sampled_from(TOKENIZER_PLACES), value=VALUES)
def test_fuzz_tokenizer_values(tiny_model, tmp_path, place, value, capsys):
    capsys.readouterr()  # only this example's output
    model = fresh_copy(tiny_model, tmp_path)
    edit_tokenizer(model, place, value)
    code, target = convert(model, tmp_path, "--vocab-only")
    if code == 0:
        assert_sound(target)
        fields = gguf_fields(target)
        tokens = fields["tokenizer.ggml.tokens"][1]
        for kind in ("bos", "eos", "padding"):
            key = f"tokenizer.ggml.{kind}_token_id"
            assert key not in fields or 0 <= fields[key][1] < len(tokens)
    else:
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "internal error" not in err


# -- --metadata overrides of keys the conversion writes ---------------------------------------------------

OVERRIDDEN = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
              "tokenizer.ggml.bos_token_id", "qwen2moe.block_count", "qwen2moe.attention.layer_norm_rms_epsilon",
              "tokenizer.ggml.pre", "general.file_type", "qwen2moe.expert_count")


@FUZZ
@given(key=st.sampled_from(OVERRIDDEN), value=st.one_of(VALUES, st.fixed_dictionaries(
    {"type": st.sampled_from(["uint8", "int32", "uint32", "float32", "string", "bool"]), "value": VALUES})))
def test_fuzz_overrides_keep_types(tiny_model, tmp_path, key, value):
    base = tmp_path / "base.gguf"
    if not base.exists():
        assert main(["convert-hf", str(tiny_model), "--outfile", str(base), "-q", "--vocab-only"]) == 0
    (tmp_path / "over.json").write_text(json.dumps({key: value}))
    code, target = convert(tiny_model, tmp_path, "--vocab-only", "--metadata", str(tmp_path / "over.json"))
    if code == 0:
        (now, _), (before, _) = gguf_fields(target)[key], gguf_fields(base)[key]
        # the type llama.cpp reads it as (gguf-py lists no item type for an empty array)
        assert now[0] == before[0] and (len(now) == 1 or now == before)
        assert_sound(target)


# -- GGUF files --------------------------------------------------------------------------------------------

SCALAR_TYPES = [V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64, V.FLOAT32, V.BOOL, V.STRING]


def raw_metadata(items: dict) -> Metadata:
    """Metadata set without the writer's checks: the bytes a careless or hostile tool could write."""
    md = Metadata()
    md.items.update(items)
    return md


def write_raw_gguf(path: Path, items: dict, shape=(2, 32)) -> None:
    tensors = [TensorEntry("blk.0.attn_q.weight", shape, T.F32)]
    nbytes = int(np.prod(shape)) * 4
    write_gguf_shards([path], [raw_metadata(items)], [(0, 1)], tensors, lambda: iter([(0, b"\0" * nbytes)]))


def typed_value(vtype: V, data):
    if vtype == V.STRING:
        return data.draw(st.text(max_size=4))
    if vtype == V.BOOL:
        return data.draw(st.booleans())
    if vtype == V.FLOAT32:
        return data.draw(st.floats(width=32))
    low, high = INT_RANGES[vtype]
    return data.draw(st.integers(low, high))


@FUZZ
@given(key=st.sampled_from(["qwen2moe.block_count", "qwen2moe.expert_count", "split.count", "split.no",
                            "split.tensors.count", "qwen2moe.expert_used_count"]),
       vtype=st.sampled_from(SCALAR_TYPES + ["array"]), shape=st.sampled_from([(2, 32), (0, 32), (2, 0), (1, 1)]),
       data=st.data())
def test_fuzz_gguf_count_types(tmp_path, key, vtype, shape, data):
    if vtype == "array":
        item = (V.ARRAY, [1, 2], V.INT32)
    else:
        item = (vtype, typed_value(vtype, data), None)
    path = tmp_path / "in.gguf"
    path.unlink(missing_ok=True)
    write_raw_gguf(path, {"general.architecture": (V.STRING, "qwen2moe", None), key: item}, shape)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    assert main(["inspect", str(path)]) in OK_CODES
    assert main(["quantize", str(path), str(out / "q.gguf"), "Q8_0", "--force", "-q", "-t", "1"]) in OK_CODES
    assert not any(p.name.endswith(".part") for p in out.iterdir())


# -- the cases the issue names ---------------------------------------------------------------------------


def run_fails(args: list[str], capsys, *needles: str) -> str:
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2 and "internal error" not in err, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def rope(**kw) -> dict:
    return {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default", **kw}}


@pytest.mark.parametrize("edit, needle", [
    (rope(rope_type="yarn", factor=4.0), "original_max_position_embeddings"),
    (rope(rope_type="linear", factor="4"), "factor"),
    (rope(rope_type="default", mrope_section=5), "mrope_section"),
    (rope(rope_theta=float("inf")), "rope_theta"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"num_experts_per_tok": 3}, "num_experts_per_tok"),
    ({"vocab_size": 10**10}, "vocab_size"),
    ({"_name_or_path": ["a"]}, "_name_or_path"),
], ids=["yarn-no-original", "factor-string", "mrope-not-list", "inf-theta", "nan-eps", "1e9-layers",
        "more-used-than-experts", "huge-vocab", "name-not-a-string"])
def test_config_values_refused(tiny_model, tmp_path, capsys, edit, needle):
    model = fresh_copy(tiny_model, tmp_path)
    (model / "config.json").write_text(json.dumps({**TINY, **edit}))
    for extra in ([], ["--vocab-only"]):
        run_fails(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf"), *extra], capsys, needle)
    assert not (tmp_path / "x.gguf").exists()


def expert_checkpoint(tmp_path: Path, edit) -> Path:
    config = qwen2moe_config()
    tensors = qwen2moe_tensors(config)
    del config["moe_intermediate_size"]  # nothing in config.json says how large the experts are
    edit(tensors)
    return write_checkpoint(tmp_path / "experts", config, tensors)


def test_zero_size_experts_without_a_config_size(tmp_path, capsys):
    def zero(t):
        for e in range(4):
            t[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] = np.zeros((0, 64), np.float32)
            t[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] = np.zeros((0, 64), np.float32)
            t[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = np.zeros((64, 0), np.float32)
    run_fails(["convert-hf", str(expert_checkpoint(tmp_path, zero)), "--outfile", str(tmp_path / "x.gguf")], capsys,
              "dimension of size 0")


@pytest.mark.parametrize("layer, expert", [(0, 1), (1, 0)], ids=["within-a-layer", "across-layers"])
def test_unequal_experts_without_a_config_size(tmp_path, capsys, layer, expert):
    def shrink(t):
        for proj, shape in (("gate", (16, 64)), ("up", (16, 64)), ("down", (64, 16))):
            t[f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"] = np.zeros(shape, np.float32)
    run_fails(["convert-hf", str(expert_checkpoint(tmp_path, shrink)), "--outfile", str(tmp_path / "x.gguf")],
              capsys, "disagrees with")


@pytest.mark.parametrize("place, value, needle", [
    ("merge", ["a", "b", "c"], "is not two tokens"), ("merge", [1, 2], "is not two tokens"),
    ("merge", "nospace", "is not two tokens"), ("added_id", None, "added_tokens[0]"),
    ("added_id", "7", "added_tokens[0]"), ("added_id", -5, "added_tokens[0]"), ("vocab_value", 3.5, "has id 3.5"),
    ("vocab_value", -3, "has id -3"), ("vocab_key", "\ud800", "unpaired surrogate"),
    ("chat_template", "x\udfff", "unpaired surrogate"), ("pre_tokenizer", 5, "pre_tokenizer"),
    ("post_processor", [1], "post_processor"),
])
def test_tokenizer_values_refused(tiny_model, tmp_path, capsys, place, value, needle):
    model = fresh_copy(tiny_model, tmp_path)
    edit_tokenizer(model, place, value)
    run_fails(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf")], capsys, needle)


def test_added_token_without_an_id(tiny_model, tmp_path, capsys):
    model = fresh_copy(tiny_model, tmp_path)
    tok = json.loads((model / "tokenizer.json").read_text())
    del tok["added_tokens"][0]["id"]
    (model / "tokenizer.json").write_text(json.dumps(tok))
    run_fails(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf")], capsys, "added_tokens[0]")


def test_chat_template_file_not_utf8(tiny_model, tmp_path, capsys):
    model = fresh_copy(tiny_model, tmp_path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").write_bytes(b"\xff\xfe{{ bad }}")
    run_fails(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf")], capsys, "chat_template.jinja", "UTF-8")


def test_overlapping_safetensors_data(tiny_model, tmp_path, capsys):
    model = fresh_copy(tiny_model, tmp_path)
    path = model / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__" and header[k]["shape"] == [TINY["hidden_size"]]]
    a, b = names[:2]
    header[b]["data_offsets"] = header[a]["data_offsets"]  # two tensors, one set of bytes
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    run_fails(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf")], capsys, "overlap")


@pytest.mark.parametrize("override, needle", [
    ({"tokenizer.ggml.tokens": 5}, "must keep that type"),
    ({"tokenizer.ggml.bos_token_id": "x"}, "not a number"),
    ({"tokenizer.ggml.merges": [1, 2]}, "not a string"),
    ({"tokenizer.ggml.bos_token_id": {"type": "int8", "value": 3}}, "must keep that type"),
    ({"qwen2moe.attention.layer_norm_rms_epsilon": {"type": "float32", "value": float("nan")}}, "finite"),
])
def test_overrides_of_the_wrong_type(tiny_model, tmp_path, capsys, override, needle):
    (tmp_path / "over.json").write_text(json.dumps(override))
    run_fails(["convert-hf", str(tiny_model), "--outfile", str(tmp_path / "x.gguf"), "--metadata",
               str(tmp_path / "over.json")], capsys, needle)


@pytest.mark.parametrize("key, item, needle", [
    ("qwen2moe.block_count", (V.STRING, "12", None), "block_count must be a non-negative integer"),
    ("qwen2moe.expert_count", (V.FLOAT32, 2.5, None), "expert_count must be a non-negative integer"),
    ("split.count", (V.ARRAY, [2, 3], V.INT32), "split.count must be a non-negative integer"),
    ("split.count", (V.INT32, -2, None), "split.count must be a non-negative integer"),
])
def test_gguf_counts_of_the_wrong_type(tmp_path, capsys, key, item, needle):
    path = tmp_path / "bad.gguf"
    write_raw_gguf(path, {"general.architecture": (V.STRING, "qwen2moe", None), key: item})
    for args in (["inspect", str(path)], ["quantize", str(path), str(tmp_path / "q.gguf"), "Q8_0"]):
        run_fails(args, capsys, needle)


def test_gguf_tensor_with_a_zero_dimension(tmp_path, capsys):
    """A valid GGUF (ggml's reader accepts it): quantize refuses it; inspect and diff show it
    (test_hardening.py)."""
    path = tmp_path / "zero.gguf"
    write_raw_gguf(path, {"general.architecture": (V.STRING, "qwen2moe", None)}, shape=(0, 32))
    run_fails(["quantize", str(path), str(tmp_path / "q.gguf"), "Q8_0"], capsys, "dimension of size 0")


def test_metadata_writer_refuses_what_llama_cpp_cannot_read():
    from gguforge.errors import UserError
    md = Metadata()
    for call in (lambda: md.f32("k", float("nan")), lambda: md.f32("k", float("inf")),
                 lambda: md.str("k", "\ud800"), lambda: md.array("k", ["ok", "\udfff"], V.STRING),
                 lambda: md.set("k", 2.5, V.UINT32), lambda: md.set("k", 2**32, V.UINT32),
                 lambda: md.array("k", [1.0, float("nan")], V.FLOAT32)):
        with pytest.raises(UserError):
            call()
    assert "k" not in md
