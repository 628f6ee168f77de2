"""`gguforge quantize --imatrix` and `convert-hf --outtype PRESET --imatrix` against llama.cpp's own tools.

llama-imatrix computes the importance matrix of a mock's f32 GGUF over a short calibration text (the
mock's own tokenizer); llama-quantize --imatrix then writes the reference. Both programs are built with
cmake from the pinned llama.cpp tree (tests/helpers.py llama_tool; the Python binding cannot pass an
imatrix). Mocks: an 8-layer dense Qwen3 (so the n/8 ffn_down rules that test has_imatrix fire) and a
2-layer Qwen3-MoE with 8 experts (per-expert slices), both with 256-wide rows.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gguforge.cli import main
from gguforge.format.imatrix import Imatrix, ImatrixEntry, importance, read_imatrix, write_imatrix
from helpers import llama_tool, small_row_chunks

pytest.importorskip("torch")  # the mocks are built with transformers

ALL_PRESETS = ("Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M",
               "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "Q8_0")
# The dense mock has 8 layers: Q4_0/Q5_0 (ffn_down of layer 0 -> Q4_1/Q5_1 only with an imatrix) and
# IQ4_NL/IQ4_XS (layer 0 -> Q5_K only without one) test has_imatrix there; the rest runs on the MoE mock.
DENSE_PRESETS = ("Q2_K_S", "Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS", "Q4_K_M", "Q3_K_M", "Q6_K")
CHUNK = 64
IMATRIX_ARGS = ("-c", str(CHUNK), "-b", str(CHUNK), "--chunks", "6", "-t", "2", "--no-ppl", "--seed", "1")


def calibration_text() -> str:
    import make_mocks
    return "\n\n".join(make_mocks.CORPUS * 3)


def run(cmd: list, what: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def tools():
    return {name: llama_tool(name) for name in ("llama-quantize", "llama-imatrix")}


class Mock:
    def __init__(self, checkpoint: Path, f32: Path, imatrix: Path, dat: Path):
        self.checkpoint, self.f32, self.imatrix, self.dat = checkpoint, f32, imatrix, dat


def build(mock_model, tmp_path_factory, tools, name: str, size: str = "q256", **kw) -> Mock:
    src = mock_model(**kw, size=size)
    root = tmp_path_factory.mktemp(f"imatrix-{name}")
    f32 = root / "model-f32.gguf"
    assert main(["convert-hf", str(src), "--outfile", str(f32), "--outtype", "f32", "-q"]) == 0
    text = root / "calibration.txt"
    text.write_text(calibration_text(), encoding="utf-8")
    im, dat = root / "imatrix.gguf", root / "imatrix.dat"
    for out, fmt in ((im, "gguf"), (dat, "dat")):
        run([tools["llama-imatrix"], "-m", f32, "-f", text, "-o", out, "--output-format", fmt, *IMATRIX_ARGS],
            f"llama-imatrix ({fmt})")
    return Mock(src, f32, im, dat)


@pytest.fixture(scope="module")
def moe(mock_model, tmp_path_factory, tools):
    return build(mock_model, tmp_path_factory, tools, "moe", arch="qwen3moe", num_experts=8)


@pytest.fixture(scope="module")
def narrow(mock_model, tmp_path_factory, tools):
    """A hybrid Qwen3.5-MoE with 64/32-wide rows: every K-quant falls back to a 32-element type, which
    llama-quantize then quantizes with the imatrix (row-level sigma for Q4_0..Q5_1, IQ4_NL)."""
    return build(mock_model, tmp_path_factory, tools, "narrow", size="tiny", arch="qwen35moe", num_experts=8)


@pytest.fixture(scope="module")
def dense(mock_model, tmp_path_factory, tools):
    return build(mock_model, tmp_path_factory, tools, "dense", arch="qwen3", num_hidden_layers=8)


def llama_quantize(tools, src: Path, dst: Path, preset: str, *options) -> None:
    run([tools["llama-quantize"], *options, src, dst, preset, "2"], f"llama-quantize {preset}")


def ours(src: Path, dst: Path, preset: str, *options) -> None:
    assert main(["quantize", str(src), str(dst), preset, "-q", "--threads", "2", *map(str, options)]) == 0


def assert_same_file(a: Path, b: Path) -> None:
    if a.read_bytes() == b.read_bytes():
        return
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    assert list(ta) == list(tb), "tensor order differs"
    types = {n: (T(ta[n].tensor_type).name, T(tb[n].tensor_type).name) for n in tb
             if ta[n].tensor_type != tb[n].tensor_type}
    assert not types, f"tensor types differ (ours, llama-quantize): {types}"
    data = [n for n in tb if ta[n].data.tobytes() != tb[n].data.tobytes()]
    assert not data, f"tensor bytes differ: {data}"
    kv = lambda r: [(k, f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")]  # noqa: E731
    assert kv(ra) == kv(rb)
    pytest.fail("the files differ outside tensor data and metadata")


def imatrix_uses(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: (f.types, f.contents()) for k, f in r.fields.items() if k.startswith("quantize.imatrix.")}


# ---------------------------------------------------------------------------------------------
# Files llama-imatrix wrote


def test_reads_and_rewrites_llama_imatrix_files(moe, dense, tmp_path):
    for mock in (moe, dense):
        im = read_imatrix(mock.imatrix)
        assert not im.legacy and im.chunk_size == CHUNK and im.chunk_count == 6
        assert im.datasets == [str(mock.imatrix.parent / "calibration.txt")]
        assert all(n.startswith("blk.") for n in im.entries) and "token_embd.weight" not in im.entries
        write_imatrix(tmp_path / "again.gguf", im)
        assert (tmp_path / "again.gguf").read_bytes() == mock.imatrix.read_bytes()
        # the legacy file of the same run, from the GGUF one
        write_imatrix(tmp_path / "again.dat", im, "dat")
        assert (tmp_path / "again.dat").read_bytes() == mock.dat.read_bytes()
        legacy = read_imatrix(mock.dat)
        assert legacy.legacy and legacy.chunk_count == 6
        a, b = importance(im), importance(legacy)
        assert sorted(b) == sorted(n for n, e in im.entries.items() if e.counts.any())
        for name in b:
            seen = np.repeat(im.entries[name].counts > 0, im.entries[name].sums.shape[1])
            np.testing.assert_allclose(a[name][seen], b[name][seen], rtol=1e-5)
    experts = read_imatrix(moe.imatrix).entries["blk.0.ffn_down_exps.weight"]
    assert experts.sums.shape == (8, 256) and experts.counts.shape == (8,)


# ---------------------------------------------------------------------------------------------
# quantize --imatrix == llama-quantize --imatrix


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_moe_presets_match_llama_quantize(moe, tools, preset, tmp_path):
    mine, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    ours(moe.f32, mine, preset, "--imatrix", moe.imatrix)
    llama_quantize(tools, moe.f32, theirs, preset, "--imatrix", moe.imatrix)
    assert_same_file(mine, theirs)


@pytest.mark.parametrize("preset", ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "Q5_K_S", "IQ4_XS", "Q4_1"))
def test_narrow_rows_fall_back_with_the_imatrix_like_llama_quantize(narrow, tools, preset, tmp_path):
    mine, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    ours(narrow.f32, mine, preset, "--imatrix", narrow.imatrix)
    llama_quantize(tools, narrow.f32, theirs, preset, "--imatrix", narrow.imatrix)
    assert_same_file(mine, theirs)
    types = {T(t.tensor_type) for t in gguf.GGUFReader(mine).tensors}
    assert types & {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL}, "no fallback type was exercised"


@pytest.mark.parametrize("preset", DENSE_PRESETS)
def test_dense_presets_match_llama_quantize(dense, tools, preset, tmp_path):
    mine, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    ours(dense.f32, mine, preset, "--imatrix", dense.imatrix)
    llama_quantize(tools, dense.f32, theirs, preset, "--imatrix", dense.imatrix)
    assert_same_file(mine, theirs)
    if preset in ("Q4_0", "IQ4_NL"):  # the has_imatrix rules fired: layer 0's ffn_down differs from plain
        plain = tmp_path / "plain.gguf"
        ours(dense.f32, plain, preset)
        t = lambda p: {x.name: T(x.tensor_type) for x in gguf.GGUFReader(p).tensors}  # noqa: E731
        assert t(mine)["blk.0.ffn_down.weight"] != t(plain)["blk.0.ffn_down.weight"]


def test_the_imatrix_changes_the_bytes(moe, tmp_path):
    """The byte-identity tests above would pass if both sides ignored the imatrix: they do not."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    ours(moe.f32, a, "Q4_K_M", "--imatrix", moe.imatrix)
    ours(moe.f32, b, "Q4_K_M")
    ta, tb = ({t.name: t.data.tobytes() for t in gguf.GGUFReader(p).tensors} for p in (a, b))
    assert ta["blk.0.ffn_down_exps.weight"] != tb["blk.0.ffn_down_exps.weight"]
    assert ta["blk.1.attn_q.weight"] != tb["blk.1.attn_q.weight"]
    keys = imatrix_uses(a)
    assert list(keys) == ["quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                          "quantize.imatrix.chunks_count"]
    assert keys["quantize.imatrix.file"][1] == str(moe.imatrix)
    assert keys["quantize.imatrix.entries_count"] == ([gguf.GGUFValueType.UINT32], len(read_imatrix(moe.imatrix).entries))
    assert keys["quantize.imatrix.chunks_count"] == ([gguf.GGUFValueType.UINT32], 6)
    assert not imatrix_uses(b)


@pytest.mark.parametrize("preset", ("Q4_K_M", "IQ4_XS", "Q2_K_S"))
def test_dat_imatrix_matches_llama_quantize(moe, dense, tools, preset, tmp_path):
    for mock in (moe, dense) if preset == "Q4_K_M" else (moe,):
        mine, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
        ours(mock.f32, mine, preset, "--imatrix", mock.dat, "--force")
        llama_quantize(tools, mock.f32, theirs, preset, "--imatrix", mock.dat)
        assert_same_file(mine, theirs)


@pytest.mark.parametrize("options", [("--include-weights", "attn"), ("--exclude-weights", "ffn_down"),
                                     ("--include-weights", "blk.1.", "--include-weights", "ffn_gate"),
                                     ("--exclude-weights", "blk.")],
                         ids=["include", "exclude", "include-twice", "exclude-all"])
def test_include_exclude_match_llama_quantize(moe, tools, options, tmp_path):
    mine, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    ours(moe.f32, mine, "Q4_K_M", "--imatrix", moe.imatrix, *options)
    llama_quantize(tools, moe.f32, theirs, "Q4_K_M", "--imatrix", moe.imatrix, *options)
    assert_same_file(mine, theirs)
    if options[-1] == "blk.":  # nothing left: no imatrix at all, no keys
        assert not imatrix_uses(mine)


def test_long_imatrix_path_is_cut_to_127_bytes(moe, tools, tmp_path):
    where = tmp_path / ("d" * 60) / ("e" * 60)
    where.mkdir(parents=True)
    im = where / "imatrix-with-a-long-name.gguf"
    shutil.copy(moe.imatrix, im)
    mine, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    ours(moe.f32, mine, "Q6_K", "--imatrix", im)
    llama_quantize(tools, moe.f32, theirs, "Q6_K", "--imatrix", im)
    assert_same_file(mine, theirs)
    assert imatrix_uses(mine)["quantize.imatrix.file"][1] == str(im)[:127]


# ---------------------------------------------------------------------------------------------
# Entries missing, experts never routed (edited files), the coverage report


def edited(mock: Mock, path: Path, drop: str, silence: tuple[str, int]) -> Path:
    """The mock's imatrix without entry `drop` and with expert `silence[1]` of entry `silence[0]` unseen."""
    im = read_imatrix(mock.imatrix)
    del im.entries[drop]
    e = im.entries[silence[0]]
    e.counts[silence[1]] = 0
    e.sums[silence[1]] = 0
    write_imatrix(path, im)
    return path


def test_missing_entries_and_unrouted_experts(moe, tools, tmp_path, capsys):
    im = edited(moe, tmp_path / "holes.gguf", "blk.1.attn_v.weight", ("blk.0.ffn_up_exps.weight", 3))
    mine, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    for preset in ("Q4_K_M", "Q3_K_S"):
        # did not find weights -> quantized without; an expert with count 0 -> weights 1.0
        assert main(["quantize", str(moe.f32), str(mine), preset, "--threads", "2", "--imatrix", str(im),
                     "--force"]) == 0
        llama_quantize(tools, moe.f32, theirs, preset, "--imatrix", im)
        assert_same_file(mine, theirs)
        theirs.unlink()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 2  # one line per run
    assert "lacks data for 2 of" in warnings[0] and "blk.1.attn_v.weight" in warnings[0]
    assert "experts never routed" in warnings[0] and "blk.0.ffn_up_exps.weight 7/8" in warnings[0]

    out = tmp_path / "refused.gguf"
    assert main(["quantize", str(moe.f32), str(out), "Q4_K_M", "--imatrix", str(im), "--imatrix-missing",
                 "error"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the importance matrix lacks data for 2 of") and not out.exists()


def test_dry_run_shows_which_tensors_get_data(moe, tmp_path, capsys):
    im = edited(moe, tmp_path / "holes.gguf", "blk.1.attn_v.weight", ("blk.0.ffn_up_exps.weight", 3))
    assert main(["quantize", str(moe.f32), str(tmp_path / "x.gguf"), "Q4_K_M", "--imatrix", str(im),
                 "--dry-run"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith(("blk", "tok", "out"))}
    assert "imatrix 8/8" in lines["blk.0.ffn_down_exps.weight"]
    assert "imatrix 7/8" in lines["blk.0.ffn_up_exps.weight"]
    assert "no imatrix entry" in lines["blk.1.attn_v.weight"]
    assert lines["blk.1.attn_q.weight"].endswith("imatrix")
    assert "not collected" in lines["token_embd.weight"]
    assert "imatrix" not in lines["blk.0.attn_norm.weight"]
    assert not (tmp_path / "x.gguf").exists()


def test_q2_k_s_needs_an_imatrix(moe, tools, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(moe.f32), str(out), "Q2_K_S"]) == 2
    assert "without an importance matrix" in capsys.readouterr().err and not out.exists()
    # an imatrix whose entries for some Q2_K tensors are filtered out: llama-quantize throws too
    assert main(["quantize", str(moe.f32), str(out), "Q2_K_S", "--imatrix", str(moe.imatrix),
                 "--exclude-weights", "ffn_gate"]) == 2
    err = capsys.readouterr().err
    assert "missing importance matrix for tensor blk.0.ffn_gate_exps.weight" in err and not out.exists()
    r = subprocess.run([str(tools["llama-quantize"]), "--imatrix", str(moe.imatrix), "--exclude-weights",
                        "ffn_gate", str(moe.f32), str(tmp_path / "llama.gguf"), "Q2_K_S", "2"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Missing importance matrix" in r.stdout + r.stderr
    # a dry run names the problem but plans
    assert main(["quantize", str(moe.f32), str(out), "Q2_K_S", "--dry-run"]) == 0
    assert "without an importance matrix" in capsys.readouterr().err


def test_imatrix_of_another_shape_is_refused(moe, tmp_path, capsys):
    """An entry that does not hold ne0 * n_expert values (e.g. an imatrix of a 4-expert model): an error,
    as llama-quantize throws, not a silent fallback."""
    im = read_imatrix(moe.imatrix)
    e = im.entries["blk.1.ffn_down_exps.weight"]
    im.entries["blk.1.ffn_down_exps.weight"] = ImatrixEntry(e.sums[:4].copy(), e.counts[:4].copy())
    write_imatrix(tmp_path / "four.gguf", im)
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(moe.f32), str(out), "Q4_K_M", "--imatrix", str(tmp_path / "four.gguf")]) == 2
    err = capsys.readouterr().err
    assert "imatrix size 1024 is different from tensor size 2048 for blk.1.ffn_down_exps.weight" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# One pass: convert-hf --outtype PRESET --imatrix


def tensors(path: Path) -> dict:
    return {t.name: (T(t.tensor_type), t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    wrong = {n: (ta[n][0].name, tb[n][0].name) for n in tb if ta[n][0] != tb[n][0]}
    assert not wrong, f"tensor types differ (ours, llama-quantize): {wrong}"
    assert not [n for n in tb if ta[n][1] != tb[n][1]], "tensor bytes differ"
    assert imatrix_uses(a) == imatrix_uses(b) and imatrix_uses(a)
    keys = [k for k in gguf.GGUFReader(a).fields if not k.startswith("GGUF.")]
    assert keys[-len(imatrix_uses(a)):] == list(imatrix_uses(a))  # last, as llama-quantize writes them


@pytest.mark.parametrize("preset", ("Q4_K_M", "Q2_K_S", "IQ4_XS"))
def test_one_pass_from_f32_checkpoint(moe, tools, preset, tmp_path):
    mine, theirs = tmp_path / "one-pass.gguf", tmp_path / "llama.gguf"
    assert main(["convert-hf", str(moe.checkpoint), "--outfile", str(mine), "--outtype", preset, "--imatrix",
                 str(moe.imatrix), "-q"]) == 0
    llama_quantize(tools, moe.f32, theirs, preset, "--imatrix", moe.imatrix)
    assert_same_tensors(mine, theirs)


@pytest.mark.parametrize("preset", ("Q4_K_M", "Q4_0"))
def test_one_pass_from_bf16_checkpoint(dense, mock_model, tools, preset, tmp_path):
    src = mock_model("qwen3", size="q256", num_hidden_layers=8, dtype="bfloat16")
    bf16, mine, theirs = tmp_path / "bf16.gguf", tmp_path / "one-pass.gguf", tmp_path / "llama.gguf"
    assert main(["convert-hf", str(src), "--outfile", str(bf16), "--outtype", "bf16", "-q"]) == 0
    assert main(["convert-hf", str(src), "--outfile", str(mine), "--outtype", preset, "--imatrix",
                 str(dense.imatrix), "-q"]) == 0
    llama_quantize(tools, bf16, theirs, preset, "--imatrix", dense.imatrix)
    assert_same_tensors(mine, theirs)


def test_one_pass_refusals(moe, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert main(["convert-hf", str(moe.checkpoint), "--outfile", str(out), "--outtype", "q2_k_s"]) == 2
    assert "without an importance matrix" in capsys.readouterr().err and not out.exists()
    # as quantize --dry-run: the plan is shown, the problem named
    assert main(["convert-hf", str(moe.checkpoint), "--outfile", str(out), "--outtype", "q2_k_s", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "without an importance matrix" in captured.err and "Q2_K" in captured.out and not out.exists()
    # several types in one pass: refused before anything is written
    assert main(["convert-hf", str(moe.checkpoint), "--outfile", str(tmp_path / "o-{ftype}.gguf"),
                 "--outtype", "q8_0,q2_k_s"]) == 2
    assert "without an importance matrix" in capsys.readouterr().err and not list(tmp_path.glob("o-*"))
    assert main(["convert-hf", str(moe.checkpoint), "--outfile", str(out), "--outtype", "f16", "--imatrix",
                 str(moe.imatrix)]) == 2
    assert "needs a quantize preset" in capsys.readouterr().err and not out.exists()


def test_mtp_layers_are_named_in_the_report(tmp_path, capsys):
    """llama-imatrix never runs MTP layers: their tensors are reported as such (a synthetic model, as no
    llama.cpp tool computes an imatrix for them)."""
    path = tmp_path / "mtp.gguf"
    w = gguf.GGUFWriter(str(path), "qwen35")
    w.add_block_count(2)
    w.add_uint32("qwen35.nextn_predict_layers", 1)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    rng = np.random.default_rng(1)
    for i in range(2):
        w.add_tensor(f"blk.{i}.ffn_up.weight", rng.standard_normal((64, 256)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = tmp_path / "im.gguf"
    write_imatrix(im, Imatrix({"blk.0.ffn_up.weight": ImatrixEntry(np.ones((1, 256), np.float32),
                                                                   np.array([5], np.float32))}, ["t"], 1, 64))
    assert main(["quantize", str(path), str(tmp_path / "o.gguf"), "Q4_K_S", "--imatrix", str(im)]) == 0
    err = capsys.readouterr().err
    assert "lacks data for 1 of 2 quantized tensors: 1 in MTP layers (e.g. blk.1.ffn_up.weight)" in err


def test_library_api_takes_an_imatrix(moe, tmp_path):
    import gguforge

    cli, lib, one_pass = tmp_path / "cli.gguf", tmp_path / "lib.gguf", tmp_path / "one.gguf"
    ours(moe.f32, cli, "Q4_K_S", "--imatrix", moe.imatrix, "--exclude-weights", "attn_k")
    gguforge.quantize(moe.f32, lib, "Q4_K_S", imatrix=str(moe.imatrix), exclude_weights=["attn_k"], threads=2)
    assert lib.read_bytes() == cli.read_bytes()
    gguforge.convert_hf(moe.checkpoint, one_pass, outtype="Q4_K_S", imatrix=str(moe.imatrix),
                        exclude_weights=["attn_k"])
    assert tensors(one_pass) == tensors(cli)
    with pytest.raises(gguforge.UserError):
        gguforge.quantize(moe.f32, tmp_path / "x.gguf", "Q4_K_S", imatrix=str(moe.imatrix),
                          include_weights=["a"], exclude_weights=["b"])


def test_prune_layers_look_up_the_original_blocks(dense, tools, tmp_path):
    """With --prune-layers the renumbered blk.N takes the imatrix entry of its original block
    (llama-quant.cpp remap_imatrix)."""
    mine, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    ours(dense.f32, mine, "Q4_K_M", "--imatrix", dense.imatrix, "--prune-layers", "2,5")
    llama_quantize(tools, dense.f32, theirs, "Q4_K_M", "--imatrix", dense.imatrix, "--prune-layers", "2,5")
    assert_same_file(mine, theirs)


def test_many_presets_in_one_pass_with_an_imatrix(moe, tools, tmp_path):
    """quantize IN 'OUT-{ftype}.gguf' A,B --imatrix: each output equals llama-quantize --imatrix of its own.
    A float type first: it looks up no importance data, so an output given another's lookup shows."""
    assert main(["quantize", str(moe.f32), str(tmp_path / "m-{ftype}.gguf"), "F16,Q4_K_M,Q2_K_S,IQ4_XS", "-q",
                 "--threads", "2", "--imatrix", str(moe.imatrix)]) == 0
    for preset in ("F16", "Q4_K_M", "Q2_K_S", "IQ4_XS"):
        theirs = tmp_path / f"llama-{preset}.gguf"
        llama_quantize(tools, moe.f32, theirs, preset, "--imatrix", moe.imatrix)
        assert_same_file(tmp_path / f"m-{preset.lower()}.gguf", theirs)


# Row chunks of 3 KB: 3 rows of 256 values, so chunks start inside experts (64-row slices) and cross their
# boundaries; convert-hf cuts the stacked experts one per chunk. The bytes must not change.
SMALL_CHUNK_BYTES = 3 << 10


@pytest.mark.parametrize("preset", ("Q4_K_M", "Q4_0", "IQ4_XS"))
def test_small_row_chunks_match_unchunked_and_llama_quantize(moe, tools, preset, tmp_path, monkeypatch):
    unchunked, theirs = tmp_path / "unchunked.gguf", tmp_path / "llama.gguf"
    ours(moe.f32, unchunked, preset, "--imatrix", moe.imatrix)
    llama_quantize(tools, moe.f32, theirs, preset, "--imatrix", moe.imatrix)
    small_row_chunks(monkeypatch, SMALL_CHUNK_BYTES)
    chunked, one_pass = tmp_path / "chunked.gguf", tmp_path / "one-pass.gguf"
    ours(moe.f32, chunked, preset, "--imatrix", moe.imatrix)
    assert main(["convert-hf", str(moe.checkpoint), "--outfile", str(one_pass), "--outtype", preset, "--imatrix",
                 str(moe.imatrix), "-q", "--threads", "2"]) == 0
    assert chunked.read_bytes() == unchunked.read_bytes()
    assert_same_file(chunked, theirs)
    assert_same_tensors(one_pass, theirs)  # (the converter writes its own metadata)
