"""Benchmark the lattice i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M) against ggml, one thread.

    python scripts/bench_lattice.py [--rows 64] [--cols 4096] [--repeat 3] [--types IQ2_XXS,IQ1_M]

Per type, measured in this one process: the table set-up (ggml_quantize_init, i.e. ggml's
iq2xs_init_impl, against gguforge's lattice build; wall time, first use in the process; ggml's may
use OpenMP threads), then quantization weights/s by this thread's CPU time with the same imatrix
on both sides (best of --repeat), the ratio of the times (gguforge/ggml, lower is better), and the
same ratio for one --rows x --cols tensor including the set-up. Bytes are checked equal.

ggml is llama-cpp-python's libggml-base.so through ctypes (or the library in GGUFORGE_GGML_LIB).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_native import best_time, ggml_fn, ggml_path  # noqa: E402

from gguforge.quantize import _native, native  # noqa: E402

TYPES = "IQ2_XXS,IQ2_XS,IQ2_S,IQ1_S,IQ1_M"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default=TYPES)
    a = ap.parse_args()
    g = ggml_fn()
    if g is None:
        raise SystemExit("no libggml-base.so: install llama-cpp-python or set GGUFORGE_GGML_LIB")
    init = ctypes.CDLL(ggml_path()).ggml_quantize_init
    init.argtypes = [ctypes.c_int]

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((a.rows, a.cols)) * rng.uniform(0.005, 0.05, (a.rows, 1))).astype(np.float32)
    x[rng.random(x.shape) < 1e-4] *= 30
    w = (rng.gamma(0.7, 2.0, a.cols) * np.where(rng.random(a.cols) < 0.01, 100, 1)).astype(np.float32)
    print(f"{a.rows}x{a.cols} f32 with an imatrix, one thread; set-up = lattice tables (first use, wall time)")
    print(f"{'type':8}{'ggml set-up':>12}{'ours':>8}{'ggml Mw/s':>11}{'ours Mw/s':>11}{'time ratio':>12}"
          f"{'incl. set-up':>14}  bytes")
    for name in a.types.split(","):
        q = T[name.strip().upper()]
        blk, nbytes = native.block_info(q)
        t = time.perf_counter()
        init(int(q))
        g_init = time.perf_counter() - t
        t = time.perf_counter()
        _native.lattice_tables(int(q))
        o_init = time.perf_counter() - t
        want = np.empty((a.rows, a.cols // blk * nbytes), np.uint8)
        g_t = best_time(lambda: g(int(q), x.ctypes.data, want.ctypes.data, 0, a.rows, a.cols, w.ctypes.data),
                        a.repeat, time.thread_time)
        got = None

        def ours():
            nonlocal got
            got = native.quantize(x, q, threads=1, imatrix=w)
        o_t = best_time(ours, a.repeat, time.thread_time)
        same = "identical" if np.array_equal(got, want) else "DIFFER"
        print(f"{q.name:8}{g_init:11.2f}s{o_init:7.2f}s{x.size / g_t / 1e6:11.2f}{x.size / o_t / 1e6:11.2f}"
              f"{o_t / g_t:11.2f}x{(o_init + o_t) / (g_init + g_t):13.2f}x  {same}")


if __name__ == "__main__":
    main()
