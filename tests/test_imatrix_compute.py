"""`gguforge imatrix` on the HF mock against llama-imatrix on the f32 GGUF of the same mock.

Same text, same chunking: the same entry names, equal token counts (dense; >= 99 % of (tensor, expert)
pairs for MoE, where routing ties may flip), normalised values (sum/count) within 1e-3 relative (median).
Qwen3.5's ssm_out has V-head-reordered input columns (mock: 2 K heads, 4 V heads), so a wrong column
order fails the value check; a small ubatch makes llama-imatrix skip ssm_out (16-row rule per sequence).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import gguforge

pytest.importorskip("torch")
pytest.importorskip("transformers")

WORDS = ("the quick brown fox jumps over a lazy dog while models weigh every matrix and token ; "
         "importance 12 345 6789 , . ! ? ( ) café naïve 你好 世界 Привет").split()


def calibration_text(n_lines: int = 120, seed: int = 3) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="module")
def llama_imatrix():
    from helpers import llama_tool_or_skip
    return llama_tool_or_skip("llama-imatrix")


def run_llama_imatrix(tool: Path, model: Path, text: Path, out: Path, *extra: str) -> None:
    r = subprocess.run([str(tool), "-m", str(model), "-f", str(text), "-o", str(out), "--no-ppl", "-t", "2",
                        *extra], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def compare(ours, ref) -> dict:
    """Figures of `ours` against `ref` (both format.imatrix.Imatrix)."""
    assert sorted(ours.entries) == sorted(ref.entries)
    assert (ours.chunk_count, ours.chunk_size) == (ref.chunk_count, ref.chunk_size)
    pairs = equal = dense = dense_equal = routed = moved = 0
    rel = []
    for name, r in ref.entries.items():
        o = ours.entries[name]
        assert o.sums.shape == r.sums.shape, name
        same = o.counts == r.counts
        pairs, equal = pairs + same.size, equal + int(same.sum())
        if r.counts.size == 1:
            dense, dense_equal = dense + 1, dense_equal + int(same.all())
        else:  # a token routed elsewhere moves one count from one expert to another
            routed, moved = routed + int(r.counts.sum()), moved + int(np.abs(o.counts - r.counts).sum()) // 2
        seen = (o.counts > 0) & (r.counts > 0)
        a = o.sums[seen] / o.counts[seen, None]
        b = r.sums[seen] / r.counts[seen, None]
        rel.append((np.abs(a - b) / np.maximum(np.abs(b), 1e-30)).reshape(-1))
    worst = max(float(np.median(r)) for r in rel)  # per entry: a wrong column order shows in its own entry
    rel = np.concatenate(rel)
    return dict(entries=len(ref.entries), dense=dense, dense_equal=dense_equal, pairs=pairs, equal=equal,
                routed=routed, rerouted=moved,
                median_rel=float(np.median(rel)), worst_entry_median_rel=worst, p99_rel=float(np.quantile(rel, 0.99)))


FUSED = ("--fuse-qkv", "--fuse-gate-up-exps")


@pytest.mark.parametrize("arch,extra", [
    ("qwen3", ()),
    ("qwen3moe", ()),
    ("qwen35", ()),
    ("qwen35", ("--ubatch-size", "256")),  # 32 chunks side by side, 8 tokens each per ubatch: no ssm_out
    ("qwen35moe", FUSED),  # Hub layout (packed experts, MTP block), fused attn_qkv and ffn_gate_up_exps
    ("qwen2", ("--process-output",)),  # q/k/v biases; output.weight recorded too
    ("qwen2moe", ()),  # shared expert and its gate
    ("qwen3vl", ()),  # a model that exists only inside its vision-language wrapper
    ("mixtral", ()),  # block_sparse_moe experts under transformers' in-memory names
])
def test_gguforge_imatrix_matches_llama_imatrix(mock_model, llama_imatrix, tmp_path, arch, extra):
    from gguforge.format.imatrix import read_imatrix

    model = mock_model(arch, layout="hub") if extra == FUSED else mock_model(arch)
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text())
    f32 = tmp_path / "f32.gguf"
    fuse = list(extra) if extra == FUSED else []
    r = gguforge("convert-hf", str(model), "--outtype", "f32", "--outfile", str(f32), "-q", *fuse)
    assert r.returncode == 0, r.stderr
    ref_out, our_out = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    # the same llama-imatrix flags, but the converter's --fuse-* (already in the f32 file)
    llama_args = [] if extra == FUSED else ["-ub" if a == "--ubatch-size" else a for a in extra]
    run_llama_imatrix(llama_imatrix, f32, text, ref_out, "-c", "64", *llama_args)
    r = gguforge("imatrix", str(model), "-f", str(text), "-c", "64", "-o", str(our_out), "-t", "2", "-q", *extra)
    assert r.returncode == 0, r.stderr
    ours, ref = read_imatrix(our_out), read_imatrix(ref_out)
    figures = compare(ours, ref)
    print(arch, extra, figures)
    assert figures["dense_equal"] == figures["dense"]
    # MoE: routing ties may flip between torch and ggml. One flipped token changes the counts of two
    # experts in three tensors (6 of the 34 (tensor, expert) pairs of this mock), so the criterion is on
    # routing decisions: >= 99 % of the routed (token, expert) assignments agree.
    assert figures["rerouted"] <= 0.01 * max(figures["routed"], 1)
    if arch in ("qwen3", "qwen2", "qwen3vl"):
        assert figures["equal"] == figures["pairs"]
    assert ("output.weight" in ours.entries) == ("output.weight" in ref.entries) == ("--process-output" in extra)
    assert figures["median_rel"] < 1e-3 and figures["worst_entry_median_rel"] < 1e-3
    if arch == "qwen35":
        assert ("blk.0.ssm_out.weight" in ref.entries) == (not extra)  # the 16-rows-per-sequence rule
    if fuse:
        assert {"blk.1.attn_qkv.weight", "blk.0.ffn_gate_up_exps.weight"} <= set(ours.entries)
    assert ours.datasets == [str(text)] and ref.datasets == [str(text)]


def test_column_order_follows_the_conversion(mock_model):
    """Qwen3.5 ssm_out: GGUF column j reads HF out_proj input column tiled_v_order(...)[j], not j."""
    from gguforge.archs.options import ConvertOptions
    from gguforge.archs.rules import tiled_v_order
    from gguforge.checkpoint.read import open_checkpoint
    from gguforge.imatrix.compute import plan_targets

    _, targets = plan_targets(open_checkpoint(mock_model("qwen35")), ConvertOptions(), False)
    by_name = {t.gguf: t for t in targets}
    ssm_out = by_name["blk.0.ssm_out.weight"]
    assert ssm_out.per_sequence and ssm_out.key == "model.layers.0.linear_attn.out_proj.weight"
    assert list(ssm_out.columns) == list(tiled_v_order(2, 4, 16))
    assert not any(t.gguf.endswith(("ssm_conv1d.weight", "token_embd.weight")) for t in targets)
    assert "output.weight" not in by_name  # only with --process-output


def test_experts_share_inputs_and_count_per_expert(mock_model):
    from gguforge.archs.options import ConvertOptions
    from gguforge.checkpoint.read import open_checkpoint
    from gguforge.imatrix.compute import plan_targets

    _, targets = plan_targets(open_checkpoint(mock_model("qwen3moe")), ConvertOptions(), True)
    by_name = {t.gguf: t for t in targets}
    assert by_name["blk.0.ffn_gate_exps.weight"].key == by_name["blk.0.ffn_up_exps.weight"].key
    assert by_name["blk.0.ffn_down_exps.weight"].key.endswith(":down")
    assert by_name["blk.0.ffn_gate_exps.weight"].n_expert == 4
    assert by_name["output.weight"].key == "lm_head.weight"


def test_ubatch_lengths_follow_llama_batch_splitting():
    from gguforge.imatrix.compute import ubatch_lengths
    # one sequence of 1000 tokens in 512-token ubatches: 512 then 488
    assert list(np.unique(ubatch_lengths(1000, 1, 2048, 512), return_counts=True)[1]) == [488, 512]
    # 32 sequences side by side: 16 tokens of each per ubatch
    assert set(ubatch_lengths(64, 32, 2048, 512)) == {16}
    # longer than the batch: 3000 = 2048 + 952; ubatches 512 x4, then 512 + 440
    per = ubatch_lengths(3000, 1, 2048, 512)
    assert per[0] == 512 and per[2047] == 512 and per[2048] == 512 and per[-1] == 440


def test_sixteen_bit_run_and_auto_device(mock_model, tmp_path):
    """--dtype bfloat16 is what a GPU run of a bf16 checkpoint uses: same entries and counts, values within
    bf16 activation noise of the float32 run (and far from a wrong column order); --device auto on a
    machine without CUDA is the CPU run, value for value."""
    import torch
    from gguforge.format.imatrix import importance, read_imatrix
    model = mock_model("qwen3moe", dtype="bfloat16")
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text(60))
    runs = {"f32": ["--dtype", "float32", "--device", "cpu"], "bf16": ["--dtype", "bfloat16", "--device", "cpu"],
            "auto": ["--device", "auto"]}
    for name, args in runs.items():
        r = gguforge("imatrix", str(model), "-f", str(text), "-c", "64", "-o", str(tmp_path / f"{name}.gguf"), "-q", *args)
        assert r.returncode == 0, r.stderr
    f32, bf16 = read_imatrix(tmp_path / "f32.gguf"), read_imatrix(tmp_path / "bf16.gguf")
    assert sorted(f32.entries) == sorted(bf16.entries)
    wa, wb = importance(f32), importance(bf16)
    for name in f32.entries:
        if "exps" not in name:  # routing may differ in bf16
            assert np.array_equal(f32.entries[name].counts, bf16.entries[name].counts), name
            rel = np.abs(wa[name] - wb[name]) / np.maximum(np.abs(wa[name]), 1e-30)
            assert np.median(rel) < 5e-2, (name, float(np.median(rel)))
    assert any(not np.array_equal(wa[n], wb[n]) for n in f32.entries), "--dtype bfloat16 ran in float32"
    if not torch.cuda.is_available():
        auto = read_imatrix(tmp_path / "auto.gguf")
        assert all(np.array_equal(auto.entries[n].sums, f32.entries[n].sums) for n in f32.entries)


def test_too_little_text_is_one_clear_error(mock_model, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("only a few words")
    out = tmp_path / "im.gguf"
    r = gguforge("imatrix", str(mock_model("qwen3")), "-f", str(text), "-c", "64", "-o", str(out))
    assert r.returncode == 2 and "needs at least 128" in r.stderr, r.stderr
    assert not out.exists()


def test_convert_hf_imatrix_text_equals_imatrix_then_convert(mock_model, tmp_path):
    """--imatrix-text computes in memory what `gguforge imatrix` writes; the Q4_K_M file is the one
    --imatrix FILE gives, but for quantize.imatrix.file naming the text."""
    from helpers import gguf_fields, read_gguf

    model = mock_model("qwen3moe", size="q256")
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text(60))
    im, a, b = tmp_path / "im.gguf", tmp_path / "a.gguf", tmp_path / "b.gguf"
    r = gguforge("imatrix", str(model), "-f", str(text), "-c", "64", "-o", str(im), "-q")
    assert r.returncode == 0, r.stderr
    r = gguforge("convert-hf", str(model), "--outtype", "Q4_K_M", "--imatrix", str(im), "--outfile", str(a), "-q")
    assert r.returncode == 0, r.stderr
    r = gguforge("convert-hf", str(model), "--outtype", "Q4_K_M", "--imatrix-text", str(text), "--imatrix-ctx", "64",
                 "--outfile", str(b), "-q")
    assert r.returncode == 0, r.stderr
    ta, tb = read_gguf(a), read_gguf(b)
    assert list(ta) == list(tb)
    for name in ta:
        assert bytes(ta[name].data) == bytes(tb[name].data), name
    fa, fb = gguf_fields(a), gguf_fields(b)
    assert fa.pop("quantize.imatrix.file") == str(im) and fb.pop("quantize.imatrix.file") == str(text)
    assert fa == fb and fb["quantize.imatrix.dataset"] == str(text)
    # and the imatrix changed the quantized bytes (the same conversion without it differs)
    c = tmp_path / "c.gguf"
    assert gguforge("convert-hf", str(model), "--outtype", "Q4_K_M", "--outfile", str(c), "-q").returncode == 0
    assert bytes(read_gguf(c)["blk.0.ffn_down_exps.weight"].data) != bytes(tb["blk.0.ffn_down_exps.weight"].data)


@pytest.mark.parametrize("args,message", [
    (["--outtype", "f16"], "needs a quantize preset"),
    (["--outtype", "Q4_K_M", "--imatrix", "x.gguf"], "cannot be combined"),
    (["--outtype", "Q4_K_M", "--imatrix-chunks", "0"], "--imatrix-chunks"),
])
def test_convert_hf_imatrix_text_refusals(mock_model, tmp_path, args, message):
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text(60))
    out = tmp_path / "o.gguf"
    r = gguforge("convert-hf", str(mock_model("qwen3")), "--imatrix-text", str(text), "--outfile", str(out), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--device", "cuda"], "no CUDA device"),
    (["--device", "tpu"], "--device must be cpu, cuda or auto"),
    (["--output-format", "bin"], "--output-format must be gguf or dat"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["-o", "no/such/dir/im.gguf"], "does not exist"),
    (["-f", "missing.txt"], "missing.txt: no such file"),
    (["--chunks", "0"], "--chunks"),
])
def test_imatrix_refusals(mock_model, tmp_path, args, message):
    import torch
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text(60))
    out = tmp_path / "im.gguf"
    argv = ["imatrix", str(mock_model("qwen3")), "-f", str(text), "-o", str(out), "-c", "64", *args]
    r = gguforge(*argv, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not out.exists() and not (tmp_path / "imatrix.gguf").exists()


def test_dat_output_reads_back_like_llama_imatrix_dat(mock_model, tmp_path):
    """--output-format dat: the legacy file; its normalised values equal the GGUF's (per expert)."""
    from gguforge.format.imatrix import importance, read_imatrix
    text = tmp_path / "calib.txt"
    text.write_text(calibration_text(60))
    model = mock_model("qwen3moe")
    for fmt in ("gguf", "dat"):
        r = gguforge("imatrix", str(model), "-f", str(text), "-c", "64", "-o", str(tmp_path / f"im.{fmt}"),
                     "--output-format", fmt, "-q")
        assert r.returncode == 0, r.stderr
    g, d = read_imatrix(tmp_path / "im.gguf"), read_imatrix(tmp_path / "im.dat")
    assert d.legacy and sorted(d.entries) == sorted(g.entries) and d.chunk_count == g.chunk_count
    wg, wd = importance(g), importance(d)
    for name in wg:
        np.testing.assert_allclose(wd[name], wg[name], rtol=1e-5)


def test_library_compute_imatrix_feeds_convert_hf(mock_model, tmp_path):
    import gguforge
    from gguforge.format.imatrix import read_imatrix
    from gguforge.quantize.imatrix import ImatrixOptions

    text = tmp_path / "calib.txt"
    text.write_text(calibration_text(60))
    model = mock_model("qwen3")
    path = gguforge.compute_imatrix(model, text, tmp_path / "im.gguf", chunk_size=64)
    im = gguforge.compute_imatrix(model, text, None, chunk_size=64)
    on_disk = read_imatrix(path)
    assert sorted(im.entries) == sorted(on_disk.entries) and im.chunk_count == on_disk.chunk_count
    with pytest.raises(gguforge.UserError, match="already exists"):
        gguforge.compute_imatrix(model, text, path, chunk_size=64)
    out = gguforge.convert_hf(model, tmp_path / "q.gguf", outtype="Q4_K_M",
                              imatrix=ImatrixOptions(str(text), computed=im))
    assert out.is_file()
