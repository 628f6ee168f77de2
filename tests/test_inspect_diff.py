"""`gguforge inspect` and `gguforge diff`: output and exit codes (0 equal, 1 different, 2 bad input)."""

from __future__ import annotations

import json

import pytest

from gguforge.cli import main
from gguforge.inspect import format_value

from helpers import gguforge, qwen2moe_config, qwen2moe_tensors, read_gguf, write_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """f32 and q8_0 conversions of one checkpoint, a copy with one changed tensor, one with changed metadata."""
    d = tmp_path_factory.mktemp("diff")
    config = qwen2moe_config()
    tensors = qwen2moe_tensors(config)
    base = write_checkpoint(d / "base", config, tensors)
    tensors["model.layers.1.self_attn.q_proj.weight"] = tensors["model.layers.1.self_attn.q_proj.weight"] + 0.25
    changed = write_checkpoint(d / "changed", config, tensors)
    (d / "over.json").write_text(json.dumps({"general.name": "Other", "custom.extra": 3}))

    def convert(src, name, *extra):
        assert main(["convert-hf", str(src), "--outfile", str(d / name), "--quiet", *extra]) == 0
        return d / name

    return {
        "f32": convert(base, "a.gguf", "--outtype", "f32"),
        "f32_again": convert(base, "b.gguf", "--outtype", "f32"),
        "q8": convert(base, "q.gguf", "--outtype", "q8_0"),
        "changed": convert(changed, "c.gguf", "--outtype", "f32", "--model-name", "Base"),
        "renamed": convert(base, "r.gguf", "--outtype", "f32", "--metadata", str(d / "over.json")),
        "split": convert(base, "s.gguf", "--outtype", "f32", "--split-max-tensors", "7"),
        "dir": d,
    }


def test_format_value_summarises_long_arrays_and_strings():
    assert format_value(list(range(100))) == "[0, 1, 2, 3, 4, ...] (100 items)"
    assert format_value([1, 2]) == "[1, 2]"
    assert format_value("x" * 500).endswith("...' (500 chars)")


def test_inspect_shows_metadata_tensors_and_totals(files):
    r = gguforge("inspect", str(files["q8"]))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "general.architecture" in out and "'qwen2moe'" in out
    assert "tokenizer.ggml.tokens" in out and "(512 items)" in out  # long array: length and first items
    for name, t in read_gguf(files["q8"]).items():
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        shape = "x".join(str(int(d)) for d in t.shape)
        assert line.split()[1:] == [shape, t.tensor_type.name, f"{int(t.n_bytes):,d}"]
    by_type = out[out.index("by type:"):]
    assert "Q8_0" in by_type and "8.50 bits per weight" in by_type and "32.00 bits per weight" in by_type
    assert "total" in by_type


def test_inspect_reads_every_shard_of_a_split_file(files):
    shards = sorted(files["dir"].glob("s-*-of-*.gguf"))
    r = gguforge("inspect", str(shards[0]))
    assert r.returncode == 0, r.stderr
    assert f"in {len(shards)} shards" in r.stdout and "split.count" in r.stdout
    for name in read_gguf(files["f32"]):
        assert f"\n  {name} " in r.stdout


def test_diff_equal_files_exit_0(files):
    r = gguforge("diff", str(files["f32"]), str(files["f32_again"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "files are equal" in r.stdout


def test_diff_split_and_unsplit_are_equal(files):
    first = sorted(files["dir"].glob("s-*-of-*.gguf"))[0]
    r = gguforge("diff", str(files["f32"]), str(first))
    assert r.returncode == 0, r.stdout


def test_diff_reports_changed_tensor_with_max_abs_diff(files):
    r = gguforge("diff", str(files["f32"]), str(files["changed"]))
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("  ~")]
    assert len(lines) == 1 and "blk.1.attn_q.weight: data differs" in lines[0]
    assert "max abs diff 0.25" in lines[0]
    assert main(["diff", str(files["f32"]), str(files["changed"]), "--tol", "0.3"]) == 0
    assert main(["diff", str(files["f32"]), str(files["changed"]), "--tol", "0.2"]) == 1


def test_diff_types_and_tolerance(files):
    r = gguforge("diff", str(files["f32"]), str(files["q8"]))
    assert r.returncode == 1
    assert "~ general.file_type: 0 -> 7" in r.stdout
    assert "type F32 -> Q8_0" in r.stdout and "max abs diff" in r.stdout
    # within a tolerance Q8_0 matches its source; the file_type key still differs
    r = gguforge("diff", str(files["f32"]), str(files["q8"]), "--tol", "0.01")
    assert r.returncode == 1 and "0 tensor differences" in r.stdout and "1 metadata differences" in r.stdout


def test_diff_metadata_differences(files):
    r = gguforge("diff", str(files["f32"]), str(files["renamed"]))
    assert r.returncode == 1
    assert "~ general.name:" in r.stdout and "'Other'" in r.stdout
    assert "+ custom.extra = 3 (only in B)" in r.stdout
    assert "0 tensor differences" in r.stdout


@pytest.mark.parametrize("command", ["inspect", "diff"])
def test_bad_input_exit_2(files, tmp_path, command):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    for bad in (junk, tmp_path / "missing.gguf"):
        args = [str(bad)] if command == "inspect" else [str(files["f32"]), str(bad)]
        r = gguforge(command, *args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(files["f32"].read_bytes()[:5000])
    assert gguforge(command, *([str(truncated)] if command == "inspect" else [str(truncated)] * 2)).returncode == 2
