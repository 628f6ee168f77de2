"""The lattice i-quants IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M (gguforge/quantize/native_iq2.c).

Oracle: ggml itself (llama-cpp-python's libggml-base through ctypes, test_native_quant.ggml_lib),
called as llama-quantize calls it: ggml_quantize_chunk with the same n_per_row imatrix for every
row, one call per expert for a 3-D tensor, and without an imatrix where ggml allows that (IQ2_S,
IQ1_M). Dequantization against ggml's dequantize_row_*; the grids against what ggml's own
dequantizer decodes; the map/neighbour tables against the rule of ggml's iq2xs_init_impl, computed
here with numpy from those grids.

Data: test_native_quant's kinds plus 'huge'; bf16-rounded rows (equal values inside a block, which
IQ1_S/IQ1_M's sorts must order as ggml's qsort does). Imatrix kinds as test_native_imatrix, except
'huge' and 'signed' (weights that overflow or are negative), and the data kind 'huge' for IQ2_XS
and IQ2_S: with those ggml's lattice quantizers abort (GGML_ASSERT in the neighbour search), so
there are no bytes to compare with.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gguforge.quantize import _native, native
from test_native_imatrix import ALL_KINDS, IMATRIX_KINDS, case, ggml_quantize, imatrix_of
from test_native_quant import ggml_lib

F = np.float32
LATTICE = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M]
NEEDS_IMATRIX = {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}
WKINDS = [k for k in IMATRIX_KINDS if k not in ("huge", "signed")]
GGML_ABORTS = {(T.IQ2_XS, "huge"), (T.IQ2_S, "huge")}  # (type, data kind)
ids = lambda t: t.name  # noqa: E731


@pytest.fixture(scope="module")
def lib():
    return ggml_lib()


@pytest.fixture(scope="module")
def ggml(lib):
    return lib.ggml_quantize_chunk


def imatrices(qtype, rng, n):
    """(name, imatrix or None) for every imatrix kind, and no imatrix where ggml allows it."""
    out = [(k, imatrix_of(k, rng, n)) for k in WKINDS]
    return out if qtype in NEEDS_IMATRIX else out + [("none", None)]


def bf16_rows(rng, shape, scale=1.0):
    """Gaussian rows rounded to bf16: blocks hold repeated values (ties in IQ1's sorts)."""
    x = (rng.standard_normal(shape) * scale).astype(F)
    return ((x.view(np.uint32) + 0x8000) & 0xFFFF0000).view(F)


def assert_same(want, got, what):
    bad = np.nonzero((want != got).reshape(-1, want.shape[-1]).any(axis=1))[0]
    assert bad.size == 0, f"{what}: rows {bad[:5]} differ"


# ---------------------------------------------------------------------------------------------
# Bytes against ggml_quantize_chunk


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", LATTICE, ids=ids)
def test_each_kind_matches_ggml(ggml, qtype):
    """Every data kind x every imatrix kind (and none where allowed), rows of 2 super-blocks."""
    cases = 0
    kinds = [k for k in ALL_KINDS if (qtype, k) not in GGML_ABORTS]
    for ki, kind in enumerate(kinds):
        rng = np.random.default_rng(100 * ki + int(qtype))
        x = np.stack([case(kind, rng, 512) for _ in range(3)])
        for wkind, w in imatrices(qtype, rng, 512):
            want = ggml_quantize(ggml, x, qtype, w)
            for impl in native.IMPLS:   # the scalar loops (0) and the AVX2 / vector searches
                assert_same(want, native.quantize(x, qtype, threads=1, impl=impl, imatrix=w),
                            f"{qtype.name} {kind}/{wkind} impl={native.IMPLS[impl]}")
            cases += 1
    assert cases == len(kinds) * (len(WKINDS) + (qtype not in NEEDS_IMATRIX)) >= 13 * 6


@pytest.mark.parametrize("qtype", LATTICE, ids=ids)
def test_bf16_rows_and_mixed_scales_match_ggml(ggml, qtype):
    """Model-like rows: bf16 values (ties inside a block), rows of different scale, 4096 wide
    (16 super-blocks), with a realistic imatrix, and plain where allowed; scalar and vector paths."""
    rng = np.random.default_rng(31 + int(qtype))
    x = bf16_rows(rng, (6, 4096), rng.uniform(0.005, 0.2, (6, 1)))
    x[1, 256:512] = x[1, 256]  # a super-block of one repeated value
    ties = sum(len(np.unique(b)) < 16 for b in x.reshape(-1, 16))
    assert ties > 100, "the data must exercise equal values inside IQ1 groups"
    for wkind, w in [("random", imatrix_of("random", rng, 4096)), ("none", None)]:
        if w is None and qtype in NEEDS_IMATRIX:
            continue
        want = ggml_quantize(ggml, x, qtype, w)
        for impl in native.IMPLS:
            assert_same(want, native.quantize(x, qtype, impl=impl, imatrix=w), f"{qtype.name} {wkind} {impl}")


@pytest.mark.parametrize("qtype", LATTICE, ids=ids)
def test_per_expert_imatrix(ggml, qtype):
    """3-D (n_expert, rows, n) with a (n_expert, n) imatrix: expert e's rows use imatrix[e]."""
    rng = np.random.default_rng(7 + int(qtype))
    x = (rng.standard_normal((4, 3, 512)) * rng.uniform(0.1, 2, (4, 1, 1))).astype(F)
    w = np.stack([imatrix_of(k, rng, 512) for k in ("random", "zeros", "dynamic", "ones")])
    want = ggml_quantize(ggml, x, qtype, w)
    for threads in (1, 3):
        assert np.array_equal(native.quantize(x, qtype, threads=threads, imatrix=w), want), threads
    rotated = native.quantize(x, qtype, imatrix=np.roll(w, 1, axis=0))
    assert not np.array_equal(rotated, want), "the experts' slices must matter"


@pytest.mark.parametrize("qtype", LATTICE, ids=ids)
def test_threads_and_chunking_identical(qtype):
    rng = np.random.default_rng(3 + int(qtype))
    x = (rng.standard_normal((90, 256)) * rng.uniform(0.1, 3, (90, 1))).astype(F)
    w = imatrix_of("random", rng, 256)
    one = native.quantize(x, qtype, threads=1, imatrix=w)
    assert np.array_equal(native.quantize(x, qtype, threads=4, imatrix=w), one)
    assert np.array_equal(np.concatenate([native.quantize(x[i : i + 7], qtype, imatrix=w) for i in range(0, 90, 7)]),
                          one)
    if qtype not in NEEDS_IMATRIX:  # the unweighted path splits the tensor into runs of blocks
        plain = native.quantize(x, qtype, threads=1)
        assert np.array_equal(native.quantize(x.reshape(-1, 1280), qtype, threads=3).reshape(plain.shape), plain)
        assert not np.array_equal(plain, one)


def test_block_sizes():
    from gguf import GGML_QUANT_SIZES
    for qtype in LATTICE:
        assert native.supported(qtype) and native.block_info(qtype) == tuple(GGML_QUANT_SIZES[qtype])


def test_imatrix_requirements(lib):
    """Refused without an imatrix exactly where ggml refuses (ggml_quantize_requires_imatrix)."""
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    x = np.ones((1, 256), F)
    for qtype in LATTICE:
        assert native.uses_imatrix(qtype)
        assert native.requires_imatrix(qtype) == lib.ggml_quantize_requires_imatrix(int(qtype)) == (qtype in NEEDS_IMATRIX)
        if qtype in NEEDS_IMATRIX:
            with pytest.raises(ValueError, match="importance matrix"):
                native.quantize(x, qtype)
            with pytest.raises(ValueError, match="importance matrix"):
                _native.quantize(int(qtype), x.reshape(-1), np.empty(native.block_info(qtype)[1], np.uint8))
    assert not native.requires_imatrix(T.Q4_K)


# ---------------------------------------------------------------------------------------------
# Dequantization and grids against ggml's decoder


def ggml_dequantize(lib, qtype, data: np.ndarray, n: int) -> np.ndarray:
    f = getattr(lib, f"dequantize_row_{qtype.name.lower()}")
    f.restype = None
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    data = np.ascontiguousarray(data, np.uint8)
    out = np.empty(n, F)
    f(data.ctypes.data, out.ctypes.data, n)
    return out


def scale_bytes(rng, count):
    """fp16 scales that decode to finite values (random exponent and mantissa, either sign)."""
    return (rng.standard_normal(count) * 10.0 ** rng.uniform(-6, 3, count)).astype(np.float16).view(np.uint8)


def random_blocks(qtype, rng, nblocks) -> np.ndarray:
    _, nbytes = native.block_info(qtype)
    b = rng.integers(0, 256, (nblocks, nbytes), dtype=np.uint8)
    if qtype == T.IQ1_M:   # the fp16 scale is spread over the top nibbles of the 4 scale words
        d = scale_bytes(rng, nblocks).view(np.uint16)
        for i in range(4):
            word = b[:, 48 + 2 * i : 50 + 2 * i].copy().view(np.uint16)[:, 0]
            word = (word & 0x0FFF) | (((d >> (4 * i)) & 15) << 12)
            b[:, 48 + 2 * i : 50 + 2 * i] = word.astype(np.uint16).view(np.uint8).reshape(-1, 2)
    else:
        b[:, :2] = scale_bytes(rng, nblocks).reshape(-1, 2)
    return b


@pytest.mark.parametrize("qtype", LATTICE, ids=ids)
def test_dequantize_matches_ggml(lib, qtype):
    """Random blocks (every field random, finite scales) and quantized data: identical floats."""
    rng = np.random.default_rng(19 + int(qtype))
    blocks = random_blocks(qtype, rng, 600)
    x = rng.standard_normal((4, 1024)).astype(F)
    q = native.quantize(x, qtype, imatrix=imatrix_of("random", rng, 1024))
    for data in (blocks, q):
        n = data.size // native.block_info(qtype)[1] * 256
        want = ggml_dequantize(lib, qtype, data, n)
        got = native.dequantize(data, qtype, n).reshape(-1)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def ggml_grid(lib, qtype) -> np.ndarray:
    """The lattice coordinates l (0..2) of every grid point, as ggml's dequantizer decodes them:
    blocks with scale 1 whose groups of 8 name grid point 0, 1, 2, ..."""
    ngrid = {T.IQ2_XXS: 256, T.IQ2_XS: 512, T.IQ2_S: 1024, T.IQ1_S: 2048}[qtype]
    _, nbytes = native.block_info(qtype)
    idx = np.arange(ngrid)
    blocks = np.zeros((ngrid // 32, nbytes), np.uint8)
    blocks[:, :2] = np.array([1.0], np.float16).view(np.uint8)
    g = idx.reshape(-1, 32)
    if qtype == T.IQ2_XXS:       # per 32: 4 index bytes, then signs (0) and scale nibble (0)
        for ib in range(8):
            blocks[:, 2 + 8 * ib : 6 + 8 * ib] = g[:, 4 * ib : 4 * ib + 4]
        unit = 0.125             # d * (0.5 + 0) * 0.25
    elif qtype == T.IQ2_XS:      # 9-bit index per 16-bit word
        blocks[:, 2:66] = g.astype(np.uint16).view(np.uint8)
        unit = 0.125
    elif qtype == T.IQ2_S:       # low 8 bits in qs, high 2 bits in qh
        blocks[:, 2:34] = g & 255
        hi = (g >> 8).reshape(-1, 8, 4)
        blocks[:, 66:74] = (hi[..., 0] | hi[..., 1] << 2 | hi[..., 2] << 4 | hi[..., 3] << 6)
        unit = 0.125
    else:                        # IQ1_S: low 8 bits in qs, 3 high bits per group in qh, scale 1
        blocks[:, 2:34] = g & 255
        hi = (g >> 8).reshape(-1, 8, 4)
        qh = hi[..., 0] | hi[..., 1] << 3 | hi[..., 2] << 6 | hi[..., 3] << 9
        blocks[:, 34:50] = qh.astype(np.uint16).view(np.uint8).reshape(-1, 16)
        unit = 1.0
    vals = ggml_dequantize(lib, qtype, blocks, ngrid * 8).reshape(ngrid, 8) / unit
    if qtype == T.IQ1_S:
        return np.rint(vals - 0.125).astype(int) + 1          # -1, 0, 1 -> 0, 1, 2
    return np.searchsorted([8, 25, 43], np.rint(vals).astype(int))


def lattice_tables(qtype):
    grid, kmap, nbr = _native.lattice_tables(int(qtype))
    return (np.frombuffer(grid, np.uint8).reshape(-1, 8).astype(int), np.frombuffer(kmap, np.int32),
            np.frombuffer(nbr, np.uint16).astype(np.int64))


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S], ids=ids)
def test_tables_match_ggml(lib, qtype):
    """Grid: ggml's decoded grid (search coordinates 2l+1). Map: every code to its grid point.
    Neighbours of every other code: exactly the grid points within the nwant smallest distinct
    squared distances (iq2xs_init_impl: 3 for IQ1, 2 for IQ2_XXS/XS, 1 for IQ2_S), ordered by
    (distance, index)."""
    grid, kmap, nbr = lattice_tables(qtype)
    lat = ggml_grid(lib, qtype)
    assert np.array_equal(grid, 2 * lat + 1)
    codes = (lat << (2 * np.arange(8))).sum(axis=1)
    assert kmap.size == 43692 and len(np.unique(codes)) == len(codes)
    assert np.array_equal(kmap[codes], np.arange(len(codes)))
    off_grid = np.setdiff1d(np.arange(43692), codes)
    assert (kmap[off_grid] < 0).all()
    nwant = {T.IQ2_XXS: 2, T.IQ2_XS: 2, T.IQ2_S: 1, T.IQ1_S: 3}[qtype]
    # numpy model: squared distances of every off-grid point to every grid point
    pts = 2 * ((off_grid[:, None] >> (2 * np.arange(8))) & 3) + 1
    starts = -kmap[off_grid] - 1
    counts = nbr[starts]
    thr = np.empty(len(off_grid), np.int64)
    want_counts = np.empty(len(off_grid), np.int64)
    # |p - g|^2 = [p, |p|^2, 1] . [-2g, 1, |g|^2]: one product, exact in float32 for these small integers
    paug = np.concatenate([pts, (pts**2).sum(axis=1, keepdims=True), np.ones((len(pts), 1), int)], axis=1).astype(F)
    gaug = np.concatenate([-2 * grid, np.ones((len(grid), 1), int), (grid**2).sum(axis=1, keepdims=True)], axis=1)
    gaug = np.ascontiguousarray(gaug.T, dtype=F)
    for a in range(0, len(off_grid), 4096):
        d2 = (paug[a : a + 4096] @ gaug).astype(np.int16)
        assert d2.min() >= 0
        t = np.full(len(d2), -1, np.int16)
        for _ in range(nwant):   # the next distinct distance above t (or t when there is none)
            nxt = np.where(d2 > t[:, None], d2, np.int16(999)).min(axis=1)
            t = np.where(nxt < 999, nxt, t)
        thr[a : a + 4096] = t
        want_counts[a : a + 4096] = (d2 <= t[:, None]).sum(axis=1)
    assert np.array_equal(counts, want_counts)
    # the listed points: within the threshold, strictly increasing in (distance, index)
    row = np.repeat(np.arange(len(off_grid)), counts)
    pos = np.repeat(starts + 1 - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    members = nbr[pos]
    d = ((pts[row] - grid[members]) ** 2).sum(-1)
    assert (d <= thr[row]).all()
    key = d * 4096 + members
    same_row = row[1:] == row[:-1]
    assert (key[1:][same_row] > key[:-1][same_row]).all()
    assert nbr.size == len(off_grid) + counts.sum()


# ---------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_error():
    """llama.cpp's test-quantize-fns data (0.1 + 2 cos(i), 4096 values): IQ2_S (the one of these
    types it tests, through quantize_row_iq2_s_ref = no imatrix) within MAX_QUANTIZATION_TOTAL_ERROR_2BITS;
    the others, with a flat imatrix, error ordered by bits per weight."""
    x = (0.1 + 2 * np.cos(np.arange(4096, dtype=F))).astype(F)

    def err(qtype, w):
        y = native.dequantize(native.quantize(x[None], qtype, imatrix=w), qtype, x.size)
        return float(np.sqrt(((x.astype(np.float64) - y) ** 2).sum()) / x.size)

    assert err(T.IQ2_S, None) < 0.0075
    ones = np.ones(4096, F)
    e = {t: err(t, ones) for t in LATTICE}
    assert e[T.IQ2_S] < e[T.IQ2_XXS] and e[T.IQ2_XS] < e[T.IQ2_XXS] < e[T.IQ1_M] < e[T.IQ1_S] < 0.05, e
