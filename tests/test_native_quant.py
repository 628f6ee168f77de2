"""Native quantizer: byte-exactness against ggml's reference quantizers.

Three independent oracles:
  * a slow pure-Python/numpy transcription of the reference algorithms written here
    (float32 scalar semantics, step by step; shares no code with the C extension);
  * ggml itself through ctypes, when llama-cpp-python is installed;
  * gguf-py's numpy quantizers/dequantizers where they exist.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from gguforge.quantize import native

F = np.float32
QTYPES = [T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q5_0, T.Q5_1]

# ---------------------------------------------------------------------------
# Slow reference model (spec §2-§3), float32 scalars only
# ---------------------------------------------------------------------------


def nearest_int(f) -> int:
    v = F(F(f) + F(12582912.0))
    i = int(np.array(v, dtype=F).view(np.int32))
    return (i & 0x007FFFFF) - 0x00400000


def roundf(a) -> int:
    # half away from zero; exact in double for float32 inputs of this size
    a = float(a)
    if not math.isfinite(a):
        # id = 1/d overflows for subnormal-sized blocks; x86 float->int gives 0x80000000
        return -(2**31)
    return int(math.copysign(math.floor(abs(a) + 0.5), a))


def c_trunc(a) -> int:
    """C float->int conversion (toward zero); x86 yields 0x80000000 for NaN/inf/out of range."""
    a = float(a)
    if not math.isfinite(a) or abs(a) >= 2**31:
        return -(2**31)
    return int(a)


def fp16_bits(v) -> int:
    return int(np.array(F(v)).astype(np.float16).view(np.uint16))


def fp16_val(bits: int) -> np.float32:
    return F(np.array(bits, dtype=np.uint16).view(np.float16))


def clamp(v, lo, hi):
    return max(lo, min(hi, v))


def u16le(v: int) -> bytes:
    return int(v).to_bytes(2, "little")


def ref_q8_0(x) -> bytes:
    out = bytearray()
    for b in range(0, len(x), 32):
        xs = [F(v) for v in x[b : b + 32]]
        amax = F(0)
        for v in xs:
            a = F(abs(v))
            amax = amax if amax > a else a
        d = F(amax / F(127))
        idd = F(F(1) / d) if d != 0 else F(0)
        out += u16le(fp16_bits(d))
        out += bytes((roundf(F(v * idd)) & 0xFF) for v in xs)
    return bytes(out)


def _pack_q5(v: list[int]) -> bytes:
    qh = 0
    qs = bytearray(16)
    for j in range(16):
        qs[j] = (v[j] & 15) | ((v[j + 16] & 15) << 4)
        qh |= ((v[j] >> 4) & 1) << j
        qh |= ((v[j + 16] >> 4) & 1) << (j + 16)
    return qh.to_bytes(4, "little") + bytes(qs)


def ref_q5_0(x) -> bytes:
    out = bytearray()
    for b in range(0, len(x), 32):
        xs = [F(v) for v in x[b : b + 32]]
        amax, mx = F(0), F(0)
        for v in xs:
            if amax < abs(v):
                amax, mx = F(abs(v)), v
        d = F(mx / F(-16))
        idd = F(F(1) / d) if d != 0 else F(0)
        vals = []
        for v in xs:
            t = c_trunc(F(F(v * idd) + F(16.5)))  # as (int8_t)
            t = ((t + 128) & 0xFF) - 128
            vals.append(min(31, t) & 0xFF)
        out += u16le(fp16_bits(d)) + _pack_q5(vals)
    return bytes(out)


def ref_q5_1(x) -> bytes:
    out = bytearray()
    for b in range(0, len(x), 32):
        xs = [F(v) for v in x[b : b + 32]]
        mn, mx = F(np.finfo(F).max), F(-np.finfo(F).max)
        for v in xs:
            if v < mn:
                mn = v
            if v > mx:
                mx = v
        d = F(F(mx - mn) / F(31))
        idd = F(F(1) / d) if d != 0 else F(0)
        vals = [c_trunc(F(F(F(v - mn) * idd) + F(0.5))) & 0xFF for v in xs]
        out += u16le(fp16_bits(d)) + u16le(fp16_bits(mn)) + _pack_q5(vals)
    return bytes(out)


def make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    """Returns (scale, the_min, L). Reproduces the drifting-min quirk."""
    n = len(x)
    mn = mx = x[0]
    sum_w = w[0]
    sum_x = F(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = F(sum_w + w[i])
        sum_x = F(sum_x + F(w[i] * x[i]))
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return F(0), F(-mn), [0] * n
    iscale = F(F(nmax) / F(mx - mn))
    scale = F(F(1) / iscale)
    L = []
    best = F(0)
    for i in range(n):
        l = clamp(nearest_int(F(iscale * F(x[i] - mn))), 0, nmax)
        L.append(l)
        diff = F(F(F(scale * F(l)) + mn) - x[i])
        best = F(best + F(w[i] * F(diff * diff)))
    for step in range(nstep + 1):
        iscale = F(F(F(rmin + F(rdelta * F(step))) + F(nmax)) / F(mx - mn))
        sl = sl2 = sxl = F(0)
        laux = []
        for i in range(n):
            l = clamp(nearest_int(F(iscale * F(x[i] - mn))), 0, nmax)
            laux.append(l)
            wl = F(w[i] * F(l))
            sl = F(sl + wl)
            sl2 = F(sl2 + F(wl * F(l)))
            sxl = F(sxl + F(wl * x[i]))
        D = F(F(sum_w * sl2) - F(sl * sl))
        if not D > 0:
            continue
        this_scale = F(F(F(sum_w * sxl) - F(sum_x * sl)) / D)
        this_min = F(F(F(sl2 * sum_x) - F(sl * sxl)) / D)
        if this_min > 0:
            this_min = F(0)
            this_scale = F(sxl / sl2)
        cur = F(0)
        for i in range(n):
            diff = F(F(F(this_scale * F(laux[i])) + this_min) - x[i])
            cur = F(cur + F(w[i] * F(diff * diff)))
        if cur < best:
            L, best, scale, mn = laux, cur, this_scale, this_min
    return scale, F(-mn), L


def ref_q45_k(x, nmax) -> bytes:
    rmin, nstep = (F(-1.0), 20) if nmax == 15 else (F(-0.5), 15)
    out = bytearray()
    for b in range(0, len(x), 256):
        xb = [F(v) for v in x[b : b + 256]]
        scales, mins, L = [], [], []
        for j in range(8):
            xs = xb[32 * j : 32 * j + 32]
            s2 = F(0)
            for v in xs:
                s2 = F(s2 + F(v * v))
            av = F(np.sqrt(F(s2 / F(32))))
            w = [F(av + F(abs(v))) for v in xs]
            sc, m, l = make_qkx2(xs, w, nmax, rmin, F(0.1), nstep)
            scales.append(sc)
            mins.append(m)
            L += l
        max_scale = max_min = F(0)
        for j in range(8):
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_s = F(F(63) / max_scale) if max_scale > 0 else F(0)
        inv_m = F(F(63) / max_min) if max_min > 0 else F(0)
        ls = [min(63, nearest_int(F(inv_s * s)) & 0xFF) for s in scales]
        lm = [min(63, nearest_int(F(inv_m * m)) & 0xFF) for m in mins]
        sb = bytearray(12)
        for j in range(8):
            if j < 4:
                sb[j] = ls[j]
                sb[j + 4] = lm[j]
            else:
                sb[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
                sb[j - 4] |= (ls[j] >> 4) << 6
                sb[j] |= (lm[j] >> 4) << 6
        dh, mh = fp16_bits(F(max_scale / F(63))), fp16_bits(F(max_min / F(63)))
        for j in range(8):
            # decode from the packed bytes (independent of ls/lm)
            if j < 4:
                sc, m = sb[j] & 63, sb[j + 4] & 63
            else:
                sc = (sb[j + 4] & 0xF) | ((sb[j - 4] >> 6) << 4)
                m = (sb[j + 4] >> 4) | ((sb[j] >> 6) << 4)
            dj = F(fp16_val(dh) * F(sc))
            if dj == 0:
                continue
            dm = F(fp16_val(mh) * F(m))
            for i in range(32):
                L[32 * j + i] = clamp(nearest_int(F(F(xb[32 * j + i] + dm) / dj)), 0, nmax)
        out += u16le(dh) + u16le(mh) + sb
        if nmax == 15:
            for p in range(4):
                out += bytes(L[64 * p + l] | (L[64 * p + 32 + l] << 4) for l in range(32))
        else:
            qh = bytearray(32)
            qs = bytearray(128)
            for p in range(4):
                for l in range(32):
                    a, c = L[64 * p + l], L[64 * p + 32 + l]
                    qs[32 * p + l] = (a & 15) | ((c & 15) << 4)
                    qh[l] |= ((a >> 4) << (2 * p)) | ((c >> 4) << (2 * p + 1))
            out += qh + qs
    return bytes(out)


def make_qx(x, nmax=32):
    mx, amax = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = F(abs(v)), v
    if amax < F(1e-15):
        return F(0), [0] * len(x)

    def pass_(iscale):
        sumlx = suml2 = F(0)
        ls = []
        for v in x:
            l = clamp(nearest_int(F(iscale * v)), -nmax, nmax - 1)
            ls.append(l)
            w = F(v * v)
            sumlx = F(sumlx + F(F(w * v) * F(l)))
            suml2 = F(suml2 + F(F(w * F(l)) * F(l)))
        return sumlx, suml2, ls

    sumlx, suml2, ls = pass_(F(F(-nmax) / mx))
    L = [l + nmax for l in ls]
    scale = F(sumlx / suml2) if suml2 != 0 else F(0)
    best = F(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = F(F(-F(F(nmax) + F(F(0.1) * F(step)))) / mx)
        sumlx, suml2, ls = pass_(iscale)
        if suml2 > 0 and F(sumlx * sumlx) > F(best * suml2):
            L = [l + nmax for l in ls]
            scale = F(sumlx / suml2)
            best = F(scale * sumlx)
    return scale, L


def ref_q6_k(x) -> bytes:
    out = bytearray()
    for b in range(0, len(x), 256):
        xb = [F(v) for v in x[b : b + 256]]
        scales, L = [], []
        max_scale = max_abs = F(0)
        for ib in range(16):
            s, l = make_qx(xb[16 * ib : 16 * ib + 16])
            scales.append(s)
            L += l
            if abs(s) > max_abs:
                max_abs, max_scale = F(abs(s)), s
        if max_abs < F(1e-15):
            out += bytes(210)
            continue
        iscale = F(F(-128) / max_scale)
        dh = fp16_bits(F(F(1) / iscale))
        sc = [((min(127, nearest_int(F(iscale * s))) + 128) & 0xFF) - 128 for s in scales]
        for j in range(16):
            dj = F(fp16_val(dh) * F(sc[j]))
            if dj == 0:
                continue
            for i in range(16):
                L[16 * j + i] = clamp(nearest_int(F(xb[16 * j + i] / dj)), -32, 31) + 32
        ql = bytearray(128)
        qh = bytearray(64)
        for h in range(2):
            e = L[128 * h : 128 * h + 128]
            for l in range(32):
                ql[64 * h + l] = (e[l] & 15) | ((e[l + 64] & 15) << 4)
                ql[64 * h + 32 + l] = (e[l + 32] & 15) | ((e[l + 96] & 15) << 4)
                qh[32 * h + l] = (e[l] >> 4) | ((e[l + 32] >> 4) << 2) | ((e[l + 64] >> 4) << 4) | ((e[l + 96] >> 4) << 6)
        out += ql + qh + bytes(s & 0xFF for s in sc) + u16le(dh)
    return bytes(out)


REF = {
    T.Q8_0: ref_q8_0,
    T.Q5_0: ref_q5_0,
    T.Q5_1: ref_q5_1,
    T.Q4_K: lambda x: ref_q45_k(x, 15),
    T.Q5_K: lambda x: ref_q45_k(x, 31),
    T.Q6_K: ref_q6_k,
}

# ---------------------------------------------------------------------------
# Test data: one 256-element block per case (a multiple of every block size)
# ---------------------------------------------------------------------------


def make_case(kind: str, rng: np.random.Generator, n: int = 256) -> np.ndarray:
    g = rng.standard_normal(n)
    if kind == "gaussian":
        x = g * rng.uniform(0.01, 3)
    elif kind == "zero":
        x = np.zeros(n)
    elif kind == "constant":
        x = np.full(n, rng.choice([0.37, -1.25, 3.0]))
    elif kind == "positive":
        x = np.abs(g) + 0.05
    elif kind == "negative":
        x = -np.abs(g) - 0.05
    elif kind == "partial_zero":
        x = g.copy()
        x[rng.random(n) < 0.6] = 0
        x[32:64] = 0
    elif kind == "ties":
        # integer and half-integer values: exact .5 ties inside nearest_int/roundf
        x = rng.integers(-16, 17, n) / rng.choice([1.0, 2.0, 4.0])
    elif kind == "halfsteps":
        # amax 127 per 32-block -> Q8_0 d = 1, id = 1: x*id hits exact .5 ties for roundf
        x = rng.integers(-254, 255, n) / 2.0
        x[::32] = 127.0
    elif kind == "outlier":
        x = g * 0.02
        x[rng.integers(0, n, 3)] = rng.choice([-1, 1], 3) * 40
        x[64:96] *= 1e-6  # near-zero sub-block next to big ones
    elif kind == "tiny6":
        x = g * 1e-6  # fp16 subnormal d/dmin
    elif kind == "tiny15":
        x = g * 1e-15  # x^3 underflows to float32 subnormals; Q6_K zero-block branch
    elif kind == "subnormal":
        x = g * 1e-39  # float32 subnormals: 1/d overflows to inf in Q8_0/Q5_0/Q5_1
    elif kind == "heavy":
        x = rng.standard_t(1.5, n)
    elif kind == "small_ints":
        x = rng.integers(0, 3, n).astype(float)
    else:
        raise AssertionError(kind)
    return x.astype(F)


KINDS = ["gaussian", "zero", "constant", "positive", "negative", "partial_zero", "ties", "halfsteps",
         "outlier", "tiny6", "tiny15", "subnormal", "heavy", "small_ints"]


def all_impls():
    return sorted(native.IMPLS)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the model overflows like C does
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_matches_python_model(qtype):
    """Every implementation == the slow transcription, block for block."""
    seeds = [0, 1, 2] if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else [0, 1, 2, 3, 4, 5]
    for seed in seeds:
        rng = np.random.default_rng(1000 * seed + int(qtype))
        for kind in KINDS:
            x = make_case(kind, rng)
            want = REF[qtype](x)
            for impl in all_impls():
                got = native.quantize(x, qtype, threads=1, impl=impl).tobytes()
                assert got == want, f"{qtype.name} {kind} seed={seed} impl={native.IMPLS[impl]}"


def test_model_sanity():
    """The model itself must be able to fail: it is a real quantizer, not a copy of the input."""
    x = make_case("gaussian", np.random.default_rng(5))
    for qtype in QTYPES:
        blk, nbytes = native.block_info(qtype)
        b = REF[qtype](x)
        assert len(b) == len(x) // blk * nbytes
        y = gguf_quants.dequantize(np.frombuffer(b, np.uint8), qtype)
        assert np.abs(y - x).max() < 0.2 * np.abs(x).max()
    # perturbing one input changes the output bytes
    x2 = x.copy()
    x2[7] += 0.5
    assert ref_q8_0(x2) != ref_q8_0(x)


def _many_blocks(rng, nblocks: int) -> np.ndarray:
    parts = [make_case(KINDS[i % len(KINDS)], rng) for i in range(nblocks)]
    return np.concatenate(parts)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_vector_paths_equal_scalar(qtype):
    """The lane-parallel kernels give the scalar path's bytes on many mixed blocks (odd counts too)."""
    rng = np.random.default_rng(int(qtype))
    for nblocks in (1, 3, 257):
        x = _many_blocks(rng, nblocks)
        want = native.quantize(x, qtype, threads=1, impl=0)
        for impl in all_impls()[1:]:
            got = native.quantize(x, qtype, threads=1, impl=impl)
            assert np.array_equal(got, want), (qtype.name, native.IMPLS[impl], nblocks)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # subnormal blocks overflow 1/d
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_matches_gguf_py_quantizer(qtype):
    """gguf-py's numpy quantizers for these types are bit-exact with ggml."""
    rng = np.random.default_rng(7)
    x = _many_blocks(rng, 64).reshape(16, -1)
    assert np.array_equal(native.quantize(x, qtype), gguf_quants.quantize(x, qtype))


