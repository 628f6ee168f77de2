"""llama.cpp's LLM_TYPE_70B rule, and rope scaling types: written as llama.cpp reads them, or refused."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gguforge.cli import main
from gguforge.quantize.presets import parse_preset
from gguforge.quantize.rules import TensorIn, model_is_70b, plan_quantization

from helpers import gguf_fields, qwen2moe_config, qwen2moe_tensors, write_checkpoint


def fields(values: dict):
    return values.get


@pytest.mark.parametrize("arch,values,expected", [
    ("qwen2", {"qwen2.block_count": 80}, True),
    ("qwen2", {"qwen2.block_count": 64}, False),
    ("llama", {"llama.block_count": 80, "llama.attention.head_count": 64, "llama.attention.head_count_kv": 8}, True),
    ("llama", {"llama.block_count": 80, "llama.attention.head_count": 64, "llama.attention.head_count_kv": 64}, False),
    ("llama", {"llama.block_count": 80, "llama.attention.head_count": 64}, False),  # no GQA: the 65B
    ("llama", {"llama.block_count": 80, "llama.attention.head_count": [64] * 80,
               "llama.attention.head_count_kv": [8] * 80}, True),
    ("jais2", {"jais2.block_count": 68}, True),
    ("qwen2moe", {"qwen2moe.block_count": 80}, False),
    ("qwen3", {"qwen3.block_count": 80}, False),
])
def test_model_is_70b_where_llama_cpp_says_so(arch, values, expected):
    assert model_is_70b(arch, fields(values)) is expected


def qwen2_gguf(path, n_layer: int, n_embd: int = 256, n_head: int = 2, n_head_kv: int = 1) -> None:
    """A synthetic qwen2 GGUF with every tensor llama.cpp's qwen2 loader names (random f16 data)."""
    rng = np.random.default_rng(n_layer)
    hd = n_embd // n_head
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(n_layer)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_embd)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float16)

    w.add_tensor("token_embd.weight", mat(512, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", mat(512, n_embd))
    for i in range(n_layer):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(b + "attn_q.weight", mat(n_head * hd, n_embd))
        w.add_tensor(b + "attn_k.weight", mat(n_head_kv * hd, n_embd))
        w.add_tensor(b + "attn_v.weight", mat(n_head_kv * hd, n_embd))
        w.add_tensor(b + "attn_output.weight", mat(n_embd, n_head * hd))
        w.add_tensor(b + "ffn_norm.weight", np.ones(n_embd, np.float32))
        for name in ("ffn_gate", "ffn_up"):
            w.add_tensor(b + name + ".weight", mat(n_embd, n_embd))
        w.add_tensor(b + "ffn_down.weight", mat(n_embd, n_embd))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_M"])
def test_80_layer_qwen2_quantizes_as_llama_quantize_does(tmp_path, preset):
    llama_cpp = pytest.importorskip("llama_cpp")
    src = tmp_path / "qwen2-80.gguf"
    qwen2_gguf(src, 80)
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    assert main(["quantize", str(src), str(ours), preset, "-q"]) == 0

    @llama_cpp.llama_log_callback
    def ignore(level, text, data):
        pass

    llama_cpp.llama_log_set(ignore, ctypes.c_void_p(0))
    try:
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread = int(parse_preset(preset).file_type), 2
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(ref).encode(), p)
    finally:  # `ignore` dies with this function: a later llama.cpp log call through it would segfault
        from llama_cpp._logger import llama_log_callback
        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
    assert code == 0
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(ref).tensors}
    assert sorted(a) == sorted(b)
    for name in b:
        assert (a[name].tensor_type, a[name].data.tobytes()) == (b[name].tensor_type, b[name].data.tobytes()), name

    # ... and the 70B rule is what made some of these choices (so the comparison above can see it)
    reader = gguf.GGUFReader(src)
    tensors = [TensorIn(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), T(t.tensor_type))
               for t in reader.tensors]
    plan = {is70: {p.name: p.dst_type for p in plan_quantization(tensors, preset, arch="qwen2", n_layer_all=80,
                                                                  model_is_70b=is70)}
            for is70 in (False, True)}
    changed = [n for n in plan[True] if plan[True][n] != plan[False][n]]
    assert changed and all(".attn_v." in n for n in changed)
    assert all(T(b[n].tensor_type) == plan[True][n] for n in changed)


# -- rope scaling ---------------------------------------------------------------------------------


def convert(tmp_path, **config_over):
    config = qwen2moe_config(**config_over)
    if "rope_scaling" in config_over:
        del config["rope_parameters"]  # (it would take precedence)
    root = write_checkpoint(tmp_path / "model", config, qwen2moe_tensors(config))
    out = tmp_path / "out.gguf"
    return main(["convert-hf", str(root), "--outfile", str(out), "-q"]), out


@pytest.mark.parametrize("kind", ["longrope", "llama3", "dynamic", "su", "ntk"])
def test_rope_types_llama_cpp_does_not_implement_are_refused(tmp_path, capsys, kind):
    rc, out = convert(tmp_path, rope_scaling={"rope_type": kind, "factor": 4.0,
                                              "original_max_position_embeddings": 4096})
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert len(err.strip().splitlines()) <= 2 and repr(kind) in err and "yarn" in err and "linear" in err


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_yarn_writes_what_llama_cpp_reads(tmp_path, key):
    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 32.0,
            "beta_slow": 1.0, "attention_factor": 1.25}
    rc, out = convert(tmp_path, **{key: rope})
    assert rc == 0
    f = gguf_fields(out)
    assert f["qwen2moe.rope.scaling.type"] == "yarn"
    assert f["qwen2moe.rope.scaling.factor"] == 4.0
    assert f["qwen2moe.rope.scaling.original_context_length"] == 32768
    assert f["qwen2moe.rope.scaling.yarn_beta_fast"] == 32.0
    assert f["qwen2moe.rope.scaling.yarn_beta_slow"] == 1.0
    assert f["qwen2moe.rope.scaling.yarn_attn_factor"] == 1.25


def test_yarn_takes_original_length_from_the_top_level_config(tmp_path):
    rc, out = convert(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 2.0},
                      original_max_position_embeddings=8192)
    assert rc == 0 and gguf_fields(out)["qwen2moe.rope.scaling.original_context_length"] == 8192


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": "4", "original_max_position_embeddings": 4096}, "factor"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "linear", "factor": float("nan")}, "factor"),
])
def test_broken_rope_scaling_is_one_clear_error(tmp_path, capsys, rope, message):
    rc, out = convert(tmp_path, rope_scaling=rope)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and message in err and "Traceback" not in err


def test_linear_and_default_rope(tmp_path):
    rc, out = convert(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert rc == 0
    f = gguf_fields(out)
    assert (f["qwen2moe.rope.scaling.type"], f["qwen2moe.rope.scaling.factor"]) == ("linear", 2.0)
    rc, out = convert(tmp_path / "d", rope_scaling={"rope_type": "default"})
    assert rc == 0 and "qwen2moe.rope.scaling.type" not in gguf_fields(out)
