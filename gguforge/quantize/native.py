"""Python API of the native quantizer (gguforge/quantize/_native.c).

Output is byte-identical to what llama-quantize runs without an imatrix: ggml's reference
quantizers (`quantize_row_*_ref`), and for IQ4_NL / IQ4_XS `quantize_iq4_nl` /
`quantize_iq4_xs` (the ntry=7 search of `quantize_row_iq4_nl_impl`, not
`quantize_row_iq4_nl_ref`); MXFP4, Q1_0, Q2_0, TQ1_0, TQ2_0 (native_misc.c) and IQ3_XXS, IQ3_S
(native_iq3.c) as ggml_quantize_chunk writes them. Blocks are independent, so the bytes never
depend on thread count or chunking.

The lattice i-quants IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M (native_iq2.c) are ggml_quantize_chunk's
bytes too; IQ2_XXS, IQ2_XS and IQ1_S need an imatrix (requires_imatrix), IQ2_S and IQ1_M take one
or not.

With `imatrix=` the bytes are those of llama-quantize --imatrix, i.e. ggml_quantize_chunk with an
importance matrix (the weighted `quantize_row_*_impl`); Q4_0/Q4_1/Q5_0/Q5_1 weigh by a sigma2 over
the whole row, so that path splits work by whole rows.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType as T

from . import _native

_BLOCKS = {
    T.F32: (1, 4),
    T.F16: (1, 2),
    T.BF16: (1, 2),
    T.Q8_0: (32, 34),
    T.Q5_0: (32, 22),
    T.Q5_1: (32, 24),
    T.Q4_0: (32, 18),
    T.Q4_1: (32, 20),
    T.IQ4_NL: (32, 18),
    T.IQ4_XS: (256, 136),
    T.Q2_K: (256, 84),
    T.Q3_K: (256, 110),
    T.Q4_K: (256, 144),
    T.Q5_K: (256, 176),
    T.Q6_K: (256, 210),
    # native_misc.c / native_iq3.c
    T.MXFP4: (32, 17),
    T.Q1_0: (128, 18),
    T.TQ1_0: (256, 54),
    T.TQ2_0: (256, 66),
    T.IQ3_XXS: (256, 98),
    T.IQ3_S: (256, 110),
    # the lattice i-quants (native_iq2.c); IQ2_XXS, IQ2_XS and IQ1_S need an imatrix
    T.IQ2_XXS: (256, 66),
    T.IQ2_XS: (256, 74),
    T.IQ2_S: (256, 82),
    T.IQ1_S: (256, 50),
    T.IQ1_M: (256, 56),
}
# ggml types gguf-py does not name yet, by number (gguf 0.19 lacks Q2_0).
GGML_Q2_0 = 42
_BLOCKS[getattr(T, "Q2_0", GGML_Q2_0)] = (64, 18)

# Implementation ids of the C module: 0 = scalar transcription of the reference,
# 1.. = one sub-block per SIMD lane (baseline / AVX2 / AVX-512). Same bytes for all.
IMPLS: dict[int, str] = dict(_native.impls())
BEST_IMPL: int = _native.best_impl()

# Work unit per task: big enough to amortise the call, small enough to balance threads.
_MIN_CHUNK_ELEMS = 1 << 16


def _qtype(qtype) -> int:
    if isinstance(qtype, int) and int(qtype) in _BLOCKS:
        return int(qtype)
    try:
        return int(T(int(qtype)))
    except ValueError:
        raise ValueError(f"unknown GGML type {qtype!r}") from None


def supported(qtype) -> bool:
    try:
        return _qtype(qtype) in _BLOCKS
    except ValueError:
        return False


def _name(q: int) -> str:
    return T(q).name if q in T._value2member_map_ else f"type {q}"


def block_info(qtype) -> tuple[int, int]:
    """(elements per block, bytes per block)."""
    q = _qtype(qtype)
    if q not in _BLOCKS:
        raise ValueError(f"unsupported type {_name(q)}")
    return _BLOCKS[q]


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    # Reused across calls: a converter quantizes hundreds of tensors.
    with _pools_lock:
        p = _pools.get(threads)
        if p is None:
            p = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="gguforge-q")
        return p


def uses_imatrix(qtype) -> bool:
    """True when an importance matrix changes this type's bytes (Q8_0, F16, BF16, F32 ignore it)."""
    return bool(_native.uses_imatrix(_qtype(qtype)))


