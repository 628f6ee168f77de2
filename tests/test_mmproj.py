"""`convert-hf --mmproj`: the Qwen3-VL vision encoder of Qwen3.5, Qwen3.5-MoE, Qwen3-VL and Qwen3-VL-MoE
checkpoints as a `clip` GGUF, against llama.cpp's `convert_hf_to_gguf.py --mmproj`, llama-quantize and
mtmd's loader.

The mocks' ViT has an FFN 72 wide (not a multiple of 32, like the real 4304), so q8_0 exercises the F16
fallback; Qwen3-VL's has a deepstack merger at ViT layer 1 (not 0: the index is absolute).
Deliberate difference from the reference: for the model.language_model.visual.* layout llama.cpp's
converter writes a file without tensors (its issue #22656); gguforge writes the same file as for the
model.visual.* layout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

import gguforge as gguforge_api
from gguforge.cli import main

from helpers import gguf_fields, gguforge, read_gguf, run_reference_converter

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llama_tree(tree):
    return tree  # (conftest's llama.cpp tree)


def mmproj(model: Path, out: Path, outtype: str, *extra: str) -> Path:
    assert main(["convert-hf", str(model), "--mmproj", "--outfile", str(out), "--outtype", outtype, "-q", *extra]) == 0
    return out


@pytest.mark.parametrize("arch,layout,kw,outtypes", [
    ("qwen35", "hub", {}, ("f32", "f16", "bf16", "q8_0")),
    ("qwen35moe", "hub", {}, ("bf16",)),
    ("qwen3vl", "causal", {"full_precision": True}, ("q8_0",)),  # float32 values that 16-bit types round
    ("qwen3vlmoe", "hub", {}, ("f16",)),
])
def test_whole_file_equals_reference_converter(llama_tree, mock_model, tmp_path, arch, layout, kw, outtypes):
    model = mock_model(arch, layout=layout, **kw)
    for outtype in outtypes:
        ours_dir, ref_dir = tmp_path / f"ours-{outtype}", tmp_path / f"ref-{outtype}"
        ours_dir.mkdir(), ref_dir.mkdir()  # directories: both converters pick the file name
        mmproj(model, ours_dir, outtype)
        r = run_reference_converter(llama_tree, model, ref_dir, outtype, "qwen2", "--mmproj")
        assert r.returncode == 0, r.stderr[-2000:]
        [ours], [ref] = ours_dir.iterdir(), ref_dir.iterdir()
        assert ours.name == ref.name == f"mmproj-{model.name}-{outtype.upper()}.gguf"
        assert ours.read_bytes() == ref.read_bytes(), outtype
        # what the comparison covers: the facts below hold in both files
        fields, tensors = gguf_fields(ours), read_gguf(ours)
        assert fields["general.architecture"] == "clip" and fields["general.type"] == "mmproj"
        assert fields["clip.projector_type"] == "qwen3vl_merger"
        assert fields["clip.vision.image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
        deepstack = arch.startswith("qwen3vl")  # never for Qwen3.5: its text loader reads no deepstack count
        assert fields["clip.vision.is_deepstack_layers"] == [False, deepstack]
        assert ("v.deepstack.1.fc1.weight" in tensors) == deepstack and "v.deepstack.0.fc1.weight" not in tensors
        types = {name: T(t.tensor_type) for name, t in tensors.items()}
        assert types["v.position_embd.weight"] == T.F32
        assert types["v.patch_embd.weight"] == types["v.patch_embd.weight.1"] == (T.F16 if outtype == "f16" else T.F32)
        if outtype == "q8_0":
            assert types["v.blk.0.ffn_down.weight"] == T.F16  # 72-wide rows: no whole Q8_0 blocks
            assert types["v.blk.0.ffn_up.weight"] == types["mm.0.weight"] == T.Q8_0


def relabel(src: Path, dst: Path, rename) -> Path:
    """A copy of checkpoint `src` whose tensor names are rename(name): only the safetensors headers and
    the index change (data offsets are relative to the data, so they stay valid)."""
    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = {(k if k == "__metadata__" else rename(k)): v for k, v in json.loads(raw[8:8 + n]).items()}
        new = json.dumps(header).encode()
        shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    index = dst / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    return dst


def test_both_visual_prefixes_give_the_same_file(mock_model, tmp_path):
    model = mock_model("qwen35", layout="hub")
    inner = relabel(model, tmp_path / "inner" / model.name,  # same directory name: same general.name
                    lambda k: k.replace("model.visual.", "model.language_model.visual."))
    outer, nested = tmp_path / "outer-out", tmp_path / "inner-out"
    outer.mkdir(), nested.mkdir()
    mmproj(model, outer, "bf16")  # a directory: the default file name, mmproj-<name>-<TYPE> (no size label)
    gguforge_api.convert_hf(inner, nested, outtype="bf16", mmproj=True)  # the library API takes it too
    name = f"mmproj-{model.name}-BF16.gguf"
    assert [p.name for p in outer.iterdir()] == [p.name for p in nested.iterdir()] == [name]
    assert (outer / name).read_bytes() == (nested / name).read_bytes()
    assert len(read_gguf(nested / name)) == 3 + 1 + 2 * 12 + 6  # patch x3, position, 2 blocks, merger


def assert_refused(args: list[str], out: Path, *words: str) -> None:
    r = gguforge(*args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: --mmproj") and all(w in lines[0] for w in words), r.stderr
    assert len(lines) <= 2 and not r.stdout  # one error line (and a hint)
    assert not any(out.parent.iterdir()), "nothing may be written"


def test_no_vision_tower_is_one_clear_error(mock_model, tmp_path):
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    text_only = mock_model("qwen3", mtp=False)  # an architecture without a vision tower
    assert_refused(["convert-hf", str(text_only), "--mmproj", "--outfile", str(out)], out, "qwen3", "no vision tower")
    causal = mock_model("qwen35", mtp=False)  # Qwen3_5ForCausalLM: the capability, but no vision_config
    assert_refused(["convert-hf", str(causal), "--mmproj", "--outfile", str(out)], out, "no vision_config")
    hub = mock_model("qwen35", layout="hub")
    assert_refused(["convert-hf", str(hub), "--mmproj", "--outfile", str(out), "--outtype", "Q4_K_M"], out,
                   "f32, f16, bf16 or q8_0")
    assert_refused(["convert-hf", str(hub), "--mmproj", "--vocab-only", "--outfile", str(out)], out, "--vocab-only")
    no_processor = shutil.copytree(hub, tmp_path / "no-processor")
    (no_processor / "preprocessor_config.json").unlink()
    assert_refused(["convert-hf", str(no_processor), "--mmproj", "--outfile", str(out)], out, "image_mean")


@pytest.fixture(scope="module")
def qwen3vl_files(mock_model, tmp_path_factory):
    """(text GGUF, f16 mmproj) of the Qwen3-VL mock."""
    model = mock_model("qwen3vl", layout="causal", full_precision=True)
    d = tmp_path_factory.mktemp("qwen3vl-mmproj")
    assert main(["convert-hf", str(model), "--outfile", str(d / "text.gguf"), "--outtype", "f16", "-q"]) == 0
    return d / "text.gguf", mmproj(model, d / "mmproj-f16.gguf", "f16")


@pytest.mark.parametrize("preset", ["Q8_0", "Q4_K_M"])
def test_quantize_of_an_mmproj_equals_llama_quantize(qwen3vl_files, tmp_path, preset):
    """llama.cpp loads clip files without hyper-parameters, so llama-quantize plans them with zero layers;
    position and patch embeddings are never quantized; 72-wide rows fall back."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from gguforge.quantize.presets import parse_preset
    _, src = qwen3vl_files
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    assert main(["quantize", str(src), str(ours), preset, "-q"]) == 0
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = int(parse_preset(preset).file_type), 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(ref).encode(), p) == 0
    assert ours.read_bytes() == ref.read_bytes()
    types = {name: T(t.tensor_type) for name, t in read_gguf(ours).items()}
    assert types["v.position_embd.weight"] == T.F32 and types["v.patch_embd.weight"] == T.F16
    # 128-wide rows hold no whole 256-blocks: Q4_K falls back to Q5_0 (llama-quant.cpp tensor_type_fallback)
    assert types["mm.0.weight"] == {"Q8_0": T.Q8_0, "Q4_K_M": T.Q5_0}[preset]


