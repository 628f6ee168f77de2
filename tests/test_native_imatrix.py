"""Native quantizer with an importance matrix: byte-exact with ggml_quantize_chunk(.., imatrix).

The oracle is ggml itself (llama-cpp-python's libggml-base.so through ctypes), called exactly as
llama-quantize --imatrix calls it: the same n_per_row weights for every row of a chunk, and for a
3-D tensor one call per expert with that expert's slice. Data: test_native_quant's 14 kinds plus
huge values (as test_quant_ladder), in rows of 256, 512, 4096+ and, for the 32-element types,
lengths that are not a multiple of 256; imatrix kinds: random positive, with zeros, all ones, a huge
dynamic range and tiny values. Every implementation id, one thread and many.
"""

from __future__ import annotations


import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gguforge.quantize import native
from test_native_quant import KINDS, ggml_lib, make_case

F = np.float32
WEIGHTED = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS]
IGNORED = [T.Q8_0, T.F16, T.BF16, T.F32]
IMPLS = sorted(native.IMPLS)


@pytest.fixture(scope="module")
def ggml():
    return ggml_lib().ggml_quantize_chunk


def ggml_quantize(fn, x: np.ndarray, qtype, imatrix: np.ndarray | None) -> np.ndarray:
    """ggml_quantize_chunk on 2-D x; a 3-D x with a 2-D imatrix goes one expert per call."""
    x = np.ascontiguousarray(x, dtype=F)
    blk, nbytes = native.block_info(qtype)
    n = x.shape[-1]
    if x.ndim == 3:
        return np.stack([ggml_quantize(fn, x[e], qtype, None if imatrix is None else imatrix[e])
                         for e in range(x.shape[0])])
    nrows = x.shape[0]
    out = np.zeros((nrows, n // blk * nbytes), np.uint8)
    w = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=F)
    size = fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n, None if w is None else w.ctypes.data)
    assert size == out.size
    return out


# ---------------------------------------------------------------------------------------------
# Data


def case(kind: str, rng: np.random.Generator, n: int = 256) -> np.ndarray:
    """test_native_quant's kinds plus test_quant_ladder's 'huge' (x^2 and sums overflow to inf)."""
    if kind == "huge":
        x = rng.standard_normal(n) * rng.choice([1e19, 1e30, 3e37])
        x[rng.integers(0, n, 2)] = rng.choice([-1, 1], 2) * 3.4e38
        return x.astype(F)
    return make_case(kind, rng, n)


ALL_KINDS = [*KINDS, "huge"]
IMATRIX_KINDS = ["random", "zeros", "ones", "dynamic", "tiny", "all_zero", "huge", "signed"]


