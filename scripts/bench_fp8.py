#!/usr/bin/env python3
"""Peak memory and time of converting an FP8 checkpoint, side by side with a bf16 checkpoint of the same
matrices (today's bound) and llama.cpp's converter on the same FP8 files. Nothing here is a test.

Generates a dense Qwen3 checkpoint with real matrix sizes (default hidden 4096, ffn 14336, 10 layers:
2.2 GB of e4m3 weights with one float32 scale per 128x128 block), converts it to bf16, and prints wall
time, peak RSS and the ratios. The output type (default f16) makes every job compute its values a chunk
at a time (bf16 -> bf16 would be a plain copy).

    python scripts/bench_fp8.py                       # 2.2 GB FP8 vs a 4-layer bf16 twin, to f16
    python scripts/bench_fp8.py --layers 2 --no-reference
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))


def qwen3_shapes(hidden: int, ffn: int) -> dict[str, tuple[int, int]]:
    hd, heads, kv = 128, hidden // 128, max(1, hidden // 512)
    return {"self_attn.q_proj": (heads * hd, hidden), "self_attn.k_proj": (kv * hd, hidden),
            "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, heads * hd),
            "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn)}


def big_checkpoint(root: Path, hidden: int, ffn: int, layers: int, fp8: bool = True) -> Path:
    """A dense Qwen3 checkpoint written with numpy: FP8 (random finite e4m3 codes, one float32 scale per
    128x128 block, `quantization_config` fp8) or bf16 with the same matrices."""
    from helpers import qwen2moe_config, write_checkpoint
    rng = np.random.default_rng(0)
    hd, heads, kv = 128, hidden // 128, max(1, hidden // 512)
    config = qwen2moe_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=hidden,
                             intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv, head_dim=hd)
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
        del config[key]
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    vocab = config["vocab_size"]
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden), np.float32) * 0.02,
         "model.norm.weight": np.ones(hidden, np.float32),
         "lm_head.weight": rng.standard_normal((vocab, hidden), np.float32) * 0.02}
    codes = rng.integers(0, 0x7E, size=1 << 22, dtype=np.uint8)  # positive finite codes (no NaN 0x7F)
    bf16 = rng.integers(0x3C00, 0x3D00, size=1 << 22, dtype=np.uint16)  # bf16 bits of small values
    for i in range(layers):
        p = f"model.layers.{i}."
        for leaf in ("input_layernorm", "post_attention_layernorm"):
            t[p + leaf + ".weight"] = np.ones(hidden, np.float32)
        for leaf in ("self_attn.q_norm", "self_attn.k_norm"):
            t[p + leaf + ".weight"] = np.ones(hd, np.float32)
        for leaf, (r, c) in qwen3_shapes(hidden, ffn).items():
            n = r * c
            signs = (np.arange(n, dtype=np.uint32) % 3 == 0).astype(np.uint8) << 7
            if fp8:
                t[p + leaf + ".weight"] = (np.resize(codes, n) | signs).reshape(r, c)
                t[p + leaf + ".weight_scale_inv"] = rng.random((-(-r // 128), -(-c // 128)), np.float32) * 1e-3
            else:
                t[p + leaf + ".weight"] = (np.resize(bf16, n) | signs.astype(np.uint16) << 8).reshape(r, c)
    write_checkpoint(root, config, t)
    relabel(root / "model.safetensors", {"U8": "F8_E4M3", "U16": "BF16"})
    return root


def relabel(path: Path, dtypes: dict[str, str]) -> None:
    """safetensors-numpy knows neither fp8 nor bf16: rename the dtypes of the stored codes in the header."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for k, v in header.items():
        if k != "__metadata__":
            v["dtype"] = dtypes.get(v["dtype"], v["dtype"])
    new = json.dumps(header).encode()  # offsets are relative to the data, so they stay valid
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def main(argv=None) -> int:
    import bench_convert
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--bf16-layers", type=int, default=4, help="layers of the bf16 twin (disk: 2 bytes a weight)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--outtype", default="f16")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp8 = big_checkpoint(tmp / "fp8", args.hidden, args.ffn, args.layers)
        size = (fp8 / "model.safetensors").stat().st_size
        ours = [sys.executable, "-m", "gguforge", "convert-hf", "--quiet", "--force", "--threads", str(args.threads),
                "--outtype", args.outtype, "--outfile"]
        rows = []
        t, rss = bench_convert.measure(ours + [str(tmp / "a.gguf"), str(fp8)])
        rows.append((f"gguforge FP8 {size / 1e9:.2f} GB -> {args.outtype}", t, rss))
        (tmp / "a.gguf").unlink()
        twin = big_checkpoint(tmp / "bf16", args.hidden, args.ffn, args.bf16_layers, fp8=False)
        bsize = (twin / "model.safetensors").stat().st_size
        t, rss = bench_convert.measure(ours + [str(tmp / "b.gguf"), str(twin)])
        rows.append((f"gguforge bf16 {bsize / 1e9:.2f} GB -> {args.outtype} (today's bound)", t, rss))
        (tmp / "b.gguf").unlink()
        if not args.no_reference:
            from helpers import _REFERENCE_RUNNER, llama_cpp_tree
            tree = llama_cpp_tree()
            env = {**__import__("os").environ, "PYTHONPATH": str(tree / "gguf-py")}
            t, rss = bench_convert.measure([sys.executable, "-c", _REFERENCE_RUNNER, str(tree), "qwen2",
                                            str(tree / "convert_hf_to_gguf.py"), str(fp8), "--outfile",
                                            str(tmp / "c.gguf"), "--outtype", args.outtype], env=env)
            rows.append((f"llama.cpp convert_hf_to_gguf.py FP8 {size / 1e9:.2f} GB -> {args.outtype}", t, rss))
    print("| job | wall s | peak RSS | RSS / gguforge FP8 |")
    print("|---|---|---|---|")
    for job, t, rss in rows:
        print(f"| {job} | {t:.1f} | {rss / 2**20:.0f} MB | {rss / rows[0][2]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