LOAD = """
import sys, llama_cpp
from llama_cpp import mtmd_cpp as mtmd
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), llama_cpp.llama_model_default_params())
p = mtmd.mtmd_context_params_default()
p.use_gpu, p.n_threads, p.warmup = False, 2, True  # warmup builds and reserves the encoder graph
ctx = mtmd.mtmd_init_from_file(sys.argv[2].encode(), model, p)
ok = bool(ctx) and mtmd.mtmd_support_vision(ctx)
print("LOADED" if ok else "FAILED")
"""


def mtmd_load(text: Path, projector: Path) -> str:
    r = subprocess.run([sys.executable, "-c", LOAD, str(text), str(projector)], capture_output=True, text=True,
                       timeout=120)
    return r.stdout.strip() + r.stderr[-300:]


def test_llama_cpp_mtmd_loads_the_mmproj(qwen3vl_files, mock_model, tmp_path):
    pytest.importorskip("llama_cpp.mtmd_cpp")
    text, projector = qwen3vl_files
    assert mtmd_load(text, projector).startswith("LOADED")
    # Qwen3.5: no deepstack, so its mmproj's output width is the text width; the Qwen3-VL projector
    # (with deepstack) is refused by a Qwen3.5 text model, which shows the check can fail.
    model = mock_model("qwen35", layout="hub")
    assert main(["convert-hf", str(model), "--outfile", str(tmp_path / "t35.gguf"), "--outtype", "f16", "-q"]) == 0
    mm35 = mmproj(model, tmp_path / "mm35.gguf", "q8_0")
    assert mtmd_load(tmp_path / "t35.gguf", mm35).startswith("LOADED")
    assert "mismatch between text model" in mtmd_load(tmp_path / "t35.gguf", projector)


