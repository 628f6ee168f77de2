"""Importance-matrix files (gguforge/format/imatrix.py): llama-imatrix's GGUF layout and the legacy .dat
layout, llama-quantize's normalisation, and broken files (one line, exit 2, nothing written).

Files written by llama-imatrix itself are read (and rewritten byte for byte) in test_imatrix_apply.py,
which builds the tool.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFValueType

from gguforge.cli import main
from gguforge.errors import UserError
from gguforge.format.imatrix import Imatrix, ImatrixEntry, importance, read_imatrix, write_imatrix

F = np.float32
NE0, NE1, N_EXP = 256, 64, 4


def sample(rng=None) -> Imatrix:
    """A dense entry and a 4-expert entry with one expert never routed; sums not representable in bf16."""
    rng = rng or np.random.default_rng(7)
    dense = ImatrixEntry((rng.random((1, NE0)) * 50 + 1e-3).astype(F), np.array([1200], F))
    moe = ImatrixEntry((rng.random((N_EXP, NE0)) * 9).astype(F), np.array([37, 0, 512, 3], F))
    moe.sums[1] = 0
    return Imatrix({"blk.0.ffn_down_exps.weight": moe, "blk.0.attn_q.weight": dense},
                   ["calibration.txt", "more.txt"], 19, 64)


def test_gguf_layout_as_llama_imatrix_writes_it(tmp_path):
    path = tmp_path / "im.gguf"
    write_imatrix(path, sample())
    r = gguf.GGUFReader(path)
    # sorted names, in_sum2 then counts; dense is 1-D [ne0] + [1], MoE 2-D [ne0, n] + [1, n] (ggml order)
    assert [(t.name, t.shape.tolist(), T(t.tensor_type)) for t in r.tensors] == [
        ("blk.0.attn_q.weight.in_sum2", [NE0], T.F32), ("blk.0.attn_q.weight.counts", [1], T.F32),
        ("blk.0.ffn_down_exps.weight.in_sum2", [NE0, N_EXP], T.F32),
        ("blk.0.ffn_down_exps.weight.counts", [1, N_EXP], T.F32)]
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["calibration.txt", "more.txt"]
    assert [fields[k].types for k in ("imatrix.chunk_count", "imatrix.chunk_size")] == [[GGUFValueType.UINT32]] * 2
    assert (fields["imatrix.chunk_count"].contents(), fields["imatrix.chunk_size"].contents()) == (19, 64)
    assert r.tensors[0].data_offset % 32 == 0 and path.stat().st_size % 32 == 0


def test_gguf_round_trip(tmp_path):
    im = sample()
    write_imatrix(tmp_path / "a.gguf", im)
    back = read_imatrix(tmp_path / "a.gguf")
    assert not back.legacy and back.has_metadata
    assert (back.datasets, back.chunk_count, back.chunk_size) == (im.datasets, im.chunk_count, im.chunk_size)
    assert sorted(back.entries) == sorted(im.entries)
    for name, e in im.entries.items():
        assert back.entries[name].sums.tobytes() == e.sums.tobytes()
        assert back.entries[name].counts.tolist() == e.counts.tolist()
    write_imatrix(tmp_path / "b.gguf", back)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_importance_is_mean_per_expert_and_one_for_unrouted_experts():
    im = sample()
    w = importance(im)
    moe = im.entries["blk.0.ffn_down_exps.weight"]
    got = w["blk.0.ffn_down_exps.weight"].reshape(N_EXP, NE0)
    for j, c in enumerate(moe.counts):
        want = np.ones(NE0, F) if c == 0 else moe.sums[j] / F(c)  # float32 division, as quantize.cpp
        assert got[j].tobytes() == want.astype(F).tobytes()
    assert w["blk.0.attn_q.weight"].shape == (NE0,) and w["blk.0.attn_q.weight"].dtype == F


def test_counts_are_rounded_as_lround():
    e = ImatrixEntry(np.full((2, 32), 10, F), np.array([2.5, 3.49], F))
    w = importance(Imatrix({"blk.0.x.weight": e}, [], 1, 4))["blk.0.x.weight"].reshape(2, 32)
    assert w[0, 0] == F(10) / F(3) and w[1, 0] == F(10) / F(3)  # lround(2.5) = 3, lround(3.49) = 3


def test_dat_layout_as_save_imatrix_legacy(tmp_path):
    im = sample()
    im.entries["blk.1.ffn_up_exps.weight"] = ImatrixEntry(np.ones((N_EXP, NE0), F), np.zeros(N_EXP, F))  # no data
    write_imatrix(tmp_path / "im.dat", im, "dat")
    raw = (tmp_path / "im.dat").read_bytes()
    # expected bytes, computed by hand: ncall = ceil(max(counts) / chunk_size), values (sum/count) * ncall
    want = [struct.pack("<i", 2)]  # the all-zero entry is skipped
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down_exps.weight"):
        e = im.entries[name]
        ncall = -(-int(e.counts.max()) // 64)
        counts = np.where(e.counts == 0, F(1), e.counts).astype(F)
        sums = np.where((e.counts == 0)[:, None], F(1), e.sums).astype(F)
        values = ((sums / counts[:, None]) * F(ncall)).astype("<f4")
        want.append(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
                    + values.tobytes())
    want.append(struct.pack("<ii", 19, len(b"more.txt")) + b"more.txt")  # the last dataset only
    assert raw == b"".join(want)

    back = read_imatrix(tmp_path / "im.dat")
    assert back.legacy and back.chunk_count == 19 and back.datasets == ["more.txt"] and back.chunk_size == 0
    assert sorted(back.entries) == ["blk.0.attn_q.weight", "blk.0.ffn_down_exps.weight"]
    w = importance(back)["blk.0.ffn_down_exps.weight"]  # legacy: values / ncall
    e = back.entries["blk.0.ffn_down_exps.weight"]
    assert w.tobytes() == (e.sums.reshape(-1) / F(e.counts[0])).astype(F).tobytes()
    write_imatrix(tmp_path / "again.dat", back, "dat")  # a legacy matrix is rewritten unchanged
    assert (tmp_path / "again.dat").read_bytes() == raw


def test_dat_trailer_is_optional(tmp_path):
    name = b"blk.0.attn_k.weight"
    body = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 0, 3) + \
        np.array([1, 2, 3], "<f4").tobytes()
    (tmp_path / "a.dat").write_bytes(body)
    im = read_imatrix(tmp_path / "a.dat")
    assert im.chunk_count == 0 and im.datasets == []
    # ncall 0: the values are taken as they are
    assert importance(im)["blk.0.attn_k.weight"].tolist() == [1, 2, 3]


def test_legacy_matrix_is_not_written_as_gguf(tmp_path):
    write_imatrix(tmp_path / "a.dat", sample(), "dat")
    with pytest.raises(UserError):
        write_imatrix(tmp_path / "a.gguf", read_imatrix(tmp_path / "a.dat"), "gguf")
    assert not (tmp_path / "a.gguf").exists()


# ---------------------------------------------------------------------------------------------
# Broken files: one line, exit 2, nothing written (through `gguforge quantize --imatrix`)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A small llama-arch GGUF whose tensors match sample()'s entries."""
    path = tmp_path_factory.mktemp("model") / "m.gguf"
    rng = np.random.default_rng(3)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(NE0)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_expert_count(N_EXP)
    w.add_expert_used_count(2)
    w.add_tensor("token_embd.weight", rng.standard_normal((32, NE0)).astype(F))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((NE1, NE0)).astype(F))
    w.add_tensor("blk.0.ffn_down_exps.weight", rng.standard_normal((N_EXP, NE1, NE0)).astype(F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def good_gguf(tmp_path) -> Path:
    write_imatrix(tmp_path / "good.gguf", sample())
    return tmp_path / "good.gguf"


def raw_gguf(path: Path, tensors: dict[str, np.ndarray], kv: dict | None = None, general_type="imatrix") -> Path:
    """An imatrix-like GGUF written with gguf-py, for the kinds our writer refuses to make."""
    w = gguf.GGUFWriter(str(path), "x")  # (gguf-py always adds general.architecture)
    if general_type is not None:
        w.add_string("general.type", general_type)
    for k, v in (kv if kv is not None else {"imatrix.datasets": ["d"], "imatrix.chunk_count": 1,
                                              "imatrix.chunk_size": 64}).items():
        if isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_uint32(k, v)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def entry_tensors(sums=None, counts=None, sums_dtype=F):
    s = np.ones(NE0, F) if sums is None else sums
    c = np.array([10], F) if counts is None else counts
    return {"blk.0.attn_q.weight.in_sum2": s.astype(sums_dtype), "blk.0.attn_q.weight.counts": c}


def dat_file(path: Path, n_entries=1, name=b"blk.0.attn_q.weight", name_len=None, ncall=1, nval=NE0,
             values=None, cut=0) -> Path:
    v = np.ones(NE0, "<f4") if values is None else np.asarray(values, "<f4")
    body = (struct.pack("<i", n_entries) + struct.pack("<i", len(name) if name_len is None else name_len) + name
            + struct.pack("<ii", ncall, nval) + v.tobytes() + struct.pack("<ii", 1, 1) + b"d")
    path.write_bytes(body[:len(body) - cut] if cut else body)
    return path


def truncated_gguf(p: Path) -> Path:
    p.write_bytes(good_gguf(p.parent).read_bytes()[:-700])
    return p


def written(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


# kind -> (make the file, what the error line says)
BAD = {
    "truncated gguf": (truncated_gguf, "truncated"),
    "empty file": (lambda p: written(p, b""), "truncated or corrupt"),
    "not an imatrix (text)": (lambda p: written(p, b"hello, this is not a matrix\n" * 4), "not an importance matrix"),
    "wrong dtype": (lambda p: raw_gguf(p, entry_tensors(sums_dtype=np.float16)), "must be F32"),
    "missing counts half": (lambda p: raw_gguf(p, {"blk.0.attn_q.weight.in_sum2": np.ones(NE0, F)}),
                            "has no blk.0.attn_q.weight.counts"),
    "missing sums half": (lambda p: raw_gguf(p, {"blk.0.attn_q.weight.counts": np.ones(1, F)}),
                          "has no blk.0.attn_q.weight.in_sum2"),
    "nan sums": (lambda p: raw_gguf(p, entry_tensors(sums=np.full(NE0, np.nan, F))), "NaN or Inf"),
    "inf sums": (lambda p: raw_gguf(p, entry_tensors(sums=np.full(NE0, np.inf, F))), "NaN or Inf"),
    "negative sums": (lambda p: raw_gguf(p, entry_tensors(sums=-np.ones(NE0, F))), "negative sums"),
    "negative count": (lambda p: raw_gguf(p, entry_tensors(counts=np.array([-3], F))), "impossible token count"),
    "oversized count": (lambda p: raw_gguf(p, entry_tensors(counts=np.array([1e30], F))), "impossible token count"),
    "nan count": (lambda p: raw_gguf(p, entry_tensors(counts=np.array([np.nan], F))), "impossible token count"),
    "sums not in rows": (lambda p: raw_gguf(p, entry_tensors(counts=np.array([1, 2, 3], F))), "whole rows"),
    "no entries": (lambda p: raw_gguf(p, {"something.else": np.ones(4, F)}), "no entries"),
    "no metadata": (lambda p: raw_gguf(p, entry_tensors(), kv={}), "missing imatrix metadata"),
    "model gguf": (lambda p: raw_gguf(p, entry_tensors(), general_type="model"), "not an importance matrix"),
    "size differs from tensor": (lambda p: raw_gguf(p, entry_tensors(sums=np.ones(NE0 // 2, F))),
                                 "imatrix size 128 is different from tensor size 256 for blk.0.attn_q.weight"),
    "dat truncated": (lambda p: dat_file(p, cut=40), "truncated"),
    "dat absurd entry count": (lambda p: dat_file(p, n_entries=2 ** 30), "not an importance matrix"),
    "dat negative entry count": (lambda p: dat_file(p, n_entries=-1), "not an importance matrix"),
    "dat absurd name length": (lambda p: dat_file(p, name_len=2 ** 31 - 1), "name of 2147483647 bytes"),
    "dat negative name length": (lambda p: dat_file(p, name_len=-5), "name of -5 bytes"),
    "dat absurd value count": (lambda p: dat_file(p, nval=2 ** 31 - 1), "claims 2147483647 values"),
    "dat zero value count": (lambda p: dat_file(p, nval=0), "claims 0 values"),
    "dat negative ncall": (lambda p: dat_file(p, ncall=-2), "negative call count"),
    "dat nan value": (lambda p: dat_file(p, values=np.full(NE0, np.nan)), "NaN or Inf"),
    "dat bad utf-8 name": (lambda p: dat_file(p, name=b"blk.0.\xff\xfe.weight"), "not valid UTF-8"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_imatrix_is_one_line_exit_2_nothing_written(kind, model, tmp_path, capsys):
    make, says = BAD[kind]
    bad = make(tmp_path / "bad.imatrix")
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(model), str(out), "Q8_0", "--imatrix", str(bad), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and says in err.splitlines()[0]
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1
    assert not any("out.gguf" in p.name for p in tmp_path.iterdir())  # no output, no temp file


def test_the_good_file_passes(model, tmp_path):
    """The hostile cases fail for their flaw: the same file without it quantizes."""
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(model), str(out), "Q8_0", "--imatrix", str(good_gguf(tmp_path)), "-q"]) == 0
    assert out.exists()
    dat = dat_file(tmp_path / "good.dat")
    assert main(["quantize", str(model), str(tmp_path / "o2.gguf"), "Q8_0", "--imatrix", str(dat), "-q"]) == 0


def test_include_and_exclude_together_is_a_usage_error(model, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    code = main(["quantize", str(model), str(out), "Q8_0", "--imatrix", str(good_gguf(tmp_path)),
                 "--include-weights", "attn", "--exclude-weights", "ffn"])
    assert code == 2 and not out.exists()
    assert "cannot be used together" in capsys.readouterr().err