def requires_imatrix(qtype) -> bool:
    """True for the types ggml refuses to quantize without an importance matrix (IQ2_XXS, IQ2_XS,
    IQ1_S: ggml_quantize_requires_imatrix)."""
    return bool(_native.requires_imatrix(_qtype(qtype)))


def _check_imatrix(imatrix, x: np.ndarray) -> np.ndarray:
    """The imatrix as float32 (n_per_row,), or (n_expert, n_per_row) for a 3-D x; ValueError otherwise."""
    w = np.asarray(imatrix)
    if w.dtype != np.float32:
        raise ValueError(f"imatrix must be float32, got {w.dtype}")
    n = x.shape[-1]
    if w.ndim == 1:
        ok = w.shape[0] == n
    elif w.ndim == 2:
        ok = x.ndim == 3 and w.shape == (x.shape[0], n)
    else:
        ok = False
    if not ok:
        want = f"({n},)" + (f" or ({x.shape[0]}, {n})" if x.ndim == 3 else "")
        raise ValueError(f"imatrix shape {w.shape} does not fit tensor shape {x.shape}: expected {want}")
    if not np.isfinite(w).all():
        raise ValueError("imatrix holds NaN or Inf values")
    return np.ascontiguousarray(w)


def quantize(x: np.ndarray, qtype, threads: int | None = None, impl: int | None = None,
             imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 rows (..., n) to uint8 (..., n//block*bytes).

    F32/F16/BF16 are accepted too and return the converted bytes. `impl` selects a C
    implementation (see IMPLS); default is the fastest one.

    `imatrix`: importance weights, what ggml_quantize_chunk takes as `imatrix` (llama-quantize
    --imatrix): float32 of shape (n,) for every row, or (n_expert, n) when x is 3-D
    (n_expert, rows, n), expert e's rows weighted by imatrix[e]. Types for which
    uses_imatrix() is False ignore it.
    """
    q = _qtype(qtype)
    blck, nbytes = block_info(q)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("quantize needs at least one dimension")
    n = x.shape[-1]
    if n % blck:
        raise ValueError(f"row length {n} is not a multiple of the {_name(q)} block size {blck}")
    out = np.empty(x.shape[:-1] + (n // blck * nbytes,), dtype=np.uint8)
    impl = BEST_IMPL if impl is None else impl
    if imatrix is None and requires_imatrix(q):
        raise ValueError(f"{_name(q)} cannot be quantized without an importance matrix")
    if imatrix is not None:
        w = _check_imatrix(imatrix, x)
        if uses_imatrix(q):
            _quantize_weighted(q, x, out, w, threads, impl)
            return out
    flat, oflat = x.reshape(-1), out.reshape(-1)
    nblocks = flat.size // blck
    threads = max(1, threads if threads is not None else (os.cpu_count() or 1))
    # chunks of whole blocks (an even number, so vector batches stay full)
    per = max(_MIN_CHUNK_ELEMS // blck, -(-nblocks // (threads * 4)))
    per += per % 2
    if threads == 1 or nblocks <= per:
        _native.quantize(q, flat, oflat, impl)
        return out
    spans = [(s, min(s + per, nblocks)) for s in range(0, nblocks, per)]
    futs = [
        _pool(threads).submit(_native.quantize, q, flat[a * blck : b * blck], oflat[a * nbytes : b * nbytes], impl)
        for a, b in spans
    ]
    for f in futs:
        f.result()
    return out


def _quantize_weighted(q: int, x: np.ndarray, out: np.ndarray, w: np.ndarray, threads, impl: int) -> None:
    """Tasks of whole rows (Q4_0..Q5_1 weigh by a row-wide sigma2), each with its expert's weights."""
    n = x.shape[-1]
    if x.size == 0:
        return
    ne = w.shape[0] if w.ndim == 2 else 1
    xs = x.reshape(ne, -1, n)
    os_ = out.reshape(ne, xs.shape[1], -1)
    ws = w.reshape(ne, n)
    rows = xs.shape[1]
    threads = max(1, threads if threads is not None else (os.cpu_count() or 1))
    per = max(-(-_MIN_CHUNK_ELEMS // n), -(-ne * rows // (threads * 4)))
    tasks = [(xs[e, a : a + per], os_[e, a : a + per], ws[e]) for e in range(ne) for a in range(0, rows, per)]
    if threads == 1 or len(tasks) == 1:
        for t in tasks:
            _native.quantize_w(q, t[0], t[1], n, t[2], impl)
        return
    futs = [_pool(threads).submit(_native.quantize_w, q, t[0], t[1], n, t[2], impl) for t in tasks]
    for f in futs:
        f.result()


def dequantize(data: np.ndarray, qtype, n: int) -> np.ndarray:
    """Decode `n` elements. 1-D input gives shape (n,); (..., row_bytes) gives (..., n_per_row)."""
    q = _qtype(qtype)
    blck, nbytes = block_info(q)
    data = np.ascontiguousarray(data).view(np.uint8)
    if n % blck or data.size != n // blck * nbytes:
        raise ValueError(f"{data.size} bytes do not hold {n} {_name(q)} elements")
    out = np.empty(n, dtype=np.float32)
    _native.dequantize(q, data.reshape(-1), out)
    if data.ndim > 1:
        return out.reshape(data.shape[:-1] + (-1,))
    return out


def _narrow(x, qtype: T, dtype) -> np.ndarray:
    """float32 -> a 16-bit float type, through the C module's element-wise 'quantizer'."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=dtype)
    _native.quantize(int(qtype), x.reshape(-1), out.reshape(-1).view(np.uint8), 0)
    return out


def f32_to_bf16(x) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even; NaN stays a quiet NaN."""
    return _narrow(x, T.BF16, np.uint16)


def bf16_to_f32(x: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exact."""
    x = np.ascontiguousarray(x).view(np.uint16)
    out = np.empty(x.shape, dtype=np.float32)
    _native.bf16_to_f32(x.reshape(-1), out.reshape(-1))
    return out


def bf16_to_f16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bf16 bits (uint16) -> float16 in one pass; same bytes as widening to float32 then f32_to_f16.
    `out`: optional float16 array of the same shape to write into."""
    x = np.ascontiguousarray(x).view(np.uint16)
    if out is None:
        out = np.empty(x.shape, dtype=np.float16)
    _native.bf16_to_f16(x.reshape(-1), out.reshape(-1).view(np.uint16))
    return out


def f32_to_f16(x) -> np.ndarray:
    """float32 -> float16, IEEE round to nearest even (same as numpy astype)."""
    return _narrow(x, T.F16, np.float16)


def f16_to_f32(x: np.ndarray) -> np.ndarray:
    """float16 -> float32, exact."""
    x = np.ascontiguousarray(x)
    if x.dtype != np.float16:
        x = x.view(np.float16) if x.dtype == np.uint16 else x.astype(np.float16)
    out = np.empty(x.shape, dtype=np.float32)
    _native.f16_to_f32(x.reshape(-1).view(np.uint16), out.reshape(-1))
    return out


_NONFINITE_KIND = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}


def count_nonfinite(x: np.ndarray, bf16: bool = False) -> int:
    """Number of NaN/Inf values in a float32 (or float16) array; bf16=True reads uint16 as bf16."""
    x = np.ascontiguousarray(x)
    kind = 2 if bf16 else _NONFINITE_KIND.get(x.dtype)
    if kind is None:
        raise TypeError(f"count_nonfinite expects float32/float16, got {x.dtype}")
    return _native.count_nonfinite(x.reshape(-1).view(np.uint8), kind)
