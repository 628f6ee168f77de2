"""Qwen3.8-Flash-Next (`qwen4exp`) text: against llama.cpp's converter (conversion/qwen4exp.py), the names in
llama.cpp's gguf-py/gguf/constants.py (gguf 0.19 has none of them), llama.cpp's runtime and transformers.

The mock (transformers' Qwen4ExpForCausalLM): hc_count 3 and hc_lowrank 12, an indexer of 3 heads of 24 with a
budget of 96 tokens in blocks of 3, PLE on layer 3 (1-based) with its n-gram table in 12 shards of rows 32 wide
(file order shard_0, shard_1, shard_10, shard_11, shard_2, ...: not the index order), int64 hash constants up to
1.7e16 (beyond float64's 2^53), the sigmoid output gate of the release.

Measured (f32, this mock, 64-token verify text): llama.cpp vs transformers NMSE 1.3e-3, top-1 96.9% with QSA
selecting 12 of 64 tokens (llama.cpp's and transformers' block selection differ); 5e-13 when the budget covers the
text. The reference's file (compress ratios all 0, see below) runs dense attention: NMSE 1.4e-2, top-1 78%.
The Hub layout (Qwen4ExpForConditionalGeneration) adds the Qwen3-VL ViT: its mmproj equals the reference's, and
mtmd's image embeddings match transformers' vision tower at NMSE 1.8e-7 (f32).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from gguforge.archs import qwen4exp as q4
from gguforge.cli import main

from helpers import gguf_fields, read_gguf, run_reference_converters

pytest.importorskip("torch")

OUTTYPES = ("f32", "bf16", "q8_0")
RATIOS = "qwen4exp.attention.compress_ratios"
PLE_PREFIX = "model.layers.2.ple.ple_embedding."


def convert(model, out, outtype: str = "f32", *extra: str):
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", outtype, "-q", *extra]) == 0
    return out


def shard_data(model) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(model / "model.safetensors"))


# (layout, outtype, --mmproj): the CausalLM mock, and the Hub layout (ConditionalGeneration: bf16 shards, packed
# experts, an MTP head the reference drops, the Qwen3-VL ViT)
CASES = [("causal", o, False) for o in OUTTYPES] + [("hub", "bf16", False), ("hub", "f32", True), ("hub", "q8_0", True)]


@pytest.fixture(scope="module")
def reference_files(tree, mock_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen4exp-reference")
    runs = [(mock_model("qwen4exp", layout=layout), root / f"{layout}-{outtype}-{mmproj}.gguf", outtype,
             *(("--mmproj",) if mmproj else ())) for layout, outtype, mmproj in CASES]
    r = run_reference_converters(tree, "qwen35", runs)
    assert r.returncode == 0, r.stderr[-2000:]
    return {case: run[1] for case, run in zip(CASES, runs)}


@pytest.mark.parametrize("layout,outtype,mmproj", CASES)
def test_tensors_and_metadata_equal_the_reference_converter(reference_files, mock_model, tmp_path, layout, outtype,
                                                            mmproj):
    """Byte-identical but for attention.compress_ratios: the reference reads the config through transformers,
    whose Qwen4ExpTextConfig renames "full_attention" to "indexed_attention", so its comparison with
    "full_attention" writes 0 for every layer (QSA off in llama.cpp); gguforge writes the ratio on the attention
    layers. The mmproj files are byte-identical."""
    from gguf import GGUFReader
    model = mock_model("qwen4exp", layout=layout)
    ours, ref = tmp_path / "ours.gguf", reference_files[(layout, outtype, mmproj)]
    convert(model, ours, outtype, *(("--mmproj",) if mmproj else ()))
    a, b = ours.read_bytes(), ref.read_bytes()
    if mmproj:
        assert a == b
        assert gguf_fields(ours)["clip.projector_type"] == "qwen3vl_merger"
        return
    assert len(a) == len(b)
    field = GGUFReader(str(ref)).fields[RATIOS]
    start, stop = field.offset, field.offset + sum(p.nbytes for p in field.parts)
    differ = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    assert differ.size and start <= differ.min() and differ.max() < stop
    fields, ref_fields = gguf_fields(ours), gguf_fields(ref)
    assert fields[RATIOS] == [0, 3, 0, 3] and ref_fields[RATIOS] == [0, 0, 0, 0]
    # what the comparison covers
    assert fields["qwen4exp.hyper_connection.count"] == 3 and fields["qwen4exp.hyper_connection.low_rank"] == 12
    assert fields["qwen4exp.ple.layers"] == [2] and fields["qwen4exp.embedding_length_per_layer_input"] == 32
    tensors = read_gguf(ours)
    assert "output_norm.weight" not in tensors and "blk.0.attn_norm.weight" not in tensors
    assert {"blk.1.indexer.q_proj.weight", "blk.1.indexer.k_proj.weight", "output_hc_up.weight",
            "blk.2.ple_conv1d.weight"} <= set(tensors)
    assert not any("ple_embedding" in n or "mtp" in n or "nextn" in n for n in tensors)


def test_mmproj_image_embeddings_match_transformers(mock_model, tmp_path):
    pytest.importorskip("llama_cpp.mtmd_cpp")
    from gguforge import verify_vision
    model = mock_model("qwen4exp", layout="hub")
    text, mm = tmp_path / "text.gguf", tmp_path / "mm.gguf"
    convert(model, text)
    convert(model, mm, "f32", "--mmproj")
    vision = verify_vision.verify_vision(model, text, mm)
    assert not vision.problems and vision.nmse <= 1e-5, vision.format()
    assert (vision.n_tokens, vision.n_embd, vision.n_deepstack) == (24, 64, 0)


def test_ple_table_in_shard_index_order_and_hash_constants_exact(mock_model, tmp_path):
    model = mock_model("qwen4exp")
    sd = shard_data(model)
    names = [n for n in sd if ".shard_" in n]
    assert len(names) == 12
    fields, tensors = gguf_fields(convert(model, tmp_path / "m.gguf")), read_gguf(tmp_path / "m.gguf")
    table = np.concatenate([sd[f"{PLE_PREFIX}ngram_embedding.shard_{i}.weight"] for i in range(12)])
    assert np.array_equal(np.asarray(tensors["per_layer_token_embd.weight"].data).reshape(table.shape), table)
    for leaf, key in (("layer_multipliers", "layer_multipliers"), ("ngram_heads_offsets", "head_offsets"),
                      ("ngram_heads_vocab_sizes", "head_vocab_sizes")):
        want = [int(v) for v in sd[PLE_PREFIX + leaf]]
        assert fields[f"qwen4exp.ple.{key}"] == want
    assert max(fields["qwen4exp.ple.layer_multipliers"]) > 2 ** 53  # a float round trip would change it


def _pinned_constants(tree):
    spec = importlib.util.spec_from_file_location("pinned_gguf_constants", tree / "gguf-py" / "gguf" / "constants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_names_defined_here_are_llama_cpps(tree, mock_model, tmp_path):
    c = _pinned_constants(tree)
    arch = c.MODEL_ARCH.QWEN4EXP
    assert c.MODEL_ARCH_NAMES[arch] == q4.ARCH
    for member, name in q4.NAMES.items():
        assert c.TENSOR_NAMES[c.MODEL_TENSOR[member]] == name, member
        assert c.MODEL_TENSOR[member] in c.MODEL_TENSORS[arch], member
    for path, key in q4.KEYS.items():
        obj = c.Keys
        for part in path.split("."):
            obj = getattr(obj, part)
        assert obj == key, path
    # every tensor and key of a converted file is one llama.cpp's qwen4exp knows
    out = convert(mock_model("qwen4exp"), tmp_path / "m.gguf")
    known = {c.TENSOR_NAMES[t].format(bid=b) for t in c.MODEL_TENSORS[arch] for b in range(4)}
    for name in read_gguf(out):
        assert name.removesuffix(".weight").removesuffix(".bias") in known, name
    keys = {k.format(arch=q4.ARCH) for k in q4.KEYS.values()}
    assert keys - {"qwen4exp.ple.image_token_id"} <= set(gguf_fields(out))  # (a text-only config has no image id)


def test_llama_cpp_logits_match_transformers_with_qsa_selecting(mock_model, tmp_path):
    """A budget of 12 of the 64 tokens: QSA selects blocks (llama.cpp's selection differs from transformers'
    in places). The mock's own budget covers the text: test_mocks.py's convert-then-verify matrix checks
    that case at NMSE < 1e-8 (measured 5e-13)."""
    pytest.importorskip("llama_cpp")
    from gguforge.verify import verify
    model = mock_model("qwen4exp", config={"indexer_budget": 12})
    report = verify(model, convert(model, tmp_path / "m.gguf"))
    assert report.nmse <= 5e-3 and report.top1_agreement >= 0.9 and report.tokenizer_ok, report.format()


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q6_K"])
def test_one_pass_presets_equal_llama_quantize(mock_model, tmp_path, preset):
    """(llama-quantize keeps indexer.q_proj / k_proj in their float type, as for MiniMax.)"""
    pytest.importorskip("llama_cpp")
    from helpers import llama_quantize
    from test_quantize_vs_llama import assert_same_tensors
    model = mock_model("qwen4exp")
    ours, theirs = convert(model, tmp_path / "one-pass.gguf", preset.lower()), tmp_path / "llama.gguf"
    llama_quantize(convert(model, tmp_path / "f32.gguf"), theirs, preset)
    assert_same_tensors(ours, theirs, same_order=False)
    assert read_gguf(ours)["blk.1.indexer.q_proj.weight"].tensor_type == 0  # F32


def _rewrite(model, dst, edit_tensors=None, edit_config=None):
    from safetensors.numpy import load_file, save_file
    shutil.copytree(model, dst)
    if edit_tensors:
        sd = load_file(str(dst / "model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


SHARD = PLE_PREFIX + "ngram_embedding.shard_{}.weight"
BAD = {
    "shard missing": (lambda sd: sd.pop(SHARD.format(5)), None, "shard_5.weight"),
    "shard row width": (lambda sd: sd.update({SHARD.format(3): np.zeros((8, 16), np.float32)}), None,
                        "shard_3.weight"),
    "hash dtype": (lambda sd: sd.update({PLE_PREFIX + "layer_multipliers":
                                         sd[PLE_PREFIX + "layer_multipliers"].astype(np.float32)}), None, "int64"),
    "hash length": (lambda sd: sd.update({PLE_PREFIX + "ngram_heads_offsets": np.zeros(3, np.int64)}), None,
                    "ngram_heads_offsets"),
    "ple layer 0": (None, lambda c: c.update(ple_layer_ids=[0]), "1-based"),
    "ple layer past the end": (None, lambda c: c.update(ple_layer_ids=[5]), "out of range"),
    "ple on an attention layer": (None, lambda c: c.update(ple_layer_ids=[4]), "linear-attention layers only"),
    "two ple layers": (None, lambda c: c.update(ple_layer_ids=[1, 3]), "one PLE layer"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_are_refused_in_one_line(mock_model, tmp_path, capsys, case):
    edit_tensors, edit_config, words = BAD[case]
    model = _rewrite(mock_model("qwen4exp"), tmp_path / "m", edit_tensors, edit_config)
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    assert main(["convert-hf", str(model), "--outfile", str(out / "m.gguf")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:") and words in lines[0], lines
    assert len(lines) <= 2 and not any(out.iterdir())
