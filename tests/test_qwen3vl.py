"""Qwen3-VL / Qwen3-VL-MoE text models: reference bytes, llama.cpp logits, both expert layouts.

Measured on these mocks (f32): llama.cpp vs transformers NMSE 4.1e-6 for qwen3vl with our file and
with llama.cpp's converter's (the files are identical); 4.4e-6 for qwen3vlmoe. The residual is
llama.cpp's M-RoPE on text positions, not the conversion.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from gguforge.cli import main

from helpers import gguf_fields, run_reference_converter

pytest.importorskip("torch")



@pytest.mark.parametrize("arch,layout,outtypes", [
    ("qwen3vl", "causal", ("f32", "q8_0")),
    ("qwen3vlmoe", "hub", ("bf16", "q8_0")),  # as published: bf16 shards, transposed packed experts
])
def test_whole_file_equals_reference_converter(tree, mock_model, tmp_path, arch, layout, outtypes):
    model = mock_model(arch, layout=layout, mtp=False, full_precision=layout == "causal")
    for outtype in outtypes:
        ours, ref = tmp_path / f"ours-{outtype}.gguf", tmp_path / f"ref-{outtype}.gguf"
        assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", outtype, "--quiet"]) == 0
        r = run_reference_converter(tree, model, ref, outtype, "qwen2")
        assert r.returncode == 0, r.stderr[-2000:]
        assert ours.read_bytes() == ref.read_bytes(), outtype
    assert gguf_fields(ours)[f"{arch}.n_deepstack_layers"] == 1
    assert len(gguf_fields(ours)[f"{arch}.rope.dimension_sections"]) == 4


@pytest.mark.parametrize("arch", ["qwen3vl", "qwen3vlmoe"])
def test_llama_cpp_logits_match_transformers(mock_model, tmp_path, arch):
    pytest.importorskip("llama_cpp")
    from gguforge.verify import verify
    model = mock_model(arch, mtp=False)  # saved by transformers 5: the usual expert layout
    out = tmp_path / "m.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", "f32", "--quiet"]) == 0
    report = verify(model, out)
    assert report.nmse <= 1e-5 and report.top1_agreement >= 0.95 and report.tokenizer_ok, report.format()


def test_both_expert_layouts_give_the_same_file(mock_model, tmp_path):
    """Published [E, H, 2F] / [E, F, H] and transformers 5's [E, 2F, H] / [E, H, F] (llama.cpp's
    converter transposes both, so its file from a transformers-5 checkpoint does not load)."""
    files = []
    for layout in ("hub", "causal"):
        out = tmp_path / f"{layout}.gguf"
        model = mock_model("qwen3vlmoe", layout=layout, mtp=False, dtype="bfloat16")
        assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", "bf16", "--quiet"]) == 0
        files.append({t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors})
    hub, causal = files
    assert hub.keys() == causal.keys()
    for name in hub:
        assert np.array_equal(hub[name], causal[name]), name


def test_missing_mrope_sections_are_refused(mock_model, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(mock_model("qwen3vl", mtp=False), model)
    config = json.loads((model / "config.json").read_text())
    del config["text_config"]["rope_parameters"]["mrope_section"]
    (model / "config.json").write_text(json.dumps(config))
    assert main(["convert-hf", str(model), "--outfile", str(tmp_path / "o.gguf")]) == 2
    assert "mrope_section" in capsys.readouterr().err and not (tmp_path / "o.gguf").exists()
