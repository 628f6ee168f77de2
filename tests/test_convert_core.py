"""Conversion core, torch-free: each transform, the dtype policy, vocabulary and naming."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, TokenType

from gguforge.cli import main
from gguforge.archs.options import ConvertOptions
from gguforge.convert.plan import plan_conversion
from gguforge.checkpoint.read import open_checkpoint
from gguforge.checkpoint.lazy import Lazy, concat_axis, concat_rows, stack
from gguforge.convert.vocab import QWEN2_REGEX, detect_pre_tokenizer
from gguforge.errors import UserError

from helpers import gguf_fields, qwen2moe_config, qwen2moe_tensors, read_gguf, to_bf16_bits, write_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A per-expert f32 checkpoint and the same weights with packed experts."""
    base = tmp_path_factory.mktemp("ckpt")
    config = qwen2moe_config()
    per_expert = write_checkpoint(base / "per_expert", config, qwen2moe_tensors(config))
    packed = write_checkpoint(base / "packed", config, qwen2moe_tensors(config, packed=True))
    return config, per_expert, packed


def convert(model, out, *extra):
    assert main(["convert-hf", str(model), "--outfile", str(out), "--quiet", *extra]) == 0
    return out


# -- lazy expressions ---------------------------------------------------------------------------

def test_lazy_ops_match_numpy():
    a = np.arange(60, dtype=np.float32).reshape(5, 3, 4)
    b = -np.arange(60, dtype=np.float32).reshape(5, 3, 4)
    la, lb = Lazy.from_array(a), Lazy.from_array(b)
    np.testing.assert_array_equal(la.slice_axis(1, 1, 3).numpy(), a[:, 1:3])
    idx = np.array([4, 0, 1, 2, 3])
    np.testing.assert_array_equal(la.take_rows(idx).numpy(), a[idx])
    np.testing.assert_array_equal(la.take_rows(idx).rows(1, 4), a[idx][1:4])
    np.testing.assert_array_equal(la.take_axis(2, [3, 2, 1, 0]).numpy(), a[:, :, ::-1])
    np.testing.assert_array_equal(concat_rows([la, lb]).rows(3, 8), np.concatenate([a, b])[3:8])
    np.testing.assert_array_equal(concat_axis([la, lb], 1).numpy(), np.concatenate([a, b], axis=1))
    np.testing.assert_array_equal(stack([la, lb]).numpy(), np.stack([a, b]))
    np.testing.assert_array_equal(la.flatten().rows(7, 29), a.reshape(-1)[7:29])
    np.testing.assert_array_equal(la.reshape_rest((12,)).numpy(), a.reshape(5, 12))
    np.testing.assert_array_equal(la.map(lambda x: x + 1).numpy(), a + 1)


# -- experts -------------------------------------------------------------------------------------

