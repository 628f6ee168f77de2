"""Every llama-quantize preset added by issue 24 against llama-quantize itself.

IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ3_XXS, IQ3_XS, IQ3_S, IQ3_M, MXFP4_MOE, Q1_0, TQ1_0, TQ2_0
and COPY (Q2_0 is refused: gguf-py cannot name its type). The reference is llama-quantize built from the
pinned tree, with an importance matrix from llama-imatrix (test_imatrix_apply's mocks and helpers): an
8-layer dense Qwen3 (n_gqa 2: the attn_v rules that depend on it and on the imatrix, ffn_down by n/8), a
Qwen3-MoE with 8 experts (the 8-expert rules, MXFP4 experts) and a Qwen3.5-MoE with 64/32-wide rows
(every shape fallback).

- type choice, every preset x mock x with/without imatrix: the per-tensor types of `llama-quantize
  --dry-run` (it needs no kernels) against ours, and whether llama-quantize says it needs an imatrix;
- whole files, every preset x mock: byte-identical; a preset whose chosen types lack a kernel in this
  build is skipped with the missing kernel named (they run once all lattice kernels are merged);
- one-pass convert, several presets per read, COPY, refusals.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from gguforge.cli import main
from gguforge.errors import UserError
from gguforge.quantize import native
from gguforge.quantize.imatrix import ImatrixOptions
from gguforge.quantize.rules import QuantOptions, tensor_requires_imatrix
from gguforge.quantize.run import quantize_gguf
from gguforge.quantize.presets import parse_preset
from test_imatrix_apply import (assert_same_file, assert_same_tensors, build, llama_quantize, ours,  # noqa: F401
                                tools)  # (tools: a fixture)

PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
           "MXFP4_MOE", "Q1_0", "TQ1_0", "TQ2_0")
MOCKS = ("dense", "moe", "narrow")


@pytest.fixture(scope="module")
def mocks(mock_model, tmp_path_factory, tools):
    return {
        "dense": build(mock_model, tmp_path_factory, tools, "dense", arch="qwen3", num_hidden_layers=8),
        "moe": build(mock_model, tmp_path_factory, tools, "moe", arch="qwen3moe", num_experts=8),
        "narrow": build(mock_model, tmp_path_factory, tools, "narrow", size="tiny", arch="qwen35moe", num_experts=8),
    }


_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[\d.]+ MiB"
                   r"(?: ->\s*[\d.]+ MiB \((\w+)\))?")


def llama_plan(tools, src: Path, preset: str, imatrix: Path | None) -> tuple[dict[str, T] | None, bool]:
    """llama-quantize --dry-run: each tensor's type (None when it refuses the model), and whether it warns
    that writing needs an imatrix."""
    args = ["--dry-run", *(["--imatrix", imatrix] if imatrix else []), src, preset, "2"]
    r = subprocess.run([str(a) for a in (tools["llama-quantize"], *args)], capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode:
        assert "failed to quantize" in out, out[-2000:]
        return None, False
    types = {m[1]: T[(m[3] or m[2]).upper()] for m in _LINE.finditer(out)}
    assert types, out[-2000:]
    return types, "will require an imatrix" in out


def our_plan(src: Path, preset: str, imatrix: Path | None):
    options = QuantOptions(imatrix=ImatrixOptions(imatrix) if imatrix else None)
    result = quantize_gguf(src, src.with_name("unused.gguf"), preset, options, dry_run=True)
    return result


def missing_kernels(plans) -> list[str]:
    return sorted({p.dst_type.name for p in plans if p.converts and not native.supported(p.dst_type)})


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["static", "imatrix"])
@pytest.mark.parametrize("preset", PRESETS)
def test_types_match_llama_quantize(mocks, tools, preset, with_imatrix):
    """Every tensor's type as llama-quantize chooses it, on the three mocks; the imatrix requirement too."""
    for name in MOCKS:
        mock = mocks[name]
        im = mock.imatrix if with_imatrix else None
        want, needs = llama_plan(tools, mock.f32, preset, im)
        if want is None:  # e.g. Q1_0 on 64-wide rows: no fallback is defined for it
            with pytest.raises(UserError, match="no tensor type fallback"):
                our_plan(mock.f32, preset, im)
            continue
        result = our_plan(mock.f32, preset, im)
        got = {p.name: p.dst_type for p in result.plans}
        diff = {n: (got.get(n), t) for n, t in want.items() if got.get(n) != t}
        assert not diff and set(got) == set(want), f"{name}: (ours, llama-quantize) {diff}"
        refused = any("without an importance matrix" in w for w in result.warnings)
        assert refused == (needs and not with_imatrix), (name, result.warnings)


