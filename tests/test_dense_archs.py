"""Qwen2 / Qwen3 dense decoders and Qwen3-MoE: the reference converter's bytes and llama.cpp's logits.

The worked example of docs/adding-an-architecture.md: each is one short file plus its mock spec.
"""

from __future__ import annotations

import gguf
import pytest

from gguforge.cli import main

from helpers import run_reference_converter
import make_mocks

pytest.importorskip("torch")

VARIANTS = [  # (arch, mock kwargs)
    ("qwen2", {}),
    ("qwen2", {"tied": True}),
    ("qwen3", {}),
    ("qwen3", {"tied": True, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 1024}}),
    ("qwen3moe", {}),
    ("qwen3moe", {"tied": True, "num_experts": 8}),
    ("llama", {"tied": True}),  # GQA 8:1, head_dim != hidden/heads, llama3 rope scaling -> rope_freqs
    ("mistral", {}),
    ("mixtral", {"tied": True, "num_experts": 8}),
]
IDS = [a + "".join(f"-{k}" for k in kw) for a, kw in VARIANTS]



@pytest.mark.parametrize("arch,kw", VARIANTS, ids=IDS)
def test_whole_file_equals_reference_converter(tree, mock_model, tmp_path, arch, kw):
    model = mock_model(arch, full_precision=True, **kw)
    for outtype in ("q8_0", "f16"):
        ours, ref = tmp_path / f"ours-{outtype}.gguf", tmp_path / f"ref-{outtype}.gguf"
        assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", outtype, "--quiet"]) == 0
        r = run_reference_converter(tree, model, ref, outtype, make_mocks.spec(arch).tokenizer)
        assert r.returncode == 0, r.stderr[-2000:]
        a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors], outtype
        assert ("output.weight" in {t.name for t in a.tensors}) is not kw.get("tied", False)
        for key in b.fields:
            assert a.fields[key].contents() == b.fields[key].contents(), (outtype, key)
        assert ours.read_bytes() == ref.read_bytes(), outtype


@pytest.mark.parametrize("arch,kw", VARIANTS, ids=IDS)
@pytest.mark.parametrize("outtype,bound", [("f32", 1e-6), ("q8_0", 1e-2)])
def test_llama_cpp_logits_match_transformers(mock_model, tmp_path, arch, kw, outtype, bound):
    pytest.importorskip("llama_cpp")
    from gguforge.verify import verify
    model = mock_model(arch, **kw)
    out = tmp_path / "m.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", outtype, "--quiet"]) == 0
    report = verify(model, out)
    assert report.nmse <= bound and report.tokenizer_ok, report.format()
    assert report.top1_agreement >= 0.9, report.format()