@pytest.mark.parametrize("arch,layout,path,value,words", [
    ("qwen35", "hub", ("vision_config", "depth"), 10 ** 9, "vision_config.depth"),
    ("qwen35", "hub", ("vision_config", "spatial_merge_size"), "2", "vision_config.spatial_merge_size"),
    ("qwen35", "hub", ("vision_config", "temporal_patch_size"), 3, "temporal_patch_size"),
    ("qwen35", "hub", ("vision_config", "intermediate_size"), 64, "vision_config.intermediate_size=64"),
    ("qwen35", "hub", ("vision_config",), "none", "no vision_config"),
    ("qwen35", "hub", ("text_config", "hidden_size"), "64", "hidden_size"),
    ("qwen3vl", "causal", ("vision_config", "deepstack_visual_indexes"), [2], "deepstack_visual_indexes"),
    ("qwen3vl", "causal", ("vision_config", "deepstack_visual_indexes"), [1, 1], "deepstack_visual_indexes"),
])
def test_bad_vision_configs_are_one_clear_error(mock_model, tmp_path, capsys, arch, layout, path, value, words):
    model = shutil.copytree(mock_model(arch, layout=layout), tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    assert main(["convert-hf", str(model), "--mmproj", "--outfile", str(out / "m.gguf"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err.splitlines()[0], err
    assert not any(out.iterdir())


def test_processor_config_json_overrides_the_preprocessor_config(mock_model, tmp_path):
    """processor_config.json's image_processor wins over preprocessor_config.json (as llama.cpp merges them)."""
    model = shutil.copytree(mock_model("qwen35", layout="hub"), tmp_path / "m")
    (model / "processor_config.json").write_text(json.dumps({"image_processor": {"image_mean": [0.5, 0.5, 0.5]}}))
    fields = gguf_fields(mmproj(model, tmp_path / "mm.gguf", "f16"))
    assert fields["clip.vision.image_mean"] == [0.5, 0.5, 0.5]
    assert fields["clip.vision.image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])


def test_qwen35_mmproj_never_feeds_deepstack(mock_model, tmp_path):
    """Even a Qwen3.5 config naming deepstack layers gets none: the qwen35 text loaders read no deepstack
    count, and mtmd would refuse the wider projector output (see the load test)."""
    model = shutil.copytree(mock_model("qwen35", layout="hub"), tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["vision_config"]["deepstack_visual_indexes"] = [1]
    (model / "config.json").write_text(json.dumps(config))
    out = mmproj(model, tmp_path / "mm.gguf", "f16")
    assert gguf_fields(out)["clip.vision.is_deepstack_layers"] == [False, False]
    assert not any(".deepstack." in name for name in read_gguf(out))
