"""Qwen2-VL and Qwen2.5-VL: the text model (`qwen2vl`) and both ViT generations (`--mmproj`), against
llama.cpp's converter (conversion/qwenvl.py), llama.cpp's runtime and mtmd, and transformers.

The mocks: Qwen2-VL's ViT is 32 wide (embed_dim) with an MLP of 96 (mlp_ratio 3) and a merger to the text
width (its vision hidden_size); Qwen2.5-VL's has 4 blocks, full attention on blocks 1 and 3 only, patch 14
and the default 112-pixel windows, so the 6 x 4 merged-token test image spans two windows, and an MLP 72
wide (q8_0 falls back to F16 for ffn_down). The text rms_norm_eps is 1e-5, not the ViT's 1e-6.
"""

from __future__ import annotations

import json
import shutil

import pytest
from gguf import GGMLQuantizationType as T

from gguforge.cli import main

from helpers import gguf_fields, read_gguf, run_reference_converters
from test_mmproj import relabel

pytest.importorskip("torch")

ARCHS = ("qwen2vl", "qwen25vl")
HUB_TO_TRANSFORMERS = (("visual.", "model.visual."), ("model.", "model.language_model."))


def hub(mock_model, arch: str):
    """The mock in the Hub's layout (model.*, visual.*, lm_head.*): bf16 shards."""
    return mock_model(arch, layout="hub")


def convert(model, out, outtype: str, *extra: str):
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", outtype, "-q", *extra]) == 0
    return out


# Every output type, for the text model and the mmproj of both generations.
REFERENCE_CASES = [(arch, outtype, False) for arch in ARCHS for outtype in ("f32", "bf16", "q8_0")] + \
                  [(arch, outtype, True) for arch in ARCHS for outtype in ("f32", "f16", "bf16", "q8_0")]


@pytest.fixture(scope="module")
def reference_files(tree, mock_model, tmp_path_factory):
    """{case: the file llama.cpp's converter writes}, all converted in one process."""
    root = tmp_path_factory.mktemp("qwen2vl-reference")
    runs = []
    for arch, outtype, mmproj in REFERENCE_CASES:
        out = root / f"{arch}-{outtype}-{mmproj}"
        out.mkdir()  # a directory: the converter chooses the file name
        runs.append((hub(mock_model, arch), out, outtype, *(("--mmproj",) if mmproj else ())))
    r = run_reference_converters(tree, "qwen2", runs)
    assert r.returncode == 0, r.stderr[-2000:]
    return {case: next(run[1].iterdir()) for case, run in zip(REFERENCE_CASES, runs)}


@pytest.mark.parametrize("arch,outtype,mmproj", REFERENCE_CASES)
def test_text_and_mmproj_equal_the_reference_converter(reference_files, mock_model, tmp_path, arch, outtype, mmproj):
    ours_dir = tmp_path / "ours"
    ours_dir.mkdir()
    convert(hub(mock_model, arch), ours_dir, outtype, *(("--mmproj",) if mmproj else ()))
    [ours], ref = ours_dir.iterdir(), reference_files[(arch, outtype, mmproj)]
    assert ours.name == ref.name and ours.read_bytes() == ref.read_bytes()
    fields, tensors = gguf_fields(ours), read_gguf(ours)
    if not mmproj:
        assert fields["general.architecture"] == "qwen2vl"
        assert fields["qwen2vl.rope.dimension_sections"] == [2, 3, 3, 0]
        assert not any("visual" in n or n.startswith("v.") for n in tensors)
        return
    # what the comparison covers
    assert fields["clip.projector_type"] == {"qwen2vl": "qwen2vl_merger", "qwen25vl": "qwen2.5vl_merger"}[arch]
    assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert {"v.blk.0.attn_q.weight", "v.blk.0.attn_k.bias", "v.blk.0.attn_v.weight"} <= set(tensors)
    assert "v.blk.0.attn_qkv.weight" not in tensors and "v.position_embd.weight" not in tensors
    types = {name: T(t.tensor_type) for name, t in tensors.items()}
    assert types["v.patch_embd.weight"] == types["v.patch_embd.weight.1"] == (T.F16 if outtype == "f16" else T.F32)
    if arch == "qwen25vl":
        assert fields["clip.vision.n_wa_pattern"] == 2 and fields["clip.use_silu"] is True
        assert "v.blk.0.ffn_gate.weight" in tensors and "v.blk.0.ln1.bias" not in tensors
        if outtype == "q8_0":
            assert types["v.blk.0.ffn_down.weight"] == T.F16 and types["v.blk.0.ffn_up.weight"] == T.Q8_0
    else:
        assert fields["clip.vision.feed_forward_length"] == 64  # as the reference writes it: hidden_size
        assert "v.blk.0.ln1.bias" in tensors and "v.blk.0.ffn_gate.weight" not in tensors


