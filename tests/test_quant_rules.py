"""llama-quantize type selection (gguforge.quantize.rules), checked against quant-spec.md §7.

Expectations are written from the spec's rules and tables, not from the module's output.
"""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from gguforge.errors import UserError
from gguforge.quantize.presets import parse_ggml_type, parse_preset, parse_tensor_type_option
from gguforge.quantize.rules import (
    Category,
    QuantOptions,
    TensorIn,
    bits_per_weight,
    fallback_summary,
    ggml_n_dims,
    llama_quantize_order,
    never_quantized_reason,
    plan_quantization,
    shape_fallback,
    size_summary,
    tensor_category,
    tensor_nbytes,
    use_more_bits,
)

# §7.4 examples of use_more_bits(i, n), spelled out.
UMB_SETS = {
    24: {0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23},
    28: {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27},
    32: {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31},
    36: set(range(0, 4)) | set(range(6, 28, 3)) | set(range(30, 36)),
    48: set(range(0, 6)) | set(range(8, 39, 3)) | set(range(41, 48)),
}

DEFAULT = {"Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K, "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K, "Q8_0": T.Q8_0}
K_PRESETS = list(DEFAULT)


# ---------------------------------------------------------------------------------------------
# Model builders (numpy-order shapes: (rows, ne0))


def dense_model(n_layer, *, n_embd=1024, n_ff=2816, n_kv=256, vocab=1000, tied=False, src=T.F16):
    tensors = [TensorIn("token_embd.weight", (vocab, n_embd), src),
               TensorIn("output_norm.weight", (n_embd,), T.F32)]
    if not tied:
        tensors.append(TensorIn("output.weight", (vocab, n_embd), src))
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [
            TensorIn(p + "attn_norm.weight", (n_embd,), T.F32),
            TensorIn(p + "attn_q.weight", (n_embd, n_embd), src),
            TensorIn(p + "attn_k.weight", (n_kv, n_embd), src),
            TensorIn(p + "attn_v.weight", (n_kv, n_embd), src),
            TensorIn(p + "attn_output.weight", (n_embd, n_embd), src),
            TensorIn(p + "ffn_norm.weight", (n_embd,), T.F32),
            TensorIn(p + "ffn_gate.weight", (n_ff, n_embd), src),
            TensorIn(p + "ffn_up.weight", (n_ff, n_embd), src),
            TensorIn(p + "ffn_down.weight", (n_embd, n_ff), src),
        ]
    return tensors


def moe_model(n_layer, n_expert, *, n_embd=1024, n_ff_exp=512, n_dense_layers=0, shared_expert=False):
    tensors = [TensorIn("token_embd.weight", (1000, n_embd), T.F16),
               TensorIn("output.weight", (1000, n_embd), T.F16),
               TensorIn("output_norm.weight", (n_embd,), T.F32)]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [
            TensorIn(p + "attn_norm.weight", (n_embd,), T.F32),
            TensorIn(p + "attn_q.weight", (n_embd, n_embd), T.F16),
            TensorIn(p + "attn_k.weight", (256, n_embd), T.F16),
            TensorIn(p + "attn_v.weight", (256, n_embd), T.F16),
            TensorIn(p + "attn_output.weight", (n_embd, n_embd), T.F16),
        ]
        if i < n_dense_layers:
            tensors += [TensorIn(p + "ffn_gate.weight", (2048, n_embd), T.F16),
                        TensorIn(p + "ffn_up.weight", (2048, n_embd), T.F16),
                        TensorIn(p + "ffn_down.weight", (n_embd, 2048), T.F16)]
            continue
        tensors += [
            TensorIn(p + "ffn_gate_inp.weight", (n_expert, n_embd), T.F32),
            TensorIn(p + "ffn_gate_exps.weight", (n_expert, n_ff_exp, n_embd), T.F16),
            TensorIn(p + "ffn_up_exps.weight", (n_expert, n_ff_exp, n_embd), T.F16),
            TensorIn(p + "ffn_down_exps.weight", (n_expert, n_embd, n_ff_exp), T.F16),
        ]
        if shared_expert:
            tensors += [TensorIn(p + "ffn_gate_shexp.weight", (n_ff_exp, n_embd), T.F16),
                        TensorIn(p + "ffn_up_shexp.weight", (n_ff_exp, n_embd), T.F16),
                        TensorIn(p + "ffn_down_shexp.weight", (n_embd, n_ff_exp), T.F16)]
    return tensors


def by_name(plans):
    return {p.name: p for p in plans}


