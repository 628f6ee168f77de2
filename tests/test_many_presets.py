"""Many presets in one pass (issue 13, item 4).

`quantize IN OUT_{ftype}.gguf Q4_K_M,Q6_K,...` and `convert-hf --outtype Q4_K_M,Q6_K,...` read every
source tensor once and write every output; each output must equal its own separate run byte for byte
(dense and MoE mocks, split outputs too); all outputs appear together or none does; a bad list is
refused before anything is written.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from gguforge.cli import main
from gguforge.format import atomic

from helpers import gguforge, qwen2moe_config, qwen2moe_tensors, small_row_chunks, write_checkpoint

PRESETS = ["Q4_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "Q3_K_M", "IQ4_XS", "F16"]


# qwen35: a hybrid with computed tensors (ssm_a = -exp(A_log), 1 + norm weights) and reordered V heads.
@pytest.fixture(scope="module", params=[("qwen3", 0), ("qwen2moe", 8), ("qwen35", 0)],
                ids=["dense", "moe-8experts", "hybrid-qwen35"])
def checkpoint(request, mock_model):
    pytest.importorskip("torch")  # the mocks are built with transformers
    arch, experts = request.param
    kw = {"num_experts": experts} if experts else {}
    return mock_model(arch, dtype="bfloat16", size="q256", num_hidden_layers=4, **kw)


@pytest.fixture(scope="module")
def bf16(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("many-src") / "model-bf16.gguf"
    assert main(["convert-hf", str(checkpoint), "--outfile", str(out), "--outtype", "bf16", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A torch-free bf16 GGUF (the tiny qwen2moe config) for the refusal and interruption tests."""
    root = tmp_path_factory.mktemp("many-small")
    config = qwen2moe_config()
    model = write_checkpoint(root / "model", config, qwen2moe_tensors(config), bf16=True)
    out = root / "small-bf16.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", "bf16", "-q"]) == 0
    return out


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------------------------------
# quantize


SMALL_CHUNKS = "small-chunks"  # the one pass in row chunks of 3 KB (mock tensors span many), the separate runs not


@pytest.mark.parametrize("split", [[], ["--split-max-size", "300K"], SMALL_CHUNKS],
                         ids=["single-file", "split", SMALL_CHUNKS])
def test_quantize_many_equals_separate_runs(bf16, tmp_path, monkeypatch, split):
    one, sep = tmp_path / "one-pass", tmp_path / "separate"
    one.mkdir(), sep.mkdir()
    small, split = split == SMALL_CHUNKS, [] if split == SMALL_CHUNKS else split
    with monkeypatch.context() as m:
        if small:
            small_row_chunks(m, 3 << 10)
        assert main(["quantize", str(bf16), str(one / "m-{FTYPE}.gguf"), ",".join(PRESETS), "-q", "-t", "2",
                     *split]) == 0
    for preset in PRESETS:
        assert main(["quantize", str(bf16), str(sep / f"m-{preset}.gguf"), preset, "-q", "-t", "2", *split]) == 0
    ours, theirs = files(one), files(sep)
    assert sorted(ours) == sorted(theirs)
    if split:
        assert any("-00002-of-" in name for name in ours)
    for name in theirs:
        same = ours[name] == theirs[name]
        assert same, f"{name}: the one-pass output differs from the separate run"


