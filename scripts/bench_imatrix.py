#!/usr/bin/env python3
"""Benchmark `gguforge imatrix` (torch on CPU, from the HF checkpoint) against llama-imatrix (on the f32
GGUF of the same checkpoint), side by side: same text, chunk size and thread count. Wall time of each
whole command (loading included) and the ratio. Nothing here is a test.

The model is a random float32 checkpoint with the mock tokenizer and scaled-up dimensions
(default: Qwen3 dense, hidden 768, 4 layers; --arch qwen3moe adds 16 routed experts).

    python scripts/bench_imatrix.py [--arch qwen3|qwen3moe] [--hidden 768] [--layers 4] [--chunks 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def build_model(arch: str, out: Path, hidden: int, layers: int) -> Path:
    import torch
    import make_mocks

    kw = make_mocks.text_config_kwargs(arch, "q256")
    kw.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
              num_key_value_heads=max(1, hidden // 256), head_dim=128)
    if arch == "qwen3moe":
        kw.update(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=hidden)
    else:
        kw.update(intermediate_size=3 * hidden)
    config_cls, model_cls = make_mocks._classes(arch)[:2]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kw)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    make_mocks.write_tokenizer(arch, out)
    return out


def text(n_lines: int) -> str:
    import numpy as np
    words = ("the quick brown fox jumps over a lazy dog while models weigh every matrix and token ; "
             "importance 12 345 6789 , . ! ? ( ) café naïve 你好 世界 Привет").split()
    rng = np.random.default_rng(0)
    return "\n".join(" ".join(rng.choice(words, 12)) for _ in range(n_lines)) + "\n"


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds of the whole command, its own steady-state tokens/s)."""
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{r.stderr[-3000:]}")
    log = r.stdout + r.stderr
    if m := re.search(r"([\d,]+) tokens/s", log):  # gguforge: the forward passes only
        return wall, float(m.group(1).replace(",", ""))
    # llama-imatrix: the first pass decodes n_seq chunks of n_ctx tokens
    per_pass = float(re.search(r"([\d.]+) seconds per pass", log).group(1))
    m = re.search(r"n_ctx=(\d+), batch_size=\d+, n_seq=(\d+)", log)
    return wall, int(m.group(1)) * int(m.group(2)) / per_pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen3", choices=("qwen3", "qwen3moe"))
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs each")
    args = ap.parse_args(argv)

    from llama_tools import llama_tools
    tool = llama_tools("llama-imatrix")["llama-imatrix"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(args.arch, tmp / "model", args.hidden, args.layers)
        calib = tmp / "calib.txt"
        calib.write_text(text(60 * args.chunks * args.ctx // 512 + 60))
        f32 = tmp / "f32.gguf"
        subprocess.run([sys.executable, "-m", "gguforge", "convert-hf", str(model), "--outtype", "f32",
                        "--outfile", str(f32), "-q"], check=True)
        common = ["-f", str(calib), "-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads)]
        ours = [sys.executable, "-m", "gguforge", "imatrix", str(model), *common, "--device", "cpu",
                "--force", "-o", str(tmp / "ours.gguf")]
        ref = [str(tool), "-m", str(f32), *common, "--no-ppl", "-o", str(tmp / "ref.gguf")]
        runs = [(timed(ours), timed(ref)) for _ in range(args.repeat)]  # interleaved: load changes alike
        t_ours, r_ours = min(o[0] for o, _ in runs), max(o[1] for o, _ in runs)
        t_ref, r_ref = min(r[0] for _, r in runs), max(r[1] for _, r in runs)
        n_params = sum(p.stat().st_size for p in model.glob("*.safetensors")) // 4
    tokens = args.chunks * args.ctx
    print(f"{args.arch}: {n_params / 1e6:.0f}M parameters, {args.chunks} chunks x {args.ctx} tokens, "
          f"{args.threads} threads")
    print("  whole command (loading included), best of", args.repeat)
    print(f"    gguforge imatrix (torch CPU, HF checkpoint): {t_ours:7.2f} s")
    print(f"    llama-imatrix (f32 GGUF):                   {t_ref:7.2f} s")
    print(f"    ratio gguforge / llama-imatrix: {t_ours / t_ref:.2f}x")
    print("  forward passes only (tokens/s)")
    print(f"    gguforge imatrix: {r_ours:8,.0f}   llama-imatrix (first pass): {r_ref:8,.0f}   "
          f"time ratio {r_ref / r_ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
