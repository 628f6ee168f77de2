"""Mock checkpoints (scripts/make_mocks.py) and the torch-free pieces of gguforge.verify."""

from __future__ import annotations

import re

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

import make_mocks
from gguforge import verify as V

ARCHS = make_mocks.ARCHS
HYBRID = ("qwen3next", "qwen35", "qwen35moe")


def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _logits(model_dir: Path, text: str = V.DEFAULT_TEXT):
    import torch

    model, tok, _ = V.load_hf(model_dir)  # (the text model of a VL checkpoint too)
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# ------------------------------------------------------------------------------------------------
# verify: pure pieces
# ------------------------------------------------------------------------------------------------


def test_compare_logits_known_values():
    b = np.array([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]])
    a = b.copy()
    a[0, 0] += 0.5  # one error of 0.5; Σb² = 24
    m = V.compare_logits(a, b)
    assert m["nmse"] == pytest.approx(0.25 / 24)
    assert m["nmse_db"] == pytest.approx(10 * np.log10(0.25 / 24))
    assert m["max_abs_diff"] == pytest.approx(0.5)
    assert m["top1_agreement"] == 1.0
    a[1] = [0.0, 5.0, 0.0]  # top-1 of row 1 changes
    assert V.compare_logits(a, b)["top1_agreement"] == 0.5
    same = V.compare_logits(b, b)
    assert same["nmse"] == 0 and same["nmse_db"] == -np.inf and same["max_abs_diff"] == 0
    with pytest.raises(ValueError):
        V.compare_logits(a[:, :2], b)


def test_compare_tokenizations_reports_only_mismatches():
    texts = ["ab", "cd", ""]
    mm = V.compare_tokenizations(texts, lambda t: [ord(c) for c in t],
                                 lambda t: [ord(c) for c in t.replace("d", "x")])
    assert [m.text for m in mm] == ["cd"]
    assert mm[0].first_diff == 1 and mm[0].hf == [99, 100] and mm[0].gguf == [99, 120]
    assert V.TokenMismatch("x", [1, 2], [1, 2, 3]).first_diff == 2


def test_report_format_and_ok():
    r = V.VerifyReport("hf", "m.gguf", n_tokens=10, n_vocab=512, hf_vocab=512, gguf_vocab=512,
                       nmse=1e-9, nmse_db=-90.0, top1_agreement=1.0, max_abs_diff=1e-4, texts_checked=3)
    assert r.ok() and r.tokenizer_ok
    text = r.format()
    assert "1.000e-09" in text and "-90.0 dB" in text and "3/3 texts identical" in text
    r.token_mismatches.append(V.TokenMismatch("héllo", [1, 2], [1, 3]))
    assert not r.ok() and "MISMATCH" in r.format() and "2/3" in r.format()
    assert not V.VerifyReport("hf", "g", nmse=1e-2).ok(max_nmse=1e-3)