@pytest.mark.parametrize("qtype", QTYPES + [T.F16, T.BF16, T.F32], ids=lambda t: t.name)
def test_dequantize_matches_gguf_py(qtype):
    rng = np.random.default_rng(11)
    x = _many_blocks(rng, 24).reshape(6, -1)
    q = native.quantize(x, qtype)
    got = native.dequantize(q, qtype, x.size)
    want = gguf_quants.dequantize(q, qtype)
    assert got.shape == x.shape
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


# ---------------------------------------------------------------------------
# Against ggml itself (llama-cpp-python's libggml-base.so)
# ---------------------------------------------------------------------------


def ggml_lib():
    """llama-cpp-python's libggml-base (GGUFORGE_GGML_LIB overrides), with ggml_quantize_chunk typed;
    the oracle of every native-quantizer test."""
    path = os.environ.get("GGUFORGE_GGML_LIB")
    if not path:
        if importlib.util.find_spec("llama_cpp") is None:
            pytest.skip("llama-cpp-python not installed")
        pkg = Path(importlib.util.find_spec("llama_cpp").origin).parent
        libs = sorted(pkg.rglob("libggml-base.so*"))
        if not libs:
            pytest.skip(f"no libggml-base.so under {pkg}")
        path = str(libs[0])
    lib = ctypes.CDLL(path)
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(fn, x: np.ndarray, qtype) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=F)
    nrows, n = x.shape
    blk, nbytes = native.block_info(qtype)
    out = np.zeros((nrows, n // blk * nbytes), np.uint8)
    size = fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n, None)
    assert size == out.size
    return out


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_matches_ggml(qtype):
    fn = ggml_lib().ggml_quantize_chunk
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        # many random rows: every kind of block, several scales, shuffled
        x = _many_blocks(rng, 256)
        x = (x * rng.uniform(0.001, 100)).astype(F).reshape(-1, 1024)
        rng.shuffle(x)
        want = ggml_quantize(fn, x, qtype)
        for impl in all_impls():
            got = native.quantize(x, qtype, threads=2, impl=impl)
            bad = np.nonzero((got != want).any(axis=1))[0]
            assert bad.size == 0, f"{qtype.name} impl={native.IMPLS[impl]} seed={seed} rows {bad[:5]}"


# ---------------------------------------------------------------------------
# Error bounds from test-quantize-fns (spec §6)
# ---------------------------------------------------------------------------


def quantize_fns_data(offset: int, n: int = 4096) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    c = np.cos(i + offset).astype(F)  # cosf: float result
    return (0.1 + 2.0 * c.astype(np.float64)).astype(F)


def array_rmse(a, b) -> float:
    d = a.astype(np.float64) - b.astype(np.float64)
    return math.sqrt(float(np.sum(d * d))) / len(a)


# measured with ggml's ref quantizer + dequantizer (spec §6 table)
MEASURED = {T.Q4_K: 0.000982, T.Q5_K: 0.000531, T.Q6_K: 0.000261, T.Q8_0: 0.000074}


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_quantization_error_bound(qtype):
    x = quantize_fns_data(0)
    y = native.dequantize(native.quantize(x, qtype), qtype, x.size)
    err = array_rmse(x, y)
    assert err < 0.002, err
    if qtype in MEASURED:
        assert err == pytest.approx(MEASURED[qtype], rel=0.02)
    x2 = quantize_fns_data(1)
    assert array_rmse(x2, native.dequantize(native.quantize(x2, qtype), qtype, x2.size)) < 0.002


# ---------------------------------------------------------------------------
# Float converters
# ---------------------------------------------------------------------------


def _interesting_f32() -> np.ndarray:
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e-8, 6e-8, 2.98e-8,
                        2.9802322e-08, 5.9604645e-08, 6.1035156e-05, 6.097555e-05, 3e38, np.inf, -np.inf,
                        np.nan, -np.nan, np.finfo(F).tiny, 1e-45], dtype=F)
    # f16 rounding boundaries: exactly halfway between f16 neighbours (ties) and +-1 ulp
    h = np.arange(0, 0x7C00, 7, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = ((h[:-1] + h[1:]) / 2).astype(F)
    ties = np.concatenate([mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf)])
    # bf16 ties: low 16 bits exactly 0x8000
    bt = (rng.integers(0, 2**16, 5000).astype(np.uint32) << 16 | 0x8000).astype(np.uint32).view(F)
    x = np.concatenate([bits.view(F), special, ties, -ties, bt])
    return x


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_f32_to_f16_matches_numpy():
    x = _interesting_f32()
    got = native.f32_to_f16(x)
    want = x.astype(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
    assert np.all(got[nan].view(np.uint16) & 0x7FFF == 0x7E00)   # quiet NaN, sign kept


def test_f16_to_f32_exhaustive():
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = native.f16_to_f32(h)
    want = h.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def _bf16_oracle(x: np.ndarray) -> np.ndarray:
    """RNE by exact distance comparison in float64 (independent of bit tricks)."""
    u = x.view(np.uint32).astype(np.uint64)
    lo = (u & 0xFFFF0000).astype(np.uint32)
    hi = (lo.astype(np.uint64) + 0x10000).astype(np.uint32)
    xf = np.abs(x.astype(np.float64))
    with np.errstate(invalid="ignore", over="ignore"):
        dl = xf - np.abs(lo.view(F).astype(np.float64))
        hv = hi.view(F).astype(np.float64)
        # rounding up past the max finite value lands on inf: treat as 2^128
        hv = np.where(np.isinf(hv), 2.0**128, np.abs(hv))
        dh = hv - xf
    lo16, hi16 = lo >> 16, hi >> 16
    pick_hi = (dh < dl) | ((dh == dl) & (lo16 & 1 == 1))
    return np.where(pick_hi, hi16, lo16).astype(np.uint16)


def test_f32_to_bf16_rne():
    x = _interesting_f32()
    fin = np.isfinite(x)
    got = native.f32_to_bf16(x)
    assert got.dtype == np.uint16
    assert np.array_equal(got[fin], _bf16_oracle(x[fin]))
    back = native.bf16_to_f32(got)
    assert np.array_equal(np.isnan(back), np.isnan(x))
    nan = np.isnan(x)
    assert np.all(got[nan] & 0x0040)                         # quiet
    assert np.array_equal(got[np.isinf(x)], (x[np.isinf(x)].view(np.uint32) >> 16).astype(np.uint16))
    # explicit ties: 1 + 2^-8 is halfway between 1 and 1+2^-7 -> even (1.0)
    assert native.f32_to_bf16(np.array([1.00390625, 1.01171875], F)).tolist() == [0x3F80, 0x3F82]


def test_bf16_round_trip_exact():
    b = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    f = native.bf16_to_f32(b)
    assert np.array_equal(f.view(np.uint32), b.astype(np.uint32) << 16)
    fin = np.isfinite(f)
    assert np.array_equal(native.f32_to_bf16(f)[fin], b[fin])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_count_nonfinite():
    x = np.random.default_rng(0).standard_normal(10_001).astype(F)
    assert native.count_nonfinite(x) == 0
    x[[0, 5, 10_000]] = [np.nan, np.inf, -np.inf]
    assert native.count_nonfinite(x) == 3
    assert native.count_nonfinite(x.astype(np.float16)) == 3
    assert native.count_nonfinite(native.f32_to_bf16(x), bf16=True) == 3
    big = np.full(100, 1e30, F)
    assert native.count_nonfinite(big) == 0 and native.count_nonfinite(big.astype(np.float16)) == 100


# ---------------------------------------------------------------------------
# API behaviour and threading
# ---------------------------------------------------------------------------


def test_block_info_and_supported():
    for qtype in QTYPES:
        assert native.block_info(qtype) == tuple(gguf_quants.GGML_QUANT_SIZES[qtype])
        assert native.supported(qtype) and native.supported(int(qtype))
    assert native.block_info(T.F32) == (1, 4) and native.block_info(T.BF16) == (1, 2)
    assert not native.supported(T.Q8_1) and not native.supported(999)


def test_shapes_and_float_types():
    x = np.random.default_rng(1).standard_normal((2, 3, 512)).astype(F)
    assert native.quantize(x, T.Q4_K).shape == (2, 3, 2 * 144)
    assert np.array_equal(native.quantize(x, T.F16).view(np.float16), x.astype(np.float16))
    assert np.array_equal(native.quantize(x, T.F32).view(F), x)
    assert np.array_equal(native.quantize(x, T.BF16).view(np.uint16), native.f32_to_bf16(x))
    with pytest.raises(ValueError):
        native.quantize(np.zeros(100, F), T.Q8_0)
    with pytest.raises(ValueError):
        native.quantize(np.zeros(256, F), T.IQ2_XXS)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_threads_identical(qtype):
    rng = np.random.default_rng(9)
    x = (rng.standard_t(3, (40, 8192)) * 0.05).astype(F)
    one = native.quantize(x, qtype, threads=1)
    for t in (2, 3, 7):
        assert np.array_equal(native.quantize(x, qtype, threads=t), one)


def test_bf16_to_f16_in_one_pass_equals_two_steps():
    bits = np.arange(1 << 16, dtype=np.uint16)  # every bf16 value
    wide = native.bf16_to_f32(bits)
    finite = np.isfinite(wide)
    with np.errstate(over="ignore"):
        two_steps = wide.astype(np.float16).view(np.uint16)
    one_pass = native.bf16_to_f16(bits).view(np.uint16)
    np.testing.assert_array_equal(one_pass[finite], two_steps[finite])