def imatrix_of(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if kind == "random":     # what llama-imatrix gives: mean of squared activations
        w = rng.gamma(0.7, 2.0, n)
    elif kind == "zeros":    # columns never activated, whole 16/32-groups among them
        w = rng.gamma(0.7, 2.0, n)
        w[rng.random(n) < 0.3] = 0
        w[:32] = 0
    elif kind == "ones":
        w = np.ones(n)
    elif kind == "dynamic":  # many orders of magnitude between columns
        w = 10.0 ** rng.uniform(-12, 12, n)
    elif kind == "tiny":
        w = rng.uniform(0, 1, n) * 1e-30
    elif kind == "all_zero":  # an expert no token reached, before llama-quantize's fallback
        w = np.zeros(n)
    elif kind == "huge":      # weights times sqrt(sigma2 + x^2) overflow
        w = rng.uniform(0.5, 1, n) * 1e37
    elif kind == "signed":    # no imatrix file holds these, but the float sequence is still ggml's
        w = rng.standard_normal(n) * rng.choice([1e-20, 1.0, 1e20])
    else:
        raise AssertionError(kind)
    return w.astype(F)


def row_lengths(qtype) -> list[int]:
    blk, _ = native.block_info(qtype)
    return [256, 512, 4352] if blk == 256 else [96, 256, 800, 4128]


def assert_all_impls(fn, x, qtype, w, what: str, threads: int = 1):
    want = ggml_quantize(fn, x, qtype, w)
    for impl in IMPLS:
        got = native.quantize(x, qtype, threads=threads, impl=impl, imatrix=w)
        assert got.shape == want.shape
        bad = np.nonzero((got != want).reshape(-1, want.shape[-1]).any(axis=1))[0]
        assert bad.size == 0, f"{qtype.name} {what} impl={native.IMPLS[impl]} threads={threads} rows {bad[:5]}"


# ---------------------------------------------------------------------------------------------
# Byte-exactness against ggml


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_each_kind_matches_ggml(ggml, qtype):
    """Every data kind x every imatrix kind, chunks of 3 rows; counts the cases it compared."""
    cases = 0
    for ki, kind in enumerate(ALL_KINDS):
        for wi, wkind in enumerate(IMATRIX_KINDS):
            rng = np.random.default_rng(1000 * ki + 10 * wi + int(qtype))
            n = 512 if native.block_info(qtype)[0] == 256 else 288
            x = np.stack([case(kind, rng, n) for _ in range(3)])
            assert_all_impls(ggml, x, qtype, imatrix_of(wkind, rng, n), f"{kind}/{wkind}")
            cases += 1
    assert cases == len(ALL_KINDS) * len(IMATRIX_KINDS)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_mixed_rows_match_ggml(ggml, qtype):
    """Rows mixing every kind block by block (the row-wide sigma2 of Q4_0..Q5_1 sees them all),
    several row lengths, many rows, shuffled; one thread and four."""
    for li, n in enumerate(row_lengths(qtype)):
        rng = np.random.default_rng(50 + li + 100 * int(qtype))
        nrows = max(4, 16384 // n)
        blocks = [case(ALL_KINDS[i % len(ALL_KINDS)], rng, 32) for i in range(nrows * n // 32)]
        x = np.concatenate(blocks).reshape(-1, 32)
        rng.shuffle(x)
        x = (x.reshape(nrows, n) * rng.uniform(0.001, 100)).astype(F)
        for wkind in IMATRIX_KINDS:
            w = imatrix_of(wkind, rng, n)
            assert_all_impls(ggml, x, qtype, w, f"n={n} {wkind}", threads=1)
        assert_all_impls(ggml, x, qtype, imatrix_of("random", rng, n), f"n={n} threaded", threads=4)


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_per_expert_imatrix(ggml, qtype):
    """3-D (n_expert, rows, n) with a (n_expert, n) imatrix: expert e's rows use imatrix[e]
    (llama-quantize's one ggml_quantize_chunk per expert)."""
    rng = np.random.default_rng(7 + int(qtype))
    n = 512 if native.block_info(qtype)[0] == 256 else 160
    x = (rng.standard_normal((4, 5, n)) * rng.uniform(0.1, 2, (4, 1, 1))).astype(F)
    w = np.stack([imatrix_of(k, rng, n) for k in ("random", "zeros", "dynamic", "ones")])
    want = ggml_quantize(ggml, x, qtype, w)
    for impl in IMPLS:
        for threads in (1, 3):
            got = native.quantize(x, qtype, threads=threads, impl=impl, imatrix=w)
            assert np.array_equal(got, want), (qtype.name, impl, threads)
    # the slicing matters: with the experts' weights rotated, some expert's bytes change
    rotated = native.quantize(x, qtype, imatrix=np.roll(w, 1, axis=0))
    assert not np.array_equal(rotated, want)
    # a 1-D imatrix on a 3-D tensor applies to every expert
    assert np.array_equal(native.quantize(x, qtype, imatrix=w[0]), ggml_quantize(ggml, x.reshape(-1, n), qtype, w[0]).reshape(want.shape))


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_threads_and_chunking_identical(qtype):
    """Many rows across threads: same bytes for every thread count (work splits by whole rows)."""
    rng = np.random.default_rng(3 + int(qtype))
    n = 256 if native.block_info(qtype)[0] == 256 else 96
    x = (rng.standard_normal((700, n)) * rng.uniform(0.1, 3, (700, 1))).astype(F)
    w = imatrix_of("random", rng, n)
    one = native.quantize(x, qtype, threads=1, imatrix=w)
    for threads in (2, 5, 16):
        assert np.array_equal(native.quantize(x, qtype, threads=threads, imatrix=w), one), threads
    # row-by-row calls agree with one big call
    assert np.array_equal(np.concatenate([native.quantize(x[i : i + 1], qtype, imatrix=w) for i in range(0, 700, 97)]),
                          one[::97])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_vector_paths_equal_scalar(qtype):
    """The lane-parallel weighted kernels batch blocks across rows: odd counts (partial batches),
    rows of one block and of several, every kind of data."""
    rng = np.random.default_rng(23 + int(qtype))
    blk, _ = native.block_info(qtype)
    shapes = ((1, 256), (1, 768), (257, 256), (17, 768)) if blk == 256 else ((1, 32), (7, 96), (129, 32), (33, 800))
    for nrows, n in shapes:
        nsb = nrows * n // 256 + 1
        x = np.concatenate([case(ALL_KINDS[i % len(ALL_KINDS)], rng) for i in range(nsb)])[: nrows * n].reshape(nrows, n)
        w = imatrix_of(IMATRIX_KINDS[nsb % len(IMATRIX_KINDS)], rng, n)
        want = native.quantize(x, qtype, threads=1, impl=0, imatrix=w)
        for impl in IMPLS[1:]:
            got = native.quantize(x, qtype, threads=1, impl=impl, imatrix=w)
            assert np.array_equal(got, want), (qtype.name, native.IMPLS[impl], nrows, n)


# ---------------------------------------------------------------------------------------------
# The imatrix must matter (a quantizer that ignored it would pass the tests above only if ggml
# did too; these make the difference explicit)


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_imatrix_changes_the_bytes(ggml, qtype):
    rng = np.random.default_rng(11 + int(qtype))
    n = 1024
    x = rng.standard_normal((8, n)).astype(F)
    w = imatrix_of("random", rng, n)
    plain = native.quantize(x, qtype)
    weighted = native.quantize(x, qtype, imatrix=w)
    assert np.array_equal(plain, ggml_quantize(ggml, x, qtype, None))
    assert (weighted != plain).any(axis=1).all(), "every row should change with a non-trivial imatrix"
    # weighting helps where it is told to: the weighted squared error drops
    deq = native.dequantize(weighted, qtype, x.size).reshape(x.shape)
    deq0 = native.dequantize(plain, qtype, x.size).reshape(x.shape)
    assert (w * (deq - x) ** 2).sum() < (w * (deq0 - x) ** 2).sum()


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda t: t.name)
def test_row_wide_sigma_needs_whole_rows(ggml, qtype):
    """Q4_0..Q5_1 weigh with sigma2 over the whole row: quantizing half rows gives other bytes
    (so a chunking that split rows would be caught); the other types are per super-block."""
    rng = np.random.default_rng(17)
    n = 512
    x = rng.standard_normal((4, n)).astype(F)
    x[:, : n // 2] *= 50   # first half dominates sigma2
    w = imatrix_of("random", rng, n)
    whole = native.quantize(x, qtype, imatrix=w)
    halves = np.concatenate([native.quantize(np.ascontiguousarray(x[:, : n // 2]), qtype, imatrix=w[: n // 2]),
                             native.quantize(np.ascontiguousarray(x[:, n // 2 :]), qtype, imatrix=w[n // 2 :])], axis=1)
    assert np.array_equal(whole, ggml_quantize(ggml, x, qtype, w))
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        assert not np.array_equal(whole, halves)
    else:
        assert np.array_equal(whole, halves)


@pytest.mark.parametrize("qtype", IGNORED, ids=lambda t: t.name)
def test_types_without_imatrix_effect_ignore_it(ggml, qtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 512)).astype(F)
    w = imatrix_of("random", rng, 512)
    assert not native.uses_imatrix(qtype)
    got = native.quantize(x, qtype, imatrix=w)
    assert np.array_equal(got, native.quantize(x, qtype))
    assert np.array_equal(got, ggml_quantize(ggml, x, qtype, w))


def test_uses_imatrix():
    assert [t for t in WEIGHTED + IGNORED if native.uses_imatrix(t)] == WEIGHTED
    with pytest.raises(ValueError):
        native.uses_imatrix(9999)


# ---------------------------------------------------------------------------------------------
# Validation


def test_bad_imatrix_is_a_value_error():
    x = np.ones((2, 256), F)
    x3 = np.ones((3, 2, 256), F)
    w = np.ones(256, F)
    bad = [
        (x, w[:128], "shape"),
        (x, np.ones(512, F), "shape"),
        (x, np.ones((2, 256), F), "shape"),            # 2-D imatrix needs a 3-D tensor
        (x3, np.ones((2, 256), F), "shape"),           # expert count mismatch
        (x3, np.ones((3, 1, 256), F), "shape"),
        (x, w.astype(np.float64), "float32"),
        (x, w.astype(np.float16), "float32"),
        (x, np.where(np.arange(256) == 7, np.nan, 1).astype(F), "NaN"),
        (x, np.where(np.arange(256) == 7, np.inf, 1).astype(F), "NaN or Inf"),
    ]
    for xx, ww, msg in bad:
        for qtype in (T.Q4_K, T.Q8_0):   # validated even where the type ignores it
            with pytest.raises(ValueError, match=msg):
                native.quantize(xx, qtype, imatrix=ww)
    # nothing odd about an empty chunk
    assert native.quantize(np.ones((0, 256), F), T.Q4_K, imatrix=w).shape == (0, 144)


def test_inputs_not_modified():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 512)).astype(F)
    w = imatrix_of("random", rng, 512)
    x0, w0 = x.copy(), w.copy()
    for qtype in WEIGHTED:
        native.quantize(x, qtype, imatrix=w)
    assert np.array_equal(x, x0) and np.array_equal(w, w0)
    # read-only and strided inputs (a memory-mapped tensor, an imatrix sliced out of a bigger one)
    ro = np.frombuffer(x.tobytes(), F).reshape(x.shape)
    wide = np.stack([w, w * 2]).T.copy()   # (512, 2): column 0 is w, strided
    assert np.array_equal(native.quantize(ro, T.Q4_K, imatrix=wide[:, 0]), native.quantize(x, T.Q4_K, imatrix=w))
