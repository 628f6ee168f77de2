"""Benchmark the native quantizer: blocks/s per implementation, and vs ggml.

    python scripts/bench_native.py [--rows 256] [--cols 4096] [--threads 1] [--types Q4_K,Q6_K] [--imatrix]

--imatrix: both sides get the same importance weights (llama-quantize --imatrix's weighted
quantizers, ggml_quantize_chunk(.., imatrix)); the types default to the weighted ones.

ggml is reached through llama-cpp-python's libggml-base.so (ctypes `ggml_quantize_chunk`,
imatrix=NULL, single call = single thread), or the library named by GGUFORGE_GGML_LIB.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from gguforge.quantize import native


def ggml_path() -> str | None:
    """GGUFORGE_GGML_LIB, else llama-cpp-python's libggml-base.so, else None."""
    path = os.environ.get("GGUFORGE_GGML_LIB")
    if not path:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None:
            return None
        libs = sorted(Path(spec.origin).parent.rglob("libggml-base.so*"))
        if not libs:
            return None
        path = str(libs[0])
    return path


def ggml_fn():
    path = ggml_path()
    if path is None:
        return None
    f = ctypes.CDLL(path).ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return f


def best_time(fn, repeat: int, clock) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default=None)
    ap.add_argument("--imatrix", action="store_true", help="weighted quantizers (importance matrix)")
    a = ap.parse_args()
    if a.types is None:
        a.types = ("Q4_K,Q6_K,Q5_K,Q3_K,Q2_K,IQ4_XS,IQ4_NL,Q4_0,Q4_1,Q5_0,Q5_1" if a.imatrix
                   else "Q8_0,Q4_K,Q5_K,Q6_K,Q5_0,Q5_1")

    rng = np.random.default_rng(0)
    # weight-like data: gaussian rows with varying scale and a few outliers
    x = (rng.standard_normal((a.rows, a.cols)) * rng.uniform(0.005, 0.05, (a.rows, 1))).astype(np.float32)
    x[rng.random(x.shape) < 1e-4] *= 30
    # imatrix-like weights: mean squared activations, a few dominant columns
    w = (rng.gamma(0.7, 2.0, a.cols) * np.where(rng.random(a.cols) < 0.01, 100, 1)).astype(np.float32) if a.imatrix else None
    wp = None if w is None else w.ctypes.data
    g = ggml_fn()
    # One thread: count this thread's CPU time, so a busy machine skews the numbers less.
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    names = [n for _, n in sorted(native.IMPLS.items())]
    what = "CPU time" if a.threads == 1 else "wall time"
    print(f"{a.rows}x{a.cols} f32, threads={a.threads}{', with imatrix' if a.imatrix else ''}; "
          f"blocks/s by {what} (higher is better)")
    head = f"{'type':6}" + "".join(f"{n:>13}" for n in names)
    print(head + (f"{'ggml':>13}{'best/ggml':>11}" if g else ""))
    for tn in a.types.split(","):
        qt = T[tn]
        blk, nbytes = native.block_info(qt)
        nblocks = x.size // blk
        row = f"{tn:6}"
        rates = {}
        for impl in sorted(native.IMPLS):
            dt = best_time(lambda: native.quantize(x, qt, threads=a.threads, impl=impl, imatrix=w), a.repeat, clock)
            rates[impl] = nblocks / dt
            row += f"{rates[impl]:13.0f}"
        if g:
            out = np.empty((a.rows, a.cols // blk * nbytes), np.uint8)
            # ggml's call is single-threaded; scale by the thread count for an equal-threads ratio
            dt = best_time(lambda: g(int(qt), x.ctypes.data, out.ctypes.data, 0, a.rows, a.cols, wp), a.repeat, clock)
            gr = nblocks / dt * a.threads
            best = rates[native.BEST_IMPL]
            row += f"{gr:13.0f}{best / gr:10.2f}x"
            assert np.array_equal(out, native.quantize(x, qt, imatrix=w)), f"{tn}: bytes differ from ggml"
        print(row)


if __name__ == "__main__":
    main()
