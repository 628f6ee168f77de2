"""NaN/Inf in the first, a middle or the last row chunk of a tensor that spans many chunks.

Work is done a block of rows at a time (gguforge.parallel.CHUNK_BYTES, 16 MB); the mocks' tensors
fit in one such block, so here the chunk size is made tiny and the poisoned tensors span many
chunks. `convert-hf` (f32 and bf16 sources; same-type copies, f16, q8_0 and a K-quant preset) and
`quantize` (F32, F16 and BF16 inputs; Q8_0 and Q4_K_M) must refuse with exit code 2, name the
tensor, and leave nothing behind. Torch-free: the checkpoints are written with numpy.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from gguforge.cli import main
from gguforge.errors import EXIT_BAD_INPUT

from helpers import qwen2moe_config, qwen2moe_tensors, small_row_chunks, write_checkpoint

CHUNK = 4096  # float32 bytes of rows per chunk in these tests
H, FE, E = 256, 32, 4  # hidden size (K-quant rows), expert width, experts
POSITIONS = ("first", "middle", "last")
VALUES = (np.nan, np.inf, -np.inf)

# checkpoint tensor -> (GGUF tensor, rows as convert-hf chunks them, rows as quantize chunks them)
# token_embd is copied untouched (a raw copy for same-type outputs); the experts are stacked from
# one tensor per expert, so convert-hf's chunks are whole experts.
EXPERT = "model.layers.1.mlp.experts.{e}.gate_proj.weight"
TARGETS = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "experts": (EXPERT, "blk.1.ffn_gate_exps.weight"),
}
CONVERT_OUTTYPES = {"f32": ("f32", "f16", "q8_0", "q4_k_m"), "bf16": ("bf16", "f16", "q8_0", "q4_k_m")}


@pytest.fixture
def small_chunks(monkeypatch):
    small_row_chunks(monkeypatch, CHUNK)


def chunk_of(row: int, n_rows: int, row_elems: int) -> tuple[int, int]:
    """(index of the chunk holding `row`, number of chunks) as the pipelines cut the tensor."""
    from gguforge.parallel import row_chunks
    chunks = list(row_chunks(n_rows, row_elems))
    assert chunks[0][0] == 0 and chunks[-1][1] == n_rows
    return next(i for i, (a, b) in enumerate(chunks) if a <= row < b), len(chunks)


def assert_in_position(position: str, row: int, n_rows: int, row_elems: int) -> None:
    index, count = chunk_of(row, n_rows, row_elems)
    assert count >= 4, f"only {count} chunks: the test would not cover several"
    assert {"first": index == 0, "middle": 0 < index < count - 1, "last": index == count - 1}[position], \
        (position, index, count)


def poisoned_checkpoint(root, target: str, position: str, bf16: bool):
    """A qwen2moe checkpoint with one NaN/Inf in `target` at `position`; returns (dir, GGUF name, value)."""
    config = qwen2moe_config(hidden_size=H, num_attention_heads=4, num_key_value_heads=2,
                             moe_intermediate_size=FE, num_experts=E)
    tensors = qwen2moe_tensors(config)
    p = POSITIONS.index(position)
    value = VALUES[(p + list(TARGETS).index(target)) % 3]  # every value meets every output path
    source, gguf_name = TARGETS[target]
    if target == "embed":
        n = config["vocab_size"]
        row = {"first": 0, "middle": n // 2, "last": n - 1}[position]
        col = {"first": 0, "middle": H // 2 + 3, "last": H - 1}[position]
        tensors[source][row, col] = value
        assert_in_position(position, row, n, H)  # convert-hf and quantize cut [vocab, H] alike
    else:
        expert = {"first": 0, "middle": E // 2, "last": E - 1}[position]
        row = {"first": 0, "middle": 0, "last": FE - 1}[position]  # "middle": an expert's first row
        col = {"first": 0, "middle": 5, "last": H - 1}[position]
        tensors[source.format(e=expert)][row, col] = value
        assert_in_position(position, expert, E, FE * H)  # convert-hf: rows of the stacked [E, FE, H]
        assert_in_position(position, expert * FE + row, E * FE, H)  # quantize: rows of FE*E x H
    return write_checkpoint(root, config, tensors, bf16=bf16), gguf_name, value


def refused(capsys, args, name: str) -> None:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    first = err.strip().splitlines()[0]
    assert first.startswith("error: ") and f"tensor {name} " in first and "NaN or Inf" in first, err
    assert "Traceback" not in err


CASES = [(t, p) for t in TARGETS for p in POSITIONS]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("target,position", CASES, ids=[f"{t}-{p}" for t, p in CASES])
def test_convert_refuses_nonfinite_in_any_chunk(small_chunks, tmp_path, capsys, dtype, target, position):
    root, name, _ = poisoned_checkpoint(tmp_path / "model", target, position, bf16=dtype == "bf16")
    for i, outtype in enumerate(CONVERT_OUTTYPES[dtype]):
        out_dir = tmp_path / f"out-{outtype}"
        out_dir.mkdir()
        refused(capsys, ["convert-hf", root, "--outfile", out_dir / "m.gguf", "--outtype", outtype, "-q",
                         "--threads", (1, 3)[i % 2]], name)  # the sequential path and the thread pool
        assert sorted(p.name for p in out_dir.iterdir()) == [], outtype  # no output, no temp file


# convert-hf --outtype A,B reads each chunk once for every output (pipeline.encode_chunks): types that widen
# the rows first (its own scan), then ones that copy or narrow the stored values (encode_chunk's scans).
MANY_OUTTYPES = {"f32": ("q8_0,q4_k_m", "f16,q4_0"), "bf16": ("q8_0,q4_k_m", "bf16,q4_k_s")}


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_convert_many_refuses_nonfinite_in_the_last_chunk(small_chunks, tmp_path, capsys, dtype, target):
    root, name, _ = poisoned_checkpoint(tmp_path / "model", target, "last", bf16=dtype == "bf16")
    for i, outtypes in enumerate(MANY_OUTTYPES[dtype]):
        out_dir = tmp_path / f"out-{i}"
        out_dir.mkdir()
        refused(capsys, ["convert-hf", root, "--outfile", out_dir / "m-{ftype}.gguf", "--outtype", outtypes, "-q",
                         "--threads", (1, 3)[i % 2]], name)
        assert sorted(p.name for p in out_dir.iterdir()) == [], outtypes


def nonfinite_count(path, name: str) -> int:
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    data = t.data
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # bf16 bits
    return int(np.count_nonzero(~np.isfinite(data)))


@pytest.mark.parametrize("target,position", CASES, ids=[f"{t}-{p}" for t, p in CASES])
def test_quantize_refuses_nonfinite_in_any_chunk(small_chunks, tmp_path, capsys, target, position):
    root, name, _ = poisoned_checkpoint(tmp_path / "model", target, position, bf16=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    k = 0
    for src_type in ("f32", "f16", "bf16"):
        src = tmp_path / f"in-{src_type}.gguf"
        assert main(["convert-hf", str(root), "--outfile", str(src), "--outtype", src_type, "-q",
                     "--allow-nonfinite"]) == 0, capsys.readouterr().err
        assert nonfinite_count(src, name) == 1  # the poison reached the input, once
        for preset in ("Q8_0", "Q4_K_M"):
            out = out_dir / f"{src_type}-{preset}.gguf"
            refused(capsys, ["quantize", src, out, preset, "-q", "--threads", (1, 3)[k % 2]], name)
            k += 1
            assert sorted(p.name for p in out_dir.iterdir()) == [], (src_type, preset)