def test_rules_are_exercised(mocks, tools):
    """The mocks reach the branches: IQ3_XXS's attn_v by imatrix, the IQ2 attn_v by n_expert, fallbacks."""
    dense, moe = mocks["dense"], mocks["moe"]
    static = {p.name: p.dst_type for p in our_plan(dense.f32, "IQ3_XXS", None).plans}
    weighted = {p.name: p.dst_type for p in our_plan(dense.f32, "IQ3_XXS", dense.imatrix).plans}
    assert static["blk.0.attn_v.weight"] == T.IQ3_S and weighted["blk.0.attn_v.weight"] == T.IQ3_XXS
    assert static["blk.0.ffn_down.weight"] == T.Q4_K and weighted["blk.0.ffn_down.weight"] == T.IQ3_XXS
    assert {p.name: p.dst_type for p in our_plan(dense.f32, "IQ2_XXS", None).plans}["blk.0.attn_v.weight"] == T.Q2_K
    assert {p.name: p.dst_type for p in our_plan(moe.f32, "IQ2_XXS", None).plans}["blk.0.attn_v.weight"] == T.Q4_K
    mx = {p.name: p.dst_type for p in our_plan(moe.f32, "MXFP4_MOE", None).plans}
    assert mx["blk.0.ffn_down_exps.weight"] == T.MXFP4 and mx["blk.0.attn_q.weight"] == T.Q8_0
    narrow = our_plan(mocks["narrow"].f32, "IQ2_M", mocks["narrow"].imatrix).plans
    assert any(p.fallback_from is not None and p.dst_type == T.IQ4_NL for p in narrow)


@pytest.mark.parametrize("mock_name", ["moe", "narrow"])  # (the dense mock's types: the test above)
@pytest.mark.parametrize("preset", PRESETS)
def test_files_identical_to_llama_quantize(mocks, tools, preset, mock_name, tmp_path):
    """The whole file, with llama-imatrix's matrix and, on the narrow mock, without one where llama-quantize
    allows it."""
    mock = mocks[mock_name]
    if preset == "Q1_0" and mock_name == "narrow":
        pytest.skip("llama-quantize has no fallback for Q1_0 on rows of 64 (test_types_match_llama_quantize)")
    missing = missing_kernels(our_plan(mock.f32, preset, mock.imatrix).plans)
    if missing:
        pytest.skip(f"{preset} on the {mock_name} mock needs {', '.join(missing)}, which has no kernel in this build")
    want, got = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    llama_quantize(tools, mock.f32, want, preset, "--imatrix", mock.imatrix)
    ours(mock.f32, got, preset, "--imatrix", mock.imatrix)
    assert_same_file(got, want)
    plans = our_plan(mock.f32, preset, None).plans
    if mock_name == "narrow" and not any(tensor_requires_imatrix(p.name, p.dst_type, parse_preset(preset)) for p in plans):
        llama_quantize(tools, mock.f32, want, preset)
        ours(mock.f32, got, preset, "--force")
        assert_same_file(got, want)


@pytest.mark.parametrize("preset", ["IQ3_M", "MXFP4_MOE", "IQ2_M"])
def test_one_pass_convert_equals_llama_quantize(mocks, tools, preset, tmp_path):
    mock = mocks["moe"]
    missing = missing_kernels(our_plan(mock.f32, preset, mock.imatrix).plans)
    if missing:
        pytest.skip(f"{preset} needs {', '.join(missing)}, which has no kernel in this build")
    want, got = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    llama_quantize(tools, mock.f32, want, preset, "--imatrix", mock.imatrix)
    assert main(["convert-hf", str(mock.checkpoint), "--outfile", str(got), "--outtype", preset,
                 "--imatrix", str(mock.imatrix), "-q"]) == 0
    assert_same_tensors(got, want)  # (the converter's tensor order; llama-quantize's decides only the counters)


def test_several_presets_in_one_pass(mocks, tmp_path):
    mock = mocks["moe"]
    presets = [p for p in ("IQ3_XS", "TQ2_0", "Q1_0", "MXFP4_MOE", "IQ2_XXS")
               if not missing_kernels(our_plan(mock.f32, p, mock.imatrix).plans)]
    assert len(presets) >= 4
    ours(mock.f32, tmp_path / "all-{ftype}.gguf", ",".join(presets), "--imatrix", mock.imatrix)
    for preset in presets:
        ours(mock.f32, tmp_path / f"one-{preset}.gguf", preset, "--imatrix", mock.imatrix)
        assert (tmp_path / f"all-{preset.lower()}.gguf").read_bytes() == (tmp_path / f"one-{preset}.gguf").read_bytes()


def test_copy_equals_llama_quantize(mocks, tools, tmp_path):
    """COPY keeps every tensor and writes the input's file type; also from a quantized input."""
    mock = mocks["moe"]
    q8 = tmp_path / "q8.gguf"
    ours(mock.f32, q8, "Q8_0")
    for src in (mock.f32, q8):
        want, got = tmp_path / f"llama-{src.name}", tmp_path / f"ours-{src.name}"
        llama_quantize(tools, src, want, "COPY")
        ours(src, got, "COPY")
        assert_same_file(got, want)


def test_refusals(mocks, tmp_path, capsys):
    """Without an imatrix where llama-quantize refuses; Q2_0 (gguf-py lacks the type); a type no kernel
    writes: one line, exit 2, nothing written."""
    f32 = mocks["dense"].f32
    cases = [("IQ3_XXS", (), "without an importance matrix"),
             ("Q2_0", (), "Q2_0"),
             ("IQ3_S", ("--tensor-type", "attn_v=nvfp4"), "cannot write NVFP4")]
    for preset, extra, needle in cases:
        out = tmp_path / f"{preset}.gguf"
        assert main(["quantize", str(f32), str(out), preset, "-q", *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and not out.exists(), err
    # the dry run shows the plan and says what writing it needs
    assert main(["quantize", str(f32), str(tmp_path / "x.gguf"), "IQ2_XXS", "--dry-run"]) == 0
    text = capsys.readouterr()
    assert "attn_v-like" in text.out and "needs --imatrix" in text.err + text.out