def test_parity_texts_are_nfc_and_varied():
    assert all(unicodedata.is_normalized("NFC", t) for t in V.PARITY_TEXTS + (V.DEFAULT_TEXT,))
    joined = "".join(V.PARITY_TEXTS)
    for needle in ("\u200d", "<|im_start|>", "\t", "\n\n", "我", "П", "ក", "🦙", "333"):
        assert needle in joined


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen35"])
def test_tokenizer_files(arch, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    ids = make_mocks.write_tokenizer(arch, tmp_path)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    assert len(tj["model"]["vocab"]) + len(tj["added_tokens"]) == 400
    assert tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == (
        make_mocks.QWEN35_REGEX if arch == "qwen35" else make_mocks.QWEN2_REGEX)
    assert tj["post_processor"]["type"] == "ByteLevel" and tj["decoder"]["type"] == "ByteLevel"
    special = {t["content"]: t["special"] for t in tj["added_tokens"]}
    assert special == {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True,
                       "<think>": False, "</think>": False}
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None

    tok = AutoTokenizer.from_pretrained(tmp_path)
    for text in V.PARITY_TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    for t in make_mocks.SPECIAL_TOKENS + make_mocks.USER_TOKENS:
        assert tok.encode(t, add_special_tokens=False) == [ids[t]]
    assert tok.eos_token_id == ids["<|im_end|>"]


def test_tokenizer_deterministic_and_regexes_differ():
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer

    make_mocks.tokenizer_json.cache_clear()
    first = make_mocks.tokenizer_json("qwen2moe")
    make_mocks.tokenizer_json.cache_clear()
    assert make_mocks.tokenizer_json("qwen2moe") == first
    khmer = "ស្វាគមន៍មកកាន់ប្រទេសកម្ពុជា"  # spacing/combining marks are \p{M}
    q2 = Tokenizer.from_str(make_mocks.tokenizer_json("qwen2moe"))
    q35 = Tokenizer.from_str(make_mocks.tokenizer_json("qwen35"))
    assert q2.pre_tokenizer.pre_tokenize_str(khmer) != q35.pre_tokenizer.pre_tokenize_str(khmer)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_mock_loads_with_nontrivial_logits(arch, mock_model):
    pytest.importorskip("torch")
    import torch

    d = mock_model(arch)
    cfg = json.loads((d / "config.json").read_text())
    text = cfg.get("text_config") or cfg.get("thinker_config", {}).get("text_config") or cfg  # (wrappers nest it)
    assert text["vocab_size"] == 512 and not cfg["tie_word_embeddings"]
    logits = _logits(d)
    assert logits.shape[-1] == 512 and torch.isfinite(logits).all()
    assert 0.5 < logits.std() < 20
    assert len(set(logits.argmax(-1).tolist())) >= 5  # predictions vary with the input


@pytest.mark.parametrize("arch", ARCHS)
def test_mock_config_and_weights(arch, mock_model):
    pytest.importorskip("torch")
    d = mock_model(arch)
    cfg = json.loads((d / "config.json").read_text())
    sd = _tensors(d)
    if not make_mocks.spec(arch).wrapper_only:  # (Qwen3-VL-MoE: transformers saves them packed)
        assert not any(".experts.gate_up_proj" in k for k in sd)  # causal layout: per-expert names
    norms = {k: v for k, v in sd.items() if k.endswith("norm.weight") and "linear_attn" not in k
             and "visual" not in k}
    cls = make_mocks.arch_classes()[arch]
    centre = 0.0 if cls.zero_centred_norms else 1.0  # Qwen3-Next/3.5 store w for x*(1+w)
    for k, v in norms.items():
        assert abs(float(v.mean()) - centre) < 0.1 and float(v.std()) > 0.03, k
    if arch in ("qwen2", "qwen2moe"):
        assert "lm_head.weight" in sd and float(sd["model.layers.0.self_attn.q_proj.bias"].abs().mean()) > 0.01
    from gguforge.archs.qwen3next import Qwen3Next
    if not issubclass(cls, Qwen3Next):  # the rest is about the hybrid layers
        return
    assert {"linear_attention", "full_attention"} <= set(cfg["layer_types"])
    assert cfg["linear_num_value_heads"] != cfg["linear_num_key_heads"]
    assert cfg["full_attention_interval"] == 2
    for k, v in sd.items():
        if k.endswith("linear_attn.norm.weight"):
            assert abs(float(v.mean()) - 1) < 0.1 and float(v.std()) > 0.03
        if k.endswith("A_log") or k.endswith("dt_bias"):
            assert float(v.std()) > 0.05
    if arch != "qwen3next":
        rope = cfg["rope_parameters"]
        assert sum(rope["mrope_section"]) == int(cfg["head_dim"] * rope["partial_rotary_factor"]) // 2


def test_same_seed_same_files_other_seed_differs(tmp_path):
    pytest.importorskip("torch")
    a = make_mocks.make_mock("qwen35moe", tmp_path / "a", layout="hub", seed=3)
    b = make_mocks.make_mock("qwen35moe", tmp_path / "b", layout="hub", seed=3)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = make_mocks.make_mock("qwen35moe", tmp_path / "c", layout="hub", seed=4)
    assert (a / files[0]).read_bytes() != (c / files[0]).read_bytes() or \
        (a / "model-00002-of-00002.safetensors").read_bytes() != (c / "model-00002-of-00002.safetensors").read_bytes()


def test_bf16_and_f32_hold_same_values(mock_model):
    pytest.importorskip("torch")
    import torch

    f32 = _tensors(mock_model("qwen3next"))
    bf16 = _tensors(mock_model("qwen3next", dtype="bfloat16"))
    assert f32.keys() == bf16.keys()
    for k in f32:
        assert bf16[k].dtype == torch.bfloat16 and torch.equal(f32[k], bf16[k].float()), k


def _hub_to_causal(sd: dict) -> dict:
    """Undo the hub rewrite: drop mtp/visual, strip the language_model prefix, unpack experts."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("mtp.", "model.visual.")):
            continue
        k = k.replace("model.language_model.", "model.")
        if k.endswith("experts.gate_up_proj"):
            fe = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = v[e, :fe]
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = v[e, fe:]
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("arch", HYBRID)
def test_hub_layout(arch, mock_model):
    pytest.importorskip("torch")
    import torch

    hub = mock_model(arch, layout="hub")
    causal = _tensors(mock_model(arch))
    index = json.loads((hub / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards == sorted(p.name for p in hub.glob("*.safetensors"))
    sd = _tensors(hub)
    assert sorted(sd) == sorted(index["weight_map"])
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    cfg = json.loads((hub / "config.json").read_text())

    # MTP head: fc, three norms, one full-attention block with the arch's MLP
    for k in ("mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
              "mtp.norm.weight", "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.input_layernorm.weight"):
        assert k in sd, k
    H = causal["model.embed_tokens.weight"].shape[1]
    assert sd["mtp.fc.weight"].shape == (H, 2 * H)
    if arch != "qwen35":
        assert "mtp.layers.0.mlp.experts.0.gate_proj.weight" in sd  # Hub MTP experts are per-expert

    if arch == "qwen3next":
        assert cfg["architectures"] == ["Qwen3NextForCausalLM"] and "mtp_num_hidden_layers" not in cfg
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in sd
    else:
        assert cfg["architectures"][0].endswith("ForConditionalGeneration")
        tc = cfg["text_config"]
        assert "architectures" not in tc and tc["mtp_num_hidden_layers"] == 1
        assert any(k.startswith("model.visual.") for k in sd)
        assert not any(k.startswith("model.layers.") for k in sd)
    if arch == "qwen35moe":
        E, Fe = cfg["text_config"]["num_experts"], cfg["text_config"]["moe_intermediate_size"]
        assert sd["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 2 * Fe, H)
        assert sd["model.language_model.layers.0.mlp.experts.down_proj"].shape == (E, H, Fe)

    # same trunk weights as the causal layout (values are bf16-exact by construction)
    trunk = _hub_to_causal(sd)
    assert sorted(trunk) == sorted(causal)
    for k, v in causal.items():
        assert torch.equal(trunk[k].float(), v), k


@pytest.mark.parametrize("arch", HYBRID)
def test_hub_layout_gives_same_logits_in_transformers(arch, mock_model):
    """transformers maps the hub names itself: equal logits prove packing/prefixes are right."""
    pytest.importorskip("torch")
    import torch

    a = _logits(mock_model(arch, layout="hub"))
    b = _logits(mock_model(arch))
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_q256_rows_are_multiples_of_256(mock_model):
    pytest.importorskip("torch")
    d = mock_model("qwen3next", size="q256", num_experts=8, layout="hub")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_experts"] == 8 and cfg["vocab_size"] % 256 == 0
    sd = _tensors(d)
    for k, v in sd.items():
        if v.ndim >= 2 and "conv1d" not in k and "shared_expert_gate" not in k:
            assert v.shape[-1] % 256 == 0, (k, tuple(v.shape))
    for arch in ("qwen2moe", "qwen35", "qwen35moe"):
        kw = make_mocks.text_config_kwargs(arch, "q256")
        dims = [kw["hidden_size"], kw.get("intermediate_size", 256), kw.get("moe_intermediate_size", 256),
                kw.get("shared_expert_intermediate_size", 256), kw["vocab_size"],
                kw["num_attention_heads"] * kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"])]
        if arch != "qwen2moe":
            dims.append(kw["linear_num_value_heads"] * kw["linear_value_head_dim"])
        assert all(x % 256 == 0 for x in dims), (arch, dims)


def test_embedded_model_is_small_and_reproducible(tmp_path):
    emb = make_mocks.EMBEDDED_DIR
    assert (emb / "config.json").is_file() and (emb / "model.safetensors").is_file()
    assert sum(p.stat().st_size for p in emb.iterdir()) < 1_000_000
    pytest.importorskip("torch")
    fresh = make_mocks.make_embedded(tmp_path / "emb")
    names = sorted(p.name for p in emb.iterdir())
    assert names == sorted(p.name for p in fresh.iterdir())
    for n in names:
        a, b = (emb / n).read_bytes(), (fresh / n).read_bytes()
        if n.endswith(".json"):  # the transformers release that wrote the file is not part of the model
            a, b = (re.sub(rb'"transformers_version": "[^"]*"', b"", x) for x in (a, b))
        assert a == b, f"{n}: run scripts/make_mocks.py --embedded"


def test_make_mock_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_mocks.make_mock("gpt-j", tmp_path / "x")  # no such mock
    with pytest.raises(ValueError):
        make_mocks.make_mock("qwen2moe", tmp_path / "x", layout="hub")
    with pytest.raises(ValueError):
        make_mocks.text_config_kwargs("qwen35", "huge")


def test_cli_builds_a_mock(tmp_path):
    pytest.importorskip("torch")
    assert make_mocks.main(["qwen2moe", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------------------
# End to end: convert with gguforge, verify against transformers through llama.cpp
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,layout", [(a, "causal") for a in ARCHS] + [(a, "hub") for a in HYBRID])
def test_convert_then_verify(arch, layout, mock_model, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    import subprocess
    import sys

    src = mock_model(arch, layout=layout)
    out = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, "-m", "gguforge.cli", "convert-hf", str(src), "--outfile", str(out),
                        "--outtype", "f32", "--quiet"], capture_output=True, text=True)
    if "not supported" in r.stdout + r.stderr:
        pytest.skip(f"converter does not support {arch} yet")
    assert r.returncode == 0, r.stdout + r.stderr
    report = V.verify(src, out)
    assert report.n_tokens >= 48 and report.n_vocab == 512
    assert report.tokenizer_ok, report.format()
    assert report.nmse < NMSE_BOUND.get(arch, 1e-8) and report.top1_agreement >= 0.98, report.format()


# llama.cpp's M-RoPE on text positions differs slightly from transformers' for Qwen3-VL: 4e-6 with
# our file and with llama.cpp's converter's (the two files are byte-identical: tests/test_qwen3vl.py).
NMSE_BOUND = {"qwen3vl": 1e-5, "qwen3vlmoe": 1e-5, "qwen3omni": 1e-5, "qwen3asr": 1e-5}
