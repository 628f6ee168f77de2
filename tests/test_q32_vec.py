"""The lane-parallel Q4_0/Q4_1/Q5_0/Q5_1 quantizers against ggml (ggml_quantize_chunk via ctypes) on the
cases where only the order of the scalar loops decides the bytes: which element supplies the signed
max (x and -x both the largest), the sign of a zero min or max (+0.0 and -0.0 in one block), plus
blocks the vector code hands to the scalar code (inf, NaN, d or 1/d overflowing)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gguforge.quantize import native
from test_quant_ladder import ggml  # noqa: F401  (the fixture)

F = np.float32
TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q5_0: 22, T.Q5_1: 24}  # per block of 32 (ggml-common.h)


def ggml_quantize(lib, x: np.ndarray, qtype: T) -> np.ndarray:
    """llama-quantize's call: ggml_quantize_chunk without an imatrix."""
    x = np.ascontiguousarray(x, dtype=F)
    nrows, n = x.shape
    out = np.zeros((nrows, n // 32 * BYTES[qtype]), np.uint8)
    assert lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n, None) == out.size
    return out


def blocks(rng: np.random.Generator) -> np.ndarray:
    out = []
    for _ in range(64):
        x = rng.standard_normal(32).astype(F)
        kind = rng.integers(0, 9)
        if kind == 0:  # +x and -x both the largest |x|, either first
            i, j = rng.choice(32, 2, replace=False)
            x[i], x[j] = 4.0, -4.0
        elif kind == 1:  # non-negative with signed zeros: a zero min
            x = np.abs(x)
            x[rng.choice(32, 6, replace=False)] = rng.choice([0.0, -0.0], 6)
        elif kind == 2:  # non-positive with signed zeros: a zero max
            x = -np.abs(x)
            x[rng.choice(32, 6, replace=False)] = rng.choice([0.0, -0.0], 6)
        elif kind == 3:  # all zeros, mixed signs
            x = rng.choice([0.0, -0.0], 32).astype(F)
        elif kind == 4:  # subnormals and signed zeros
            x = (rng.choice([-1, 1, 0], 32) * rng.integers(1, 50, 32) * 1e-45).astype(F)
            x[rng.integers(0, 32)] = -0.0
        elif kind == 5:  # d or 1/d overflows
            x = (x * 1e38).astype(F)
            x[rng.integers(0, 32)] = 3.4e38
            x[rng.integers(0, 32)] = -3.4e38
        elif kind == 6:  # a tiny max: 1/d overflows
            x = np.zeros(32, F)
            x[rng.integers(0, 32)] = rng.choice([1e-44, -1e-44, 3e-39])
        elif kind == 7:  # exact ties for the +8.5 / +0.5 truncation
            x = (rng.integers(-16, 17, 32) / 2.0).astype(F)
        else:
            x = (x * rng.uniform(1e-3, 1e3)).astype(F)
        out.append(x.astype(F))
    return np.stack(out)


def nonfinite_blocks(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((8, 32)).astype(F)
    x[0, 3] = np.inf
    x[1, 30] = -np.inf
    x[2, 0] = np.nan
    x[3, :] = np.inf
    return x


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_order_sensitive_blocks_match_ggml(ggml, qtype):  # noqa: F811
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x = blocks(rng).reshape(16, 128)  # rows of 4 blocks
        want = ggml_quantize(ggml, x, qtype)
        for impl in sorted(native.IMPLS):
            got = native.quantize(x, qtype, threads=1, impl=impl)
            bad = np.nonzero((got != want).any(axis=1))[0]
            assert bad.size == 0, f"{qtype.name} seed={seed} impl={native.IMPLS[impl]} rows {bad}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_nonfinite_blocks_equal_scalar(qtype):
    """Blocks with inf/NaN go to the scalar code (ggml's own output there is C's undefined casts)."""
    x = nonfinite_blocks(np.random.default_rng(3))
    want = native.quantize(x, qtype, threads=1, impl=0)
    for impl in sorted(native.IMPLS)[1:]:
        assert np.array_equal(native.quantize(x, qtype, threads=1, impl=impl), want), native.IMPLS[impl]