def dst(plans, name):
    return by_name(plans)[name].dst_type


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("text, name, file_type, default", [
    ("Q4_K_M", "Q4_K_M", FT.MOSTLY_Q4_K_M, T.Q4_K),
    ("q4_k_s", "Q4_K_S", FT.MOSTLY_Q4_K_S, T.Q4_K),
    ("q4_k", "Q4_K_M", FT.MOSTLY_Q4_K_M, T.Q4_K),
    ("Q5_k", "Q5_K_M", FT.MOSTLY_Q5_K_M, T.Q5_K),
    ("q5_k_s", "Q5_K_S", FT.MOSTLY_Q5_K_S, T.Q5_K),
    ("Q6_K", "Q6_K", FT.MOSTLY_Q6_K, T.Q6_K),
    ("q8_0", "Q8_0", FT.MOSTLY_Q8_0, T.Q8_0),
    ("f16", "F16", FT.MOSTLY_F16, T.F16),
    ("bf16", "BF16", FT.MOSTLY_BF16, T.BF16),
    ("F32", "F32", FT.ALL_F32, T.F32),
    ("15", "Q4_K_M", FT.MOSTLY_Q4_K_M, T.Q4_K),
])
def test_parse_preset(text, name, file_type, default):
    preset = parse_preset(text)
    assert (preset.name, preset.file_type, preset.default_type) == (name, file_type, default)


def test_preset_file_type_numbers_match_spec():
    spec = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17,
            "Q6_K": 18, "BF16": 32}
    assert {n: int(parse_preset(n).file_type) for n in spec} == spec


def test_unknown_preset_lists_valid_names():
    with pytest.raises(UserError) as e:
        parse_preset("Q3_K_XL")
    assert "Q3_K_XL" in e.value.message
    for name in ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "F16", "BF16", "F32", "Q4_K", "Q5_K"):
        assert name in e.value.hint


def test_parse_tensor_type_option():
    assert parse_tensor_type_option("Attn_V=q8_0") == ("attn_v", T.Q8_0)
    assert parse_ggml_type("bf16") == T.BF16
    for bad in ("attn_v", "=q8_0", "attn_v=", "attn_v=q9_9"):
        with pytest.raises(UserError):
            parse_tensor_type_option(bad)


# ---------------------------------------------------------------------------------------------
# Building blocks


@pytest.mark.parametrize("n", sorted(UMB_SETS))
def test_use_more_bits_sets(n):
    assert {i for i in range(n) if use_more_bits(i, n)} == UMB_SETS[n]


@pytest.mark.parametrize("name, category", [
    ("output.weight", Category.OUTPUT),
    ("token_embd.weight", Category.TOKEN_EMBD),
    ("per_layer_token_embd.weight", Category.TOKEN_EMBD),
    ("blk.0.attn_qkv.weight", Category.ATTENTION_QKV),
    ("blk.0.attn_kv_b.weight", Category.ATTENTION_KV_B),
    ("blk.0.attn_v.weight", Category.ATTENTION_V),
    ("blk.0.attn_k.weight", Category.ATTENTION_K),
    ("blk.0.attn_q.weight", Category.ATTENTION_Q),
    ("blk.0.attn_output.weight", Category.ATTENTION_OUTPUT),
    ("blk.0.ffn_up_exps.weight", Category.FFN_UP),
    ("blk.0.ffn_up_shexp.weight", Category.FFN_UP),
    ("blk.0.ffn_gate_up_exps.weight", Category.FFN_GATE),  # fused: "ffn_gate_up" does not contain "ffn_up"
    ("blk.0.ffn_gate_inp.weight", Category.FFN_GATE),
    ("blk.0.ffn_down_shexp.weight", Category.FFN_DOWN),
    ("blk.0.attn_gate.weight", Category.OTHER),
    ("blk.0.attn_q_a.weight", Category.OTHER),
    ("blk.0.ssm_out.weight", Category.OTHER),
    ("blk.0.nextn.eh_proj.weight", Category.OTHER),
    ("output_norm.weight", Category.OTHER),
])
def test_categories(name, category):
    assert tensor_category(name) == category


@pytest.mark.parametrize("shape, n_dims", [
    ((4096,), 1), ((1, 4096), 1), ((1, 1, 4096), 1), ((4096, 1), 2), ((11008, 4096), 2),
    ((8, 1024, 4096), 3), ((8, 1, 4096), 3),
])
def test_ggml_n_dims(shape, n_dims):
    assert ggml_n_dims(shape) == n_dims


