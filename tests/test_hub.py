"""Hub ids: `convert-hf org/name` from a pre-populated Hugging Face cache, offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import gguf_fields, qwen2moe_config, qwen2moe_tensors, read_gguf, write_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME with hub/models--tiny-org--Tiny-MoE-Chat laid out as huggingface_hub stores a download."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--tiny-org--Tiny-MoE-Chat"
    config = qwen2moe_config()
    write_checkpoint(repo / "snapshots" / COMMIT, config, qwen2moe_tensors(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def run_offline(hf_home, *args, cwd):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "gguforge", *args], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_hub_id_converts_from_the_cache_offline(hf_home, tmp_path):
    r = run_offline(hf_home, "convert-hf", "tiny-org/Tiny-MoE-Chat", "--outfile", str(tmp_path), "--quiet",
                    cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (out,) = tmp_path.glob("*.gguf")
    # the repo's name (not the snapshot hash) names the file: basename, size label, finetune, type
    assert out.name.startswith("Tiny-MoE-4x") and out.name.endswith("-Chat-F16.gguf"), out.name
    fields = gguf_fields(out)
    assert fields["general.organization"] == "Tiny Org"
    assert fields["general.finetune"] == "Chat"
    assert len(read_gguf(out)) == 37


def test_hub_id_default_output_is_in_the_working_directory(hf_home, tmp_path):
    r = run_offline(hf_home, "convert-hf", "tiny-org/Tiny-MoE-Chat", "--quiet", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "-> Tiny-MoE-4x" in r.stdout and list(tmp_path.iterdir()) == []


def test_missing_model_offline_is_a_clear_error(hf_home, tmp_path):
    r = run_offline(hf_home, "convert-hf", "tiny-org/not-downloaded", "--outfile", str(tmp_path / "x.gguf"),
                    cwd=tmp_path)
    assert r.returncode == 2
    assert "tiny-org/not-downloaded: not in the local Hugging Face cache" in r.stderr
    assert "HF_HUB_OFFLINE" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["tokenizer.model", "added_tokens.json", "hf_quant_config.json"])
def test_hub_patterns_bring_what_conversion_reads(name):
    """Hub downloads and --remote fetch the small files by HUB_PATTERNS: a SentencePiece vocabulary
    (convert/spm.py) or modelopt's quantization config (checkpoint/dequant.py) left out would make a hub
    conversion fail, or differ from converting a local copy of the same repository."""
    from fnmatch import fnmatch

    from gguforge.checkpoint.read import HUB_PATTERNS
    assert any(fnmatch(name, pattern) for pattern in HUB_PATTERNS)
