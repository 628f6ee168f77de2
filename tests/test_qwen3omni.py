"""Qwen3-Omni-MoE and Qwen3-ASR: the thinker / language model as text GGUFs (qwen3vlmoe / qwen3vl), against
llama.cpp's converter (conversion/qwen3vl.py) and, through llama.cpp, transformers.

The Omni mock is transformers' Qwen3OmniMoeForConditionalGeneration (thinker with vision and audio
towers) plus two stand-in speech-output tensors (talker.*, code2wav.*: transformers builds that part
only at full size). The ASR mock is transformers 5's Qwen3ASRForConditionalGeneration layout.
Measured (f32, these mocks): llama.cpp vs transformers NMSE 8.2e-6 (Omni, top-1 98.4%) and 5.9e-6 (ASR,
top-1 100%), the level of Qwen3-VL's M-RoPE on text positions; the files equal the reference's.
"""

from __future__ import annotations

import json
import shutil

import pytest

from gguforge.cli import main

from helpers import gguf_fields, gguforge, run_reference_converters
from test_mmproj import relabel

pytest.importorskip("torch")

IM_END = 397  # <|im_end|> in the mock tokenizer (config bos_token_id is <|endoftext|>, 395)


REFERENCE_CASES = [("qwen3omni", "hub", "bf16"), ("qwen3omni", "causal", "f32"), ("qwen3omni", "causal", "q8_0"),
                   ("qwen3asr", "causal", "f32"), ("qwen3asr", "causal", "bf16"), ("qwen3asr", "causal", "q8_0")]


@pytest.fixture(scope="module")
def reference_files(tree, mock_model, tmp_path_factory):
    """{case: the file llama.cpp's converter writes}, all converted in one process."""
    root = tmp_path_factory.mktemp("qwen3omni-reference")
    runs = [(mock_model(arch, layout=layout), root / f"{arch}-{layout}-{outtype}.gguf", outtype)
            for arch, layout, outtype in REFERENCE_CASES]
    r = run_reference_converters(tree, "qwen2", runs)
    assert r.returncode == 0, r.stderr[-2000:]
    return {case: run[1] for case, run in zip(REFERENCE_CASES, runs)}


@pytest.mark.parametrize("arch,layout,outtype", REFERENCE_CASES)
def test_text_equals_the_reference_converter(reference_files, mock_model, tmp_path, arch, layout, outtype):
    ours = tmp_path / "ours.gguf"
    assert main(["convert-hf", str(mock_model(arch, layout=layout)), "--outfile", str(ours), "--outtype", outtype,
                 "-q"]) == 0
    assert ours.read_bytes() == reference_files[(arch, layout, outtype)].read_bytes()
    fields = gguf_fields(ours)  # what the comparison covers
    gguf_arch = {"qwen3omni": "qwen3vlmoe", "qwen3asr": "qwen3vl"}[arch]
    assert fields["general.architecture"] == gguf_arch and fields[f"{gguf_arch}.n_deepstack_layers"] == 0
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == IM_END
    assert fields["tokenizer.ggml.tokens"][IM_END] == "<|im_end|>" and len(fields["tokenizer.ggml.tokens"]) == 512
    if arch == "qwen3asr":
        assert fields["tokenizer.chat_template"].startswith("{% for message in messages %}{{'<|im_start|>'")


@pytest.mark.parametrize("arch", ["qwen3omni", "qwen3asr"])
def test_llama_cpp_logits_match_transformers(mock_model, tmp_path, arch):
    pytest.importorskip("llama_cpp")
    from gguforge.verify import verify
    model = mock_model(arch)
    out = tmp_path / "m.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", "f32", "-q"]) == 0
    report = verify(model, out)
    assert report.nmse <= 1e-5 and report.top1_agreement >= 0.95 and report.tokenizer_ok, report.format()


def test_speech_output_is_left_out_with_a_note(mock_model):
    r = gguforge("convert-hf", str(mock_model("qwen3omni")), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "warning: 2 speech-output tensors (talker.*, code2wav.*) left out" in r.stderr
    assert "talker" not in r.stdout and "code2wav" not in r.stdout and "thinker.model.layers.0" in r.stdout


def test_the_original_asr_layout_gives_the_same_file(mock_model, tmp_path):
    """thinker_config.text_config and thinker.model.* (as Qwen3-Omni) against transformers 5's layout: the
    same tensors and keys (BOS moves to the end: llama.cpp's converter finds no config id under thinker_config
    and adds it last, as gguforge does)."""
    model = mock_model("qwen3asr")
    old = relabel(model, tmp_path / "old" / model.name,
                  lambda n: "thinker.model." + n[len("model.language_model."):] if n.startswith("model.language_model.")
                  else n)
    config = json.loads((old / "config.json").read_text())
    config["thinker_config"] = {"text_config": config.pop("text_config"), "audio_config": config.pop("audio_config")}
    (old / "config.json").write_text(json.dumps(config))
    for src, out in ((model, tmp_path / "new.gguf"), (old, tmp_path / "old.gguf")):
        assert main(["convert-hf", str(src), "--outfile", str(out), "--outtype", "bf16", "-q"]) == 0
    r = gguforge("diff", str(tmp_path / "new.gguf"), str(tmp_path / "old.gguf"))
    assert r.returncode == 0 and "files are equal" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("case,words", [
    ("no thinker_config", "no thinker"),
    ("no thinker tensors", "no thinker"),
    ("--mmproj", "audio encoder"),
])
def test_refusals_are_one_line(mock_model, tmp_path, case, words):
    model = shutil.copytree(mock_model("qwen3omni"), tmp_path / "m")
    if case == "no thinker_config":
        config = json.loads((model / "config.json").read_text())
        del config["thinker_config"]
        (model / "config.json").write_text(json.dumps(config))
    elif case == "no thinker tensors":  # e.g. a talker-only export
        model = relabel(model, tmp_path / "talker", lambda n: n.replace("thinker.", "talker.", 1))
    out = tmp_path / "out"
    out.mkdir()
    r = gguforge("convert-hf", str(model), "--outfile", str(out / "m.gguf"), *(["--mmproj"] if case == "--mmproj" else []))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and lines[0].startswith("error:") and words in lines[0], r.stderr
    assert len(lines) <= 2 and not any(out.iterdir())
