"""Native MXFP4, Q1_0, Q2_0, TQ1_0, TQ2_0, IQ3_XXS and IQ3_S (issue 24): byte-exact with ggml.

The oracle is ggml itself through ctypes (llama-cpp-python's libggml-base, as test_native_quant /
test_native_imatrix / test_quant_ladder use it): ggml_quantize_chunk with and without an importance
matrix (one call per expert for 3-D tensors, as llama-quantize), and each type's to_float for the
decoders. Data: the kinds of those tests (huge values included), rows of one and several blocks,
mixed and shuffled; imatrix kinds of test_native_imatrix. Only IQ3_XXS and IQ3_S read an imatrix;
for the others ggml ignores it, and so must we. Round-trip errors: test-quantize-fns' bounds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES

from gguforge.quantize import native
from test_native_imatrix import ALL_KINDS, IMATRIX_KINDS, case, ggml_quantize, imatrix_of
from test_native_quant import array_rmse, quantize_fns_data
from test_quant_ladder import _TO_FLOAT, ggml  # noqa: F401 (ggml: libggml-base with its type traits typed)

F = np.float32
Q2_0 = getattr(T, "Q2_0", native.GGML_Q2_0)  # gguf-py 0.19 has no name for type 42
PLAIN = [T.MXFP4, T.Q1_0, Q2_0, T.TQ1_0, T.TQ2_0]  # ggml ignores an imatrix for these
WEIGHTED = [T.IQ3_XXS, T.IQ3_S]
ALL = PLAIN + WEIGHTED
# tests/test-quantize-fns.cpp: MAX_QUANTIZATION_TOTAL_ERROR(_BINARY, _TERNARY, _3BITS, _3BITS_XXS)
ERROR_BOUND = {T.MXFP4: 0.002, T.Q1_0: 0.025, Q2_0: 0.01, T.TQ1_0: 0.01, T.TQ2_0: 0.01,
               T.IQ3_S: 0.004, T.IQ3_XXS: 0.005}


def kinds(qtype) -> list[str]:
    """The data kinds ggml can quantize to `qtype`: for IQ3 values near FLT_MAX make every candidate's
    distance inf and ggml aborts (iq3_find_best_neighbour: GGML_ASSERT(grid_index >= 0))."""
    return [k for k in ALL_KINDS if not (k == "huge" and qtype in WEIGHTED)]


# ggml aborts on these as well: weights near FLT_MAX (inf distances) and negative ones (sqrt gives NaN)
IQ3_IMATRIX_KINDS = [k for k in IMATRIX_KINDS if k not in ("huge", "signed")]


def name(t) -> str:
    return T(t).name if int(t) in T._value2member_map_ else "Q2_0"


def ggml_dequantize(lib, q: np.ndarray, qtype, n: int) -> np.ndarray:
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    q = np.ascontiguousarray(q, dtype=np.uint8)
    out = np.empty(n, F)
    _TO_FLOAT(traits.to_float)(q.ctypes.data, out.ctypes.data, n)
    return out


def mixed_rows(rng: np.random.Generator, qtype, nrows: int, n: int) -> np.ndarray:
    """Rows of blocks of every kind, shuffled block-wise, at a random overall scale."""
    blk, _ = native.block_info(qtype)
    usable = kinds(qtype)
    parts = [case(usable[i % len(usable)], rng, 256)[:blk] for i in range(nrows * n // blk)]
    x = np.concatenate(parts).reshape(-1, blk)
    rng.shuffle(x)
    return (x.reshape(nrows, n) * rng.uniform(0.01, 10)).astype(F)


@pytest.mark.parametrize("qtype", ALL, ids=name)
def test_block_sizes_are_ggml(ggml, qtype):
    traits = ggml.ggml_get_type_traits(int(qtype)).contents
    assert native.block_info(qtype) == (traits.blck_size, traits.type_size)
    assert native.supported(qtype)
    if int(qtype) in T._value2member_map_:
        assert native.block_info(qtype) == tuple(GGML_QUANT_SIZES[T(qtype)])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", ALL, ids=name)
def test_each_kind_matches_ggml(ggml, qtype):
    """Every data kind alone, rows of 256 and 512, no imatrix; one thread and three."""
    fn = ggml.ggml_quantize_chunk
    for ki, kind in enumerate(kinds(qtype)):
        rng = np.random.default_rng(100 * ki + int(qtype))
        for n in (256, 512):
            x = np.stack([case(kind, rng, n) for _ in range(3)])
            want = ggml_quantize(fn, x, qtype, None)
            for threads in (1, 3):
                got = native.quantize(x, qtype, threads=threads)
                bad = np.nonzero((got != want).any(axis=1))[0]
                assert bad.size == 0, f"{name(qtype)} {kind} n={n} threads={threads} rows {bad}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", ALL, ids=name)
def test_mixed_rows_match_ggml(ggml, qtype):
    """Many rows mixing every kind, several row lengths (one block, several, 4352), shuffled."""
    fn = ggml.ggml_quantize_chunk
    for li, n in enumerate((256, 1024, 4352)):
        rng = np.random.default_rng(7 + li + 100 * int(qtype))
        x = mixed_rows(rng, qtype, max(2, 8192 // n), n)
        want = ggml_quantize(fn, x, qtype, None)
        assert np.array_equal(native.quantize(x, qtype, threads=2), want), (name(qtype), n)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", WEIGHTED, ids=name)
def test_weighted_matches_ggml(ggml, qtype):
    """IQ3 with every imatrix kind on every data kind; rows of two blocks, so each block reads its own
    slice of the weights."""
    fn = ggml.ggml_quantize_chunk
    for ki, kind in enumerate(kinds(qtype)):
        for wi, wkind in enumerate(IQ3_IMATRIX_KINDS):
            rng = np.random.default_rng(1000 * ki + 10 * wi + int(qtype))
            x = np.stack([case(kind, rng, 512) for _ in range(2)])
            w = imatrix_of(wkind, rng, 512)
            want = ggml_quantize(fn, x, qtype, w)
            got = native.quantize(x, qtype, threads=1, imatrix=w)
            assert np.array_equal(got, want), f"{name(qtype)} {kind}/{wkind}"


@pytest.mark.parametrize("qtype", WEIGHTED, ids=name)
def test_per_expert_imatrix_matters(ggml, qtype):
    """3-D experts with one imatrix row each, as llama-quantize slices them; the weights change the bytes."""
    fn = ggml.ggml_quantize_chunk
    rng = np.random.default_rng(5 + int(qtype))
    x = (rng.standard_normal((4, 6, 512)) * rng.uniform(0.1, 2, (4, 1, 1))).astype(F)
    w = np.stack([imatrix_of(k, rng, 512) for k in ("random", "zeros", "dynamic", "ones")])
    want = ggml_quantize(fn, x, qtype, w)
    for threads in (1, 3):
        assert np.array_equal(native.quantize(x, qtype, threads=threads, imatrix=w), want), threads
    assert not np.array_equal(native.quantize(x, qtype, imatrix=np.roll(w, 1, axis=0)), want)
    assert not np.array_equal(native.quantize(x, qtype), want)
    assert native.uses_imatrix(qtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", PLAIN, ids=name)
def test_imatrix_is_ignored_as_ggml_does(ggml, qtype):
    fn = ggml.ggml_quantize_chunk
    rng = np.random.default_rng(9 + int(qtype))
    x = mixed_rows(rng, qtype, 4, 512)
    w = imatrix_of("dynamic", rng, 512)
    want = ggml_quantize(fn, x, qtype, w)
    assert np.array_equal(want, ggml_quantize(fn, x, qtype, None))
    assert np.array_equal(native.quantize(x, qtype, imatrix=w), want)
    assert not native.uses_imatrix(qtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", ALL, ids=name)
def test_dequantize_matches_ggml(ggml, qtype):
    """The decoder against ggml's to_float on our own (= ggml's) blocks and on random bytes, bit for bit."""
    rng = np.random.default_rng(31 + int(qtype))
    x = mixed_rows(rng, qtype, 6, 1024)
    blk, nbytes = native.block_info(qtype)
    noise = rng.integers(0, 256, (4, 1024 // blk * nbytes), dtype=np.uint8)
    if qtype != T.MXFP4:  # (every byte pattern is an MXFP4 block) keep the fp16 scales finite, or NaNs hide errors
        scale_at = nbytes - 2 if qtype in (T.TQ1_0, T.TQ2_0) else 0
        noise.reshape(4, -1, nbytes)[:, :, scale_at + 1] &= 0x3B
    for data in (native.quantize(x, qtype), noise):
        n = data.size // nbytes * blk
        got = native.dequantize(data, qtype, n)
        want = ggml_dequantize(ggml, data, qtype, n).reshape(got.shape)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name(qtype)


@pytest.mark.parametrize("qtype", ALL, ids=name)
def test_round_trip_error_bound(qtype):
    """test-quantize-fns: RMSE of quantize + dequantize on its cosine data within the type's bound."""
    for offset in (0, 1):
        x = quantize_fns_data(offset)
        y = native.dequantize(native.quantize(x, qtype), qtype, x.size)
        assert array_rmse(x, y) < ERROR_BOUND[qtype], (name(qtype), offset)