def test_quantize_many_lower_case_template_and_dry_run(small, tmp_path):
    r = gguforge("quantize", str(small), str(tmp_path / "x-{ftype}.gguf"), "q8_0,Q4_K", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "Q8_0 -> " in r.stdout and "Q4_K_M -> " in r.stdout
    assert os.listdir(tmp_path) == []
    assert main(["quantize", str(small), str(tmp_path / "x-{ftype}.gguf"), "q8_0,Q4_K", "-q"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["x-q4_k_m.gguf", "x-q8_0.gguf"]


@pytest.mark.parametrize("out,types,message", [
    ("x.gguf", "Q4_K_M,Q8_0", "need an output name with {ftype}"),
    ("x-{ftype}.gguf", "Q4_K_M,Q9_9", "unknown quantization type 'Q9_9'"),
    ("x-{ftype}.gguf", "Q4_K_M,,Q8_0", "empty entry"),
    ("x-{ftype}.gguf", "Q4_K_M,", "empty entry"),
    ("x-{ftype}.gguf", "Q4_K,Q4_K_M", "names Q4_K_M twice"),
    ("x-{ftype}.gguf", "Q8_0,7", "names Q8_0 twice"),
    ("x-{ftype}.gguf", "Q4_K_M,IQ2_XS", "cannot write IQ2_XS"),
    ("x-{ftype}.gguf", "Q8_0,Q4_K_M", "already exists"),
])
def test_quantize_bad_list_refused_before_writing(small, tmp_path, out, types, message):
    if message == "already exists":
        (tmp_path / "x-q4_k_m.gguf").write_bytes(b"keep me")
    before = files(tmp_path)
    r = gguforge("quantize", str(small), str(tmp_path / out), types)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr.splitlines()[0], r.stderr
    assert files(tmp_path) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_quantize_many_interrupted_leaves_nothing(small, tmp_path, monkeypatch, capsys, sig):
    import gguforge.format.writer as writer
    original, calls = writer._write_chunk, []

    def write_then_signal(f, data):
        calls.append(1)
        if len(calls) == 30:
            os.kill(os.getpid(), sig)
        return original(f, data)
    monkeypatch.setattr(writer, "_write_chunk", write_then_signal)
    code = main(["quantize", str(small), str(tmp_path / "x-{ftype}.gguf"), "Q4_K_M,Q6_K,Q8_0", "-q", "-t", "1"])
    assert code == 128 + sig and len(calls) >= 30
    assert os.listdir(tmp_path) == []


def test_quantize_many_failed_move_takes_back_the_others(small, tmp_path, monkeypatch, capsys):
    original = atomic.place

    def fail_on_q6(temp, target, expected):
        if "q6_k" in target.name:
            raise OSError(5, "Input/output error", str(target))
        original(temp, target, expected)
    monkeypatch.setattr(atomic, "place", fail_on_q6)
    code = main(["quantize", str(small), str(tmp_path / "x-{ftype}.gguf"), "Q4_K_M,Q6_K,Q8_0", "-q"])
    assert code == 2
    assert "cannot write" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# convert-hf

CONVERT_TYPES = ["Q4_K_M", "Q6_K", "Q8_0", "bf16", "f16", "Q4_0", "IQ4_NL"]


@pytest.mark.parametrize("split", [[], ["--split-max-tensors", "7"], SMALL_CHUNKS],
                         ids=["single-file", "split", SMALL_CHUNKS])
def test_convert_many_equals_separate_runs(checkpoint, tmp_path, monkeypatch, split):
    one, sep = tmp_path / "one-pass", tmp_path / "separate"
    one.mkdir(), sep.mkdir()
    small, split = split == SMALL_CHUNKS, [] if split == SMALL_CHUNKS else split
    with monkeypatch.context() as m:
        if small:
            small_row_chunks(m, 3 << 10)
        assert main(["convert-hf", str(checkpoint), "--outfile", str(one / "m-{ftype}.gguf"),
                     "--outtype", ",".join(CONVERT_TYPES), "-q", "-t", "2", *split]) == 0
    for outtype in CONVERT_TYPES:
        assert main(["convert-hf", str(checkpoint), "--outfile", str(sep / f"m-{outtype.lower()}.gguf"),
                     "--outtype", outtype, "-q", "-t", "2", *split]) == 0
    ours, theirs = files(one), files(sep)
    assert sorted(ours) == sorted(theirs)
    if split:
        assert any("-00002-of-" in name for name in ours)
    for name in theirs:
        same = ours[name] == theirs[name]
        assert same, f"{name}: the one-pass output differs from the separate run"


def test_convert_many_default_names(tmp_path):
    """Without --outfile (or with a directory) each output gets llama.cpp's name, which holds its type."""
    r = gguforge("convert-hf", "--outtype", "q8_0,Q4_K_M", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["tiny-qwen2moe-4x128K-Q4_K_M.gguf", "tiny-qwen2moe-4x128K-Q8_0.gguf"]
    (tmp_path / "d").mkdir()
    assert main(["convert-hf", "--outtype", "bf16,f16", "--outfile", str(tmp_path / "d"), "-q"]) == 0
    assert sorted(os.listdir(tmp_path / "d")) == ["tiny-qwen2moe-4x128K-BF16.gguf", "tiny-qwen2moe-4x128K-F16.gguf"]


@pytest.mark.parametrize("outfile,types,message", [
    ("x.gguf", "Q4_K_M,q8_0", "need an --outfile with {ftype}"),
    ("x-{ftype}.gguf", "Q4_K_M,q9_0", "unknown output type 'q9_0'"),
    ("x-{ftype}.gguf", "Q4_K_M,,q8_0", "empty entry"),
    ("x-{ftype}.gguf", "q8_0,Q8_0", "names Q8_0 twice"),
    ("x-{ftype}.gguf", "Q4_K,Q4_K_M", "names Q4_K_M twice"),
    ("x-{ftype}.gguf", "f16,IQ2_XS", "cannot write IQ2_XS"),
    ("x-{ftype}.gguf", "Q8_0,bf16", "already exists"),
])
def test_convert_bad_list_refused_before_writing(tmp_path, outfile, types, message):
    if message == "already exists":
        (tmp_path / "x-bf16.gguf").write_bytes(b"keep me")
    before = files(tmp_path)
    r = gguforge("convert-hf", "--outfile", str(tmp_path / outfile), "--outtype", types, "-q")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr.splitlines()[0], r.stderr
    assert files(tmp_path) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_convert_many_interrupted_leaves_nothing(tmp_path, monkeypatch, sig):
    import gguforge.format.writer as writer
    original, calls = writer._write_chunk, []

    def write_then_signal(f, data):
        calls.append(1)
        if len(calls) == 40:
            os.kill(os.getpid(), sig)
        return original(f, data)
    monkeypatch.setattr(writer, "_write_chunk", write_then_signal)
    code = main(["convert-hf", "--outfile", str(tmp_path / "x-{ftype}.gguf"), "--outtype", "Q4_K_M,bf16,Q8_0",
                 "-q", "-t", "1", "--split-max-tensors", "10"])
    assert code == 128 + sig and len(calls) >= 40
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("options", [
    ["--keep-split"],
    ["--prune-layers", "1", "--override-kv", "general.name=str:pruned", "--tensor-type", "attn_v=q8_0", "--pure"],
    ["--split-max-tensors", "9", "--leave-output-tensor"],
], ids=["keep-split", "prune-override-pure", "split-tensors"])
def test_quantize_many_with_options_equals_separate_runs(small, tmp_path, options):
    src = small
    if "--keep-split" in options:  # a split input, its shards kept
        split_dir = tmp_path / "in"
        split_dir.mkdir()
        assert main(["quantize", str(small), str(split_dir / "in.gguf"), "BF16", "-q", "--split-max-tensors", "12"]) == 0
        src = split_dir / "in-00001-of-00004.gguf"
        assert src.exists()
    one, sep = tmp_path / "one-pass", tmp_path / "separate"
    one.mkdir(), sep.mkdir()
    types = ["Q4_K_M", "Q8_0", "Q5_1", "F16"]
    assert main(["quantize", str(src), str(one / "m-{FTYPE}.gguf"), ",".join(types), "-q", *options]) == 0
    for preset in types:
        assert main(["quantize", str(src), str(sep / f"m-{preset}.gguf"), preset, "-q", *options]) == 0
    ours, theirs = files(one), files(sep)
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == len(types) if "--prune-layers" in options else len(ours) > len(types)  # shards
    for name in theirs:
        same = ours[name] == theirs[name]
        assert same, f"{name}: the one-pass output differs from the separate run"


def test_library_many(small, tmp_path):
    import gguforge
    paths = gguforge.quantize(small, tmp_path / "q-{FTYPE}.gguf", "Q8_0,Q4_K_M", threads=1)
    assert [p.name for p in paths] == ["q-Q8_0.gguf", "q-Q4_K_M.gguf"]
    single = gguforge.quantize(small, tmp_path / "single.gguf", "Q4_K_M", threads=1)
    assert single.read_bytes() == paths[1].read_bytes()
    from gguforge.cli import embedded_model_dir
    made = gguforge.convert_hf(embedded_model_dir(), tmp_path / "c-{ftype}.gguf", outtype="q8_0,bf16")
    assert [p.name for p in made] == ["c-q8_0.gguf", "c-bf16.gguf"]
    with pytest.raises(gguforge.UserError, match="twice"):
        gguforge.quantize(small, tmp_path / "x-{ftype}.gguf", "Q4_K,Q4_K_M")


def test_convert_many_mixed_dtypes(tmp_path):
    """A bf16 checkpoint with some float32 weights: the quantized outputs round those through bf16 first
    (as llama-quantize of the bf16 file would see them), the float outputs do not; one pass must keep
    the two apart and still equal the separate runs."""
    import json
    from helpers import _save
    config = qwen2moe_config()
    tensors = qwen2moe_tensors(config, seed=5)
    wide = {k for k in tensors if k.endswith(("q_proj.weight", "down_proj.weight"))}  # float32, not bf16-exact
    root = tmp_path / "mixed"
    write_checkpoint(root, config, {k: v for k, v in tensors.items() if k not in wide}, bf16=True)
    (root / "model.safetensors").rename(root / "model-00001-of-00002.safetensors")
    _save({k: tensors[k] for k in wide}, root / "model-00002-of-00002.safetensors", False)
    weight_map = {k: "model-00002-of-00002.safetensors" if k in wide else "model-00001-of-00002.safetensors"
                  for k in tensors}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    types = ["Q4_K_M", "bf16", "f16", "Q8_0", "f32"]
    one, sep = tmp_path / "one-pass", tmp_path / "separate"
    one.mkdir(), sep.mkdir()
    assert main(["convert-hf", str(root), "--outfile", str(one / "m-{ftype}.gguf"), "--outtype", ",".join(types),
                 "-q"]) == 0
    for outtype in types:
        assert main(["convert-hf", str(root), "--outfile", str(sep / f"m-{outtype.lower()}.gguf"), "--outtype",
                     outtype, "-q"]) == 0
    ours, theirs = files(one), files(sep)
    assert sorted(ours) == sorted(theirs) == sorted(f"m-{t.lower()}.gguf" for t in types)
    for name in theirs:
        same = ours[name] == theirs[name]
        assert same, f"{name}: the one-pass output differs from the separate run"