def test_per_expert_tensors_are_stacked(tiny, tmp_path):
    config, per_expert, _ = tiny
    src = qwen2moe_tensors(config)
    out = read_gguf(convert(per_expert, tmp_path / "x.gguf", "--outtype", "f32"))
    for i in range(config["num_hidden_layers"]):
        for proj in ("gate", "up", "down"):
            want = np.stack([src[f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight"]
                             for e in range(config["num_experts"])])
            got = out[f"blk.{i}.ffn_{proj}_exps.weight"]
            assert list(got.shape) == list(reversed(want.shape))  # GGUF stores dims reversed
            np.testing.assert_array_equal(got.data, want)


def test_packed_experts_split_gate_first_and_match_per_expert(tiny, tmp_path):
    config, per_expert, packed = tiny
    a = read_gguf(convert(per_expert, tmp_path / "a.gguf", "--outtype", "f32"))
    b = read_gguf(convert(packed, tmp_path / "b.gguf", "--outtype", "f32"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].data.tobytes() == b[name].data.tobytes(), name
    src = qwen2moe_tensors(config, packed=True)
    gate_up = src["model.layers.0.mlp.experts.gate_up_proj"]
    np.testing.assert_array_equal(b["blk.0.ffn_gate_exps.weight"].data, gate_up[:, :32])
    np.testing.assert_array_equal(b["blk.0.ffn_up_exps.weight"].data, gate_up[:, 32:])


def test_packed_gate_up_with_odd_rows_is_refused(tmp_path):
    config = qwen2moe_config()
    tensors = qwen2moe_tensors(config, packed=True)
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = tensors["model.layers.0.mlp.experts.gate_up_proj"][:, :63]
    root = write_checkpoint(tmp_path / "m", config, tensors)
    with pytest.raises(UserError, match=r"gate_up_proj: shape \[4, 63, 64\] but config implies \[4, 64, 64\]"):
        plan_conversion(open_checkpoint(root), ConvertOptions())


def test_missing_expert_and_unmapped_tensor_are_named(tmp_path):
    config = qwen2moe_config()
    tensors = qwen2moe_tensors(config)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        plan_conversion(open_checkpoint(write_checkpoint(tmp_path / "a", config, tensors)), ConvertOptions())
    tensors = qwen2moe_tensors(config)
    tensors["model.layers.0.mlp.switch_mlp.gate_proj.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(UserError, match=r"switch_mlp\.gate_proj"):
        plan_conversion(open_checkpoint(write_checkpoint(tmp_path / "b", config, tensors)), ConvertOptions())


def test_tied_checkpoint_gets_an_output_tensor_for_qwen2moe(tmp_path):
    # llama.cpp's qwen2moe loader requires output.weight even when the embeddings are tied.
    config = qwen2moe_config(tie_word_embeddings=True)
    tensors = qwen2moe_tensors(config)
    del tensors["lm_head.weight"]
    out = read_gguf(convert(write_checkpoint(tmp_path / "m", config, tensors), tmp_path / "x.gguf",
                            "--outtype", "f32"))
    np.testing.assert_array_equal(out["output.weight"].data, tensors["model.embed_tokens.weight"])


# -- dtype policy -------------------------------------------------------------------------------

def bf16_round_reference(x: np.ndarray) -> np.ndarray:
    """Nearest bf16 by comparing the two neighbouring bf16 values in float64 (ties to even)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    lo = bits >> 16
    hi = lo + 1
    as_f = lambda b: (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    x64 = x.astype(np.float64)
    d_lo, d_hi = np.abs(x64 - as_f(lo)), np.abs(as_f(hi) - x64)
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (lo % 2 == 1))
    return np.where(pick_hi, hi, lo).astype(np.uint16)


def test_bf16_policy_and_rounding(tiny, tmp_path):
    config, per_expert, _ = tiny
    src = qwen2moe_tensors(config)
    out = read_gguf(convert(per_expert, tmp_path / "x.gguf", "--outtype", "bf16"))
    f32 = {"blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight", "blk.0.ffn_gate_inp.weight",
           "blk.0.ffn_gate_inp_shexp.weight", "blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"}
    for name, t in out.items():
        if name.startswith("blk.1."):
            continue
        assert t.tensor_type == (T.F32 if name in f32 else T.BF16), name
    got = out["blk.0.attn_q.weight"].data.view(np.uint16)
    np.testing.assert_array_equal(got, bf16_round_reference(src["model.layers.0.self_attn.q_proj.weight"]))


def test_bf16_source_to_bf16_is_an_exact_copy(tmp_path):
    config = qwen2moe_config()
    tensors = qwen2moe_tensors(config)
    root = write_checkpoint(tmp_path / "m", config, tensors, bf16=True, shards=3)
    path = convert(root, tmp_path / "x-{ftype}.gguf")  # auto -> bf16 for a bf16 checkpoint
    out = read_gguf(tmp_path / "x-bf16.gguf")
    assert path.name == "x-{ftype}.gguf"
    np.testing.assert_array_equal(out["token_embd.weight"].data.view(np.uint16),
                                  to_bf16_bits(tensors["model.embed_tokens.weight"]))
    norm = to_bf16_bits(tensors["model.norm.weight"]).astype(np.uint32) << 16
    np.testing.assert_array_equal(out["output_norm.weight"].data, norm.view(np.float32))


def test_f16_and_q8_0_fallback_for_short_rows(tmp_path):
    # Rows of 48 elements do not fill Q8_0 blocks of 32: those tensors stay F16, as in llama.cpp.
    config = qwen2moe_config()
    root = write_checkpoint(tmp_path / "m", config, qwen2moe_tensors(config))
    out = read_gguf(convert(root, tmp_path / "q.gguf", "--outtype", "q8_0"))
    assert out["blk.0.ffn_down_shexp.weight"].tensor_type == T.F16  # ne0 = 48
    assert out["blk.0.ffn_gate_shexp.weight"].tensor_type == T.Q8_0  # ne0 = 64
    assert out["blk.0.ffn_down_exps.weight"].tensor_type == T.Q8_0  # ne0 = 32
    f16 = read_gguf(convert(root, tmp_path / "h.gguf", "--outtype", "f16"))
    src = qwen2moe_tensors(config)["model.layers.0.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(f16["blk.0.attn_output.weight"].data, src.astype(np.float16))


# -- vocabulary ---------------------------------------------------------------------------------

def test_vocab_padding_token_types_and_specials(tiny, tmp_path):
    _, per_expert, _ = tiny
    fields = gguf_fields(convert(per_expert, tmp_path / "x.gguf", "--outtype", "f32"))
    tok = json.loads((per_expert / "tokenizer.json").read_text())
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 512  # config vocab_size, beyond the tokenizer's own size
    added = {a["id"]: a for a in tok["added_tokens"]}
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text and types[i] == TokenType.NORMAL
    for i, a in added.items():
        assert tokens[i] == a["content"]
        assert types[i] == (TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED)
    used = set(tok["model"]["vocab"].values()) | set(added)
    for i in set(range(512)) - used:
        assert tokens[i] == f"[PAD{i}]" and types[i] == TokenType.UNUSED
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert len(fields["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
    content = {a["content"]: i for i, a in added.items()}
    assert fields["tokenizer.ggml.eos_token_id"] == content["<|im_end|>"]  # tokenizer_config beats config
    assert fields["tokenizer.ggml.padding_token_id"] == content["<|endoftext|>"]
    assert fields["tokenizer.ggml.bos_token_id"] == 395  # only in config.json
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert "tokenizer.chat_template" in fields


def _pre(regex, behavior="Isolated", use_regex=False):
    return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": behavior, "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": use_regex}]}}


def test_pre_tokenizer_is_derived_from_its_definition(tiny, tmp_path):
    assert detect_pre_tokenizer(_pre(QWEN2_REGEX)) == "qwen2"
    assert detect_pre_tokenizer(_pre(QWEN2_REGEX.replace(r"\p{L}+", r"[\p{L}\p{M}]+")
                                     .replace(r"[^\s\p{L}\p{N}]", r"[^\s\p{L}\p{M}\p{N}]"))) == "qwen35"
    with pytest.raises(UserError, match="unrecognised pre-tokenizer") as e:
        detect_pre_tokenizer(_pre(QWEN2_REGEX, behavior="Removed"))
    assert "--pre-tokenizer" in e.value.hint
    # An unknown definition converts when named by hand.
    _, per_expert, _ = tiny
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in per_expert.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    tok = json.loads((odd / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+|."
    (odd / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match=r"\\\\p\{L\}\+"):
        plan_conversion(open_checkpoint(odd), ConvertOptions())
    plan = plan_conversion(open_checkpoint(odd), ConvertOptions(pre_tokenizer="qwen2"))
    assert plan.metadata.get("tokenizer.ggml.pre") == "qwen2"


# -- metadata and naming ------------------------------------------------------------------------

def test_qwen2moe_metadata_and_default_name(tiny, tmp_path):
    config, per_expert, _ = tiny
    assert main(["convert-hf", str(per_expert), "--outfile", str(tmp_path), "--outtype", "f16", "--quiet"]) == 0
    (path,) = tmp_path.glob("*.gguf")
    assert path.name.startswith("per_expert-4x") and path.name.endswith("-F16.gguf")
    f = gguf_fields(path)
    assert f["general.architecture"] == "qwen2moe" and f["general.file_type"] == 1
    expect = {"block_count": 2, "context_length": 256, "embedding_length": 64, "feed_forward_length": 128,
              "attention.head_count": 4, "attention.head_count_kv": 2, "expert_count": 4,
              "expert_used_count": 2, "expert_feed_forward_length": 32, "expert_shared_feed_forward_length": 48}
    for key, value in expect.items():
        assert f[f"qwen2moe.{key}"] == value, key
    assert f["qwen2moe.rope.freq_base"] == 1e6
    assert abs(f["qwen2moe.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
    assert f["general.quantization_version"] == 2


def test_dry_run_lists_every_tensor_and_writes_nothing(tiny, tmp_path, capsys):
    _, per_expert, _ = tiny
    assert main(["convert-hf", str(per_expert), "--outfile", str(tmp_path / "x.gguf"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = plan_conversion(open_checkpoint(per_expert), ConvertOptions())
    for t in plan.tensors:
        assert t.name in out
    assert "bits per weight" in out
    assert not list(tmp_path.iterdir())


def test_moved_values_keep_their_stored_bits(tmp_path):
    """Slicing, gathering, stacking and concatenating bf16 tensors works on the stored bits, so a
    bf16 output skips the float round trip; a value-changing map drops them."""
    config = qwen2moe_config()
    tensors = qwen2moe_tensors(config)
    ckpt = open_checkpoint(write_checkpoint(tmp_path / "m", config, tensors, bf16=True))
    src = {n: Lazy.from_source(t) for n, t in ckpt.tensors.items()}
    experts = [src[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] for e in range(4)]
    moved = [stack(experts), stack(experts).slice_axis(1, 2, 9), concat_rows(experts).take_rows([5, 1, 2, 40]),
             concat_axis(experts, 1), experts[0].take_axis(1, np.arange(63, -1, -1)).reshape_rest((64,)),
             experts[0].flatten()]
    for lazy in moved:
        assert lazy.stored is not None and lazy.stored[0] == "BF16"
        bits = lazy.stored_rows(0, lazy.n_rows)
        np.testing.assert_array_equal((bits.astype(np.uint32) << 16).view(np.float32), lazy.numpy())
    assert experts[0].map(lambda a: a + 1).stored is None
    assert concat_rows([experts[0], Lazy.from_array(np.zeros((2, 64), np.float32))]).stored is None
