"""Third-party architectures: a real distribution registering through the `gguforge.archs` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import gguf_fields, qwen2moe_config, qwen2moe_tensors, read_gguf, write_checkpoint

PLUGIN = '''
"""A test plugin: Qwen2-MoE under a made-up HF architecture name, marking the files it writes."""
from gguforge.archs import register
from gguforge.archs.qwen2moe import Qwen2Moe


@register("TestPluginMoeForCausalLM")
class TestPluginMoe(Qwen2Moe):
    def add_metadata(self, md):
        super().add_metadata(md)
        md.str("testplugin.converted_by", type(self).__name__)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A directory holding the package and its *.dist-info, as pip would install it."""
    site = tmp_path_factory.mktemp("site")
    (site / "gguforge_testplugin").mkdir()
    (site / "gguforge_testplugin" / "__init__.py").write_text(PLUGIN)
    info = site / "gguforge_testplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gguforge-testplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [gguforge.archs]
        testplugin = gguforge_testplugin
        """))
    return site


def run_with_plugin(site, *args):
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "gguforge", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path})


def test_plugin_is_listed(site):
    r = run_with_plugin(site, "convert-hf", "--list-archs")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("TestPluginMoeForCausalLM"))
    assert line.split()[-1] == "qwen2moe"
    assert "Qwen2MoeForCausalLM" in r.stdout  # built-ins are still there


def test_plugin_converts_its_architecture(site, tmp_path):
    config = qwen2moe_config(architectures=["TestPluginMoeForCausalLM"])
    root = write_checkpoint(tmp_path / "plugin-model", config, qwen2moe_tensors(config))
    out = tmp_path / "out.gguf"
    r = run_with_plugin(site, "convert-hf", str(root), "--outfile", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    fields = gguf_fields(out)
    assert fields["testplugin.converted_by"] == "TestPluginMoe"
    assert fields["general.architecture"] == "qwen2moe"
    assert "blk.0.ffn_gate_exps.weight" in read_gguf(out)


def test_without_the_plugin_the_architecture_is_unsupported(tmp_path):
    config = qwen2moe_config(architectures=["TestPluginMoeForCausalLM"])
    root = write_checkpoint(tmp_path / "plugin-model", config, qwen2moe_tensors(config))
    r = subprocess.run([sys.executable, "-m", "gguforge", "convert-hf", str(root), "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "'TestPluginMoeForCausalLM' is not supported" in r.stderr


def test_broken_plugin_is_a_clear_error(tmp_path):
    site = tmp_path / "broken-site"
    (site / "gguforge_brokenplugin").mkdir(parents=True)
    (site / "gguforge_brokenplugin" / "__init__.py").write_text("import a_module_that_does_not_exist\n")
    info = site / "gguforge_brokenplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gguforge-brokenplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gguforge.archs]\nbroken = gguforge_brokenplugin\n")
    r = run_with_plugin(site, "convert-hf", "--list-archs")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "plugin 'broken'" in r.stderr and "a_module_that_does_not_exist" in r.stderr


def test_an_architecture_brings_its_own_vocabulary_kind(tmp_path):
    """A SentencePiece-style vocabulary plugs in without editing the converter core."""
    from gguf import GGUFValueType

    from gguforge.archs.api import register
    from gguforge.archs.qwen2moe import Qwen2Moe
    from gguforge.cli import main
    from gguforge.convert.vocab import register_vocab

    @register_vocab("test-unigram")
    def unigram(root, hparams, pre_tokenizer):
        pieces = [f"<piece{i}>" for i in range(hparams["vocab_size"])]

        def write(md):
            md.str("tokenizer.ggml.model", "llama")
            md.array("tokenizer.ggml.tokens", pieces, GGUFValueType.STRING)
            md.array("tokenizer.ggml.scores", [0.0] * len(pieces), GGUFValueType.FLOAT32)
        return write

    @register("TestUnigramMoeForCausalLM")
    class TestUnigramMoe(Qwen2Moe):
        vocab = "test-unigram"

    config = qwen2moe_config(architectures=["TestUnigramMoeForCausalLM"])
    root = write_checkpoint(tmp_path / "m", config, qwen2moe_tensors(config))
    out = tmp_path / "out.gguf"
    assert main(["convert-hf", str(root), "--outfile", str(out), "-q"]) == 0
    fields = gguf_fields(out)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"][:2] == ["<piece0>", "<piece1>"]
    assert "tokenizer.ggml.merges" not in fields