@pytest.mark.parametrize("arch", ARCHS)
def test_other_layouts_give_the_same_files(mock_model, tmp_path, arch):
    """transformers 5's layout (model.language_model.*, model.visual.*), Qwen2.5-Omni's thinker. prefix
    and a bare Qwen2VLModel (language_model.*, no lm_head: tied) against the Hub layout."""
    model = hub(mock_model, arch)

    def t5(name):
        return next((new + name[len(old):] for old, new in HUB_TO_TRANSFORMERS if name.startswith(old)), name)

    layouts = {"transformers": t5, "thinker": lambda n: "thinker." + n}
    files = {}
    for label, rename in [("hub", None), *layouts.items()]:
        src = model if rename is None else relabel(model, tmp_path / label / model.name, rename)
        files[label] = (convert(src, tmp_path / f"{label}.gguf", "bf16").read_bytes(),
                        convert(src, tmp_path / f"{label}-mm.gguf", "bf16", "--mmproj").read_bytes())
    for label in layouts:
        assert files[label] == files["hub"], label
    bare = relabel(model, tmp_path / "bare" / model.name,
                   lambda n: n.replace("model.", "language_model.", 1) if n.startswith("model.") else n)
    config = json.loads((bare / "config.json").read_text())
    config["architectures"] = ["Qwen2VLModel"]
    (bare / "config.json").write_text(json.dumps(config))
    with_head = read_gguf(tmp_path / "hub.gguf")
    drop_tensor(bare, "lm_head.weight")  # the base model has no output head
    ours = read_gguf(convert(bare, tmp_path / "bare.gguf", "bf16"))
    assert set(ours) == set(with_head) - {"output.weight"}
    assert read_gguf(convert(bare, tmp_path / "bare-mm.gguf", "bf16", "--mmproj")).keys() == \
        read_gguf(tmp_path / "hub-mm.gguf").keys()


def drop_tensor(root, name: str) -> None:
    """Remove tensor `name` from a checkpoint: its shard's header entry (the bytes stay, unreferenced)
    and its index entry."""
    for shard in root.glob("*.safetensors"):
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        if header.pop(name, None) is not None:
            new = json.dumps(header).encode()
            shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    index = root / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][name]
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_logits_and_image_embeddings_match_transformers(mock_model, tmp_path, arch):
    pytest.importorskip("llama_cpp.mtmd_cpp")
    from gguforge import verify_vision
    from gguforge.verify import verify
    model = mock_model(arch, full_precision=True)  # float32 values a 16-bit type would round
    text = convert(model, tmp_path / "text.gguf", "f32")
    report = verify(model, text)
    print(f"\n{arch} text f32: NMSE {report.nmse:.2e}, top-1 {report.top1_agreement:.3f}")
    assert report.nmse <= 1e-5 and report.top1_agreement >= 0.95 and report.tokenizer_ok, report.format()
    for outtype, bound in (("f32", 1e-5), ("q8_0", 1e-3)):
        mm = convert(model, tmp_path / f"mm-{outtype}.gguf", outtype, "--mmproj")
        vision = verify_vision.verify_vision(model, text, mm)
        print(f"{arch} mmproj {outtype}: " + ", ".join(f"{r.name} {r.nmse:.2e}" for r in vision.runs))
        assert not vision.problems and vision.nmse <= bound, vision.format()
        assert (vision.n_tokens, vision.n_embd, vision.n_deepstack) == (24, 64, 0)


@pytest.mark.parametrize("arch,path,value,words", [
    ("qwen2vl", ("text_config", "rope_parameters", "mrope_section"), None, "mrope_section"),
    ("qwen25vl", ("vision_config", "fullatt_block_indexes"), [1, 2], "fullatt_block_indexes"),
    ("qwen25vl", ("vision_config", "fullatt_block_indexes"), [1], "fullatt_block_indexes"),
    ("qwen25vl", ("vision_config", "fullatt_block_indexes"), None, "fullatt_block_indexes"),
    ("qwen2vl", ("vision_config", "embed_dim"), 48, "embed_dim=48"),
])
def test_bad_configs_are_one_clear_error(mock_model, tmp_path, capsys, arch, path, value, words):
    model = shutil.copytree(hub(mock_model, arch), tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    node = config
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    mmproj = ("--mmproj",) if path[0] == "vision_config" else ()
    assert main(["convert-hf", str(model), "--outfile", str(out / "m.gguf"), "-q", *mmproj]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err.splitlines()[0], err
    assert not any(out.iterdir())


def test_one_pass_preset_equals_llama_quantize_of_the_float_file(mock_model, tmp_path):
    pytest.importorskip("llama_cpp")
    from helpers import llama_quantize
    from test_quantize_vs_llama import assert_same_tensors
    model = hub(mock_model, "qwen25vl")
    float_file = convert(model, tmp_path / "bf16.gguf", "bf16")
    ours = convert(model, tmp_path / "ours.gguf", "Q4_K_M")
    llama_quantize(float_file, tmp_path / "ref.gguf", "Q4_K_M")
    assert_same_tensors(ours, tmp_path / "ref.gguf", same_order=False)


def test_a_wrong_window_pattern_shows_in_the_image_embeddings(mock_model, tmp_path, monkeypatch):
    """The test image spans two 112-pixel windows, so window attention matters: an mmproj whose
    n_wa_pattern makes block 1 windowed (4 instead of 2) is 2.6e-4 off transformers, against 4e-8 for
    the right file (the bound above is 1e-5)."""
    pytest.importorskip("llama_cpp.mtmd_cpp")
    from gguforge import verify_vision
    from gguforge.archs import qwen2vl
    model = mock_model("qwen25vl", full_precision=True)
    text = convert(model, tmp_path / "text.gguf", "f32")
    right = qwen2vl.Qwen25VLVision.add_window_metadata

    def wrong(self, md):
        right(self, md)
        md.u32("clip.vision.n_wa_pattern", 4)

    monkeypatch.setattr(qwen2vl.Qwen25VLVision, "add_window_metadata", wrong)
    mm = convert(model, tmp_path / "mm.gguf", "f32", "--mmproj")
    vision = verify_vision.verify_vision(model, text, mm)
    assert not vision.problems and vision.nmse > 1e-5, vision.format()
