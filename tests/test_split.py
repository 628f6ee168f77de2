"""Split output (--split-max-size / --split-max-tensors), split input to quantize, --keep-split."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from gguforge.cli import main
from gguforge.format.split import SplitOptions, parse_size, plan_groups, shard_paths
from gguforge.format.writer import TensorEntry
from gguforge.errors import UserError

from helpers import gguf_fields, gguforge, qwen2moe_config, qwen2moe_tensors, read_gguf, write_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = qwen2moe_config()
    return write_checkpoint(tmp_path_factory.mktemp("split") / "m", config, qwen2moe_tensors(config))


@pytest.fixture(scope="module")
def unsplit(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("unsplit") / "m.gguf"
    assert main(["convert-hf", str(ckpt), "--outfile", str(out), "--outtype", "f32", "--quiet"]) == 0
    return out


def convert(ckpt, out, *extra):
    assert main(["convert-hf", str(ckpt), "--outfile", str(out), "--outtype", "f32", "--quiet", *extra]) == 0


def shards_of(directory, stem="m"):
    return sorted(directory.glob(f"{stem}-*-of-*.gguf"))


# -- planning ----------------------------------------------------------------------------------------

def test_parse_size_decimal_units():
    assert parse_size("300") == 300 and parse_size("2K") == 2000 and parse_size("5M") == 5_000_000
    assert parse_size("1G") == 10**9 and parse_size("3g") == 3 * 10**9
    for bad in ("", "1.5G", "-1M", "10T", "M"):
        with pytest.raises(UserError):
            parse_size(bad)


def test_plan_groups_follow_llama_cpp_rules():
    tensors = [TensorEntry(f"t{i}", (n,), T.F32) for i, n in enumerate([10, 10, 30, 5, 5, 5])]  # bytes: 4*n
    assert plan_groups(tensors, SplitOptions(max_tensors=4)) == [(0, 4), (4, 6)]
    assert plan_groups(tensors, SplitOptions(max_size=80)) == [(0, 2), (2, 3), (3, 6)]
    # a tensor larger than the limit still gets a shard of its own (each shard holds >= 1 tensor)
    assert plan_groups(tensors, SplitOptions(max_size=1)) == [(i, i + 1) for i in range(6)]
    assert plan_groups(tensors, SplitOptions(max_size=80, max_tensors=2)) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert plan_groups(tensors, None) == [(0, 6)]


def test_shard_names(tmp_path):
    assert shard_paths(tmp_path / "x.gguf", 1) == [tmp_path / "x.gguf"]
    assert [p.name for p in shard_paths(tmp_path / "Model-F16.gguf", 3)] == [
        "Model-F16-00001-of-00003.gguf", "Model-F16-00002-of-00003.gguf", "Model-F16-00003-of-00003.gguf"]


# -- convert-hf ------------------------------------------------------------------------------------------

def test_split_dry_run_writes_nothing_and_lists_every_shard_and_tensor(ckpt, unsplit, tmp_path):
    r = gguforge("convert-hf", str(ckpt), "--outfile", str(tmp_path / "m.gguf"), "--outtype", "f32",
                 "--split-max-tensors", "10", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []
    names = read_gguf(unsplit)
    for name in names:
        assert name in r.stdout
    assert "m-00001-of-00004.gguf: 10 tensors" in r.stdout
    assert f"m-00004-of-00004.gguf: {len(names) - 30} tensors" in r.stdout


def test_split_files_keys_and_tensors(ckpt, unsplit, tmp_path):
    convert(ckpt, tmp_path / "m.gguf", "--split-max-tensors", "10")
    shards = shards_of(tmp_path)
    assert [p.name for p in shards] == [f"m-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".*.part"))
    whole = gguf_fields(unsplit)
    from gguf import GGUFReader
    for i, path in enumerate(shards):
        reader = GGUFReader(str(path))
        types = {k: f.types[0] for k, f in reader.fields.items()}
        assert (types["split.no"], types["split.count"], types["split.tensors.count"]) == (V.UINT16, V.UINT16, V.INT32)
        f = {k: fl.contents() for k, fl in reader.fields.items() if not k.startswith("GGUF.")}
        assert (f["split.no"], f["split.count"], f["split.tensors.count"]) == (i, 4, len(read_gguf(unsplit)))
        if i == 0:  # every key of the unsplit file, then the split keys
            assert {k: v for k, v in f.items() if not k.startswith("split.")} == \
                {k: v for k, v in whole.items() if not k.startswith("GGUF.")}
        else:
            assert set(f) == {"split.no", "split.count", "split.tensors.count"}
        assert 1 <= len(reader.tensors) <= 10
    merged = {n: t for p in shards for n, t in read_gguf(p).items()}
    reference = read_gguf(unsplit)
    assert list(merged) == list(reference)
    for name, t in reference.items():
        assert merged[name].tensor_type == t.tensor_type and merged[name].data.tobytes() == t.data.tobytes()


def test_one_shard_keeps_the_plain_name(ckpt, tmp_path):
    convert(ckpt, tmp_path / "m.gguf", "--split-max-size", "1G")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert "split.count" not in gguf_fields(tmp_path / "m.gguf")


def test_failed_split_write_leaves_no_shard(ckpt, tmp_path):
    bad = tmp_path / "bad"
    config = qwen2moe_config()
    tensors = qwen2moe_tensors(config)
    tensors["model.norm.weight"][3] = np.nan  # the last tensor written: every shard before it is complete
    write_checkpoint(bad, config, tensors)
    r = gguforge("convert-hf", str(bad), "--outfile", str(tmp_path / "m.gguf"), "--split-max-tensors", "5")
    assert r.returncode == 2 and "NaN" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_existing_shard_is_not_overwritten(ckpt, tmp_path):
    (tmp_path / "m-00002-of-00004.gguf").write_bytes(b"keep")
    r = gguforge("convert-hf", str(ckpt), "--outfile", str(tmp_path / "m.gguf"), "--split-max-tensors", "10")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (tmp_path / "m-00002-of-00004.gguf").read_bytes() == b"keep"


def test_bad_split_size_is_a_user_error(ckpt, tmp_path):
    r = gguforge("convert-hf", str(ckpt), "--outfile", str(tmp_path / "m.gguf"), "--split-max-size", "12X")
    assert r.returncode == 2 and "--split-max-size" in r.stderr


# -- quantize -----------------------------------------------------------------------------------------------

def test_quantize_reads_split_input_and_keeps_split(ckpt, unsplit, tmp_path):
    convert(ckpt, tmp_path / "m.gguf", "--split-max-tensors", "10")
    first = tmp_path / "m-00001-of-00004.gguf"
    assert main(["quantize", str(first), str(tmp_path / "q.gguf"), "Q8_0", "--quiet"]) == 0
    assert main(["quantize", str(unsplit), str(tmp_path / "ref.gguf"), "Q8_0", "--quiet"]) == 0
    assert (tmp_path / "q.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()

    assert main(["quantize", str(first), str(tmp_path / "k.gguf"), "Q8_0", "--keep-split", "--quiet"]) == 0
    kept = shards_of(tmp_path, "k")
    assert len(kept) == 4
    for src, dst in zip(shards_of(tmp_path, "m"), kept):
        assert list(read_gguf(src)) == list(read_gguf(dst))  # same tensors in the same shards and order
    assert gguf_fields(kept[0])["general.file_type"] == 7

    r = gguforge("quantize", str(tmp_path / "m-00002-of-00004.gguf"), str(tmp_path / "x.gguf"), "Q8_0")
    assert r.returncode == 2 and "first shard" in r.stderr
    (tmp_path / "m-00003-of-00004.gguf").unlink()
    r = gguforge("quantize", str(first), str(tmp_path / "x.gguf"), "Q8_0")
    assert r.returncode == 2 and "m-00003-of-00004.gguf is missing" in r.stderr


def test_quantize_split_output_and_dry_run(unsplit, tmp_path):
    r = gguforge("quantize", str(unsplit), str(tmp_path / "q.gguf"), "Q8_0", "--split-max-size", "100K",
                 "--dry-run")
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == [] and "q-00001-of-" in r.stdout
    assert main(["quantize", str(unsplit), str(tmp_path / "q.gguf"), "Q8_0", "--split-max-size", "100K",
                 "--quiet"]) == 0
    shards = shards_of(tmp_path, "q")
    assert len(shards) > 1
    assert sum(len(read_gguf(p)) for p in shards) == len(read_gguf(unsplit))


# -- llama.cpp ------------------------------------------------------------------------------------------------

def test_split_file_loads_in_llama_cpp_with_the_same_logits(ckpt, unsplit, tmp_path):
    pytest.importorskip("llama_cpp")
    from gguforge.verify import gguf_logits, load_gguf

    convert(ckpt, tmp_path / "m.gguf", "--split-max-size", "100K")
    shards = shards_of(tmp_path)
    assert len(shards) > 2
    ids = [1, 17, 300, 42, 5, 395, 7, 99]
    split_logits = gguf_logits(load_gguf(shards[0], n_ctx=16), ids)
    whole_logits = gguf_logits(load_gguf(unsplit, n_ctx=16), ids)
    assert np.isfinite(whole_logits).all()
    np.testing.assert_array_equal(split_logits, whole_logits)
