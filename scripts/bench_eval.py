#!/usr/bin/env python3
"""`gguforge eval` against llama-perplexity, side by side, measured in one run (2 threads).

GGUF base + four candidates: gguforge eval (one process: base pass, then the four KLD passes) against
llama-perplexity's base pass (--kl-divergence-base) plus one --kl-divergence pass per candidate, on the
same files, text, -c, -b and threads; the base storage of both; whether every printed statistic agrees.

    python scripts/bench_eval.py [--model HF_DIR] [--text FILE] [-c 512] [--chunks N] [--plot out.png]

Default model: the trained Qwen3 test fixture (scripts/trained_mock.py), its held-out text.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

TYPES = ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF checkpoint (default: the trained test fixture)")
    ap.add_argument("--text", help="evaluation text (default: the fixture's held-out text)")
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--plot", help="also write the example plot here")
    a = ap.parse_args(argv)

    import gguforge
    from gguforge.eval.report import table, to_png
    from gguforge.eval.stats import printed_lines
    from llama_tools import llama_tools
    tool = llama_tools("llama-perplexity")["llama-perplexity"]
    if a.model:
        model, text = Path(a.model), Path(a.text)
    else:
        import trained_mock
        model = trained_mock.trained_model()
        text = Path(a.text) if a.text else model / "eval.txt"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "m-F32.gguf"
        gguforge.convert_hf(model, base, outtype="f32")
        cands = [tmp / f"m-{t}.gguf" for t in TYPES]
        for t, c in zip(TYPES, cands):
            gguforge.quantize(base, c, t)
        common = ["-c", str(a.ctx_size), "-t", str(a.threads)] + (["--chunks", str(a.chunks)] if a.chunks else [])

        t0 = time.perf_counter()
        kld_file = tmp / "base.kld"
        subprocess.run([str(tool), "-m", str(base), "-f", str(text), "--kl-divergence-base", str(kld_file), *common],
                       check=True, capture_output=True)
        t_lbase = time.perf_counter() - t0
        ref_lines, t_kld = [], 0.0
        for c in cands:
            argv = [str(tool), "-m", str(c), "--kl-divergence-base", str(kld_file), "--kl-divergence", *common]
            t1 = time.perf_counter()
            r = subprocess.run(argv, check=True, capture_output=True, text=True)
            t_kld += time.perf_counter() - t1
            for _ in range(5):  # llama.cpp's logger thread can lose the last lines at exit: read them again
                lines = (r.stdout + r.stderr).splitlines()
                start = next((i for i, line in enumerate(lines) if "Perplexity statistics" in line), None)
                if start is not None and any(line.startswith("Same top p") for line in lines[start:]):
                    break
                r = subprocess.run(argv, check=True, capture_output=True, text=True)
            ref_lines.append([ln.strip() for ln in lines[start:] if ":" in ln and
                              any(k in ln for k in ("PPL", "KLD", "Δp", "top p"))])
        t_llama = t_lbase + t_kld

        t0 = time.perf_counter()
        res = gguforge.evaluate(base, cands, text, ctx_size=a.ctx_size, chunks=a.chunks, threads=a.threads)
        t_ours = time.perf_counter() - t0
        same = sum(ref == [ln.strip() for ln in printed_lines(d)] for ref, d in zip(ref_lines, res.details))

        print(table(res))
        print()
        print(f"{'':34}{'llama-perplexity':>18}{'gguforge eval':>16}{'ratio':>9}")
        print(f"{'time, base + 4 KLD passes (s)':34}{t_llama:18.2f}{t_ours:16.2f}{t_ours / t_llama:9.2f}x")
        print(f"{'  of which base pass (s)':34}{t_lbase:18.2f}{res.base_seconds:16.2f}")
        lb, ob = kld_file.stat().st_size, res.base_store_bytes
        print(f"{'base storage (bytes)':34}{lb:18,}{ob:16,}{lb / ob:8.1f}x smaller")
        print(f"statistics identical to llama-perplexity's printout: {same}/{len(cands)} candidates "
              f"({res.n_chunk} chunks of {res.n_ctx}, {res.n_tokens} scored tokens, vocab from {model.name})")
        v = 151936
        print(f"analytic, {v:,}-token vocabulary: llama-perplexity {2 * v + 8:,} bytes per scored token; the "
              f"store 14 + 4*K before deflate (K entries above -16): >= 20x while K <= {(2 * v + 8) // 20 // 4 - 3:,}")
        if a.plot:
            Path(a.plot).write_bytes(to_png(res))
            print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