@pytest.mark.parametrize("name, shape", [
    ("blk.0.attn_norm.weight", (4096,)),
    ("blk.0.attn_q.bias", (4096,)),
    ("blk.0.attn_q.weight", (1, 4096)),             # {4096,1} is 1-D
    ("blk.0.ssm_a", (32, 128)),                      # no .weight suffix
    ("blk.0.ssm_conv1d.weight", (8192, 4)),
    ("blk.0.ssm_norm.weight", (32, 128)),            # 2-D but a norm
    ("blk.0.attn_q_norm.weight", (2, 128)),
    ("blk.0.ffn_gate_inp.weight", (64, 4096)),       # router
    ("position_embd.weight", (512, 768)),
    ("token_types.weight", (2, 768)),
    ("blk.0.time_mix_w1.weight", (64, 4096)),
    ("v.patch_embd.weight", (1024, 588)),
    ("blk.0.attn_rel_b.weight", (32, 64)),
])
def test_never_quantized(name, shape):
    assert never_quantized_reason(name, shape, arch="llama", leave_output_tensor=False) is not None
    plans = plan_quantization([TensorIn(name, shape, T.F32)], "Q4_K_M", arch="llama", n_layer_all=1)
    assert plans[0].dst_type == T.F32 and not plans[0].converts


def test_eligible_tensors():
    for name, shape in [("blk.0.attn_q.weight", (4096, 4096)), ("blk.0.ssm_alpha.weight", (32, 4096)),
                        ("blk.0.ffn_down_exps.weight", (8, 4096, 1024)), ("output.weight", (1000, 4096))]:
        assert never_quantized_reason(name, shape, arch="llama", leave_output_tensor=False) is None
    assert never_quantized_reason("output.weight", (1000, 4096), arch="llama", leave_output_tensor=True)
    # ssm_beta is kept only for glm5-next
    assert never_quantized_reason("blk.0.ssm_beta.weight", (32, 4096), arch="glm5-next", leave_output_tensor=False)


