"""`gguforge eval` against llama-perplexity built from the same llama.cpp tree.

- GGUF base: every statistic of llama-perplexity's final printout (KLD pass over its own
  --kl-divergence-base file), formatted as it prints it, equals ours line for line, on two mocks x three
  quant types, a vocabulary that adds BOS, and the trained model (peaked distributions: the -16 cut-off). The text is cut into 5 chunks of 128 tokens (63 scored each), n_batch 256 decodes two
  chunks per batch as llama-perplexity does.
- HF base (torch float32) against the same GGUF base: the F32 GGUF's KLD is at the noise floor, Q4_K_M's
  mean KLD within 2 %.
- A model with learned structure (scripts/trained_mock.py): Q8_0 < Q6_K < Q4_K_M < Q3_K_M < Q2_K.
- The compact base store: reused with --base-file (same figures), refused for another text or -c, and
  smaller than llama-perplexity's file.
- Reports and bad input through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import gguforge as run_cli

pytest.importorskip("llama_cpp")

CTX = 128
CHUNKS = 5  # 315 scored tokens: an odd count (the median is the middle value)
BATCH = 256  # two chunks per llama_decode, as llama-perplexity -b 256 -c 128
ARCH_CHUNKS = {"qwen3": CHUNKS, "qwen2moe": 4, "qwen3-bos": CHUNKS}  # 4: 252, an even count (median of two)
ARCH_BATCH = {"qwen3": BATCH, "qwen2moe": BATCH, "qwen3-bos": 64}  # 64: each chunk in two decodes


@pytest.fixture(scope="module")
def perplexity_tool():
    from helpers import llama_tool_or_skip
    return llama_tool_or_skip("llama-perplexity")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    import trained_mock
    p = tmp_path_factory.mktemp("eval") / "eval.txt"
    p.write_text(trained_mock.structured_text(trained_mock.EVAL_SEED, 120), encoding="utf-8")
    return p


def _ggufs(mock: Path, out: Path, types) -> dict[str, Path]:
    import gguforge
    out.mkdir(parents=True, exist_ok=True)
    files = {"F32": out / "m-F32.gguf"}
    if not files["F32"].exists():
        gguforge.convert_hf(mock, files["F32"], outtype="f32")
    for t in types:
        files[t] = out / f"m-{t}.gguf"
        if not files[t].exists():
            gguforge.quantize(files["F32"], files[t], t)
    return files


@pytest.fixture(scope="module")
def mocks(mock_model, tmp_path_factory):
    pytest.importorskip("torch")
    import gguforge
    root = tmp_path_factory.mktemp("eval-mocks")
    out = {arch: (mock_model(arch, full_precision=True),
                  _ggufs(mock_model(arch, full_precision=True), root / arch, ("Q8_0", "Q4_K_M", "Q2_K")))
           for arch in ("qwen3", "qwen2moe")}
    # a vocabulary that adds BOS (llama-perplexity puts it first in every chunk), by --override-kv
    bos = {}
    for t in ("F32", "Q4_K_M"):
        bos[t] = root / f"bos-{t}.gguf"
        gguforge.quantize(out["qwen3"][1]["F32"], bos[t], t, kv_overrides=["tokenizer.ggml.add_bos_token=bool:true"])
    out["qwen3-bos"] = (None, bos)
    return out


def llama_stats(tool: Path, base: Path, cand: Path, text: Path, work: Path, chunks: int = CHUNKS,
                batch: int = BATCH) -> list[str]:
    """llama-perplexity's final statistics block (the lines after '====== Perplexity statistics')."""
    kld = work / f"{base.stem}.kld"
    common = ["-c", str(CTX), "-b", str(batch), "--chunks", str(chunks), "-t", "2"]
    if not kld.exists():
        r = subprocess.run([str(tool), "-m", str(base), "-f", str(text), "--kl-divergence-base", str(kld), *common],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    # llama.cpp's logger thread is never joined (common_log_main leaks it on purpose): the last lines can
    # be lost at exit. Run again until the final block is there.
    for _ in range(5):
        r = subprocess.run([str(tool), "-m", str(cand), "--kl-divergence-base", str(kld), "--kl-divergence",
                            *common], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        out = (r.stdout + "\n" + r.stderr).splitlines()
        start = next((i for i, line in enumerate(out) if "Perplexity statistics" in line), None)
        if start is not None and any(line.startswith("Same top p") for line in out[start:]):
            break
    assert start is not None, (r.stdout + r.stderr)[-3000:]
    return [line.strip() for line in out[start:] if ":" in line and not line.startswith(("llama", "common"))
            and ("PPL" in line or "KLD" in line or "Δp" in line or "top p" in line)]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2moe", "qwen3-bos"])
def test_gguf_base_equals_llama_perplexity(arch, mocks, text, perplexity_tool, tmp_path):
    import gguforge
    from gguforge.eval.stats import printed_lines

    _, files = mocks[arch]
    cands = [f for t, f in files.items() if t != "F32"]
    chunks, batch = ARCH_CHUNKS[arch], ARCH_BATCH[arch]
    result = gguforge.evaluate(files["F32"], cands, text, ctx_size=CTX, chunks=chunks, batch_size=batch, threads=2)
    assert result.n_tokens == chunks * (CTX - 1 - CTX // 2)
    for cand, stats in zip(cands, result.details):
        ref = llama_stats(perplexity_tool, files["F32"], cand, text, tmp_path, chunks, batch)
        ours = [line.strip() for line in printed_lines(stats)]
        assert ours == ref, (cand.name, [(a, b) for a, b in zip(ours, ref) if a != b])
    # the size given for llama-perplexity's base file is the size it wrote
    assert result.llama_base_bytes == (tmp_path / f"{files['F32'].stem}.kld").stat().st_size


def test_hf_base_matches_gguf_base(mocks, text):
    import gguforge
    hf, files = mocks["qwen3"]
    opts = dict(ctx_size=CTX, chunks=CHUNKS, batch_size=BATCH, threads=2)
    from_hf = gguforge.evaluate(hf, [files["F32"], files["Q4_K_M"]], text, device="cpu", **opts)
    from_gguf = gguforge.evaluate(files["F32"], [files["Q4_K_M"]], text, **opts)
    f32, q4 = from_hf.candidates
    assert abs(f32["kld_mean"]) <= 1e-5, f32
    assert f32["same_top_p"] > 99.0
    ref = from_gguf.candidates[0]["kld_mean"]
    assert ref > 1e-4  # a real difference, not the noise floor
    assert abs(q4["kld_mean"] - ref) <= 0.02 * ref, (q4["kld_mean"], ref)
    assert "(HF" in from_hf.base


def test_quant_ordering_on_trained_model(trained_model, tmp_path_factory, perplexity_tool):
    """A model with learned structure: peaked distributions, where the -16 cut-off and the max - 16 code
    range matter (random mocks keep every entry); the expected quality order; llama-perplexity's figures."""
    import gguforge
    from gguforge.eval.stats import encode_base, printed_lines
    model = trained_model
    types = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")
    work = tmp_path_factory.mktemp("trained")
    files = _ggufs(model, work, types)
    text = model / "eval.txt"
    result = gguforge.evaluate(files["F32"], [files[t] for t in types], text, ctx_size=CTX, chunks=CHUNKS,
                               batch_size=BATCH, threads=2)
    kld = [c["kld_mean"] for c in result.candidates]
    assert kld == sorted(kld) and len(set(kld)) == len(kld), dict(zip(types, kld))
    # learned structure: the held-out text is predicted far better than chance (512 tokens)
    assert result.candidates[0]["ppl_base"] < 20
    for t in ("Q4_K_M", "Q2_K"):
        ref = llama_stats(perplexity_tool, files["F32"], files[t], text, work)
        assert [line.strip() for line in printed_lines(result.details[types.index(t)])] == ref, t
    # the compact store keeps only the entries above the cut-off: smaller even for a 512-token vocabulary
    assert result.base_store_bytes * 2 < (work / "m-F32.kld").stat().st_size
    # and the cut-off matters here: tokens have log-probs below -16 (kept out of the sum)
    from gguforge.eval.llama import LlamaRunner
    from gguforge.eval.run import llama_tokens
    toks = np.asarray(llama_tokens(files["F32"], text.read_bytes()[:20000]), dtype=np.int64)
    with LlamaRunner(files["F32"], CTX, BATCH, 2) as runner:
        _, logits = next(runner.chunk_logits(toks, 1))
    rec = encode_base(logits, toks[CTX // 2 + 1:CTX])
    assert (np.diff(rec.offsets) < rec.n_vocab).all()


def test_saved_base_is_reused_and_checked(mocks, text, tmp_path):
    import gguforge
    from gguforge.errors import UserError
    _, files = mocks["qwen2moe"]
    base = tmp_path / "base.bin"
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    common = ["-f", str(text), "-c", str(CTX), "--chunks", str(CHUNKS), "-b", str(BATCH), "-t", "2", "-q"]
    r = run_cli("eval", str(files["F32"]), str(files["Q4_K_M"]), *common, "--save-base", str(base),
                 "--json", str(out1), "--markdown", str(tmp_path / "a.md"), "--plot", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "m-Q4_K_M.gguf" in r.stdout and "Q4_K_M" in r.stdout
    res = gguforge.evaluate(None, [files["Q4_K_M"]], text, base_file=base, ctx_size=CTX, chunks=CHUNKS,
                            batch_size=BATCH, threads=2)
    a = json.loads(out1.read_text())
    assert a == json.loads(json.dumps(res.candidates))
    keys = {"file", "type", "size_bytes", "bpw", "ppl_q", "ppl_base", "kld_mean", "kld_max", "kld_p99_9", "kld_p99",
            "kld_p95", "kld_p90", "kld_median", "kld_p10", "kld_p5", "kld_p1", "kld_min", "dp_mean", "dp_rms",
            "same_top_p", "ppl_q_err", "ppl_base_err", "kld_mean_err", "dp_mean_err", "dp_rms_err",
            "same_top_p_err"}
    assert set(a[0]) == keys and a[0]["type"] == "Q4_K_M"
    assert "| m-Q4_K_M.gguf | Q4_K_M |" in (tmp_path / "a.md").read_text()
    # another -c, another text: refused
    other = tmp_path / "other.txt"
    other.write_text(text.read_text() + " more", encoding="utf-8")
    for txt, ctx, what in ((text, 64, "--ctx-size"), (other, CTX, "another text")):
        with pytest.raises(UserError, match=what):
            gguforge.evaluate(None, [files["Q4_K_M"]], txt, base_file=base, ctx_size=ctx, chunks=CHUNKS)


def test_bad_inputs(mocks, text, tmp_path):
    import gguforge
    from gguforge.errors import UserError
    hf, q3 = mocks["qwen3"]
    # the checkpoint's tokenizer normalises to NFC, llama.cpp does not: a decomposed accent tokenizes
    # differently, and an HF base is refused (before the model loads)
    nfd = tmp_path / "nfd.txt"
    nfd.write_text(text.read_text() + " cafe\u0301 re\u0301sume\u0301", encoding="utf-8")
    with pytest.raises(UserError, match="tokenize the text differently"):
        gguforge.evaluate(hf, [q3["Q8_0"]], nfd, ctx_size=CTX)
    _, moe = mocks["qwen2moe"]
    short = tmp_path / "short.txt"
    short.write_text("The fox sees the dog.", encoding="utf-8")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(q3["Q8_0"].read_bytes()[:5000])
    cases = {
        "architecture": (q3["F32"], moe["Q8_0"], text, CTX),
        "tokenizes to only": (q3["F32"], q3["Q8_0"], short, CTX),
        "above the context": (q3["F32"], q3["Q8_0"], text, 100000),
    }
    for what, (base, cand, txt, ctx) in cases.items():
        with pytest.raises(UserError, match=what):
            gguforge.evaluate(base, [cand], txt, ctx_size=ctx)
    # through the CLI: one line, exit 2, no report file
    out = tmp_path / "r.json"
    r = run_cli("eval", str(q3["F32"]), str(broken), "-f", str(text), "--json", str(out), "-q")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "broken.gguf" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_plot_needs_matplotlib(monkeypatch):
    from gguforge.errors import UserError
    from gguforge.eval.report import check_plot_available
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="--plot needs matplotlib"):
        check_plot_available()


@pytest.mark.parametrize("flat", [True, False], ids=["bitmap", "sparse"])
def test_store_round_trip(flat):
    """Kept entries, their codes and the per-token floats survive the store: flat distributions (most
    entries kept: bitmap) and peaked ones (few kept, index gaps wider than 65535: u32 deltas)."""
    from gguforge.eval.stats import encode_base
    from gguforge.eval.store import decode_block, encode_block
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((9, 70000)) * (4 if flat else 1)).astype(np.float32)
    if not flat:
        logits[:, 7] = 30.0  # one dominant entry per token: only it and its neighbours in value are kept
        logits[4, 69999] = 29.0
    logits[3, :] = 1.5  # all equal: scale 0, every entry kept with code 0
    rec = encode_base(logits, rng.integers(0, 70000, 9))
    back = decode_block(encode_block(rec))
    for name in ("scale", "min_log_prob", "q_target", "offsets", "idx", "q"):
        assert np.array_equal(getattr(rec, name), getattr(back, name)), name
    assert rec.offsets[4] - rec.offsets[3] == 70000
    assert flat or (np.diff(rec.offsets)[[0, 1, 2, 5]] <= 2).all()


@pytest.mark.parametrize("during", ["base", "candidates"])
def test_interrupt_leaves_no_partial_report(mocks, text, tmp_path, monkeypatch, capsys, during):
    """SIGINT while the base is computed: nothing written; while the candidates run: the finished
    --save-base file only, no report and no temp file."""
    import os
    import signal

    import gguforge.eval.run as run
    from gguforge.cli import main
    _, files = mocks["qwen3"]
    name = "encode_base" if during == "base" else "KldSums"
    original = getattr(run, name)
    calls = []

    def then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(run, name, then_signal)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["eval", str(files["F32"]), str(files["Q8_0"]), str(files["Q2_K"]), "-f", str(text), "-c", str(CTX),
                 "--chunks", str(CHUNKS), "-b", str(BATCH), "-t", "2", "-q", "--save-base", str(out / "base.bin"),
                 "--json", str(out / "r.json"), "--markdown", str(out / "r.md")])
    assert code == 130 and len(calls) >= 2
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted"]
    assert sorted(p.name for p in out.iterdir()) == ([] if during == "base" else ["base.bin"])
