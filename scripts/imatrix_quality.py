#!/usr/bin/env python3
"""What an importance matrix buys: Q4_K_M with and without one, against the f32 model, on mocks.

For each mock (random weights, q256 size so every row fills whole K-quant blocks):
  1. `gguforge convert-hf --outtype f32`;
  2. `gguforge imatrix` on the HF checkpoint over a calibration text (and, when it can be built,
     llama-imatrix on the f32 GGUF over the same text, for comparison);
  3. `gguforge quantize f32.gguf Q4_K_M` without and with each imatrix;
  4. llama.cpp (llama-cpp-python) logits of every file on a held-out text: NMSE against the f32 logits
     and the mean KL divergence KL(p_f32 || p_quant) per token.
Prints a Markdown table (the README's imatrix section). Nothing here is a test.

    python scripts/imatrix_quality.py [--archs qwen3,qwen3moe] [--no-llama-imatrix]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

WORDS = ("the quick brown fox jumps over a lazy dog while models weigh every matrix and token ; "
         "importance 12 345 6789 , . ! ? ( ) café naïve 你好 世界 Привет").split()


def text(n_lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(n_lines)) + "\n"


def gguforge(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "gguforge", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"gguforge {' '.join(args)} failed:\n{r.stderr}")


def logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import GGML_TYPE_F32, Llama
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=len(ids) + 8, n_batch=len(ids) + 8, n_threads=2,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[: llm.n_tokens], dtype=np.float64)
    llm.close()
    return out


def kl_and_nmse(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    nmse = float(np.sum((got - ref) ** 2) / np.sum(ref ** 2))
    return kl, nmse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="qwen3,qwen3moe,qwen35")
    ap.add_argument("--preset", default="Q4_K_M")
    ap.add_argument("--ctx", type=int, default=128, help="imatrix chunk size")
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--no-llama-imatrix", action="store_true")
    args = ap.parse_args(argv)

    import make_mocks
    tool = None
    if not args.no_llama_imatrix:
        try:
            from llama_tools import llama_tools
            tool = llama_tools("llama-imatrix")["llama-imatrix"]
        except Exception as e:  # noqa: BLE001 - the comparison row is optional
            print(f"(llama-imatrix unavailable: {e})", file=sys.stderr)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib, held_out = tmp / "calib.txt", tmp / "eval.txt"
        calib.write_text(text(400, seed=1))
        held_out.write_text(text(80, seed=2))
        for arch in args.archs.split(","):
            model = make_mocks.make_mock(arch, tmp / arch, size="q256")
            f32 = tmp / f"{arch}-f32.gguf"
            gguforge("convert-hf", str(model), "--outtype", "f32", "--outfile", str(f32), "-q")
            imatrices = {"gguforge imatrix": tmp / f"{arch}-im.gguf"}
            gguforge("imatrix", str(model), "-f", str(calib), "-c", str(args.ctx), "-o",
                     str(imatrices["gguforge imatrix"]), "-q")
            if tool is not None:
                imatrices["llama-imatrix"] = tmp / f"{arch}-im-llama.gguf"
                r = subprocess.run([str(tool), "-m", str(f32), "-f", str(calib), "-c", str(args.ctx), "--no-ppl",
                                    "-o", str(imatrices["llama-imatrix"])], capture_output=True, text=True)
                if r.returncode:
                    del imatrices["llama-imatrix"]
            from transformers import AutoTokenizer
            ids = AutoTokenizer.from_pretrained(str(model))(held_out.read_text())["input_ids"][:args.eval_tokens]
            ref = logits(f32, ids)
            variants = {"none": []} | {name: ["--imatrix", str(p)] for name, p in imatrices.items()}
            for name, extra in variants.items():
                out = tmp / f"{arch}-{name.replace(' ', '_')}.gguf"
                gguforge("quantize", str(f32), str(out), args.preset, "-q", *extra)
                kl, nmse = kl_and_nmse(ref, logits(out, ids))
                rows.append((arch, name, kl, nmse))
                out.unlink()

    print(f"| mock (q256) | {args.preset} imatrix | mean KL vs f32 | logit NMSE vs f32 | KL vs none |")
    print("|---|---|---|---|---|")
    base = {arch: kl for arch, name, kl, _ in rows if name == "none"}
    for arch, name, kl, nmse in rows:
        print(f"| {arch} | {name} | {kl:.3e} | {nmse:.3e} | {kl / base[arch]:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
