"""Qwen3-Next, Qwen3.5 dense and Qwen3.5 MoE: transforms, shapes, MTP handling, end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gguforge.archs import lookup
from gguforge.archs.qwen35 import Qwen35, Qwen35Moe
from gguforge.archs.rules import tiled_v_order
from gguforge.archs.qwen3next import Qwen3Next, qkvz_rows
from gguforge.cli import main
from gguforge.archs.options import ConvertOptions
from gguforge.convert.plan import float_type, map_tensors
from gguforge.checkpoint.read import Checkpoint, SourceTensor
from gguforge.checkpoint.lazy import Lazy
from gguforge.format.writer import Metadata

HYBRID = ("qwen3next", "qwen35", "qwen35moe")



def minus_exp(a):
    """-exp correctly rounded to float32, as torch (and so llama.cpp's converter) computes it."""
    return (-np.exp(a.astype(np.float64))).astype(np.float32)

def small_hparams(**over) -> dict:
    hp = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
              linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=3, linear_value_head_dim=2,
              linear_conv_kernel_dim=4, rms_norm_eps=1e-6, vocab_size=16, num_experts=2,
              layer_types=["linear_attention", "full_attention"])
    hp.update(over)
    return hp


def run(arch, name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """All (GGUF name -> data) that `arch` emits for one checkpoint tensor."""
    return {n: t.numpy() for n, t in arch.transform(name, Lazy.from_array(array.astype(np.float32), name))}


def rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Transforms pinned on small arrays
# ------------------------------------------------------------------------------------------------


def test_qkvz_regroup_puts_all_q_then_k_then_v_and_z_apart():
    nk, dk, nv, dv = 2, 3, 4, 2  # r = 2 V heads per K head
    r = nv // nk
    labels = []  # what HF stores in each in_proj_qkvz row, group by group
    for g in range(nk):
        labels += [("q", g, i) for i in range(dk)] + [("k", g, i) for i in range(dk)]
        labels += [("v", g * r + j, i) for j in range(r) for i in range(dv)]
        labels += [("z", g * r + j, i) for j in range(r) for i in range(dv)]
    qkv, z = qkvz_rows(nk, dk, nv, dv)
    expected_qkv = ([("q", g, i) for g in range(nk) for i in range(dk)]
                    + [("k", g, i) for g in range(nk) for i in range(dk)]
                    + [("v", h, i) for h in range(nv) for i in range(dv)])
    assert [labels[i] for i in qkv] == expected_qkv
    assert [labels[i] for i in z] == [("z", h, i) for h in range(nv) for i in range(dv)]

    arch = Qwen3Next(small_hparams())
    w = rand(len(labels), 8)
    out = run(arch, "model.layers.0.linear_attn.in_proj_qkvz.weight", w)
    assert list(out) == ["blk.0.attn_qkv.weight", "blk.0.attn_gate.weight"]
    np.testing.assert_array_equal(out["blk.0.attn_qkv.weight"], w[qkv])
    np.testing.assert_array_equal(out["blk.0.attn_gate.weight"], w[z])


def test_tiled_v_order_is_the_grouped_to_tiled_permutation():
    nk, nv = 2, 6
    r = nv // nk
    order = tiled_v_order(nk, nv, 1)
    assert order.tolist() == [0, 3, 1, 4, 2, 5]
    for g in range(nk):
        for j in range(r):
            assert order[j * nk + g] == g * r + j  # new[j*nk+g] = old[g*r+j]
    # After the reorder, tiled broadcasting (V head p reads K head p % nk) matches HF (head h reads h // r).
    assert all(order[p] // r == p % nk for p in range(nv))
    blocks = tiled_v_order(nk, nv, 3)
    assert blocks.tolist()[:6] == [0, 1, 2, 9, 10, 11]


@pytest.mark.parametrize("nk,nv", [(2, 4), (2, 6), (3, 6)])  # r = nv/nk equal to, above and below nk
def test_qwen35_reorders_all_seven_v_tensors_consistently(nk, nv):
    hp = small_hparams(linear_num_key_heads=nk, linear_num_value_heads=nv)
    arch = Qwen35(hp)
    dk, dv, K, H = 3, 2, 4, 8
    qk, C = 2 * nk * dk, 2 * nk * dk + nv * dv
    # Expected order from the definition, not from tiled_v_order: in HF's grouped layout V head
    # g*r+j (r = nv/nk) reads K head g; ggml tiles K heads, so its V head p reads K head p % nk.
    # Output head p = j*nk + g is therefore HF head g*r + j (a group's heads keep their order).
    r = nv // nk
    heads = np.array([(p % nk) * r + p // nk for p in range(nv)])
    assert sorted(heads) == list(range(nv)) and all(heads[p] // r == p % nk for p in range(nv))
    cols = (heads[:, None] * dv + np.arange(dv)).reshape(-1)  # each head's dv channels move together
    p = "model.layers.0.linear_attn."
    w = {"in_proj_qkv.weight": rand(C, H, seed=1), "in_proj_z.weight": rand(nv * dv, H, seed=2),
         "in_proj_b.weight": rand(nv, H, seed=3), "in_proj_a.weight": rand(nv, H, seed=4),
         "A_log": rand(nv, seed=5), "dt_bias": rand(nv, seed=6), "conv1d.weight": rand(C, 1, K, seed=7),
         "out_proj.weight": rand(H, nv * dv, seed=8), "norm.weight": rand(dv, seed=9)}
    out = {}
    for leaf, a in w.items():
        out.update(run(arch, p + leaf, a))
    blk = "blk.0."
    qkv = out[blk + "attn_qkv.weight"]
    np.testing.assert_array_equal(qkv[:qk], w["in_proj_qkv.weight"][:qk])  # Q and K rows untouched
    np.testing.assert_array_equal(qkv[qk:], w["in_proj_qkv.weight"][qk:][cols])
    np.testing.assert_array_equal(out[blk + "attn_gate.weight"], w["in_proj_z.weight"][cols])
    np.testing.assert_array_equal(out[blk + "ssm_beta.weight"], w["in_proj_b.weight"][heads])
    np.testing.assert_array_equal(out[blk + "ssm_alpha.weight"], w["in_proj_a.weight"][heads])
    np.testing.assert_array_equal(out[blk + "ssm_a"], minus_exp(w["A_log"][heads]))  # reorder, then -exp
    np.testing.assert_array_equal(out[blk + "ssm_dt.bias"], w["dt_bias"][heads])
    conv = out[blk + "ssm_conv1d.weight"]
    assert conv.shape == (C, K)  # squeezed
    np.testing.assert_array_equal(conv[:qk], w["conv1d.weight"][:qk, 0])
    np.testing.assert_array_equal(conv[qk:], w["conv1d.weight"][qk:, 0][cols])
    np.testing.assert_array_equal(out[blk + "ssm_out.weight"], w["out_proj.weight"][:, cols])
    np.testing.assert_array_equal(out[blk + "ssm_norm.weight"], w["norm.weight"])  # shared, no +1

    # V rows and out_proj columns move together: the layer's output is unchanged.
    x = rand(H, seed=10)
    hf = w["out_proj.weight"] @ (w["in_proj_qkv.weight"][qk:] @ x)
    np.testing.assert_allclose(out[blk + "ssm_out.weight"] @ (qkv[qk:] @ x), hf, rtol=1e-5, atol=1e-6)


def float32_exp_misrounded(count: int = 64) -> np.ndarray:
    """A_log values where numpy's float32 exp is not exp correctly rounded to float32, found by search
    (so they hold on whichever SIMD path numpy takes on this machine). Expected values come from
    math.exp (float64, another implementation) rounded once to float32."""
    x = np.linspace(-2.0, 4.0, 6001, dtype=np.float32)  # A_log of released models lies in [0, 2.8]
    correct = np.array([np.float32(math.exp(float(v))) for v in x])
    misrounded = x[np.exp(x) != correct]
    return misrounded[:: max(1, len(misrounded) // count)][:count]


@pytest.mark.parametrize("cls", [Qwen3Next, Qwen35])
def test_ssm_a_is_minus_exp_rounded_once_where_float32_exp_is_not(cls):
    a_log = float32_exp_misrounded()
    if len(a_log) < 8:
        pytest.skip("numpy's float32 exp is correctly rounded here: nothing to tell the paths apart")
    expected = np.array([np.float32(-math.exp(float(v))) for v in a_log])
    assert np.all(-np.exp(a_log) != expected)  # a float32 exp would be caught on every input
    n = len(a_log)  # as many V (and K, so no reorder) heads as values
    arch = cls(small_hparams(linear_num_key_heads=n, linear_num_value_heads=n))
    got = run(arch, "model.layers.0.linear_attn.A_log", a_log)["blk.0.ssm_a"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_qwen35_without_extra_v_heads_keeps_the_order():
    arch = Qwen35(small_hparams(linear_num_value_heads=2))
    w = rand(2, 8)
    np.testing.assert_array_equal(run(arch, "model.layers.0.linear_attn.in_proj_b.weight", w)
                                  ["blk.0.ssm_beta.weight"], w)


def test_qwen35_rejects_unsupported_in_proj_b_layout():
    from gguforge.errors import UserError
    with pytest.raises(UserError, match="in_proj_b"):
        run(Qwen35(small_hparams()), "model.layers.0.linear_attn.in_proj_b.weight", rand(2 * 8, 1))


def test_qwen3next_values_minus_exp_squeeze_and_plus_one_except_ssm_norm():
    arch = Qwen3Next(small_hparams())
    a_log = rand(4)
    np.testing.assert_array_equal(run(arch, "model.layers.0.linear_attn.A_log", a_log)["blk.0.ssm_a"],
                                  minus_exp(a_log))  # no V reorder in Qwen3-Next
    conv = rand(20, 1, 4)
    out = run(arch, "model.layers.0.linear_attn.conv1d.weight", conv)["blk.0.ssm_conv1d.weight"]
    np.testing.assert_array_equal(out, conv[:, 0, :])
    w = rand(8)
    plus_one = {
        "model.norm.weight": "output_norm.weight",
        "model.layers.1.input_layernorm.weight": "blk.1.attn_norm.weight",
        "model.layers.1.post_attention_layernorm.weight": "blk.1.post_attention_norm.weight",
        "model.layers.1.self_attn.q_norm.weight": "blk.1.attn_q_norm.weight",
        "model.layers.1.self_attn.k_norm.weight": "blk.1.attn_k_norm.weight",
    }
    for hf, gguf in plus_one.items():
        np.testing.assert_array_equal(run(arch, hf, w)[gguf], w + 1)
    unchanged = {
        "model.layers.0.linear_attn.norm.weight": "blk.0.ssm_norm.weight",
        "model.layers.0.linear_attn.dt_bias": "blk.0.ssm_dt.bias",
        "model.layers.0.linear_attn.out_proj.weight": "blk.0.ssm_out.weight",
        "model.layers.0.linear_attn.in_proj_ba.weight": "blk.0.ssm_ba.weight",
        "model.layers.1.self_attn.q_proj.weight": "blk.1.attn_q.weight",
    }
    for hf, gguf in unchanged.items():
        np.testing.assert_array_equal(run(arch, hf, w)[gguf], w)


def test_mtp_names_and_norms():
    names = ["model.embed_tokens.weight", "mtp.fc.weight", "mtp.layers.0.input_layernorm.weight"]
    arch = Qwen35(small_hparams(), tensor_names=names)
    assert arch.n_mtp == 1 and arch.block_count == 3
    w = rand(8)
    for hf, gguf, value in [
        ("mtp.fc.weight", "blk.2.nextn.eh_proj.weight", w),
        ("model.mtp.pre_fc_norm_embedding.weight", "blk.2.nextn.enorm.weight", w + 1),
        ("mtp.pre_fc_norm_hidden.weight", "blk.2.nextn.hnorm.weight", w + 1),
        ("mtp.norm.weight", "blk.2.nextn.shared_head_norm.weight", w + 1),
        ("mtp.layers.0.input_layernorm.weight", "blk.2.attn_norm.weight", w + 1),
        ("mtp.layers.0.self_attn.q_proj.weight", "blk.2.attn_q.weight", w),
    ]:
        renamed = arch.rename(hf)
        np.testing.assert_array_equal(run(arch, renamed, w)[gguf], value)


# ------------------------------------------------------------------------------------------------
# MTP block counting and options, from names only
# ------------------------------------------------------------------------------------------------


def metadata_of(arch) -> dict:
    md = Metadata()
    arch.add_metadata(md)
    return {k: v[1] for k, v in md.items.items()}


@pytest.mark.parametrize("cls", [Qwen3Next, Qwen35, Qwen35Moe])
def test_mtp_count_comes_from_tensor_names(cls):
    trunk = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
    mtp = ["mtp.fc.weight", "mtp.layers.0.input_layernorm.weight", "mtp.layers.1.input_layernorm.weight"]
    a = cls.gguf_arch
    # The config claims an MTP depth, but the tensors were stripped: no MTP blocks, consistent metadata.
    stripped = cls(small_hparams(mtp_num_hidden_layers=1), tensor_names=trunk)
    md = metadata_of(stripped)
    assert stripped.block_count == 2 and f"{a}.nextn_predict_layers" not in md
    assert md[f"{a}.block_count"] == 2 and md[f"{a}.attention.recurrent_layers"] == [True, False]
    assert stripped.rename("mtp.fc.weight") is None

    full = cls(small_hparams(), tensor_names=trunk + mtp)  # no config key (as Qwen3-Next): counted
    md = metadata_of(full)
    assert full.block_count == 4 and md[f"{a}.nextn_predict_layers"] == 2
    assert md[f"{a}.attention.recurrent_layers"] == [True, False, False, False]
    assert full.rename("mtp.layers.1.input_layernorm.weight") == "model.layers.3.input_layernorm.weight"

    dropped = cls(small_hparams(), ConvertOptions(no_mtp=True), trunk + mtp)
    assert dropped.block_count == 2 and dropped.rename("mtp.fc.weight") is None
    assert f"{a}.nextn_predict_layers" not in metadata_of(dropped)

    head = cls(small_hparams(), ConvertOptions(mtp_only=True), trunk + mtp)
    assert metadata_of(head) == metadata_of(full)  # metadata identical to the full file
    assert head.rename("model.layers.0.input_layernorm.weight") is None
    assert head.rename("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert head.rename("mtp.fc.weight") == "model.layers.2.eh_proj.weight"


def test_mtp_options_errors():
    from gguforge.errors import UserError
    with pytest.raises(UserError, match="no MTP"):
        Qwen35(small_hparams(), ConvertOptions(mtp_only=True), ["model.embed_tokens.weight"])
    with pytest.raises(UserError, match="cannot be combined"):
        Qwen35(small_hparams(), ConvertOptions(mtp_only=True, no_mtp=True), ["mtp.fc.weight"])
    assert main(["convert-hf", "/nonexistent", "--mtp", "--no-mtp", "--quiet"]) == 2


def test_layer_kinds_from_interval_and_default():
    hp = small_hparams(num_hidden_layers=8)
    del hp["layer_types"]
    assert Qwen35({**hp, "full_attention_interval": 2}).recurrent_layers() == [True, False] * 4
    arch = Qwen3Next(hp)
    assert arch.recurrent_layers() == [True, True, True, False] * 2
    md = metadata_of(arch)
    assert md["qwen3next.full_attention_interval"] == 4
    assert "qwen3next.attention.recurrent_layers" not in md  # written only when layer_types exists
    assert md["qwen3next.rope.dimension_count"] == 1  # int(head_dim 4 * default factor 0.25)
    assert md["qwen3next.ssm.inner_size"] == 8 and md["qwen3next.ssm.time_step_rank"] == 4


def test_qwen35_default_mrope_sections():
    md = metadata_of(Qwen35(small_hparams()))
    assert md["qwen35.rope.dimension_sections"] == [11, 11, 10, 0]
    md = metadata_of(Qwen35(small_hparams(rope_parameters={"rope_theta": 1e7, "mrope_section": [2, 1, 1],
                                                           "mrope_interleaved": True})))
    assert md["qwen35.rope.dimension_sections"] == [2, 1, 1, 0]
    assert not any("interleaved" in k for k in md)


# ------------------------------------------------------------------------------------------------
# Shape-only plan for Qwen3.5-4B (no weights: tensors without data)
# ------------------------------------------------------------------------------------------------

QWEN35_4B_TEXT = dict(
    hidden_size=2560, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4, head_dim=256,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, intermediate_size=9216, vocab_size=248320, rms_norm_eps=1e-6,
    max_position_embeddings=262144, full_attention_interval=4, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                     "mrope_section": [11, 11, 10], "mrope_interleaved": True},
)


def qwen35_4b_header_only() -> Checkpoint:
    """Checkpoint of tensors with shapes but no data: reading any row would fail."""
    c = QWEN35_4B_TEXT
    H, F, V, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    nH, nKV, nk, nv, dk, dv = 16, 4, 16, 32, 128, 128
    C = 2 * nk * dk + nv * dv
    shapes = {"model.language_model.embed_tokens.weight": (V, H), "model.language_model.norm.weight": (H,),
              "model.visual.blocks.0.attn.qkv.weight": (96, 32)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.language_model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                       p + "mlp.down_proj.weight": (H, F)})
        if (i + 1) % 4:
            la = p + "linear_attn."
            shapes.update({la + "in_proj_qkv.weight": (C, H), la + "in_proj_z.weight": (nv * dv, H),
                           la + "in_proj_b.weight": (nv, H), la + "in_proj_a.weight": (nv, H),
                           la + "A_log": (nv,), la + "dt_bias": (nv,), la + "conv1d.weight": (C, 1, 4),
                           la + "norm.weight": (dv,), la + "out_proj.weight": (H, nv * dv)})
        else:
            sa = p + "self_attn."
            shapes.update({sa + "q_proj.weight": (2 * nH * hd, H), sa + "k_proj.weight": (nKV * hd, H),
                           sa + "v_proj.weight": (nKV * hd, H), sa + "o_proj.weight": (H, nH * hd),
                           sa + "q_norm.weight": (hd,), sa + "k_norm.weight": (hd,)})
    tensors = {n: SourceTensor(n, "BF16", s, Path("/nonexistent"), 0, 0) for n, s in shapes.items()}
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": QWEN35_4B_TEXT,
              "vision_config": {"intermediate_size": 4096}, "tie_word_embeddings": True}
    return Checkpoint(Path("/nonexistent"), config, tensors)


def test_qwen35_4b_shapes_and_metadata_from_headers_only():
    ckpt = qwen35_4b_header_only()
    arch_cls = lookup(ckpt.config)
    assert arch_cls is Qwen35
    arch = arch_cls(ckpt.hparams, ConvertOptions(), list(ckpt.tensors))
    from gguf import GGMLQuantizationType as T
    planned = {n: t for n, t in map_tensors(ckpt, arch)}
    shape = {n: list(reversed(t.shape)) for n, t in planned.items()}  # GGUF order

    assert arch.block_count == 32 and not any(n.startswith("blk.32.") for n in shape)
    linear = [i for i in range(32) if f"blk.{i}.ssm_a" in shape]
    full = [i for i in range(32) if f"blk.{i}.attn_q.weight" in shape]
    assert len(linear) == 24 and full == [3, 7, 11, 15, 19, 23, 27, 31]
    for i in linear:
        b = f"blk.{i}."
        assert shape[b + "ssm_a"] == [32] and shape[b + "ssm_dt.bias"] == [32]
        assert shape[b + "ssm_alpha.weight"] == shape[b + "ssm_beta.weight"] == [2560, 32]
        assert shape[b + "ssm_conv1d.weight"] == [4, 8192] and shape[b + "ssm_norm.weight"] == [128]
        assert shape[b + "ssm_out.weight"] == [4096, 2560]
        assert shape[b + "attn_qkv.weight"] == [2560, 8192] and shape[b + "attn_gate.weight"] == [2560, 4096]
        assert float_type(b + "ssm_conv1d.weight", planned[b + "ssm_conv1d.weight"], T.BF16, arch) == T.F32
    for i in full:
        b = f"blk.{i}."
        assert shape[b + "attn_q.weight"] == [2560, 8192]
        assert shape[b + "attn_k.weight"] == shape[b + "attn_v.weight"] == [2560, 1024]
        assert shape[b + "attn_output.weight"] == [4096, 2560]
        assert shape[b + "attn_q_norm.weight"] == shape[b + "attn_k_norm.weight"] == [256]
    for i in range(32):
        assert shape[f"blk.{i}.post_attention_norm.weight"] == [2560]
        assert shape[f"blk.{i}.ffn_gate.weight"] == [2560, 9216]
    assert shape["token_embd.weight"] == [2560, 248320] and "output.weight" not in shape  # tied
    assert not any("visual" in s for t in planned.values() for s in t.sources)

    md = metadata_of(arch)
    assert md["qwen35.block_count"] == 32 and md["qwen35.embedding_length"] == 2560
    assert md["qwen35.feed_forward_length"] == 9216  # from text_config, not vision_config
    assert md["qwen35.attention.head_count"] == 16 and md["qwen35.attention.head_count_kv"] == 4
    assert md["qwen35.attention.key_length"] == md["qwen35.attention.value_length"] == 256
    assert md["qwen35.rope.freq_base"] == 1e7 and md["qwen35.rope.dimension_count"] == 64
    assert md["qwen35.rope.dimension_sections"] == [11, 11, 10, 0]
    assert md["qwen35.full_attention_interval"] == 4
    assert (md["qwen35.ssm.conv_kernel"], md["qwen35.ssm.state_size"], md["qwen35.ssm.group_count"],
            md["qwen35.ssm.time_step_rank"], md["qwen35.ssm.inner_size"]) == (4, 128, 16, 32, 4096)
    assert "qwen35.nextn_predict_layers" not in md and "qwen35.expert_count" not in md


# ------------------------------------------------------------------------------------------------
# End to end on the mocks
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def converted(mock_model, tmp_path_factory):
    """converted(arch, layout="causal", outtype="f32", *flags) -> GGUF path (built once per session)."""
    cache: dict[tuple, Path] = {}

    def build(arch: str, layout: str = "causal", outtype: str = "f32", *flags: str) -> Path:
        key = (arch, layout, outtype, flags)
        if key not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"{arch}-{layout}-{outtype}{''.join(flags)}.gguf"
            args = ["convert-hf", str(mock_model(arch, layout=layout)), "--outfile", str(out),
                    "--outtype", outtype, "--quiet", *flags]
            assert main(args) == 0
            cache[key] = out
        return cache[key]

    return build


def gguf_tensors(path: Path) -> dict:
    from gguf import GGUFReader
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader
    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}


@pytest.mark.parametrize("arch", HYBRID)
@pytest.mark.parametrize("outtype,bound", [("f32", 1e-7), ("bf16", 1e-3)])
def test_mock_in_llama_cpp_matches_transformers(arch, outtype, bound, mock_model, converted):
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    from gguforge.verify import verify

    report = verify(mock_model(arch), converted(arch, "causal", outtype))
    assert report.nmse <= bound and report.top1_agreement >= 0.9, report.format()
    assert report.tokenizer_ok, report.format()
    expected_pre = "qwen2" if arch == "qwen3next" else "qwen35"
    assert gguf_fields(converted(arch, "causal", outtype))["tokenizer.ggml.pre"] == expected_pre


@pytest.mark.parametrize("arch", HYBRID)
def test_hub_and_causal_layouts_give_the_same_trunk(arch, converted):
    pytest.importorskip("torch")
    causal, hub = gguf_tensors(converted(arch, "causal")), gguf_tensors(converted(arch, "hub"))
    L = 4
    mtp = {n for n in hub if n.startswith(f"blk.{L}.")}
    assert mtp and {"blk.4.nextn.eh_proj.weight", "blk.4.nextn.enorm.weight", "blk.4.nextn.hnorm.weight",
                    "blk.4.nextn.shared_head_norm.weight", "blk.4.attn_q.weight"} <= mtp
    assert set(hub) - mtp == set(causal)
    for name, t in causal.items():
        assert list(hub[name].shape) == list(t.shape) and hub[name].tensor_type == t.tensor_type, name
        assert hub[name].data.tobytes() == t.data.tobytes(), name
    fields = gguf_fields(converted(arch, "hub"))
    a = fields["general.architecture"]
    assert fields[f"{a}.block_count"] == 5 and fields[f"{a}.nextn_predict_layers"] == 1
    assert fields[f"{a}.attention.recurrent_layers"] == [True, False, True, False, False]


@pytest.mark.parametrize("arch", HYBRID)
def test_no_mtp_and_mtp_only_files(arch, converted):
    pytest.importorskip("torch")
    full = gguf_tensors(converted(arch, "hub"))
    trunk = gguf_tensors(converted(arch, "hub", "f32", "--no-mtp"))
    assert set(trunk) == {n for n in full if not n.startswith("blk.4.")}
    fields = gguf_fields(converted(arch, "hub", "f32", "--no-mtp"))
    a = fields["general.architecture"]
    assert fields[f"{a}.block_count"] == 4 and f"{a}.nextn_predict_layers" not in fields

    head_path = converted(arch, "hub", "f32", "--mtp")
    head = gguf_tensors(head_path)
    assert set(head) == {n for n in full if n.startswith("blk.4.")} | {"token_embd.weight", "output_norm.weight",
                                                                       "output.weight"}
    head_fields, full_fields = gguf_fields(head_path), gguf_fields(converted(arch, "hub"))
    arch_keys = lambda f: {k: v for k, v in f.items() if k.startswith(a + ".")}  # noqa: E731
    assert arch_keys(head_fields) == arch_keys(full_fields)
    for name, t in head.items():
        assert t.data.tobytes() == full[name].data.tobytes(), name


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
def test_transformers_gguf_loader_reproduces_logits(arch, mock_model, converted):
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    import transformers as T
    from gguforge.verify import DEFAULT_TEXT

    src, gguf = mock_model(arch), converted(arch, "causal", "f32")
    ref = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    back = T.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert type(back) is type(ref)
    a, b = ref.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for k in a:  # bit-exact, except A_log = log(-ssm_a), which may move by one float32 ulp
        if k.endswith("A_log"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a[k], b[k]), k
    ids = torch.tensor([T.AutoTokenizer.from_pretrained(src).encode(DEFAULT_TEXT, add_special_tokens=False)])
    with torch.no_grad():
        x, y = ref(ids).logits, back(ids).logits
    assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), (x - y).abs().max()


def test_transformers_gguf_loader_and_qwen3next(mock_model, converted):
    """transformers 5.23 has no qwen3next GGUF loader; this becomes a round trip once it gains one."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    import transformers as T
    from gguforge.verify import DEFAULT_TEXT

    src, gguf = mock_model("qwen3next"), converted("qwen3next", "causal", "f32")
    try:
        back = T.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ValueError as e:
        assert "qwen3next" in str(e)
        pytest.skip(f"transformers {T.__version__}: {e}")
    ref = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor([T.AutoTokenizer.from_pretrained(src).encode(DEFAULT_TEXT, add_special_tokens=False)])
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, back.eval()(ids).logits, rtol=1e-4, atol=1e-5)


def test_mtp_head_default_file_name(mock_model, tmp_path):
    """llama.cpp's naming: the draft head is mtp-<name>-<TYPE>.gguf, without the size label."""
    pytest.importorskip("torch")
    from gguforge.cli import main
    model = mock_model("qwen35", "hub")
    (tmp_path / "full").mkdir()
    (tmp_path / "head").mkdir()
    assert main(["convert-hf", str(model), "--outtype", "bf16", "--outfile", str(tmp_path / "full"), "-q"]) == 0
    assert main(["convert-hf", str(model), "--mtp", "--outtype", "bf16", "--outfile", str(tmp_path / "head"),
                 "-q"]) == 0
    (full,) = (tmp_path / "full").glob("*.gguf")
    (head,) = (tmp_path / "head").glob("*.gguf")
    label = gguf_fields(full)["general.size_label"]
    assert head.name == "mtp-" + full.name.replace(f"-{label}-", "-")
