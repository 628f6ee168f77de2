"""Tensor data byte-identical to llama.cpp's own convert_hf_to_gguf.py, for every arch and layout."""

from __future__ import annotations

import pytest

from gguforge.cli import main

from helpers import llama_cpp_tree, read_gguf, run_reference_converter

pytest.importorskip("torch")

CASES = [  # (arch, layout, outtypes): causal mocks are f32, hub mocks bf16 with MTP
    ("qwen2moe", "causal", ("f32", "f16", "q8_0")),
    ("qwen3next", "causal", ("f32", "bf16")),
    ("qwen35", "causal", ("f32", "q8_0")),
    ("qwen35moe", "causal", ("f16", "q8_0")),
    ("qwen3next", "hub", ("bf16", "q8_0")),
    ("qwen35", "hub", ("bf16", "f16")),
    ("qwen35moe", "hub", ("bf16", "q8_0")),
]


@pytest.fixture(scope="module")
def tree():
    found = llama_cpp_tree()
    if found is None:
        pytest.skip("llama.cpp source (llama-cpp-python sdist) could not be fetched from PyPI")
    return found


@pytest.mark.parametrize("arch,layout,outtypes", CASES, ids=[f"{a}-{b}" for a, b, _ in CASES])
def test_same_tensors_as_llama_cpp_converter(tree, mock_model, tmp_path, arch, layout, outtypes):
    model = mock_model(arch, layout=layout)
    pre = "qwen35" if arch.startswith("qwen35") else "qwen2"
    # The reference dies with a bare AssertionError on checkpoints without MTP unless told --no-mtp.
    extra = ["--no-mtp"] if arch != "qwen2moe" and layout == "causal" else []
    for outtype in outtypes:
        ours, ref = tmp_path / f"ours-{outtype}.gguf", tmp_path / f"ref-{outtype}.gguf"
        assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", outtype, "--quiet"]) == 0
        r = run_reference_converter(tree, model, ref, outtype, pre, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        a, b = read_gguf(ours), read_gguf(ref)
        assert a.keys() == b.keys(), (outtype, sorted(a.keys() ^ b.keys()))
        for name in b:
            assert a[name].tensor_type == b[name].tensor_type, (outtype, name)
            assert list(a[name].shape) == list(b[name].shape), (outtype, name)
            assert a[name].data.tobytes() == b[name].data.tobytes(), (outtype, name)
