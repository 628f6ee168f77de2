"""The rest of the quant ladder (issue 13): Q4_0, Q4_1, IQ4_NL, IQ4_XS, Q3_K, Q2_K.

The native encoder and decoder are checked block for block against ggml itself (ggml_quantize_chunk
and the type's to_float, reached through ctypes in llama-cpp-python's libggml-base), on the data
kinds of test_native_quant plus huge values; round-trip errors against test-quantize-fns' bounds.
Whole-file comparisons with llama-quantize live in test_quantize_vs_llama.py.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from gguforge.cli import main
from gguforge.quantize import native
from gguforge.quantize.presets import parse_preset
from gguforge.quantize.rules import TensorIn, model_n_gqa, plan_quantization
from helpers import llama_quantize
from test_native_quant import KINDS, array_rmse, ggml_lib, make_case, quantize_fns_data
from test_quant_rules import dense_model, moe_model

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
    lib = ggml_lib()
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


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_vector_paths_equal_scalar(qtype):
    """Lane-parallel implementations (IQ4's scale search) give the scalar path's bytes, for block counts
    that leave partial lane groups and partial batches."""
    rng = np.random.default_rng(int(qtype) + 7)
    blk = SIZES[qtype][0]
    for nblocks in (1, 3, 17, 65, 259):
        x = np.concatenate([case(ALL_KINDS[i % len(ALL_KINDS)], rng)[:blk] for i in range(nblocks)])
        want = native.quantize(x, qtype, threads=1, impl=0)
        for impl in sorted(native.IMPLS)[1:]:
            got = native.quantize(x, qtype, threads=1, impl=impl)
            assert np.array_equal(got, want), (qtype.name, native.IMPLS[impl], nblocks)


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


# ---------------------------------------------------------------------------------------------
# Whole files against llama-quantize on synthetic llama-arch GGUFs: deep enough for the layer-position
# rules, n_gqa 4 (the Q2_K / IQ4 attn_v rules), 8 experts, and rows that do not fit 256 or 32 blocks
# (the Q4_0 / IQ4_NL / Q5_x / Q8_0 / F16 fallbacks). llama-quantize loads only the hparams, so the
# tensors need not make a runnable model.

LADDER = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q2_K")

SYNTHETIC = {  # name: (n_layer, n_embd, n_ff, n_head, n_head_kv, n_expert)
    "dense-gqa4-ff352": (16, 256, 352, 8, 2, 0),
    "dense-embd288-ff360": (9, 288, 360, 4, 4, 0),
    "moe8-ff96": (8, 256, 96, 4, 1, 8),
}


def write_synthetic(path: Path, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
                    n_expert: int) -> Path:
    import gguf

    rng = np.random.default_rng(n_layer * 1000 + n_ff)
    head_dim = n_embd // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("ladder")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    def matrix(name, *shape):
        a = rng.standard_normal(shape).astype(F) * F(0.02)
        a.reshape(-1)[rng.integers(0, a.size, 4)] *= 30  # a few outliers
        bits = native.f32_to_bf16(a)
        w.add_tensor(name, bits, raw_shape=bits.shape, raw_dtype=T.BF16)

    def vector(name, n):
        w.add_tensor(name, np.ones(n, F))

    matrix("token_embd.weight", 64, n_embd)
    matrix("output.weight", 64, n_embd)
    vector("output_norm.weight", n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", n_embd)
        vector(p + "ffn_norm.weight", n_embd)
        matrix(p + "attn_q.weight", n_embd, n_embd)
        matrix(p + "attn_k.weight", n_head_kv * head_dim, n_embd)
        matrix(p + "attn_v.weight", n_head_kv * head_dim, n_embd)
        matrix(p + "attn_output.weight", n_embd, n_embd)
        if n_expert:
            matrix(p + "ffn_gate_inp.weight", n_expert, n_embd)
            matrix(p + "ffn_gate_exps.weight", n_expert, n_ff, n_embd)
            matrix(p + "ffn_up_exps.weight", n_expert, n_ff, n_embd)
            matrix(p + "ffn_down_exps.weight", n_expert, n_embd, n_ff)
        else:
            matrix(p + "ffn_gate.weight", n_ff, n_embd)
            matrix(p + "ffn_up.weight", n_ff, n_embd)
            matrix(p + "ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=list(SYNTHETIC))
def synthetic(request, tmp_path_factory):
    return request.param, write_synthetic(tmp_path_factory.mktemp("ladder") / "in-bf16.gguf",
                                          *SYNTHETIC[request.param])


@pytest.mark.parametrize("preset", LADDER)
def test_synthetic_files_match_llama_quantize(synthetic, quiet_llama, preset, tmp_path):
    import gguf

    name, src = synthetic
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    assert main(["quantize", str(src), str(ours), preset, "-q", "--threads", "2"]) == 0
    llama_quantize(src, theirs, preset)
    a, b = gguf.GGUFReader(ours).tensors, gguf.GGUFReader(theirs).tensors
    assert [(t.name, T(t.tensor_type).name) for t in a] == [(t.name, T(t.tensor_type).name) for t in b]
    for x, y in zip(a, b):
        same = x.data.tobytes() == y.data.tobytes()
        assert same, f"{name} {preset}: {x.name} ({T(x.tensor_type).name}) bytes differ"
    same_file = ours.read_bytes() == theirs.read_bytes()
    assert same_file, f"{name} {preset}: tensors agree, the files do not"


# ---------------------------------------------------------------------------------------------
# Rules (wave2-facts §2b), written from the spec, plus presets and refusals


def test_presets_and_file_types():
    spec = {"Q4_0": (2, T.Q4_0), "Q4_1": (3, T.Q4_1), "Q5_0": (8, T.Q5_0), "Q5_1": (9, T.Q5_1),
            "Q2_K": (10, T.Q2_K), "Q3_K_S": (11, T.Q3_K), "Q3_K_M": (12, T.Q3_K), "Q3_K_L": (13, T.Q3_K),
            "IQ4_NL": (25, T.IQ4_NL), "IQ4_XS": (30, T.IQ4_XS)}
    for name, (ftype, default) in spec.items():
        for text in (name, name.lower(), str(ftype)):
            p = parse_preset(text)
            assert (p.name, int(p.file_type), p.default_type) == (name, ftype, default), text
    assert parse_preset("q3_k").name == "Q3_K_M"


@pytest.mark.parametrize("text, why", [("Q2_K_S", "importance matrix"), ("21", "importance matrix"),
                                       ("iq2_xxs", "importance matrix"), ("IQ1_S", "importance matrix"),
                                       ("23", "importance matrix"),  # 23 = LLAMA_FTYPE_MOSTLY_IQ3_XXS
                                       ("q2_0", "no GGML type Q2_0"), ("41", "no GGML type Q2_0")])
def test_refused_presets(text, why, tmp_path, capsys):
    src = write_synthetic(tmp_path / "in.gguf", 2, 256, 256, 4, 4, 0)
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(src), str(out), text]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and why in err and not out.exists()


@pytest.mark.parametrize("outtype", ["q2_0", "Q2_0"])  # needing an imatrix: test_imatrix_apply, test_lattice_presets
def test_convert_refuses_unsupported_outtype(outtype, tmp_path, capsys):
    from gguforge.cli import embedded_model_dir

    out = tmp_path / "out.gguf"
    assert main(["convert-hf", str(embedded_model_dir()), "--outfile", str(out), "--outtype", outtype]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {outtype.upper()}" in err and not out.exists()


def test_model_n_gqa():
    def getter(**kv):
        return lambda key: kv.get(key.split(".", 1)[1].replace(".", "_"))

    assert model_n_gqa("a", getter(attention_head_count=16, attention_head_count_kv=2)) == 8
    assert model_n_gqa("a", getter(attention_head_count=[16, 16], attention_head_count_kv=[4, 0])) == 4
    assert model_n_gqa("a", getter(attention_head_count=np.array([6, 6]),
                                   attention_head_count_kv=np.array([4, 4]))) == 1  # integer division
    assert model_n_gqa("a", getter(attention_head_count=16)) == 1  # KV heads default to heads
    assert model_n_gqa("a", getter(attention_head_count=16, attention_head_count_kv=0)) == 0
    assert model_n_gqa("a", getter()) == 0


def _plan(tensors, preset, **kw):
    return {p.name: p for p in plan_quantization(tensors, preset, arch="llama", **kw)}


def _dense(n_layer):
    return dense_model(n_layer, n_embd=1024, n_ff=2816, n_kv=256)  # 2816 = 11*256


@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_dense_ladder_rules(gqa):
    n = 16
    for preset in LADDER:
        plans = _plan(_dense(n), preset, n_layer_all=n, n_gqa=gqa)
        d = parse_preset(preset).default_type
        assert plans["output.weight"].dst_type == T.Q6_K
        assert plans["token_embd.weight"].dst_type == d
        for i in range(n):
            def t(kind):
                return plans[f"blk.{i}.{kind}.weight"].dst_type
            assert t("attn_q") == t("attn_k") == t("ffn_gate") == t("ffn_up") == d, (preset, i)
            v, down, out = t("attn_v"), t("ffn_down"), t("attn_output")
            if preset == "Q2_K":
                assert (v, down, out) == (T.Q4_K if gqa >= 4 else T.Q3_K, T.Q3_K, T.Q3_K)
            elif preset == "Q3_K_M":
                assert (v, down, out) == (T.Q5_K if i < 2 else T.Q4_K, T.Q5_K if i < n // 16 else T.Q4_K, T.Q4_K)
            elif preset == "Q3_K_L":
                assert (v, down, out) == (T.Q5_K, T.Q5_K, T.Q5_K)
            elif preset in ("IQ4_NL", "IQ4_XS"):
                assert (v, down, out) == (T.Q5_K if gqa >= 4 else d, T.Q5_K if i < n // 8 else d, d)
            else:  # Q3_K_S, Q4_0, Q4_1, Q5_0, Q5_1: nothing without an imatrix
                assert (v, down, out) == (d, d, d), (preset, i)
        reasons = " | ".join(p.reason for p in plans.values())
        if preset == "Q2_K":
            assert f"n_gqa {gqa}" in reasons


def test_eight_expert_rules():
    for preset in LADDER:
        plans = _plan(moe_model(4, 8), preset, n_layer_all=4, n_expert=8, n_gqa=1)
        d = parse_preset(preset).default_type
        assert plans["blk.0.attn_v.weight"].dst_type == plans["blk.3.attn_k.weight"].dst_type == T.Q8_0
        bumped = preset in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "IQ4_XS")  # Q3_K_L is not in the list
        assert plans["blk.2.attn_output.weight"].dst_type == (T.Q5_K if bumped else d), preset
        assert "8 experts" in plans["blk.2.attn_output.weight"].reason or not bumped


@pytest.mark.parametrize("preset, ne0, want", [
    ("IQ4_XS", 288, T.IQ4_NL), ("IQ4_XS", 40, T.F16), ("IQ4_NL", 40, T.F16), ("Q2_K", 288, T.Q4_0),
    ("Q3_K_S", 288, T.Q4_0), ("Q3_K_L", 288, T.Q5_1), ("Q4_0", 40, T.F16), ("Q5_1", 96, T.Q5_1),
])
def test_shape_fallbacks(preset, ne0, want):
    tensors = [TensorIn("token_embd.weight", (64, 256), T.BF16), TensorIn("output.weight", (64, 256), T.BF16),
               TensorIn("blk.0.attn_v.weight", (64, ne0), T.BF16)]
    plan = _plan(tensors, preset, n_layer_all=1)["blk.0.attn_v.weight"]
    assert plan.dst_type == want
    assert (plan.fallback_from is None) == ((preset, ne0) == ("Q5_1", 96))
    assert (plan.fallback_from is None) or f"ne0={ne0}" in plan.reason


def test_dry_run_shows_every_choice(tmp_path, capsys):
    src = write_synthetic(tmp_path / "in.gguf", *SYNTHETIC["dense-gqa4-ff352"])
    assert main(["quantize", str(src), str(tmp_path / "out.gguf"), "Q3_K_M", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("blk.", "output", "token"))}
    assert "-> Q5_K" in lines["blk.0.attn_v.weight"] and "first 2" in lines["blk.0.attn_v.weight"]
    assert "-> Q4_K" in lines["blk.2.attn_v.weight"]
    assert "-> Q5_1" in lines["blk.0.ffn_down.weight"]
    assert "fallback Q5_K->Q5_1 (ne0=352)" in lines["blk.0.ffn_down.weight"]
    assert "-> Q5_0" in lines["blk.5.ffn_down.weight"]
    assert "-> Q4_K" in lines["blk.3.attn_output.weight"]
    assert "-> Q6_K" in lines["output.weight"]
    assert not (tmp_path / "out.gguf").exists()


# ---------------------------------------------------------------------------------------------
# Dequantization in use: diff --tol and --allow-requantize read the new types


PURE = {"Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "IQ4_NL": T.IQ4_NL, "IQ4_XS": T.IQ4_XS, "Q3_K_S": T.Q3_K, "Q2_K": T.Q2_K}


@pytest.fixture(scope="module")
def pure_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pure")
    src = write_synthetic(d / "in-bf16.gguf", 2, 256, 512, 4, 2, 0)
    out = {}
    for preset in PURE:
        out[preset] = d / f"{preset}.gguf"
        assert main(["quantize", str(src), str(out[preset]), preset, "--pure", "-q"]) == 0
    return src, out


def test_diff_tol_dequantizes_new_types(pure_files, capsys):
    from gguforge.inspect import load, max_abs_diff

    src, outs = pure_files
    source = {t.name: t for t in load(src).tensors}
    for preset, qtype in PURE.items():
        ours = {t.name: t for t in load(outs[preset]).tensors}
        t = ours["blk.1.ffn_down.weight"]
        assert t.ggml_type == qtype
        want_vals = gguf_quants.dequantize(t.reader_tensor.data, qtype).astype(np.float64)  # gguf-py's decoder
        src_vals = native.bf16_to_f32(source[t.name].reader_tensor.data).astype(np.float64).reshape(want_vals.shape)
        want = float(np.abs(want_vals - src_vals).max())
        assert 0 < max_abs_diff(source[t.name], t) == pytest.approx(want, rel=1e-12), preset
        capsys.readouterr()
        assert main(["diff", str(src), str(outs[preset]), "--tol", "10"]) == 1  # file_type differs
        assert "0 tensor differences" in capsys.readouterr().out
        assert main(["diff", str(src), str(outs[preset]), "--tol", "1e-9"]) == 1
        assert "0 tensor differences" not in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["Q2_K", "IQ4_XS"])
def test_requantize_from_new_types(pure_files, preset, tmp_path):
    import gguf

    _, outs = pure_files
    again = tmp_path / "q8.gguf"
    assert main(["quantize", str(outs[preset]), str(again), "Q8_0", "--pure", "--allow-requantize", "-q"]) == 0
    a, b = gguf.GGUFReader(outs[preset]), gguf.GGUFReader(again)
    by_name = {t.name: t for t in b.tensors}
    for t in a.tensors:
        if T(t.tensor_type) != PURE[preset]:
            continue
        values = gguf_quants.dequantize(t.data, T(t.tensor_type))
        want = native.quantize(values.astype(F), T.Q8_0)
        got = by_name[t.name]
        assert T(got.tensor_type) == T.Q8_0
        assert np.array_equal(np.asarray(got.data).reshape(want.shape), want), t.name


# ---------------------------------------------------------------------------------------------
# n_gqa >= 4 through both pipelines: a qwen2moe mock rewritten to one KV head (n_gqa 4)


@pytest.fixture(scope="module")
def gqa4_checkpoint(mock_model, tmp_path_factory):
    pytest.importorskip("torch")
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = mock_model("qwen2moe", dtype="bfloat16", size="q256")
    dst = tmp_path_factory.mktemp("gqa4") / "qwen2moe-gqa4"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert config["num_attention_heads"] == 4
    config["num_key_value_heads"] = 1
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in list(tensors):
            if ".k_proj." in name or ".v_proj." in name:
                tensors[name] = tensors[name][:head_dim].contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("preset", ["Q2_K", "IQ4_XS"])
def test_gqa4_quantize_and_one_pass_match_llama(gqa4_checkpoint, quiet_llama, preset, tmp_path):
    import gguf

    bf16 = tmp_path / "bf16.gguf"
    assert main(["convert-hf", str(gqa4_checkpoint), "--outfile", str(bf16), "--outtype", "bf16", "-q"]) == 0
    assert model_n_gqa("qwen2moe", lambda k: gguf.GGUFReader(bf16).get_field(k).contents()) == 4
    theirs = tmp_path / "llama.gguf"
    llama_quantize(bf16, theirs, preset)
    ref = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert T(ref["blk.0.attn_v.weight"].tensor_type) == (T.Q4_K if preset == "Q2_K" else T.Q5_K)  # the rule fired
    for ours_args in (["quantize", str(bf16), str(tmp_path / "q.gguf"), preset],
                      ["convert-hf", str(gqa4_checkpoint), "--outfile", str(tmp_path / "q.gguf"), "--outtype", preset]):
        assert main([*ours_args, "-q", "--force"]) == 0
        ours = gguf.GGUFReader(tmp_path / "q.gguf").tensors
        assert sorted(t.name for t in ours) == sorted(ref)
        for t in ours:
            assert T(t.tensor_type) == T(ref[t.name].tensor_type), (ours_args[0], t.name)
            same = t.data.tobytes() == ref[t.name].data.tobytes()
            assert same, (ours_args[0], t.name)
