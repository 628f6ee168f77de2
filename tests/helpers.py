"""Torch-free helpers: small Qwen2-MoE checkpoints written with numpy, and GGUF reading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from gguforge.cli import embedded_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def qwen2moe_config(**over) -> dict:
    config = {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "tie_word_embeddings": False, "bos_token_id": 395, "eos_token_id": 397,
    }
    config.update(over)
    return config


def tiny_qwen2moe_config(**over) -> dict:
    """The smallest Qwen2-MoE config (one layer, two experts): for fuzzing many variants fast."""
    return qwen2moe_config(**{**dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                                     num_experts=2, moe_intermediate_size=8, shared_expert_intermediate_size=8),
                              **over})


def qwen2moe_tensors(config: dict, seed: int = 0, packed: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    H, V, E = config["hidden_size"], config["vocab_size"], config["num_experts"]
    Fe, Fs = config["moe_intermediate_size"], config["shared_expert_intermediate_size"]
    hd = H // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.05

    t = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": 1 + w(H), "lm_head.weight": w(V, H)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": 1 + w(H), p + "post_attention_layernorm.weight": 1 + w(H),
            p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.q_proj.bias": w(H),
            p + "self_attn.k_proj.weight": w(kv, H), p + "self_attn.k_proj.bias": w(kv),
            p + "self_attn.v_proj.weight": w(kv, H), p + "self_attn.v_proj.bias": w(kv),
            p + "self_attn.o_proj.weight": w(H, H), p + "mlp.gate.weight": w(E, H),
            p + "mlp.shared_expert.gate_proj.weight": w(Fs, H), p + "mlp.shared_expert.up_proj.weight": w(Fs, H),
            p + "mlp.shared_expert.down_proj.weight": w(H, Fs), p + "mlp.shared_expert_gate.weight": w(1, H),
        })
        gate, up, down = w(E, Fe, H), w(E, Fe, H), w(E, H, Fe)
        if packed:
            t[p + "mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
            t[p + "mlp.experts.down_proj"] = down
        else:
            for e in range(E):
                t[p + f"mlp.experts.{e}.gate_proj.weight"] = gate[e]
                t[p + f"mlp.experts.{e}.up_proj.weight"] = up[e]
                t[p + f"mlp.experts.{e}.down_proj.weight"] = down[e]
    return t


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Truncate float32 to bf16 bit patterns (for making bf16 checkpoints whose values are exact)."""
    return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_checkpoint(root: Path, config: dict, tensors: dict[str, np.ndarray], shards: int = 1,
                     bf16: bool = False) -> Path:
    """Write config, the built-in model's tokenizer, and tensors (optionally bf16, optionally sharded)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(embedded_model_dir() / name, root / name)
    names = list(tensors)
    if bf16:
        tensors = {k: to_bf16_bits(v) for k, v in tensors.items()}
    if shards == 1:
        _save(tensors, root / "model.safetensors", bf16)
        return root
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::shards]}
        _save(part, root / fname, bf16)
        weight_map.update({k: fname for k in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def _save(tensors: dict[str, np.ndarray], path: Path, bf16: bool) -> None:
    save_file(tensors, str(path))
    if bf16:  # safetensors-numpy has no bf16: relabel the uint16 payload in the header
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        for k, v in header.items():
            if k != "__metadata__":
                v["dtype"] = "BF16"
        new = json.dumps(header).encode()  # offsets are relative to the data, so they stay valid
        path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def gguforge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (so exit codes and stderr are exactly what users see)."""
    return subprocess.run([sys.executable, "-m", "gguforge", *args], capture_output=True, text=True, cwd=cwd)


def read_gguf(path: Path) -> dict:
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}


def gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


def llama_cpp_tree(cache: Path = Path.home() / ".cache" / "gguforge-tests") -> Path | None:
    """llama.cpp's source as vendored in the llama-cpp-python sdist (from PyPI, cached), or None."""
    import tarfile
    tree = cache / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    try:
        archive = _llama_tools().sdist_archive(cache)
    except (OSError, RuntimeError, subprocess.CalledProcessError):
        return None
    prefix = archive.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(wanted)]
        for m in members:
            m.name = "llama.cpp/" + m.name[len(prefix):]
        tar.extractall(cache, members=members, filter="data")
    return tree if (tree / "convert_hf_to_gguf.py").is_file() else None


