"""Exactness of one-pass output (issue: quantize the checkpoint's own values, in the reference's order).

The mocks here hold full-precision float32 values (not representable in bf16/f16) or are stored as
float16, so any rounding through a 16-bit type on the way to a quantized type changes bytes.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gguforge.cli import main

from helpers import llama_quantize, run_reference_converter

pytest.importorskip("torch")

# (arch, checkpoint dtype, full-precision values, outtypes)
CASES = [
    ("qwen2moe", "float32", True, ("q8_0", "f16", "bf16")),
    ("qwen2moe", "float16", False, ("q8_0", "f32")),
    ("qwen2moe", "bfloat16", False, ("q8_0",)),
    ("qwen35", "float32", True, ("q8_0", "bf16")),
    ("qwen35moe", "float16", False, ("q8_0",)),
    ("qwen3next", "float32", True, ("q8_0",)),
]



def test_full_precision_mock_is_not_bf16_exact(mock_model):
    """The test data can expose double rounding: its values change when rounded through bf16 or f16."""
    from safetensors.numpy import load_file
    model = mock_model("qwen2moe", full_precision=True)
    w = load_file(str(model / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == np.float32
    bf16 = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)
    assert np.mean(w != bf16) > 0.9 and np.mean(w != w.astype(np.float16).astype(np.float32)) > 0.9


@pytest.mark.parametrize("arch,dtype,full,outtypes", CASES, ids=[f"{a}-{d}" for a, d, _, _ in CASES])
def test_whole_file_equals_reference_converter(tree, mock_model, tmp_path, arch, dtype, full, outtypes):
    """Same bytes as llama.cpp's convert_hf_to_gguf.py, the whole file: metadata, order, data."""
    model = mock_model(arch, dtype=dtype, full_precision=full)
    pre = "qwen35" if arch.startswith("qwen35") else "qwen2"
    extra = ["--no-mtp"] if arch != "qwen2moe" else []
    for outtype in outtypes:
        ours, ref = tmp_path / f"ours-{outtype}.gguf", tmp_path / f"ref-{outtype}.gguf"
        assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", outtype, "--quiet"]) == 0
        r = run_reference_converter(tree, model, ref, outtype, pre, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors], outtype
        rounded_differently = []
        for x, y in zip(a.tensors, b.tensors):
            assert x.tensor_type == y.tensor_type, (outtype, x.name)
            if x.name.endswith("ssm_a") and x.data.tobytes() != y.data.tobytes():
                check_ssm_a(model, x, y)
                rounded_differently.append(x.name)
                continue
            assert x.data.tobytes() == y.data.tobytes(), (outtype, x.name)
        assert list(a.fields) == list(b.fields), outtype
        for key in b.fields:
            assert a.fields[key].contents() == b.fields[key].contents(), (outtype, key)
        if not rounded_differently:
            assert ours.read_bytes() == ref.read_bytes(), outtype


def check_ssm_a(model, ours, ref) -> None:
    """The one deliberate difference: ssm_a = -exp(A_log) is correctly rounded here, while the reference
    uses torch's float32 exp, which is within 1 ulp. On full-precision float32 A_log they can differ."""
    from safetensors.numpy import load_file
    a, b = ours.data.astype(np.float32), ref.data.astype(np.float32)
    assert np.all(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32)) <= 1), ours.name
    layer = ours.name.split(".")[1]
    a_log = load_file(str(model / "model.safetensors"))[f"model.layers.{layer}.linear_attn.A_log"]
    exact = (-np.exp(a_log.astype(np.float64))).astype(np.float32)
    assert sorted(a.tolist()) == sorted(exact.tolist()), ours.name  # (V heads are reordered for qwen35)


# -- one-pass presets: the checkpoint's own float type is what llama-quantize would be given ----------

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module", autouse=True)
def _quiet(quiet_llama):
    yield



def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("arch,dtype,base", [("qwen35", "float32", "f32"), ("qwen2moe", "float16", "f16"),
                                             ("qwen35moe", "float32", "f32")])  # [1, n] shexp gates
@pytest.mark.parametrize("preset", ["Q4_K_M", "Q6_K"])
def test_one_pass_preset_quantizes_the_stored_values(mock_model, tmp_path, arch, dtype, base, preset):
    """From an f32 checkpoint a preset equals llama-quantize of the F32 GGUF (from f16: of the F16 GGUF),
    and differs from llama-quantize of a 16-bit rounding of it (so the comparison can fail)."""
    model = mock_model(arch, dtype=dtype, size="q256", full_precision=True)
    float_file, via_bf16 = tmp_path / f"{base}.gguf", tmp_path / "bf16.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(float_file), "--outtype", base, "-q"]) == 0
    ref, rounded = tmp_path / "ref.gguf", tmp_path / "rounded.gguf"
    llama_quantize(float_file, ref, preset)
    ours = tmp_path / "ours.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", preset, "-q"]) == 0
    a, b = tensors(ours), tensors(ref)
    assert sorted(a) == sorted(b)
    assert list(a) == list(tensors(float_file))  # the converter's order
    for name in b:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert list(a[name].shape) == list(b[name].shape), name  # llama-quantize writes [1, n] as [n]
        assert a[name].data.tobytes() == b[name].data.tobytes(), name
    assert main(["convert-hf", str(model), "--outfile", str(via_bf16), "--outtype", "bf16", "-q"]) == 0
    llama_quantize(via_bf16, rounded, preset)
    c = tensors(rounded)
    differ = [n for n in b if b[n].tensor_type not in (T.F32,) and b[n].data.tobytes() != c[n].data.tobytes()]
    assert differ, "a 16-bit rounding gives the same bytes: this test could not see double rounding"