@pytest.mark.parametrize("qtype", WEIGHTED, ids=name)
def test_iq3_values_ggml_aborts_on_still_give_blocks(qtype):
    """Where ggml aborts (every candidate's distance inf or NaN), we write blocks that decode."""
    rng = np.random.default_rng(3)
    x = np.stack([case("huge", rng, 512) for _ in range(2)])
    for w in (None, imatrix_of("signed", rng, 512), imatrix_of("huge", rng, 512)):
        q = native.quantize(x, qtype, imatrix=w)
        assert q.shape == (2, 2 * native.block_info(qtype)[1])
        assert native.dequantize(q, qtype, x.size).shape == x.shape


def test_iq3_tables_built_once_and_shared_by_threads():
    """In a fresh process, eight threads race to the first use of the lazily built tables: the bytes
    equal this process's single-threaded ones."""
    code = ("import numpy as np, sys; from gguforge.quantize import native; "
            "x = np.random.default_rng(77).standard_normal((64, 512)).astype(np.float32); "
            "sys.stdout.write(''.join(native.quantize(x, t, threads=8).tobytes().hex() for t in (18, 21)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    x = np.random.default_rng(77).standard_normal((64, 512)).astype(F)
    assert r.stdout == "".join(native.quantize(x, t, threads=1).tobytes().hex() for t in WEIGHTED)


@pytest.mark.parametrize("generator", ["gen_native_tables.py", "gen_lattice_grids.py"])
def test_shipped_grids_are_the_pinned_trees(generator):
    """native_iq3_tables.h / native_iq2_grids.h are what the generators extract from the pinned llama.cpp
    (gen_lattice_grids.py also checks the grids against ggml-quants.c's packed lattice lists)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / generator
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
