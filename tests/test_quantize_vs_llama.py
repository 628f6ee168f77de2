"""`gguforge quantize` and one-pass `convert-hf --outtype PRESET` against llama.cpp's own quantizer.

Mocks (q256 dimensions, bf16) are converted to a bf16 GGUF by gguforge; then for every preset
llama-cpp-python's llama_model_quantize and `gguforge quantize` must give the same tensor types
and bytes (tensor by tensor, then the metadata), and `convert-hf --outtype PRESET` straight from
the checkpoint must give the same tensors as llama-quantize of the bf16 file.
"""

from __future__ import annotations

import gguf
import pytest
from gguf import GGMLQuantizationType as T

from gguforge.cli import main
from gguforge.quantize.encode import native_supports
from gguforge.quantize.presets import parse_preset

from helpers import llama_quantize

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("torch")  # the mocks are built with transformers

K_PRESETS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0")
LADDER = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q2_K")  # issue 13
PRESETS = K_PRESETS + LADDER
NEEDED_TYPES = {  # what each preset can write on the mocks (incl. shape fallbacks)
    "Q8_0": (T.Q8_0,),
    **{p: (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q5_0, T.Q5_1) for p in K_PRESETS if p != "Q8_0"},
    **{p: (parse_preset(p).default_type, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.IQ4_NL, T.Q5_0, T.Q5_1)
       for p in LADDER},
}


def mock_archs():
    from gguforge.archs import registered
    archs = {cls.gguf_arch for cls in registered().values()}
    dense = pytest.param(("qwen35", 0), id="qwen35", marks=pytest.mark.skipif(
        "qwen35" not in archs, reason="no qwen35 architecture class yet"))
    return [dense, pytest.param(("qwen2moe", 8), id="qwen2moe-8experts")]


def skip_without_native(preset: str) -> None:
    missing = [t.name for t in NEEDED_TYPES[preset] if not native_supports(t)]
    if missing:
        pytest.skip(f"the native quantizer does not support {', '.join(missing)} yet")


@pytest.fixture(scope="module", params=mock_archs())
def bf16_model(request, mock_model, tmp_path_factory):
    """(checkpoint dir, our bf16 GGUF of it)."""
    arch, n_experts = request.param
    kw = {"num_experts": n_experts} if n_experts else {}
    src = mock_model(arch, dtype="bfloat16", size="q256", **kw)
    out = tmp_path_factory.mktemp(f"vs-llama-{arch}") / "model-bf16.gguf"
    assert main(["convert-hf", str(src), "--outfile", str(out), "--outtype", "bf16", "-q"]) == 0
    return src, out


@pytest.fixture(scope="module", autouse=True)
def _quiet(quiet_llama):
    yield



def ne(tensor) -> list[int]:
    """ggml_n_dims dimensions: the converter may write {n, 1} where llama-quantize writes {n}."""
    dims = tensor.shape.tolist()
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return dims


def assert_same_tensors(ours, theirs, same_order: bool = True) -> None:
    a, b = gguf.GGUFReader(ours).tensors, gguf.GGUFReader(theirs).tensors
    if same_order:
        assert [t.name for t in a] == [t.name for t in b]
    by_name = {t.name: t for t in b}
    assert sorted(t.name for t in a) == sorted(by_name)
    for t in a:
        ref = by_name[t.name]
        assert T(t.tensor_type) == T(ref.tensor_type), t.name
        assert ne(t) == ref.shape.tolist(), t.name
        same = t.data.tobytes() == ref.data.tobytes()  # a bool: pytest would diff megabytes
        assert same, f"{t.name}: bytes differ ({T(t.tensor_type).name})"


def metadata(path) -> list:
    fields = gguf.GGUFReader(path).fields
    return [(k, f.types, f.contents()) for k, f in fields.items()]


@pytest.mark.parametrize("preset", PRESETS)
def test_quantize_matches_llama_quantize(bf16_model, preset, tmp_path):
    skip_without_native(preset)
    _, src = bf16_model
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    assert main(["quantize", str(src), str(ours), preset, "-q", "--threads", "2"]) == 0
    llama_quantize(src, theirs, preset)
    assert_same_tensors(ours, theirs)
    assert metadata(ours) == metadata(theirs)
    same_file = ours.read_bytes() == theirs.read_bytes()
    assert same_file, "tensors and metadata agree, yet the files differ (padding or layout)"


@pytest.mark.parametrize("preset", PRESETS)
def test_one_pass_convert_matches_llama_quantize(bf16_model, preset, tmp_path):
    skip_without_native(preset)
    checkpoint, src = bf16_model
    ours, theirs = tmp_path / "one-pass.gguf", tmp_path / "llama.gguf"
    assert main(["convert-hf", str(checkpoint), "--outfile", str(ours), "--outtype", preset.lower(), "-q"]) == 0
    llama_quantize(src, theirs, preset)
    assert_same_tensors(ours, theirs, same_order=False)
    file_type = gguf.GGUFReader(ours).get_field("general.file_type").contents()
    assert file_type == int(parse_preset(preset).file_type)


@pytest.mark.parametrize("option,params", [
    (["--pure"], {"pure": True}),
    (["--leave-output-tensor"], {"quantize_output_tensor": False}),
    (["--output-tensor-type", "q8_0", "--token-embedding-type", "q5_k"],
     {"output_tensor_type": int(T.Q8_0), "token_embedding_type": int(T.Q5_K)}),
])
def test_options_match_llama_quantize(bf16_model, option, params, tmp_path):
    skip_without_native("Q4_K_M")
    _, src = bf16_model
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    assert main(["quantize", str(src), str(ours), "Q4_K_M", "-q", *option]) == 0
    llama_quantize(src, theirs, "Q4_K_M", **params)
    assert_same_tensors(ours, theirs)