# llama.cpp's converter identifies tokenizers by hashing their output against a table of known
# models; mock tokenizers are not in it, so tests name the pre-tokenizer for it.
_REFERENCE_RUNNER = """
import sys, runpy, json
tree, pre, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, tree)
import importlib.machinery, types
if "sentencepiece" not in sys.modules:  # Qwen2Model.set_vocab imports it before looking for tokenizer.model
    try:
        import sentencepiece
    except ImportError:
        stub = types.ModuleType("sentencepiece")
        stub.SentencePieceProcessor = None
        stub.__spec__ = importlib.machinery.ModuleSpec("sentencepiece", None)
        sys.modules["sentencepiece"] = stub
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
for argv in runs:  # one process for several conversions: torch and transformers are imported once
    sys.argv = argv
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_reference_converter(tree: Path, model: Path, out: Path, outtype: str, pre: str, *extra: str):
    return run_reference_converters(tree, pre, [(model, out, outtype, *extra)])


def run_reference_converters(tree: Path, pre: str, runs):
    """llama.cpp's converter for each (model, out, outtype, *extra) in `runs`, in one process (stops at the
    first failure)."""
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    script = str(tree / "convert_hf_to_gguf.py")
    argvs = [[script, str(model), "--outfile", str(out), "--outtype", outtype, *extra]
             for model, out, outtype, *extra in runs]
    return subprocess.run([sys.executable, "-c", _REFERENCE_RUNNER, str(tree), pre, json.dumps(argvs)],
                          capture_output=True, text=True, env=env)


def llama_quantize(src, dst, preset: str, **params) -> None:
    """llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize), 2 threads; `params` set
    fields of llama_model_quantize_params."""
    import llama_cpp

    from gguforge.quantize.presets import parse_preset
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = int(parse_preset(preset).file_type)
    p.nthread = 2
    for key, value in params.items():
        setattr(p, key, value)
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p) == 0


def _llama_tools():
    """scripts/llama_tools.py as a module (the sdist download and the cmake build of llama.cpp's tools)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import llama_tools
    finally:
        sys.path.pop(0)
    return llama_tools


def llama_tool(name: str) -> Path:
    """Path of one of llama.cpp's programs (llama-quantize, llama-imatrix, ...), built with cmake from
    the pinned sdist's llama.cpp tree and cached under ~/.cache/gguforge-tests (scripts/llama_tools.py)."""
    return _llama_tools().llama_tools(name)[name]


def llama_tool_or_skip(name: str) -> Path:
    """llama_tool(name), or skip the calling test when it cannot be built here (no compiler / cmake /
    network): the reference is missing, not wrong."""
    import pytest
    try:
        return llama_tool(name)
    except Exception as e:
        pytest.skip(f"{name} could not be built: {e}")


def llama_cpp_source() -> Path:
    """The whole pinned llama.cpp tree (src/, models/ggml-vocab-*, ...), unpacked once under the tools'
    cache (scripts/llama_tools.py), without building anything."""
    return _llama_tools().source_tree()


def small_row_chunks(monkeypatch, nbytes: int) -> None:
    """Row chunks of about `nbytes` float32 bytes instead of gguforge.parallel.CHUNK_BYTES (16 MB), in every
    loaded gguforge module that holds the constant, so that the mocks' tensors span many chunks."""
    import gguforge.convert.pipeline  # noqa: F401  (load the users first, then patch them all)
    import gguforge.quantize.run  # noqa: F401
    patched = [name for name, mod in list(sys.modules.items())
               if name.startswith("gguforge") and hasattr(mod, "CHUNK_BYTES")]
    assert "gguforge.parallel" in patched
    for name in patched:
        monkeypatch.setattr(sys.modules[name], "CHUNK_BYTES", nbytes)