def test_order():
    names = ["blk.10.attn_q.weight", "blk.2.ffn_up.weight", "token_embd.weight", "blk.2.attn_k.weight",
             "output_norm.weight", "output.weight", "blk.1.ffn_down.weight"]
    expected = ["output.weight", "output_norm.weight", "token_embd.weight", "blk.1.ffn_down.weight",
                "blk.2.attn_k.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]
    assert llama_quantize_order(names) == expected
    plans = plan_quantization([TensorIn(n, (256, 256), T.F16) for n in names], "Q8_0", arch="llama", n_layer_all=11)
    assert [p.name for p in plans] == expected


# ---------------------------------------------------------------------------------------------
# §7.5 summary table for a dense model


def expected_dense(preset: str, kind: str, i: int, n: int) -> T:
    """The §7.5 summary table, row by row. i = layer (== i_attention_wv here), n = n_layer."""
    d = DEFAULT[preset]
    if kind == "output":
        return T.Q8_0 if preset == "Q8_0" else T.Q6_K
    if kind in ("attn_v", "ffn_down"):
        if preset == "Q4_K_S":
            first = i < 4 if kind == "attn_v" else i < n // 8
            return T.Q5_K if first else T.Q4_K
        if preset in ("Q4_K_M", "Q5_K_M"):
            return T.Q6_K if i in UMB_SETS[n] else d
    return d


@pytest.mark.parametrize("preset", K_PRESETS)
@pytest.mark.parametrize("n_layer", [24, 32])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_dense_summary_table(preset, n_layer, tied):
    plans = plan_quantization(dense_model(n_layer, tied=tied), preset, arch="llama", n_layer_all=n_layer)
    got = by_name(plans)
    assert got["output_norm.weight"].dst_type == T.F32
    assert got["token_embd.weight"].dst_type == expected_dense(preset, "output" if tied else "token_embd", 0, n_layer)
    if not tied:
        assert got["output.weight"].dst_type == expected_dense(preset, "output", 0, n_layer)
    for i in range(n_layer):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            plan = got[f"blk.{i}.{kind}.weight"]
            assert plan.dst_type == expected_dense(preset, kind, i, n_layer), plan
            assert plan.fallback_from is None
        assert got[f"blk.{i}.attn_norm.weight"].dst_type == T.F32
    assert fallback_summary(plans) is None


def test_tied_token_embd_follows_output_rule_untied_gets_default():
    tied = plan_quantization(dense_model(4, tied=True), "Q4_K_M", arch="llama", n_layer_all=4)
    untied = plan_quantization(dense_model(4, tied=False), "Q4_K_M", arch="llama", n_layer_all=4)
    assert dst(tied, "token_embd.weight") == T.Q6_K
    assert dst(untied, "token_embd.weight") == T.Q4_K
    assert dst(untied, "output.weight") == T.Q6_K


def test_dense_ffn_layer_is_a_running_counter():
    # n_expert <= 1: the k-th visited ffn_down is "layer" k whatever its name says.
    tensors = [TensorIn(f"blk.{i}.ffn_down.weight", (1024, 2816), T.F16) for i in range(10, 14)]
    plans = plan_quantization(tensors, "Q4_K_M", arch="llama", n_layer_all=32)
    assert [p.dst_type for p in plans] == [T.Q6_K if k in UMB_SETS[32] else T.Q4_K for k in range(4)]
    assert 10 not in UMB_SETS[32]  # so the name would have given Q4_K for blk.10


# ---------------------------------------------------------------------------------------------
# Hybrid (qwen35-style) and MoE


def qwen35_like(n_layer, *, n_embd=1024, full_attention_every=4):
    tensors = [TensorIn("token_embd.weight", (1000, n_embd), T.BF16),
               TensorIn("output_norm.weight", (n_embd,), T.F32)]  # tied: no output.weight
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [TensorIn(p + "attn_norm.weight", (n_embd,), T.F32),
                    TensorIn(p + "ffn_gate.weight", (3072, n_embd), T.BF16),
                    TensorIn(p + "ffn_up.weight", (3072, n_embd), T.BF16),
                    TensorIn(p + "ffn_down.weight", (n_embd, 3072), T.BF16)]
        if (i + 1) % full_attention_every == 0:
            tensors += [TensorIn(p + "attn_q.weight", (2 * n_embd, n_embd), T.BF16),
                        TensorIn(p + "attn_k.weight", (256, n_embd), T.BF16),
                        TensorIn(p + "attn_v.weight", (256, n_embd), T.BF16),
                        TensorIn(p + "attn_q_norm.weight", (256,), T.F32),
                        TensorIn(p + "attn_output.weight", (n_embd, 2 * n_embd), T.BF16)]
        else:
            tensors += [TensorIn(p + "attn_qkv.weight", (4096, n_embd), T.BF16),
                        TensorIn(p + "attn_gate.weight", (2048, n_embd), T.BF16),
                        TensorIn(p + "ssm_alpha.weight", (16, n_embd), T.BF16),
                        TensorIn(p + "ssm_beta.weight", (16, n_embd), T.BF16),
                        TensorIn(p + "ssm_conv1d.weight", (6144, 4), T.F32),
                        TensorIn(p + "ssm_a", (16,), T.F32),
                        TensorIn(p + "ssm_dt.bias", (16,), T.F32),
                        TensorIn(p + "ssm_norm.weight", (128,), T.F32),
                        TensorIn(p + "ssm_out.weight", (n_embd, 2048), T.BF16)]
    return tensors


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q5_K_M", "Q4_K_S"])
def test_hybrid_attn_qkv_is_attn_v_like_and_counts_by_layer(preset):
    n = 24
    plans = by_name(plan_quantization(qwen35_like(n), preset, arch="qwen35", n_layer_all=n))
    for i in range(n):
        name = f"blk.{i}.attn_v.weight" if (i + 1) % 4 == 0 else f"blk.{i}.attn_qkv.weight"
        # one attn_v-like tensor per layer, so i_attention_wv == layer and n_attention_wv == n
        assert plans[name].dst_type == expected_dense(preset, "attn_v", i, n), name
        assert plans[f"blk.{i}.ffn_down.weight"].dst_type == expected_dense(preset, "ffn_down", i, n)
        if (i + 1) % 4:
            for kept in ("ssm_conv1d.weight", "ssm_a", "ssm_dt.bias", "ssm_norm.weight"):
                assert not plans[f"blk.{i}.{kept}"].converts
            for other in ("attn_gate.weight", "ssm_alpha.weight", "ssm_beta.weight", "ssm_out.weight"):
                assert plans[f"blk.{i}.{other}"].dst_type == DEFAULT[preset]
    assert plans["token_embd.weight"].dst_type == T.Q6_K  # tied


def test_moe_8_experts_bumps():
    n = 32
    plans = by_name(plan_quantization(moe_model(n, 8), "Q4_K_M", arch="llama", n_layer_all=n, n_expert=8))
    for i in range(n):
        p = f"blk.{i}."
        assert plans[p + "attn_v.weight"].dst_type == T.Q8_0
        assert plans[p + "attn_k.weight"].dst_type == T.Q8_0
        assert plans[p + "attn_output.weight"].dst_type == T.Q5_K
        assert plans[p + "attn_q.weight"].dst_type == T.Q4_K
        assert plans[p + "ffn_gate_exps.weight"].dst_type == T.Q4_K
        assert plans[p + "ffn_up_exps.weight"].dst_type == T.Q4_K
        assert plans[p + "ffn_down_exps.weight"].dst_type == (T.Q6_K if i in UMB_SETS[n] else T.Q4_K)
        assert plans[p + "ffn_gate_inp.weight"].dst_type == T.F32  # router kept
    # Q4_K_S also bumps attn_output; Q5_K_M does not
    s = by_name(plan_quantization(moe_model(4, 8), "Q4_K_S", arch="llama", n_layer_all=4, n_expert=8))
    m5 = by_name(plan_quantization(moe_model(4, 8), "Q5_K_M", arch="llama", n_layer_all=4, n_expert=8))
    assert s["blk.0.attn_output.weight"].dst_type == T.Q5_K
    assert m5["blk.0.attn_output.weight"].dst_type == T.Q5_K  # its default anyway
    assert m5["blk.0.attn_v.weight"].dst_type == T.Q8_0
    falcon = by_name(plan_quantization(moe_model(4, 8), "Q4_K_M", arch="falcon", n_layer_all=4, n_expert=8))
    assert falcon["blk.0.attn_output.weight"].dst_type == T.Q4_K


def test_moe_64_experts_no_bumps_layer_from_name():
    n = 24
    tensors = moe_model(n, 64, n_dense_layers=1, shared_expert=True)
    plans = by_name(plan_quantization(tensors, "Q4_K_M", arch="qwen3moe", n_layer_all=n, n_expert=64))
    for i in range(n):
        p = f"blk.{i}."
        assert plans[p + "attn_v.weight"].dst_type == (T.Q6_K if i in UMB_SETS[n] else T.Q4_K)
        assert plans[p + "attn_k.weight"].dst_type == T.Q4_K
        assert plans[p + "attn_output.weight"].dst_type == T.Q4_K
        want_down = T.Q6_K if i in UMB_SETS[n] else T.Q4_K
        # every ffn_down* of layer i uses layer i (a running counter would drift with 2 per layer)
        downs = ["ffn_down.weight"] if i == 0 else ["ffn_down_exps.weight", "ffn_down_shexp.weight"]
        for down in downs:
            assert plans[p + down].dst_type == want_down, p + down
    assert plans["blk.1.ffn_down_exps.weight"].shape == (64, 1024, 512)


def test_fused_gate_up_exps_is_ffn_gate():
    tensors = [TensorIn("output.weight", (1000, 1024), T.F16)]
    tensors += [TensorIn(f"blk.{i}.ffn_gate_up_exps.weight", (16, 1024, 1024), T.F16) for i in range(8)]
    plans = plan_quantization(tensors, "Q4_K_M", arch="qwen35moe", n_layer_all=8, n_expert=16)
    assert [p.dst_type for p in plans[1:]] == [T.Q4_K] * 8  # FFN_GATE: default, never the ffn_down bump


def test_moe_layer_must_come_from_name():
    tensors = [TensorIn("ffn_down_exps.weight", (8, 1024, 512), T.F16)]
    with pytest.raises(UserError, match="layer"):
        plan_quantization(tensors, "Q4_K_M", arch="llama", n_layer_all=4, n_expert=8)
    tensors = [TensorIn("blk.4.ffn_up_exps.weight", (8, 512, 1024), T.F16)]
    with pytest.raises(UserError, match="bad layer 4"):
        plan_quantization(tensors, "Q4_K_M", arch="llama", n_layer_all=4, n_expert=8)


# ---------------------------------------------------------------------------------------------
# Shape fallback (§7.6)


def qwen25_05b():
    # Qwen2.5-0.5B: n_embd 896, n_ff 4864, 24 layers, 2 KV heads of 64, tied embeddings, qkv biases
    n_embd, n_ff, n_layer = 896, 4864, 24
    tensors = [TensorIn("token_embd.weight", (151936, n_embd), T.BF16),
               TensorIn("output_norm.weight", (n_embd,), T.F32)]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [
            TensorIn(p + "attn_norm.weight", (n_embd,), T.F32),
            TensorIn(p + "attn_q.weight", (n_embd, n_embd), T.BF16),
            TensorIn(p + "attn_q.bias", (n_embd,), T.F32),
            TensorIn(p + "attn_k.weight", (128, n_embd), T.BF16),
            TensorIn(p + "attn_k.bias", (128,), T.F32),
            TensorIn(p + "attn_v.weight", (128, n_embd), T.BF16),
            TensorIn(p + "attn_v.bias", (128,), T.F32),
            TensorIn(p + "attn_output.weight", (n_embd, n_embd), T.BF16),
            TensorIn(p + "ffn_norm.weight", (n_embd,), T.F32),
            TensorIn(p + "ffn_gate.weight", (n_ff, n_embd), T.BF16),
            TensorIn(p + "ffn_up.weight", (n_ff, n_embd), T.BF16),
            TensorIn(p + "ffn_down.weight", (n_embd, n_ff), T.BF16),
        ]
    return tensors, n_layer


def test_qwen25_05b_fallback_q4_k_m():
    tensors, n = qwen25_05b()
    plans = plan_quantization(tensors, "Q4_K_M", arch="qwen2", n_layer_all=n)
    got = by_name(plans)
    embd = got["token_embd.weight"]
    assert (embd.dst_type, embd.fallback_from) == (T.Q8_0, None)  # rule (a), not a fallback
    for i in range(n):
        p = f"blk.{i}."
        for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            plan = got[p + kind + ".weight"]
            assert (plan.dst_type, plan.fallback_from) == (T.Q5_0, T.Q4_K)
        v = got[p + "attn_v.weight"]
        if i in UMB_SETS[n]:
            assert (v.dst_type, v.fallback_from) == (T.Q8_0, T.Q6_K)
        else:
            assert (v.dst_type, v.fallback_from) == (T.Q5_0, T.Q4_K)
        down = got[p + "ffn_down.weight"]  # ne0 = 4864 = 19 * 256
        assert (down.dst_type, down.fallback_from) == (T.Q6_K if i in UMB_SETS[n] else T.Q4_K, None)
        assert got[p + "attn_q.bias"].dst_type == T.F32
    assert fallback_summary(plans) == f"{6 * n} of {len(plans)} tensor(s) required fallback quantization"


def test_qwen25_05b_fallback_q5_k_m_and_q8_0():
    tensors, n = qwen25_05b()
    q5 = by_name(plan_quantization(tensors, "Q5_K_M", arch="qwen2", n_layer_all=n))
    assert q5["blk.4.attn_q.weight"].dst_type == T.Q5_1
    q8 = plan_quantization(tensors, "Q8_0", arch="qwen2", n_layer_all=n)
    assert fallback_summary(q8) is None  # 896 % 32 == 0
    assert {p.dst_type for p in q8 if p.converts} == {T.Q8_0}


def test_shape_fallback_to_f16():
    assert shape_fallback(100, T.Q4_K) == T.F16
    assert shape_fallback(100, T.Q8_0) == T.F16
    assert shape_fallback(96, T.Q6_K) == T.Q8_0
    assert shape_fallback(512, T.Q6_K) == T.Q6_K
    plans = plan_quantization([TensorIn("blk.0.ssm_dt.weight", (64, 100), T.F32)], "Q4_K_M",
                              arch="mamba", n_layer_all=1)
    assert (plans[0].dst_type, plans[0].fallback_from) == (T.F16, T.Q4_K)


def test_no_fallback_refuses_and_names_tensors():
    tensors, n = qwen25_05b()
    with pytest.raises(UserError) as e:
        plan_quantization(tensors, "Q4_K_M", arch="qwen2", n_layer_all=n, options=QuantOptions(no_fallback=True))
    assert "blk.0.attn_k.weight" in e.value.message and e.value.hint
    # nothing to fall back from: no error
    plan_quantization(dense_model(4), "Q4_K_M", arch="llama", n_layer_all=4, options=QuantOptions(no_fallback=True))


# ---------------------------------------------------------------------------------------------
# Options


def test_tensor_type_overrides_first_match_wins_and_skip_rules():
    opts = QuantOptions(tensor_type_overrides=[(r"blk\.0\.", T.Q8_0), ("attn_v|output", T.Q5_K)])
    got = by_name(plan_quantization(dense_model(8), "Q4_K_M", arch="llama", n_layer_all=8, options=opts))
    assert got["blk.0.attn_v.weight"].dst_type == T.Q8_0
    assert got["blk.0.ffn_down.weight"].dst_type == T.Q8_0
    assert got["blk.1.attn_v.weight"].dst_type == T.Q5_K   # the rule would give Q6_K (use_more_bits)
    assert got["blk.5.attn_output.weight"].dst_type == T.Q5_K
    assert got["output.weight"].dst_type == T.Q5_K         # overrides the Q6_K output rule
    # Dense ffn_down uses a running counter that only advances when the rules run: blk.0 was
    # overridden, so blk.1 is counted as layer 0 (use_more_bits) although layer 1 is not.
    assert 1 not in {i for i in range(8) if use_more_bits(i, 8)}
    assert got["blk.1.ffn_down.weight"].dst_type == T.Q6_K
    assert "--tensor-type" in got["blk.1.attn_v.weight"].reason


def test_override_skips_attn_v_counter():
    # i_attention_wv only advances when the rules run, so with blk.0's attn_v overridden
    # Q4_K_S gives its "first 4" Q5_K to layers 1..4.
    opts = QuantOptions(tensor_type_overrides=[(r"blk\.0\.attn_v", T.Q8_0)])
    got = by_name(plan_quantization(dense_model(8), "Q4_K_S", arch="llama", n_layer_all=8, options=opts))
    assert [got[f"blk.{i}.attn_v.weight"].dst_type for i in range(8)] == [T.Q8_0] + [T.Q5_K] * 4 + [T.Q4_K] * 3


def test_override_still_gets_shape_fallback():
    tensors, n = qwen25_05b()
    opts = QuantOptions(tensor_type_overrides=[("attn_q", T.Q6_K)])
    got = by_name(plan_quantization(tensors, "Q4_K_M", arch="qwen2", n_layer_all=n, options=opts))
    assert (got["blk.0.attn_q.weight"].dst_type, got["blk.0.attn_q.weight"].fallback_from) == (T.Q8_0, T.Q6_K)


def test_invalid_override_regex():
    with pytest.raises(UserError, match="pattern"):
        plan_quantization(dense_model(1), "Q4_K_M", arch="llama", n_layer_all=1,
                          options=QuantOptions(tensor_type_overrides=[("attn_(", T.Q8_0)]))


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q5_K_S", "Q8_0"])
def test_pure(preset):
    plans = plan_quantization(dense_model(8), preset, arch="llama", n_layer_all=8, options=QuantOptions(pure=True))
    for p in plans:
        assert p.dst_type == (T.F32 if p.name.endswith("_norm.weight") else DEFAULT[preset]), p
    tensors, n = qwen25_05b()
    got = by_name(plan_quantization(tensors, preset, arch="qwen2", n_layer_all=n, options=QuantOptions(pure=True)))
    assert got["blk.0.attn_q.weight"].dst_type == shape_fallback(896, DEFAULT[preset])  # fallback still applies


def test_leave_output_tensor():
    opts = QuantOptions(leave_output_tensor=True)
    got = by_name(plan_quantization(dense_model(4), "Q4_K_M", arch="llama", n_layer_all=4, options=opts))
    assert got["output.weight"].dst_type == T.F16 and not got["output.weight"].converts
    assert got["token_embd.weight"].dst_type == T.Q4_K  # output.weight exists, so not tied


def test_output_and_token_embedding_types_skip_fallback():
    """llama-quantize takes them as given (no tensor_type_fallback), then aborts on 896-wide rows for a
    256-block type: refused here before anything is written. A type whose block divides the rows is used."""
    tensors, n = qwen25_05b()
    tensors.append(TensorIn("output.weight", (151936, 896), T.BF16))
    for opts in (QuantOptions(output_tensor_type=T.Q4_K), QuantOptions(token_embedding_type=T.Q5_K)):
        with pytest.raises(UserError, match="not a multiple of its block of 256"):
            plan_quantization(tensors, "Q4_K_M", arch="qwen2", n_layer_all=n, options=opts)
    opts = QuantOptions(output_tensor_type=T.Q5_0, token_embedding_type=T.IQ4_NL)
    got = by_name(plan_quantization(tensors, "Q4_K_M", arch="qwen2", n_layer_all=n, options=opts))
    assert (got["output.weight"].dst_type, got["output.weight"].fallback_from) == (T.Q5_0, None)
    assert (got["token_embd.weight"].dst_type, got["token_embd.weight"].fallback_from) == (T.IQ4_NL, None)


def test_output_tensor_type_on_tied_token_embd_goes_through_fallback():
    # Tied token_embd takes --output-tensor-type inside the rules, so the fallback still runs.
    tensors, n = qwen25_05b()
    got = by_name(plan_quantization(tensors, "Q4_K_M", arch="qwen2", n_layer_all=n,
                                    options=QuantOptions(output_tensor_type=T.Q6_K)))
    assert (got["token_embd.weight"].dst_type, got["token_embd.weight"].fallback_from) == (T.Q8_0, T.Q6_K)


def test_tensor_type_may_claim_per_layer_token_embd():
    tensors = [TensorIn("token_embd.weight", (1000, 1024), T.F16),
               TensorIn("per_layer_token_embd.weight", (1000, 1024), T.F16),
               TensorIn("output.weight", (1000, 1024), T.F16)]
    opts = QuantOptions(token_embedding_type=T.Q8_0, tensor_type_overrides=[("embd", T.Q5_K)])
    got = by_name(plan_quantization(tensors, "Q4_K_M", arch="gemma3n", n_layer_all=1, options=opts))
    assert got["token_embd.weight"].dst_type == T.Q8_0
    assert got["per_layer_token_embd.weight"].dst_type == T.Q5_K


# ---------------------------------------------------------------------------------------------
# Requantization (§7.9) and float presets


def test_requantize_rules():
    q8_tensors = [TensorIn("output.weight", (1000, 1024), T.Q8_0),
                  TensorIn("blk.0.attn_q.weight", (1024, 1024), T.Q8_0),
                  TensorIn("blk.0.attn_norm.weight", (1024,), T.F32)]
    same = plan_quantization(q8_tensors, "Q8_0", arch="llama", n_layer_all=1)
    assert not any(p.converts for p in same)  # same target: raw copy, allowed
    with pytest.raises(UserError, match="requantizing from type Q8_0 is disabled"):
        plan_quantization(q8_tensors, "Q4_K_M", arch="llama", n_layer_all=1)
    allowed = by_name(plan_quantization(q8_tensors, "Q4_K_M", arch="llama", n_layer_all=1,
                                        options=QuantOptions(allow_requantize=True)))
    assert allowed["blk.0.attn_q.weight"].dst_type == T.Q4_K
    with pytest.raises(UserError, match="I32"):
        plan_quantization([TensorIn("blk.0.attn_q.weight", (64, 64), T.I32)], "Q8_0", arch="llama", n_layer_all=1)


@pytest.mark.parametrize("preset, float_type", [("F16", T.F16), ("BF16", T.BF16), ("F32", T.F32)])
def test_float_presets(preset, float_type):
    tensors, n = qwen25_05b()
    tensors.append(TensorIn("blk.0.odd.weight", (8, 100), T.F32))  # ne0 % 32 != 0: no fallback for floats
    opts = QuantOptions(tensor_type_overrides=[("attn_v", T.Q8_0)])  # ignored: default type not quantized
    plans = plan_quantization(tensors, preset, arch="qwen2", n_layer_all=n, options=opts)
    for p in plans:
        if p.name.endswith("norm.weight") or p.name.endswith(".bias"):
            assert p.dst_type == T.F32
        else:
            assert (p.dst_type, p.fallback_from) == (float_type, None), p  # output/token_embd too
    with_embd_type = plan_quantization(tensors, preset, arch="qwen2", n_layer_all=n,
                                       options=QuantOptions(token_embedding_type=T.Q8_0))
    assert dst(with_embd_type, "token_embd.weight") == T.Q8_0  # the early return still applies


def test_duplicate_names_rejected():
    with pytest.raises(UserError, match="duplicate"):
        plan_quantization([TensorIn("a.weight", (32, 32), T.F32)] * 2, "Q8_0", arch="llama", n_layer_all=1)


# ---------------------------------------------------------------------------------------------
# Falcon / GLM5 special cases that are cheap to have


def test_falcon_rules():
    n = 32
    got = by_name(plan_quantization(dense_model(n), "Q4_K_M", arch="falcon", n_layer_all=n))
    assert got["output.weight"].dst_type == T.Q8_0
    for i in range(n):
        want = T.Q6_K if i < n // 16 else T.Q5_K if i in UMB_SETS[n] else T.Q4_K
        assert got[f"blk.{i}.ffn_down.weight"].dst_type == want
    s = by_name(plan_quantization(dense_model(n), "Q4_K_S", arch="falcon", n_layer_all=n))
    assert s["blk.0.ffn_down.weight"].dst_type == T.Q4_K


def test_glm5_next_keeps_q_a_at_q8_0():
    tensors = [TensorIn("blk.0.attn_q_a.weight", (512, 1024), T.BF16),
               TensorIn("blk.0.attn_k_b.weight", (512, 1024), T.BF16)]
    got = by_name(plan_quantization(tensors, "Q4_K_M", arch="glm5-next", n_layer_all=1))
    assert got["blk.0.attn_q_a.weight"].dst_type == T.Q8_0
    assert got["blk.0.attn_k_b.weight"].dst_type == T.BF16


# ---------------------------------------------------------------------------------------------
# Sizes


def test_sizes_and_bpw():
    assert tensor_nbytes((4096, 4096), T.Q4_K) == 4096 * 4096 // 256 * 144
    assert tensor_nbytes((8, 1024, 512), T.Q8_0) == 8 * 1024 * 512 // 32 * 34
    assert tensor_nbytes((10, 896), T.Q5_0) == 10 * 896 // 32 * 22
    assert tensor_nbytes((3,), T.F32) == 12
    with pytest.raises(ValueError):
        tensor_nbytes((10, 896), T.Q4_K)
    tensors = [TensorIn(f"blk.{i}.ffn_gate.weight", (256, 512), T.F32) for i in range(4)]
    plans = plan_quantization(tensors, "Q4_K_M", arch="llama", n_layer_all=4, options=QuantOptions(pure=True))
    assert bits_per_weight(plans) == pytest.approx(4.5)
    summary = size_summary(plans)
    assert (summary.n_elements, summary.src_bytes) == (4 * 256 * 512, 4 * 256 * 512 * 4)
    assert summary.src_bpw == 32.0
    q6 = plan_quantization(tensors, "Q6_K", arch="llama", n_layer_all=4)
    assert bits_per_weight(q6) == pytest.approx(6.5625)
