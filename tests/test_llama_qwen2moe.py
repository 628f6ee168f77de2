"""Qwen2-MoE end to end: converted files load in llama.cpp and match transformers' logits."""

from __future__ import annotations

import pytest

from gguforge.cli import embedded_model_dir, main

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from gguforge.verify import verify  # noqa: E402

BOUNDS = {"f32": 1e-6, "f16": 1e-3, "bf16": 1e-3, "q8_0": 1e-2}


@pytest.mark.parametrize("outtype", list(BOUNDS))
def test_qwen2moe_mock_in_llama_cpp(mock_model, tmp_path, outtype):
    model = mock_model("qwen2moe")
    out = tmp_path / f"m-{outtype}.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", outtype, "--quiet"]) == 0
    report = verify(model, out)
    assert report.nmse <= BOUNDS[outtype], report.format()
    assert report.top1_agreement >= 0.9, report.format()
    assert report.tokenizer_ok, report.format()


def test_builtin_default_model_converts_and_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["convert-hf", "--outtype", "f32", "--quiet"]) == 0
    (out,) = tmp_path.glob("*.gguf")
    assert out.name.startswith("tiny-qwen2moe-") and out.name.endswith("-F32.gguf")
    report = verify(embedded_model_dir(), out)
    assert report.nmse <= 1e-6 and report.tokenizer_ok, report.format()
