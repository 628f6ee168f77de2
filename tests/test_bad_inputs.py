"""Every bad input: one clear line on stderr, no traceback, exit code 2, nothing left behind, input untouched."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from gguforge.errors import EXIT_BAD_INPUT

from helpers import gguforge, qwen2moe_config, qwen2moe_tensors, write_checkpoint


def digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def assert_clean_failure(root, tmp_path, match, *extra):
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = digest(root) if root.is_dir() else None
    r = gguforge("convert-hf", str(root), "--outfile", str(out_dir / "x.gguf"), *extra)
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and match in lines[0], r.stderr
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint: ")), r.stderr
    assert "Traceback" not in r.stderr
    assert list(out_dir.iterdir()) == []  # no output, no temp file
    if before is not None:
        assert digest(root) == before
    return lines[0]


@pytest.fixture
def good(tmp_path):
    config = qwen2moe_config()
    return write_checkpoint(tmp_path / "model", config, qwen2moe_tensors(config), shards=2)


def test_missing_config(good, tmp_path):
    (good / "config.json").unlink()
    assert_clean_failure(good, tmp_path, "no config.json")


def test_config_not_json(good, tmp_path):
    (good / "config.json").write_text("{not json")
    assert_clean_failure(good, tmp_path, "config.json: not valid JSON")


def test_unknown_architecture_lists_supported(good, tmp_path):
    (good / "config.json").write_text(json.dumps(qwen2moe_config(architectures=["MambaForCausalLM"])))
    line = assert_clean_failure(good, tmp_path, "'MambaForCausalLM' is not supported")
    assert "Qwen2MoeForCausalLM" in line


def test_truncated_safetensors(good, tmp_path):
    shard = good / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_clean_failure(good, tmp_path, "truncated")


def test_corrupt_header_json(good, tmp_path):
    shard = good / "model-00001-of-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8] = ord("x")
    shard.write_bytes(bytes(raw))
    assert_clean_failure(good, tmp_path, "header is not valid JSON")


def test_header_length_beyond_file(good, tmp_path):
    shard = good / "model-00001-of-00002.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    assert_clean_failure(good, tmp_path, "header length")


def edit_first_header_entry(shard, edit) -> None:
    """Rewrite a safetensors header with `edit(entry)` applied to its first tensor entry."""
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header[next(k for k in header if k != "__metadata__")])
    new = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_data_offsets_out_of_range(good, tmp_path):
    def move_far(entry):
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [begin + 10**9, end + 10**9]
    edit_first_header_entry(good / "model-00001-of-00002.safetensors", move_far)
    assert_clean_failure(good, tmp_path, "past the end of the file")


def test_unsupported_dtype(good, tmp_path):
    edit_first_header_entry(good / "model-00001-of-00002.safetensors", lambda e: e.update(dtype="F8_E5M3"))
    assert_clean_failure(good, tmp_path, "unsupported dtype")


def test_missing_shard(good, tmp_path):
    (good / "model-00002-of-00002.safetensors").unlink()
    assert_clean_failure(good, tmp_path, "model-00002-of-00002.safetensors named in model.safetensors.index.json is missing")


def test_index_and_shard_disagree(good, tmp_path):
    index = json.loads((good / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"]["model.layers.9.extra.weight"] = index["weight_map"][name]
    (good / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_clean_failure(good, tmp_path, "model.layers.9.extra.weight")


def test_missing_tokenizer(good, tmp_path):
    (good / "tokenizer.json").unlink()
    assert_clean_failure(good, tmp_path, "no tokenizer.json")


def test_pickle_only_checkpoint(tmp_path):
    root = tmp_path / "pickle"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(qwen2moe_config()))
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_clean_failure(root, tmp_path, "only pickle checkpoints")


def test_nan_weight_is_named(tmp_path):
    config = qwen2moe_config()
    tensors = qwen2moe_tensors(config)
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = np.nan
    root = write_checkpoint(tmp_path / "nan", config, tensors)
    assert_clean_failure(root, tmp_path, "blk.1.attn_k.weight")
    r = gguforge("convert-hf", str(root), "--outfile", str(tmp_path / "ok.gguf"), "--allow-nonfinite", "--quiet")
    assert r.returncode == 0, r.stderr


def test_existing_output_needs_force(good, tmp_path):
    target = tmp_path / "exists.gguf"
    target.write_bytes(b"keep me")
    r = gguforge("convert-hf", str(good), "--outfile", str(target), "--quiet")
    assert r.returncode == EXIT_BAD_INPUT and "already exists" in r.stderr
    assert target.read_bytes() == b"keep me"
    r = gguforge("convert-hf", str(good), "--outfile", str(target), "--quiet", "--force")
    assert r.returncode == 0 and target.read_bytes()[:4] == b"GGUF"


def test_output_onto_an_input_file_is_refused(good, tmp_path):
    before = digest(good)
    r = gguforge("convert-hf", str(good), "--outfile", str(good / "config.json"), "--force")
    assert r.returncode == EXIT_BAD_INPUT and "part of the input" in r.stderr
    assert digest(good) == before


def test_unknown_outtype(good, tmp_path):
    assert_clean_failure(good, tmp_path, "unknown output type", "--outtype", "q3_x")


def test_mtp_flags_on_an_arch_without_mtp_head(good, tmp_path):
    assert_clean_failure(good, tmp_path, "--no-mtp: qwen2moe models have no multi-token-prediction head", "--no-mtp")
    assert_clean_failure(good, tmp_path, "--mtp: qwen2moe models have no multi-token-prediction head", "--mtp")


def test_config_value_too_large_for_its_gguf_key(good, tmp_path):
    (good / "config.json").write_text(json.dumps(qwen2moe_config(max_position_embeddings=2**63)))
    assert_clean_failure(good, tmp_path, "qwen2moe.context_length: 9223372036854775808 does not fit a UINT32")
    (good / "config.json").write_text(json.dumps(qwen2moe_config(rms_norm_eps=3.4028235677973366e+38)))
    assert_clean_failure(good, tmp_path, "layer_norm_rms_epsilon: 3.4028235677973366e+38 does not fit a FLOAT32")
