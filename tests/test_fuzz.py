"""Fuzzing: corrupt safetensors and GGUF headers never cause anything but success or a UserError.

Each example mutates a tiny valid file (byte flips, truncation, length and count fields, JSON
edits) and runs the command in-process through gguforge.cli.main: the exit code must be 0 (the
mutation was harmless) or 2 (a clear error), never 70 (internal error), a crash or a hang, and no
temp file may be left behind.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from gguforge.cli import main  # noqa: E402
from gguforge.errors import EXIT_BAD_INPUT  # noqa: E402

from helpers import qwen2moe_tensors, tiny_qwen2moe_config, write_checkpoint  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OK_CODES = (0, EXIT_BAD_INPUT)

TINY = tiny_qwen2moe_config()

# Values a JSON edit may put into a header field: plausible, wrong-typed and huge ones.
JSON_VALUES = st.one_of(
    st.integers(min_value=-2, max_value=2**64 + 1), st.sampled_from(["F32", "BF16", "F16", "I32", "F8_E4M3", "", "F64"]),
    st.none(), st.booleans(), st.floats(allow_nan=True),
    st.lists(st.integers(min_value=-1, max_value=2**63), max_size=5), st.lists(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("fuzz") / "model", TINY, qwen2moe_tensors(TINY))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf"
    assert main(["convert-hf", str(tiny_model), "--outfile", str(path), "--outtype", "f16", "-q"]) == 0
    return path


def no_temp_files(directory: Path) -> bool:
    return not any(p.name.endswith(".part") for p in directory.iterdir())


# -- safetensors --------------------------------------------------------------------------------------


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# Mutations are drawn as small descriptions and applied by plain functions, so a failing example
# prints as e.g. ("u64", 1234, 2**60) rather than as the whole file.

def safetensors_mutations(header_end: int, size: int, names: list[str]):
    flips = st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=8)
    return st.one_of(
        st.tuples(st.just("flip"), flips),
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("length"), st.one_of(st.integers(0, header_end + 64), st.integers(0, 2**64 - 1))),
        st.tuples(st.just("json"), st.sampled_from(names), st.sampled_from(["dtype", "shape", "data_offsets"]),
                  JSON_VALUES),
        st.tuples(st.just("entry"), st.sampled_from(names), JSON_VALUES),
        st.tuples(st.just("rename"), st.sampled_from(names), st.text(max_size=12)),
    )


def apply_safetensors(raw: bytes, mutation) -> bytes:
    kind, *args = mutation
    header, data = split_safetensors(raw)
    if kind == "flip":
        out = bytearray(raw)
        for offset, value in args[0]:
            out[offset] = value
        return bytes(out)
    if kind == "truncate":
        return raw[:args[0]]
    if kind == "length":
        return struct.pack("<Q", args[0]) + raw[8:]
    if kind == "json":
        name, field, value = args
        header[name][field] = value
    elif kind == "entry":
        header[args[0]] = args[1]
    else:
        header[args[1]] = header.pop(args[0])
    return join_safetensors(header, data)



def tiny_safetensors_facts(path: Path) -> tuple[int, int, list[str]]:
    raw = path.read_bytes()
    header, _ = split_safetensors(raw)
    return 8 + struct.unpack("<Q", raw[:8])[0], len(raw), sorted(k for k in header if k != "__metadata__")


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(tiny_model, tmp_path, data):
    source = tiny_model / "model.safetensors"
    mutation = data.draw(safetensors_mutations(*tiny_safetensors_facts(source)), label="mutation")
    mutated = apply_safetensors(source.read_bytes(), mutation)
    model = tmp_path / "m"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").write_bytes(mutated)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    code = main(["convert-hf", str(model), "--outfile", str(out / "x.gguf"), "--force", "-q", "-t", "1"])
    assert code in OK_CODES
    assert no_temp_files(out)
    assert (model / "model.safetensors").read_bytes() == mutated  # the input is never touched


# -- GGUF ---------------------------------------------------------------------------------------------

HEAD = 2048  # the header region mutated: metadata, the start of the vocabulary


def gguf_mutations(size: int):
    head = min(size, HEAD)
    flips = st.lists(st.tuples(st.integers(4, head - 1), st.integers(0, 255)), min_size=1, max_size=8)
    wild = st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1), st.sampled_from([2**60, 2**63]))
    return st.one_of(
        st.tuples(st.just("flip"), flips),
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("u64"), st.integers(4, head - 8), wild),  # a length or count field somewhere
        st.tuples(st.just("version"), st.integers(0, 2**32 - 1)),
        st.tuples(st.just("tensor_count"), wild),
        st.tuples(st.just("kv_count"), wild),
    )


def apply_gguf(raw: bytes, mutation) -> bytes:
    kind, *args = mutation
    out = bytearray(raw)
    if kind == "flip":
        for offset, value in args[0]:
            out[offset] = value
    elif kind == "truncate":
        return raw[:args[0]]
    elif kind == "u64":
        out[args[0]:args[0] + 8] = struct.pack("<Q", args[1])
    elif kind == "version":
        out[4:8] = struct.pack("<I", args[0])
    else:
        offset = 8 if kind == "tensor_count" else 16
        out[offset:offset + 8] = struct.pack("<Q", args[0])
    return bytes(out)


@FUZZ
@given(data=st.data())
def test_fuzz_gguf_header(tiny_gguf, tmp_path, data):
    raw = tiny_gguf.read_bytes()
    mutated = apply_gguf(raw, data.draw(gguf_mutations(len(raw)), label="mutation"))
    path = tmp_path / "in.gguf"
    path.write_bytes(mutated)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    assert main(["inspect", str(path)]) in OK_CODES
    assert main(["quantize", str(path), str(out / "q.gguf"), "Q8_0", "--force", "-q", "-t", "1"]) in OK_CODES
    assert no_temp_files(out)
    assert path.read_bytes() == mutated


@pytest.mark.parametrize("offset, value", [(8, 2**60), (16, 2**60), (8, 2**64 - 1), (16, 2**63)])
def test_huge_counts_are_rejected(tiny_gguf, tmp_path, capsys, offset, value):
    raw = bytearray(tiny_gguf.read_bytes())
    raw[offset:offset + 8] = struct.pack("<Q", value)
    path = tmp_path / "huge.gguf"
    path.write_bytes(bytes(raw))
    assert main(["inspect", str(path)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("error: ")


def test_regressions_found_by_fuzzing(tiny_model, tiny_gguf, tmp_path, capsys):
    """Each of these was an internal error before: now one clear line."""
    raw = (tiny_model / "model.safetensors").read_bytes()
    name = tiny_safetensors_facts(tiny_model / "model.safetensors")[2][0]
    cases = {
        "dtype is a list": ("json", name, "dtype", ["F32"]),
        "shape product past 2**64": ("json", name, "shape", [2**32, 2**32]),
    }
    for why, mutation in cases.items():
        model = tmp_path / why.replace(" ", "-")
        shutil.copytree(tiny_model, model)
        (model / "model.safetensors").write_bytes(apply_safetensors(raw, mutation))
        assert main(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf"), "-q"]) == EXIT_BAD_INPUT, why
        assert capsys.readouterr().err.startswith("error: ")
    # A metadata string that is not UTF-8 (GGUFReader decodes strings lazily, on first use).
    data = tiny_gguf.read_bytes()
    at = data.index(b"qwen2moe", 40)  # the general.architecture value
    path = tmp_path / "bad-utf8.gguf"
    path.write_bytes(data[:at] + b"\x80" + data[at + 1:])
    for args in (["inspect", str(path)], ["quantize", str(path), str(tmp_path / "q.gguf"), "Q8_0", "-q"]):
        assert main(args) == EXIT_BAD_INPUT
        assert "not valid UTF-8" in capsys.readouterr().err


@FUZZ
@given(key=st.sampled_from(sorted(TINY)), value=JSON_VALUES)
def test_fuzz_config_values(tiny_model, tmp_path, key, value):
    model = tmp_path / "m"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text(json.dumps({**TINY, key: value}))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    code = main(["convert-hf", str(model), "--outfile", str(out / "x.gguf"), "--force", "-q", "-t", "1"])
    assert code in OK_CODES
    assert no_temp_files(out)
