"""--fuse-qkv and --fuse-gate-up-exps: same logits as unfused, exact concatenations, clean refusals."""

from __future__ import annotations

import numpy as np
import pytest

from gguforge.cli import main
from gguforge.errors import EXIT_BAD_INPUT

from helpers import gguforge, qwen2moe_config, qwen2moe_tensors, read_gguf, write_checkpoint

# (arch, option) pairs llama.cpp's loaders accept
SUPPORTED = [("qwen2moe", "--fuse-qkv"), ("qwen3next", "--fuse-qkv"), ("qwen35", "--fuse-qkv"),
             ("qwen35moe", "--fuse-qkv"), ("qwen3next", "--fuse-gate-up-exps"), ("qwen35moe", "--fuse-gate-up-exps")]


def convert(model, out, *extra):
    assert main(["convert-hf", str(model), "--outfile", str(out), "--quiet", "--force", *extra]) == 0
    return out


def llama_logits(path, tokens):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float64)


def assert_fused_concatenation(plain: dict, fused: dict, option: str) -> int:
    """Every fused tensor is byte for byte the concatenation of the tensors it replaces."""
    n = 0
    for name, t in fused.items():
        if option == "--fuse-qkv" and ".attn_qkv." in name and name not in plain:
            blk, suffix = name.split(".attn_qkv.")
            parts = [plain[f"{blk}.attn_{x}.{suffix}"].data for x in "qkv"]
            assert t.data.tobytes() == np.concatenate(parts, axis=0).tobytes(), name
            n += 1
        if option == "--fuse-gate-up-exps" and ".ffn_gate_up_exps." in name:
            blk = name.split(".ffn_gate_up_exps.")[0]
            parts = [plain[f"{blk}.ffn_{x}_exps.weight"].data for x in ("gate", "up")]
            assert t.data.tobytes() == np.concatenate(parts, axis=1).tobytes(), name
            n += 1
    return n


@pytest.mark.parametrize("arch,option", SUPPORTED)
def test_fused_file_equals_unfused(mock_model, tmp_path, arch, option):
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    model = mock_model(arch)
    plain = convert(model, tmp_path / "plain.gguf", "--outtype", "f32")
    fused = convert(model, tmp_path / "fused.gguf", "--outtype", "f32", option)
    a, b = read_gguf(plain), read_gguf(fused)
    assert assert_fused_concatenation(a, b, option) > 0
    replaced = {n for n in a if n not in b}
    assert replaced and all((".attn_" if option == "--fuse-qkv" else "_exps.") in n for n in replaced)
    tokens = list(range(5, 45))
    ref, got = llama_logits(plain, tokens), llama_logits(fused, tokens)
    nmse = float(((got - ref) ** 2).sum() / (ref ** 2).sum())
    assert nmse <= 1e-10, nmse


def test_packed_experts_fuse_without_split(mock_model, tmp_path):
    """Hub checkpoints already hold gate_up_proj: the fused tensor is its bytes, untouched."""
    pytest.importorskip("torch")
    from safetensors import safe_open
    model = mock_model("qwen35moe", layout="hub")
    out = read_gguf(convert(model, tmp_path / "f.gguf", "--outtype", "bf16", "--fuse-gate-up-exps"))
    assert not any("ffn_gate_exps" in n or "ffn_up_exps" in n for n in out)
    fused = [n for n in out if n.endswith("ffn_gate_up_exps.weight")]
    assert fused
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    for shard in model.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            if name in f.keys():
                want = f.get_tensor(name).view(__import__("torch").int16).numpy().tobytes()
                assert out["blk.0.ffn_gate_up_exps.weight"].data.tobytes() == want
                return
    pytest.fail(f"{name} not found in the hub mock")


def _refused(model, tmp_path, option, match):
    out = tmp_path / "out"
    out.mkdir()
    r = gguforge("convert-hf", str(model), "--outfile", str(out / "x.gguf"), option)
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    assert match in r.stderr.splitlines()[0] and "Traceback" not in r.stderr
    assert list(out.iterdir()) == []


def test_qwen2moe_gate_up_fusion_is_refused(tmp_path):
    config = qwen2moe_config()
    model = write_checkpoint(tmp_path / "m", config, qwen2moe_tensors(config))
    _refused(model, tmp_path, "--fuse-gate-up-exps", "--fuse-gate-up-exps is not supported for qwen2moe")


def test_dense_qwen35_has_nothing_to_fuse(mock_model, tmp_path):
    pytest.importorskip("torch")
    _refused(mock_model("qwen35"), tmp_path, "--fuse-gate-up-exps", "has no routed experts to fuse")


@pytest.mark.parametrize("option", ["--fuse-gate-up-exps", "--fuse-qkv"])
def test_fused_q4_k_m_equals_llama_quantize_of_fused_bf16(mock_model, tmp_path, option):
    """One-pass Q4_K_M of a fused model = llama.cpp's llama-quantize of our fused bf16 file."""
    pytest.importorskip("torch")
    llama_cpp = pytest.importorskip("llama_cpp")
    from gguforge.quantize.presets import parse_preset
    model = mock_model("qwen35moe", dtype="bfloat16", size="q256", num_experts=8)
    bf16 = convert(model, tmp_path / "fused-bf16.gguf", "--outtype", "bf16", option)
    ours = convert(model, tmp_path / "fused-q4.gguf", "--outtype", "Q4_K_M", option)
    theirs = tmp_path / "llama-q4.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(parse_preset("Q4_K_M").file_type)
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(bf16).encode(), str(theirs).encode(), params) == 0
    a, b = read_gguf(ours), read_gguf(theirs)
    fused = ".ffn_gate_up_exps." if option == "--fuse-gate-up-exps" else ".attn_qkv."
    assert any(fused in n for n in a)
    assert a.keys() == b.keys()
    for name in b:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert a[name].data.tobytes() == b[name].data.tobytes(), name
