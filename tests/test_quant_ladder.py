"""The rest of the quant ladder (issue 13): Q4_0, Q4_1, IQ4_NL, IQ4_XS, Q3_K, Q2_K.

The native encoder and decoder are checked block for block against ggml itself (ggml_quantize_chunk
and the type's to_float, reached through ctypes in llama-cpp-python's libggml-base), on the data
kinds of test_native_quant plus huge values; round-trip errors against test-quantize-fns' bounds.
Whole-file comparisons with llama-quantize live in test_quantize_vs_llama.py.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from gguforge.quantize import native
from test_native_quant import KINDS, array_rmse, make_case, quantize_fns_data

F = np.float32
NEW_TYPES = [T.Q4_0, T.Q4_1, T.IQ4_NL, T.IQ4_XS, T.Q3_K, T.Q2_K]
SIZES = {T.Q4_0: (32, 18), T.Q4_1: (32, 20), T.IQ4_NL: (32, 18), T.IQ4_XS: (256, 136),
         T.Q3_K: (256, 110), T.Q2_K: (256, 84)}  # ggml-common.h static_asserts


# ---------------------------------------------------------------------------------------------
# ggml through ctypes


class _Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@pytest.fixture(scope="module")
def ggml():
    path = os.environ.get("GGUFORGE_GGML_LIB")
    if not path:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None:
            pytest.skip("llama-cpp-python not installed")
        libs = sorted(Path(spec.origin).parent.rglob("libggml-base.so*"))
        if not libs:
            pytest.skip("no libggml-base.so in llama-cpp-python")
        path = str(libs[0])
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(lib, x: np.ndarray, qtype: T) -> np.ndarray:
    """llama-quantize's call: ggml_quantize_chunk without an imatrix."""
    x = np.ascontiguousarray(x, dtype=F)
    nrows, n = x.shape
    blk, nbytes = SIZES[qtype]
    out = np.zeros((nrows, n // blk * nbytes), np.uint8)
    assert lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n, None) == out.size
    return out


def ggml_dequantize(lib, q: np.ndarray, qtype: T, n: int) -> np.ndarray:
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    assert (traits.blck_size, traits.type_size) == SIZES[qtype]
    q = np.ascontiguousarray(q, dtype=np.uint8)
    out = np.empty(n, F)
    _TO_FLOAT(traits.to_float)(q.ctypes.data, out.ctypes.data, n)
    return out


# ---------------------------------------------------------------------------------------------
# Data: test_native_quant's 14 kinds plus huge values (x^2 and sums overflow to inf)


def case(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "huge":
        x = rng.standard_normal(256) * rng.choice([1e19, 1e30, 3e37])
        x[rng.integers(0, 256, 2)] = rng.choice([-1, 1], 2) * 3.4e38
        return x.astype(F)
    return make_case(kind, rng)


ALL_KINDS = [*KINDS, "huge"]


def mixed_rows(rng: np.random.Generator, nblocks: int, row: int = 1024) -> np.ndarray:
    x = np.concatenate([case(ALL_KINDS[i % len(ALL_KINDS)], rng) for i in range(nblocks)])
    rng.shuffle(x.reshape(-1, 256))
    return x.reshape(-1, row)


# ---------------------------------------------------------------------------------------------
# Tests


def test_block_sizes():
    for qtype in NEW_TYPES:
        assert native.block_info(qtype) == SIZES[qtype] == tuple(gguf_quants.GGML_QUANT_SIZES[qtype])
        assert native.supported(qtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_each_kind_matches_ggml(ggml, qtype):
    """Every data kind alone (a 256-element block, 8 seeds), every implementation id."""
    for kind in ALL_KINDS:
        rng = np.random.default_rng(100 * ALL_KINDS.index(kind) + int(qtype))
        x = np.stack([case(kind, rng) for _ in range(8)])
        want = ggml_quantize(ggml, x, qtype)
        for impl in sorted(native.IMPLS):
            got = native.quantize(x, qtype, threads=1, impl=impl)
            bad = np.nonzero((got != want).any(axis=1))[0]
            assert bad.size == 0, f"{qtype.name} {kind} impl={native.IMPLS[impl]} rows {bad}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_mixed_rows_match_ggml(ggml, qtype):
    """Many rows of shuffled kinds at several scales, quantized on threads."""
    for seed in range(2):
        rng = np.random.default_rng(200 + seed)
        x = (mixed_rows(rng, 240) * rng.uniform(0.001, 100)).astype(F)
        want = ggml_quantize(ggml, x, qtype)
        got = native.quantize(x, qtype, threads=2)
        bad = np.nonzero((got != want).any(axis=1))[0]
        assert bad.size == 0, f"{qtype.name} seed={seed} rows {bad[:5]}"


def test_ties_in_the_iq4_table(ggml):
    """Values exactly halfway between two kvalues_iq4nl entries (after scaling) and on them."""
    k = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], F)
    mids = (k[:-1] + k[1:]) / 2
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(64):
        v = rng.choice(np.concatenate([k, mids]), 256)
        v[::32] = -127  # fixes max, hence d = 1 before the refit
        rows.append(v * rng.choice([1.0, 0.5, 1 / 127]))
    x = np.array(rows, F)
    for qtype in (T.IQ4_NL, T.IQ4_XS):
        assert np.array_equal(native.quantize(x, qtype), ggml_quantize(ggml, x, qtype)), qtype.name


def test_iq4_nl_is_not_the_ref_quantizer(ggml):
    """llama-quantize's IQ4_NL (ntry=7) differs from quantize_row_iq4_nl_ref (ntry=-1) on ordinary data;
    ours must be the former (compared above), so it must differ from the latter here."""
    lib = ggml
    ref = lib.quantize_row_iq4_nl_ref
    ref.restype = None
    ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.random.default_rng(1).standard_normal(4096).astype(F)
    out = np.zeros(4096 // 32 * 18, np.uint8)
    ref(x.ctypes.data, out.ctypes.data, x.size)
    assert not np.array_equal(native.quantize(x, T.IQ4_NL), out)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_ggml_and_gguf_py(ggml, qtype):
    rng = np.random.default_rng(int(qtype))
    x = mixed_rows(rng, 60)
    x = x[np.isfinite(x).all(axis=1)]
    q = native.quantize(x, qtype)
    got = native.dequantize(q, qtype, x.size)
    assert got.shape == x.shape
    want = ggml_dequantize(ggml, q, qtype, x.size).reshape(x.shape)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    py = gguf_quants.dequantize(q, qtype).astype(F)
    fin = np.isfinite(py)
    assert np.array_equal(got[fin].view(np.uint32), py[fin].view(np.uint32))


# test-quantize-fns: MAX_QUANTIZATION_TOTAL_ERROR(_2BITS/_3BITS) on 0.1 + 2*cos(i + offset)
ERROR_BOUND = {T.Q2_K: 0.0075, T.Q3_K: 0.0040}


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_quantization_error_bound(qtype):
    bound = ERROR_BOUND.get(qtype, 0.002)
    for offset in (0, 1):
        x = quantize_fns_data(offset)
        y = native.dequantize(native.quantize(x, qtype), qtype, x.size)
        err = array_rmse(x, y)
        assert 0 < err < bound, (qtype.name, offset, err)


def test_more_bits_less_error():
    """A sanity ladder on gaussian data: each type's error is below the next smaller type's."""
    x = np.random.default_rng(0).standard_normal(1 << 14).astype(F)

    def err(qtype):
        return array_rmse(x, native.dequantize(native.quantize(x, qtype), qtype, x.size))

    ladder = [T.Q2_K, T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]
    errors = [err(t) for t in ladder]
    assert errors == sorted(errors, reverse=True), dict(zip((t.name for t in ladder), errors))
    assert err(T.IQ4_NL) < err(T.Q4_0) and err(T.Q4_1) < err(T.Q4_0)


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_threads_and_shapes(qtype):
    rng = np.random.default_rng(9)
    x = (rng.standard_t(3, (24, 4096)) * 0.05).astype(F)
    one = native.quantize(x, qtype, threads=1)
    assert one.shape == (24, 4096 // SIZES[qtype][0] * SIZES[qtype][1])
    for t in (2, 5):
        assert np.array_equal(native.quantize(x, qtype, threads=t), one)
    with pytest.raises(ValueError):
        native.quantize(np.zeros(SIZES[qtype][0] + 16, F), qtype)
