"""`gguforge quantize` and one-pass `convert-hf --outtype PRESET`, torch-free and without llama.cpp.

Byte equality with llama-quantize itself is in test_quantize_vs_llama.py; here: the plan output,
options, the file layout (§7.10), refusals and the one-pass path against the two-step path.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gguforge.cli import embedded_model_dir, main
from gguforge.quantize.encode import encode, native_supports
from gguforge.quantize.rules import llama_quantize_order
from gguforge.quantize.run import plan_for_gguf

N_EMBD, N_FF, N_LAYER, VOCAB = 256, 512, 4, 64
K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
needs_k_quants = pytest.mark.skipif(not all(native_supports(t) for t in K_TYPES),
                                    reason="the native extension does not support Q4_K/Q5_K/Q6_K yet")


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 values (still float32), so a bf16 file holds exactly these numbers."""
    bits = a.astype(np.float32).view(np.uint32) + 0x8000 & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def write_model(path: Path, *, tied: bool = False, weight_type: T = T.BF16, extra_kv: bool = True) -> Path:
    """A small llama-arch GGUF: bf16 matrices (or Q8_0), f32 norms and biases."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("synthetic")
    w.add_context_length(128)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    if extra_kv:
        w.add_array("tokenizer.ggml.scores", [float(i) for i in range(8)])
        w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(8)])
        w.add_bool("test.flag", True)
        w.add_uint32("split.count", 1)  # llama-quantize drops the split keys

    def matrix(name, rows, cols):
        a = bf16(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05)
        data = encode(a, weight_type)  # uint16 bits for BF16, uint8 blocks (byte shape) for Q8_0
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=weight_type)

    def vector(name, n):
        w.add_tensor(name, rng.standard_normal(n).astype(np.float32))

    matrix("token_embd.weight", VOCAB, N_EMBD)
    if not tied:
        matrix("output.weight", VOCAB, N_EMBD)
    vector("output_norm.weight", N_EMBD)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", N_EMBD)
        vector(p + "ffn_norm.weight", N_EMBD)
        vector(p + "attn_q.bias", N_EMBD)
        matrix(p + "attn_q.weight", N_EMBD, N_EMBD)
        matrix(p + "attn_k.weight", 128, N_EMBD)
        matrix(p + "attn_v.weight", 128, N_EMBD)
        matrix(p + "attn_output.weight", N_EMBD, N_EMBD)
        matrix(p + "ffn_gate.weight", N_FF, N_EMBD)
        matrix(p + "ffn_up.weight", N_FF, N_EMBD)
        matrix(p + "ffn_down.weight", N_EMBD, N_FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("quant") / "model-bf16.gguf")


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def same_bytes(a, b) -> bool:
    """Plain bool, so a failing assert does not make pytest diff megabytes."""
    return bytes(a) == bytes(b)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


# -- plan / dry run ------------------------------------------------------------------------------


def test_dry_run_prints_plan_and_writes_nothing(model, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    code, stdout, _ = run(capsys, "quantize", model, out, "q8_0", "--dry-run")
    assert code == 0 and not out.exists()
    lines = stdout.strip().splitlines()
    plans = plan_for_gguf(str(model), "Q8_0")
    assert len(lines) == len(plans) + 1
    assert [line.split()[0] for line in lines[:-1]] == [p.name for p in plans]
    embd = next(line for line in lines if line.startswith("token_embd.weight"))
    assert "256x64" in embd and "BF16 -> Q8_0" in embd and f"{VOCAB * N_EMBD // 32 * 34:,d}" in embd
    norm = next(line for line in lines if line.startswith("output_norm.weight"))
    assert "F32 -> F32" in norm and "never quantized" in norm
    assert "bits per weight" in lines[-1] and "dry run" in lines[-1] and "8.5" in lines[-1]


@needs_k_quants
def test_dry_run_q4_k_m_reasons(model, tmp_path, capsys):
    code, stdout, _ = run(capsys, "quantize", model, tmp_path / "x.gguf", "Q4_K_M", "--dry-run")
    assert code == 0
    by_name = {line.split()[0]: line for line in stdout.splitlines()[:-1]}
    assert "-> Q6_K" in by_name["output.weight"]
    # 4 layers: use_more_bits picks layers 2 and 3
    assert "-> Q6_K" in by_name["blk.3.attn_v.weight"] and "use_more_bits" in by_name["blk.3.attn_v.weight"]
    assert "-> Q4_K" in by_name["blk.1.attn_v.weight"]


# -- the written file ----------------------------------------------------------------------------


def test_q8_0_file_layout_and_data(model, tmp_path, capsys):
    out = tmp_path / "q8.gguf"
    code, _, err = run(capsys, "quantize", model, out, "Q8_0", "--quiet")
    assert code == 0 and err == ""
    reader = gguf.GGUFReader(out)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    source_keys = [k for k in gguf.GGUFReader(model).fields if not k.startswith("GGUF.")]
    # input KVs in input order, split keys dropped, quantization_version then file_type last
    expected = [k for k in source_keys if k not in ("split.count", "general.file_type",
                                                    "general.quantization_version")]
    assert keys == expected + ["general.quantization_version", "general.file_type"]
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert reader.get_field("tokenizer.ggml.tokens").contents() == [f"tok{i}" for i in range(8)]
    assert reader.get_field("test.flag").contents() is True
    assert reader.alignment == 32

    src = tensors(model)
    names = [t.name for t in reader.tensors]
    assert names == llama_quantize_order(src)
    for t in reader.tensors:
        s = src[t.name]
        if s.tensor_type == T.F32:  # kept: copied byte for byte
            assert t.tensor_type == T.F32 and same_bytes(t.data.tobytes(), s.data.tobytes()), t.name
        else:
            assert t.tensor_type == T.Q8_0
            values = (s.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            assert same_bytes(t.data.tobytes(), encode(values, T.Q8_0).tobytes()), t.name


def test_float_presets_keep_f32_tensors(model, tmp_path, capsys):
    out = tmp_path / "f16.gguf"
    assert run(capsys, "quantize", model, out, "f16", "-q")[0] == 0
    types = {n: t.tensor_type for n, t in tensors(out).items()}
    assert types["output_norm.weight"] == T.F32 and types["blk.0.attn_q.bias"] == T.F32
    assert types["blk.0.ffn_down.weight"] == T.F16
    assert gguf.GGUFReader(out).get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_F16)


def test_thread_count_does_not_change_bytes(model, tmp_path, capsys):
    one, three = tmp_path / "t1.gguf", tmp_path / "t3.gguf"
    assert run(capsys, "quantize", model, one, "Q8_0", "-q", "--threads", "1")[0] == 0
    assert run(capsys, "quantize", model, three, "Q8_0", "-q", "--threads", "3")[0] == 0
    assert same_bytes(one.read_bytes(), three.read_bytes())


# -- options -------------------------------------------------------------------------------------


def dry_types(capsys, model, preset, *options) -> dict[str, str]:
    code, stdout, err = run(capsys, "quantize", model, "unused.gguf", preset, "--dry-run", *options)
    assert code == 0, err
    return {line.split()[0]: line.split()[4] for line in stdout.splitlines()[:-1]}


@needs_k_quants
def test_options_change_the_plan(model, capsys):
    base = dry_types(capsys, model, "Q4_K_M")
    assert base["output.weight"] == "Q6_K" and base["token_embd.weight"] == "Q4_K"
    assert base["blk.2.ffn_down.weight"] == "Q6_K"

    pure = dry_types(capsys, model, "Q4_K_M", "--pure")
    assert pure["blk.2.ffn_down.weight"] == "Q4_K" and pure["blk.2.attn_v.weight"] == "Q4_K"

    typed = dry_types(capsys, model, "Q4_K_M", "--output-tensor-type", "q8_0", "--token-embedding-type", "F16")
    assert typed["output.weight"] == "Q8_0" and typed["token_embd.weight"] == "F16"

    assert dry_types(capsys, model, "Q4_K_M", "--leave-output-tensor")["output.weight"] == "BF16"

    over = dry_types(capsys, model, "Q4_K_M", "--tensor-type", "attn_v=q8_0", "--tensor-type", "FFN_.*=q5_k")
    assert over["blk.1.attn_v.weight"] == "Q8_0" and over["blk.3.ffn_up.weight"] == "Q5_K"
    assert over["blk.0.attn_q.weight"] == "Q4_K"


@needs_k_quants
def test_written_types_follow_options(model, tmp_path, capsys):
    out = tmp_path / "over.gguf"
    assert run(capsys, "quantize", model, out, "Q4_K_S", "-q", "--tensor-type", "ffn_gate=q8_0")[0] == 0
    types = {n: t.tensor_type for n, t in tensors(out).items()}
    assert types["blk.2.ffn_gate.weight"] == T.Q8_0 and types["blk.2.ffn_up.weight"] == T.Q4_K


def test_no_fallback_refuses_partial_blocks(tmp_path, capsys):
    # the embedded tiny model has 64-wide rows: Q4_K (256 blocks) would fall back
    src = tmp_path / "tiny.gguf"
    assert main(["convert-hf", str(embedded_model_dir()), "--outfile", str(src), "--outtype", "bf16", "-q"]) == 0
    code, _, err = run(capsys, "quantize", src, tmp_path / "o.gguf", "Q4_K_M", "--no-fallback")
    assert code == 2 and "fall back" in err.splitlines()[0]
    assert not (tmp_path / "o.gguf").exists()


# -- requantization ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("q8") / "model-q8.gguf", weight_type=T.Q8_0)


def test_requantize_needs_flag(q8_model, tmp_path, capsys):
    out = tmp_path / "re.gguf"
    code, _, err = run(capsys, "quantize", q8_model, out, "F16")
    assert code == 2 and err.startswith("error: requantizing from type Q8_0 is disabled")
    assert "--allow-requantize" in err and not out.exists() and leftovers(tmp_path) == []

    assert run(capsys, "quantize", q8_model, out, "F16", "-q", "--allow-requantize")[0] == 0
    src, dst = tensors(q8_model), tensors(out)
    want = gguf.quants.dequantize(src["blk.0.attn_q.weight"].data, T.Q8_0).astype(np.float16)
    assert same_bytes(dst["blk.0.attn_q.weight"].data.tobytes(), want.tobytes())


def test_same_type_is_copied_without_requantize(q8_model, tmp_path, capsys):
    out = tmp_path / "same.gguf"
    assert run(capsys, "quantize", q8_model, out, "Q8_0", "-q")[0] == 0
    src = tensors(q8_model)
    for name, t in tensors(out).items():
        assert same_bytes(t.data.tobytes(), src[name].data.tobytes()), name


# -- refusals ------------------------------------------------------------------------------------


def assert_refused(capsys, directory: Path, args, *message: str, out: Path | None = None) -> str:
    code, stdout, err = run(capsys, "quantize", *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[0].startswith("error: ") and len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint: "))
    for text in message:
        assert text in err
    assert "Traceback" not in err and stdout == ""
    if out is not None:
        assert not out.exists()
    assert leftovers(directory) == []
    return err


def test_unknown_type_lists_valid_names(model, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    err = assert_refused(capsys, tmp_path, (model, out, "Q3_K_XL"), "unknown quantization type", out=out)
    for name in ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "F16", "BF16", "F32"):
        assert name in err
    assert_refused(capsys, tmp_path, (model, out, "Q4_K_M", "--output-tensor-type", "q9"), "unknown ggml type")
    assert_refused(capsys, tmp_path, (model, out, "Q4_K_M", "--tensor-type", "attn_v"), "REGEX=TYPE")


def test_output_equal_to_input_is_refused(model, capsys, tmp_path):
    before = model.read_bytes()
    assert_refused(capsys, model.parent, (model, model, "Q8_0", "--force"), "is the input file")
    link = tmp_path / "link.gguf"
    link.symlink_to(model)
    assert_refused(capsys, tmp_path, (model, link, "Q8_0", "--force"), "is the input file")
    assert same_bytes(model.read_bytes(), before)


def test_existing_output_needs_force(model, tmp_path, capsys):
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    assert_refused(capsys, tmp_path, (model, out, "Q8_0"), "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert run(capsys, "quantize", model, out, "Q8_0", "-q", "--force")[0] == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_missing_and_non_gguf_input(tmp_path, capsys):
    out = tmp_path / "o.gguf"
    assert_refused(capsys, tmp_path, (tmp_path / "nope.gguf", out, "Q8_0"), "no such file", out=out)
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model\n")
    assert_refused(capsys, tmp_path, (text, out, "Q8_0"), "not a GGUF file", out=out)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_refused(capsys, tmp_path, (empty, out, "Q8_0"), "not a GGUF file", out=out)


def corrupt(model: Path, tmp_path: Path, name: str, edit) -> Path:
    data = bytearray(model.read_bytes())
    data = edit(data) or data
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def test_truncated_and_corrupt_gguf(model, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    size = model.stat().st_size
    reader = gguf.GGUFReader(model)
    first = reader.tensors[0]
    type_offset = first.field.offset + sum(p.nbytes for p in first.field.parts[:4])

    def set_u32(offset, value):
        return lambda d: d.__setitem__(slice(offset, offset + 4), struct.pack("<I", value))

    cases = {
        "header_cut.gguf": (lambda d: d[:60], "truncated or corrupt"),
        "data_cut.gguf": (lambda d: d[:size - 1000], "truncated"),
        "version.gguf": (set_u32(4, 99), "unsupported GGUF version 99"),
        "type.gguf": (set_u32(type_offset, 250), "unknown tensor type id 250"),
    }
    for name, (edit, message) in cases.items():
        bad = corrupt(model, tmp_path, name, edit)
        assert_refused(capsys, tmp_path, (bad, out, "Q8_0"), message, out=out)


def test_nonfinite_input_is_refused(tmp_path, capsys):
    path = tmp_path / "nan.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    a = np.ones((4, 64), np.float32)
    a[2, 5] = np.nan
    w.add_tensor("blk.0.attn_q.weight", a)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out = tmp_path / "o.gguf"
    assert_refused(capsys, tmp_path, (path, out, "Q8_0"), "blk.0.attn_q.weight", "NaN", out=out)


# -- one pass: convert-hf --outtype PRESET ---------------------------------------------------------


def one_pass_presets():
    k = [pytest.param(p, marks=needs_k_quants) for p in ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K")]
    # the embedded model's 64-wide rows fall back to Q5_0/Q5_1/Q8_0, which the native extension encodes
    return ["Q8_0", *k]


@pytest.mark.parametrize("preset", one_pass_presets())
def test_one_pass_equals_two_steps(preset, tmp_path, capsys):
    if preset != "Q8_0" and not all(native_supports(t) for t in (T.Q5_0, T.Q5_1)):
        pytest.skip("the native extension does not support Q5_0/Q5_1 yet")
    model = str(embedded_model_dir())
    bf16_file = tmp_path / "bf16.gguf"
    assert main(["convert-hf", model, "--outfile", str(bf16_file), "--outtype", "bf16", "-q"]) == 0
    two = tmp_path / "two.gguf"
    assert run(capsys, "quantize", bf16_file, two, preset, "-q")[0] == 0
    assert main(["convert-hf", model, "--outfile", str(tmp_path), "--outtype", preset.lower(), "-q"]) == 0
    one = tmp_path / f"tiny-qwen2moe-4x128K-{preset}.gguf"  # the preset names the file
    assert one.exists(), sorted(p.name for p in tmp_path.iterdir())
    a, b = tensors(one), tensors(two)
    # convert-hf keeps the converter's tensor order for every outtype; quantize keeps llama-quantize's
    assert list(a) == list(tensors(bf16_file))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert same_bytes(a[name].data.tobytes(), b[name].data.tobytes()), name
    ft = gguf.GGUFReader(one).get_field("general.file_type").contents()
    assert ft == gguf.GGUFReader(two).get_field("general.file_type").contents()
