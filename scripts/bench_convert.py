#!/usr/bin/env python3
"""Benchmark convert-hf against llama.cpp's convert_hf_to_gguf.py and a plain copy, side by side.

Generates a random bf16 checkpoint with real Qwen dimensions (default: Qwen3.5-4B
with 8 layers and the tied 248k vocabulary, about 3.1 GB), then times each job
in one run and prints wall time, peak RSS and the ratios. Nothing here is a test.

    python scripts/bench_convert.py                      # bf16, f16, q8_0 on the 3 GB model
    python scripts/bench_convert.py --layers 24          # a bigger model (memory must not grow)
    python scripts/bench_convert.py --jobs bf16 --no-reference
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

QWEN35_4B = dict(hidden_size=2560, intermediate_size=9216, num_attention_heads=16, num_key_value_heads=4,
                 head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                 linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320,
                 full_attention_interval=4, rms_norm_eps=1e-6, max_position_embeddings=262144,
                 tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                                            "partial_rotary_factor": 0.25,
                                                            "mrope_section": [11, 11, 10],
                                                            "mrope_interleaved": True})


QWEN35_35B_A3B = dict(QWEN35_4B, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2,
                      num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                      shared_expert_intermediate_size=512, tie_word_embeddings=False)
del QWEN35_35B_A3B["intermediate_size"]


def moe_mlp_shapes(c: dict, p: str, packed: bool) -> dict[str, tuple[int, ...]]:
    H, E, Fe, Fs = c["hidden_size"], c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    shapes = {p + "mlp.gate.weight": (E, H), p + "mlp.shared_expert_gate.weight": (1, H),
              p + "mlp.shared_expert.gate_proj.weight": (Fs, H), p + "mlp.shared_expert.up_proj.weight": (Fs, H),
              p + "mlp.shared_expert.down_proj.weight": (H, Fs)}
    if packed:
        shapes[p + "mlp.experts.gate_up_proj"] = (E, 2 * Fe, H)
        shapes[p + "mlp.experts.down_proj"] = (E, H, Fe)
    else:
        for e in range(E):
            shapes.update({p + f"mlp.experts.{e}.gate_proj.weight": (Fe, H),
                           p + f"mlp.experts.{e}.up_proj.weight": (Fe, H),
                           p + f"mlp.experts.{e}.down_proj.weight": (H, Fe)})
    return shapes


def qwen35_shapes(c: dict, layers: int, moe: str | None = None) -> dict[str, tuple[int, ...]]:
    H, F = c["hidden_size"], c.get("intermediate_size")
    nk, nv, dk, dv = (c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                      c["linear_value_head_dim"])
    conv = 2 * nk * dk + nv * dv
    hd, nh, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], H), "model.norm.weight": (H,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], H)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
        if moe:
            shapes.update(moe_mlp_shapes(c, p, packed=moe == "packed"))
        else:
            shapes.update({p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                           p + "mlp.down_proj.weight": (H, F)})
        if (i + 1) % c["full_attention_interval"]:
            a = p + "linear_attn."
            shapes.update({a + "in_proj_qkv.weight": (conv, H), a + "in_proj_z.weight": (nv * dv, H),
                           a + "in_proj_b.weight": (nv, H), a + "in_proj_a.weight": (nv, H), a + "A_log": (nv,),
                           a + "dt_bias": (nv,), a + "conv1d.weight": (conv, 1, c["linear_conv_kernel_dim"]),
                           a + "norm.weight": (dv,), a + "out_proj.weight": (H, nv * dv)})
        else:
            a = p + "self_attn."
            shapes.update({a + "q_proj.weight": (2 * nh * hd, H), a + "k_proj.weight": (nkv * hd, H),
                           a + "v_proj.weight": (nkv * hd, H), a + "o_proj.weight": (H, nh * hd),
                           a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
    return shapes


def write_bf16_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], pool: np.ndarray, rng) -> None:
    """Header first, then random finite bf16 payloads streamed from a shared pool (no big buffers)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            left = int(np.prod(shape))
            while left:
                n = min(left, len(pool) // 2)
                start = int(rng.integers(0, len(pool) - n + 1))
                f.write(pool[start:start + n].tobytes())
                left -= n


def make_checkpoint(out: Path, layers: int, moe: str | None = None, shard_bytes: int = 2 << 30) -> Path:
    """moe: None (Qwen3.5-4B dense), "per-expert" or "packed" (Qwen3.5-35B-A3B MoE dimensions)."""
    import make_mocks
    out.mkdir(parents=True, exist_ok=True)
    arch = ["Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", QWEN35_35B_A3B] if moe else \
        ["Qwen3_5ForCausalLM", "qwen3_5_text", QWEN35_4B]
    config = {"architectures": [arch[0]], "model_type": arch[1], "num_hidden_layers": layers,
              "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
              "torch_dtype": "bfloat16", **arch[2]}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    make_mocks.write_tokenizer("qwen35", out)
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, size=16 << 20, dtype=np.uint32).astype(np.uint16)
    pool = (bits & 0x83FF) | 0x3800  # random sign and mantissa, small exponents: finite, |x| < 1
    shapes = qwen35_shapes(config, layers, moe)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = shape
        size += int(np.prod(shape)) * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_bf16_safetensors(out / fname, part, pool, rng)
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def measure(cmd: list[str], env=None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command, via a wrapper that owns it as its only child."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t; "
               "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, r.returncode)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    dt, rss, rc = out.stdout.strip().splitlines()[-1].split()
    if int(rc) != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{out.stderr[-2000:]}")
    return float(dt), int(rss)


def reference_tree(cache: Path) -> Path:
    """llama.cpp as vendored in the llama-cpp-python sdist (downloaded from PyPI once)."""
    for base in [cache, Path("/tmp/sdist")]:
        found = sorted(base.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
        if found:
            return found[-1].parent
    from llama_tools import sdist_archive
    import tarfile
    with tarfile.open(sdist_archive(cache)) as tar:
        tar.extractall(cache, filter="data")
    return reference_tree(cache)


# The reference identifies tokenizers by hashing their output against a table of known
# models; our generated tokenizer is not in it, so the bench names it directly.
REFERENCE_RUNNER = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen35"
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def drop(path: Path) -> None:
    if path.exists():
        path.unlink()
    subprocess.run(["sync"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="default: 8 dense, 2 MoE (both about 3 GB)")
    ap.add_argument("--moe", choices=["per-expert", "packed"], default=None,
                    help="Qwen3.5-35B-A3B-shaped MoE (256 experts) instead of the dense 4B")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gguforge-bench")
    ap.add_argument("--jobs", default="bf16,f16,q8_0")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()

    args.layers = args.layers or (2 if args.moe else 8)
    model = args.workdir / (f"qwen35moe-{args.moe}-{args.layers}L" if args.moe else f"qwen35-4b-{args.layers}L")
    if not (model / "model.safetensors.index.json").exists():
        print(f"generating {model} ...", flush=True)
        make_checkpoint(model, args.layers, args.moe)
    shards = sorted(model.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    print(f"model: {model.name} ({size / 1e9:.2f} GB bf16, {args.layers} layers)")
    subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL)  # warm the page cache for everyone

    out = args.workdir / "out.gguf"
    copy_t, _ = measure(["sh", "-c", f"cat {' '.join(map(str, shards))} > {out} && sync"])
    drop(out)
    gguforge = [sys.executable, "-m", "gguforge", "convert-hf", str(model), "--outfile", str(out), "--quiet"]
    ref = None if args.no_reference else reference_tree(Path.home() / ".cache" / "gguforge-bench")
    rows = []
    for job in args.jobs.split(","):
        ours_t, ours_rss = measure(gguforge + ["--outtype", job])
        drop(out)
        ref_t = ref_rss = float("nan")
        if ref is not None:
            env = {**os.environ, "PYTHONPATH": str(ref / "gguf-py")}
            ref_t, ref_rss = measure([sys.executable, "-c", REFERENCE_RUNNER, str(ref), str(ref / "convert_hf_to_gguf.py"),
                                      str(model), "--outfile", str(out), "--outtype", job,
                                      "--no-mtp"], env=env)  # it dies on checkpoints without MTP otherwise
            drop(out)
        rows.append((job, ours_t, ours_rss, ref_t, ref_rss))

    print(f"\ncopy (cat + sync): {copy_t:.1f} s\n")
    print("| job | gguforge s | gguforge peak RSS | llama.cpp s | llama.cpp peak RSS | speed-up | × copy time |")
    print("|---|---|---|---|---|---|---|")
    for job, t, rss, rt, rrss in rows:
        print(f"| bf16→{job} | {t:.1f} | {rss / 2**20:.0f} MB | {rt:.1f} | {rrss / 2**20:.0f} MB | "
              f"{rt / t:.2f}× | {t / copy_t:.2f} |")


if __name__ == "__main__":
    main()
