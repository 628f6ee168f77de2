"""Qwen2-MoE with packed experts (mlp.experts.gate_up_proj [E, 2Fe, H], down_proj [E, H, Fe]) in llama.cpp.

The same weights as the per-expert mock, repacked the way transformers holds them in memory. First
transformers must read both checkpoints alike (so the packed file means what we think), then the
GGUF converted from the packed checkpoint must give transformers' logits in llama.cpp.
"""

from __future__ import annotations

import shutil

import pytest

from gguforge.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from gguforge.verify import verify  # noqa: E402


@pytest.fixture(scope="module")
def packed_checkpoint(mock_model, tmp_path_factory):
    """(per-expert mock, the same weights with packed experts)."""
    import make_mocks
    from safetensors.torch import load_file, save_file

    per_expert = mock_model("qwen2moe")
    packed = tmp_path_factory.mktemp("packed") / "qwen2moe-packed"
    shutil.copytree(per_expert, packed)
    state = make_mocks.pack_experts(load_file(str(per_expert / "model.safetensors")), "model.")
    assert not any(".experts.0." in k for k in state)
    assert sum(k.endswith("mlp.experts.gate_up_proj") for k in state) == 2  # both layers packed
    save_file(state, str(packed / "model.safetensors"), metadata={"format": "pt"})
    return per_expert, packed


def test_transformers_reads_the_packed_mock_as_the_per_expert_one(packed_checkpoint):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[395, 7, 120, 33, 301, 2, 396, 88]])
    logits = []
    for path in packed_checkpoint:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("outtype,bound", [("f32", 1e-6), ("q8_0", 1e-2)])
def test_packed_qwen2moe_in_llama_cpp(packed_checkpoint, tmp_path, outtype, bound):
    _, packed = packed_checkpoint
    out = tmp_path / f"packed-{outtype}.gguf"
    assert main(["convert-hf", str(packed), "--outfile", str(out), "--outtype", outtype, "--quiet"]) == 0
    report = verify(packed, out)
    assert report.nmse <= bound, report.format()
    assert report.top1_agreement >= 0.9, report.format()
    assert report.tokenizer_ok, report.format()