def test_qwen3_requires_its_q_k_norms(mock_model, tmp_path, capsys):
    import shutil

    from safetensors.numpy import load_file, save_file
    src = mock_model("qwen3")
    model = tmp_path / "m"
    shutil.copytree(src, model)
    weights = load_file(str(model / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_norm.weight"]
    save_file(weights, str(model / "model.safetensors"))
    assert main(["convert-hf", str(model), "--outfile", str(tmp_path / "o.gguf")]) == 2
    assert "model.layers.1.self_attn.k_norm.weight" in capsys.readouterr().err


@pytest.mark.parametrize("proj", ["q", "k", "v"])
def test_qwen2_requires_its_q_k_v_biases(mock_model, tmp_path, capsys, proj):
    """Qwen2's attention always has q/k/v biases (its config has no switch): one missing is refused, as
    Qwen3 without its q/k norms."""
    import shutil

    from safetensors.numpy import load_file, save_file
    model = tmp_path / "m"
    shutil.copytree(mock_model("qwen2"), model)
    weights = load_file(str(model / "model.safetensors"))
    del weights[f"model.layers.1.self_attn.{proj}_proj.bias"]
    save_file(weights, str(model / "model.safetensors"))
    assert main(["convert-hf", str(model), "--outfile", str(tmp_path / "o.gguf")]) == 2
    assert f"model.layers.1.self_attn.{proj}_proj.bias" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("tied", [True, False], ids=["without-lm_head", "with-lm_head"])
def test_config_without_tie_word_embeddings(tree, mock_model, tmp_path, tied):
    """No tie_word_embeddings in config.json: as llama.cpp's converter, the checkpoint decides. Without
    lm_head there is no output.weight (llama.cpp's loader then uses token_embd), with it output.weight is
    written; both byte for byte as the reference converter. (transformers' Qwen2Config defaults to untied,
    so it would load the first with a freshly initialised lm_head: `verify` shows that.)"""
    import json
    import shutil

    model = tmp_path / "m"
    shutil.copytree(mock_model("qwen2", tied=tied), model)
    config = json.loads((model / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (model / "config.json").write_text(json.dumps(config))
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", "f16", "--quiet"]) == 0
    assert ("output.weight" in {t.name for t in gguf.GGUFReader(ours).tensors}) is not tied
    r = run_reference_converter(tree, model, ref, "f16", "qwen2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ours.read_bytes() == ref.read_bytes()


def test_qwen3moe_with_dense_layers_is_refused(mock_model, tmp_path, capsys):
    import json
    import shutil
    model = tmp_path / "m"
    shutil.copytree(mock_model("qwen3moe"), model)
    config = json.loads((model / "config.json").read_text())
    config["mlp_only_layers"] = [1]
    (model / "config.json").write_text(json.dumps(config))
    assert main(["convert-hf", str(model), "--outfile", str(tmp_path / "o.gguf")]) == 2
    err = capsys.readouterr().err
    assert "layer 1 is a dense MLP layer" in err and not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3moe"])
def test_fused_qkv_loads_in_llama_cpp(mock_model, tmp_path, arch):
    pytest.importorskip("llama_cpp")
    from gguforge.verify import verify
    model = mock_model(arch)
    out = tmp_path / "fused.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", "f32", "--fuse-qkv", "-q"]) == 0
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "blk.0.attn_qkv.weight" in names and "blk.0.attn_q.weight" not in names
    assert ("blk.0.attn_qkv.bias" in names) is (arch == "qwen2")
    report = verify(model, out)
    assert report.nmse <= 1e-6, report.format()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3moe"])
def test_fused_experts_are_refused_where_the_loader_has_none(mock_model, tmp_path, capsys, arch):
    out = tmp_path / "o.gguf"
    assert main(["convert-hf", str(mock_model(arch)), "--outfile", str(out), "--fuse-gate-up-exps"]) == 2
    assert "--fuse-gate-up-exps" in capsys.readouterr().err and not out.exists()


# transformers' GGUF loader (integrations/ggml.py) maps no head_dim for qwen3 and no
# moe_intermediate_size for qwen3_moe: it falls back to the config defaults (128 / 768), so those archs
# round-trip only for checkpoints with these sizes (Qwen3-8B/14B/32B have head_dim 128, Qwen3-30B-A3B
# has 768-wide experts); the mocks get them.
LOADER_SIZES = {"qwen2": {}, "qwen3": {"head_dim": 128}, "qwen3moe": {"moe_intermediate_size": 768}}


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("qwen2", True), ("qwen3", False), ("qwen3", True),
                                       ("qwen3moe", False)])
def test_transformers_gguf_loader_round_trip(mock_model, tmp_path, arch, tied):
    """transformers' own GGUF loader reads our file back to the original model's logits, bit for bit."""
    import torch
    import transformers as T
    model = mock_model(arch, tied=tied, full_precision=True, config=LOADER_SIZES[arch] or None)
    out = tmp_path / "m.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", "f32", "--quiet"]) == 0
    back = T.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    original = T.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ids = torch.arange(1, 50)[None]
    with torch.no_grad():
        a, b = back(ids).logits, original(ids).logits
    assert torch.equal(a, b)
