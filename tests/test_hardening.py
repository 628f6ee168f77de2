"""The last broken promises under hostile input (issue 22): a signal before the CLI is imported, option
values that used to end as exit 70, stderr closed, GGUF tensors with a dimension of 0, and a property
test over every option parser.

Every failure is exit 2 with one line (and at most one hint) on stderr, nothing written; a signal is one
line and exit 128 + signal, nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFValueType as V
from hypothesis import HealthCheck, example, given, settings, strategies as st

from gguforge.cli import main
from gguforge.errors import EXIT_BAD_INPUT, UserError
from gguforge.format.writer import TensorEntry, write_gguf_shards

from helpers import qwen2moe_config, qwen2moe_tensors, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    config = qwen2moe_config()
    return write_checkpoint(tmp_path_factory.mktemp("hardening") / "model", config, qwen2moe_tensors(config))


@pytest.fixture(scope="module")
def gguf_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hardening-gguf") / "m-bf16.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(path), "--outtype", "bf16", "-q"]) == 0
    return path


def one_error(code: int, stderr: str, *needles: str) -> str:
    lines = stderr.strip().splitlines()
    assert code == EXIT_BAD_INPUT, stderr
    assert lines and lines[0].startswith("error: "), stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    for needle in needles:
        assert needle in stderr, stderr
    return lines[0]


def run_fails(capsys, args: list, *needles: str) -> str:
    code = main([str(a) for a in args])
    return one_error(code, capsys.readouterr().err, *needles)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- 1. a signal from the first instruction of the entry point ----------------------------------------

# Loaded by the interpreter before the entry point (sitecustomize): pauses the import of one module,
# after writing a mark file, so the test can send its signal at that exact moment.
PAUSE_HOOK = textwrap.dedent("""
    import os, sys, time
    class _PauseAt:
        def find_spec(self, name, path=None, target=None):
            if name == os.environ.get("GGUFORGE_TEST_PAUSE_AT"):
                sys.meta_path.remove(self)
                open(os.environ["GGUFORGE_TEST_PAUSE_MARK"], "w").close()
                time.sleep(600)  # the signal ends this
            return None
    sys.meta_path.insert(0, _PauseAt())
""")


def console_script_entry() -> str:
    """What pip's `gguforge` script runs: `from MODULE import FUNC; sys.exit(FUNC())` (pyproject.toml)."""
    import re
    found = re.search(r'\[project\.scripts\][^\[]*?\ngguforge\s*=\s*"([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text())
    assert found, "pyproject.toml names no gguforge console script"
    module, func = found.groups()
    return f"import sys\nfrom {module} import {func}\nsys.exit({func}())"


ENTRY_POINTS = {"python-m": ["-m", "gguforge"], "console-script": ["-c", console_script_entry()]}
# Moments: before the CLI module is imported, while typer is imported by it, before the command installs
# its own handlers, and inside the command (numpy loads when it reads the checkpoint).
MOMENTS = ["gguforge.cli", "typer", "gguforge.signals", "numpy"]
SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sighup": signal.SIGHUP}


def expected_line(sig: int) -> str:
    return "interrupted" if sig == signal.SIGINT else f"interrupted by {signal.Signals(sig).name}"


# Every signal through `python -m`; the console script runs the same entry module, so SIGINT there.
START_UP = [(e, m, s) for e in ENTRY_POINTS for m in MOMENTS for s in SIGNALS if e == "python-m" or s == "sigint"]


@pytest.mark.parametrize("entry, moment, sig", START_UP, ids=["-".join(case) for case in START_UP])
def test_signal_during_start_up(model, tmp_path, entry, moment, sig):
    hook_dir, out_dir = tmp_path / "hook", tmp_path / "out"
    hook_dir.mkdir(), out_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(PAUSE_HOOK)
    mark = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook_dir), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "GGUFORGE_TEST_PAUSE_AT": moment, "GGUFORGE_TEST_PAUSE_MARK": str(mark)}
    proc = subprocess.Popen([sys.executable, *ENTRY_POINTS[entry], "convert-hf", str(model), "--outfile",
                             str(out_dir / "x.gguf"), "--outtype", "q8_0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not mark.exists() and proc.poll() is None:
            time.sleep(0.01)
        assert mark.exists(), f"never reached the import of {moment}: {proc.communicate()}"
        proc.send_signal(SIGNALS[sig])
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + SIGNALS[sig], stderr
    assert stderr.strip().splitlines() == [expected_line(SIGNALS[sig])]
    assert stdout == ""
    assert names(out_dir) == []


# -- 2. option values that used to end as exit 70 -------------------------------------------------------


@pytest.mark.parametrize("size", ["²M", "3²", "١٢M", "½G", "Ⅻ"])
def test_unicode_digits_in_split_max_size(model, gguf_file, tmp_path, capsys, size):
    """str.isdigit() accepts '²' and int() does not: only ASCII digits are sizes."""
    run_fails(capsys, ["convert-hf", model, "--outfile", tmp_path / "c.gguf", "--split-max-size", size],
              "--split-max-size")
    run_fails(capsys, ["quantize", gguf_file, tmp_path / "q.gguf", "Q8_0", "--split-max-size", size],
              "--split-max-size")
    assert names(tmp_path) == []


@pytest.mark.parametrize("qtype", ["²", "١٥", "⑦"])
def test_unicode_digits_as_a_type_number(gguf_file, tmp_path, capsys, qtype):
    run_fails(capsys, ["quantize", gguf_file, tmp_path / "q.gguf", qtype], "unknown quantization type")
    run_fails(capsys, ["quantize", gguf_file, tmp_path / "q.gguf", "Q8_0", "--prune-layers", qtype], "--prune-layers")
    assert names(tmp_path) == []


def writable() -> list[str]:
    from gguforge.quantize.presets import writable_types
    return [t.name for t in writable_types()]


def test_writable_types_are_those_the_quantizer_encodes():
    """The list the messages give is the native quantizer's type table: each one encodes a row."""
    from gguforge.quantize.encode import encode
    from gguforge.quantize.native import block_info, requires_imatrix
    assert {"Q8_0", "Q4_K", "F16", "IQ4_XS"} <= set(writable()) and "Q8_1" not in writable()
    row = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)
    for name in writable():
        n, nbytes = block_info(T[name])
        imatrix = np.linspace(0.5, 2, 256, dtype=np.float32) if requires_imatrix(T[name]) else None
        assert encode(row, T[name], imatrix=imatrix).nbytes == 256 // n * nbytes


@pytest.mark.parametrize("option", [["--tensor-type", "attn_q=q8_1"], ["--token-embedding-type", "iq2_xxs"],
                                    ["--output-tensor-type", "Q8_K"], ["--tensor-type", "ffn=i32"]],
                         ids=["tensor-type", "token-embedding-type", "output-tensor-type", "integer"])
def test_types_ggml_knows_but_gguforge_cannot_write(gguf_file, tmp_path, capsys, option):
    given = option[1].split("=")[-1]
    if given.upper() in writable():
        pytest.skip(f"{given} can be written now")
    err = run_fails(capsys, ["quantize", gguf_file, tmp_path / "q.gguf", "Q4_K_M", *option], "cannot write")
    assert names(tmp_path) == []
    (tensor_types_file := tmp_path / "types.txt").write_text(f"attn_k={given}\n")
    run_fails(capsys, ["quantize", gguf_file, tmp_path / "q.gguf", "Q4_K_M", "--tensor-type-file", tensor_types_file],
              "cannot write")
    assert err


def test_the_refusal_names_every_writable_type(gguf_file, tmp_path, capsys):
    main(["quantize", str(gguf_file), str(tmp_path / "q.gguf"), "Q4_K_M", "--tensor-type", "attn_q=q8_1"])
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert hint.startswith("hint: ")
    listed = hint.split(": ", 2)[-1].split(", ")
    assert sorted(listed) == sorted(t.lower() for t in writable())


# llama-quantize takes --output-tensor-type / --token-embedding-type as given (llama_tensor_get_type returns
# them before tensor_type_fallback), then aborts in ggml_row_size when the block does not divide the row;
# --tensor-type goes through the fallback (Q4_K -> Q5_0 on 64-wide rows).
@pytest.mark.parametrize("option", ["--output-tensor-type", "--token-embedding-type"])
@pytest.mark.parametrize("qtype", ["q4_k", "Q6_K", "iq4_xs"])
def test_explicit_type_whose_block_does_not_divide_the_rows(gguf_file, tmp_path, capsys, option, qtype):
    err = run_fails(capsys, ["quantize", gguf_file, tmp_path / "q.gguf", "Q4_K_M", option, qtype],
                    option, "64", "256")
    assert "weight" in err
    assert names(tmp_path) == []


def test_explicit_type_that_fits_the_rows_is_used(gguf_file, tmp_path):
    from gguforge.format.reader import open_reader
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(gguf_file), str(out), "Q4_K_M", "--output-tensor-type", "q5_0",
                 "--token-embedding-type", "q4_0", "-q"]) == 0
    types = {t.name: T(t.tensor_type) for t in open_reader(out).tensors}
    assert types["output.weight"] == T.Q5_0 and types["token_embd.weight"] == T.Q4_0


def test_tensor_type_on_narrow_rows_falls_back(gguf_file, tmp_path):
    """--tensor-type Q4_K on 64-wide rows: tensor_type_fallback's Q4_K -> Q5_0, as llama-quantize."""
    from gguforge.format.reader import open_reader
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(gguf_file), str(out), "Q8_0", "--tensor-type", "attn_q=q4_k", "-q"]) == 0
    types = {t.name: T(t.tensor_type) for t in open_reader(out).tensors}
    assert types["blk.0.attn_q.weight"] == T.Q5_0


@pytest.mark.parametrize("key", ["\ud800", "a\udcffb", "general.\udfff"])
def test_metadata_key_that_is_not_valid_unicode(model, tmp_path, capsys, key):
    overrides = tmp_path / "meta.json"
    overrides.write_text(json.dumps({key: 1}), encoding="ascii")  # JSON escapes: a lone surrogate survives
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run_fails(capsys, ["convert-hf", model, "--outfile", out_dir / "x.gguf", "--metadata", overrides],
              "not valid Unicode")
    assert names(out_dir) == []


@pytest.mark.parametrize("key", ["\ud800", "\udcff"])  # \udcff: the byte 0xff of a non-UTF-8 argument
def test_override_kv_key_that_is_not_valid_utf8(gguf_file, tmp_path, capsys, key):
    run_fails(capsys, ["quantize", gguf_file, tmp_path / "q.gguf", "Q8_0", "--override-kv", f"{key}=int:1"],
              "not valid UTF-8")
    assert names(tmp_path) == []


STDERR_CLOSED_CASES = {
    "split-size": ["convert-hf", "{model}", "--outfile", "{out}/x.gguf", "--split-max-size", "²M"],
    "missing-model": ["convert-hf", "{out}/nothing-here", "--outfile", "{out}/x.gguf"],
    "tensor-type": ["quantize", "{gguf}", "{out}/q.gguf", "Q4_K_M", "--tensor-type", "attn_q=q8_1"],
    "usage": ["quantize", "{gguf}"],
}


@pytest.mark.parametrize("case", list(STDERR_CLOSED_CASES))
def test_bad_input_with_stderr_closed(model, gguf_file, tmp_path, case):
    """`2>&-`: Python starts with sys.stderr None; the exit code must still be 2, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(model=model, gguf=gguf_file, out=out) for a in STDERR_CLOSED_CASES[case]]
    r = subprocess.run(["sh", "-c", 'exec "$@" 2>&-', "sh", sys.executable, "-m", "gguforge", *args],
                       capture_output=True, text=True)
    assert r.returncode == EXIT_BAD_INPUT, r.stdout
    assert names(out) == []


# -- 3. a tensor with a dimension of 0 ----------------------------------------------------------------


def write_gguf_with(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from gguforge.format.writer import Metadata
    md = Metadata()
    md.str("general.architecture", "qwen2moe")
    entries = [TensorEntry(name, a.shape, T.F32) for name, a in tensors.items()]
    write_gguf_shards([path], [md], [(0, len(entries))], entries,
                      lambda: iter([(i, a.tobytes()) for i, a in enumerate(tensors.values())]))


@pytest.mark.parametrize("shape", [(0, 32), (3, 0), (0,)])
def test_inspect_and_diff_show_a_tensor_with_a_zero_dimension(tmp_path, capsys, shape):
    ramp = np.arange(64, dtype=np.float32).reshape(2, 32)
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    write_gguf_with(a, {"empty": np.zeros(shape, np.float32), "ramp": ramp})
    write_gguf_with(b, {"empty": np.zeros(shape, np.float32), "ramp": ramp + 0.25})
    write_gguf_with(c, {"empty": np.zeros((1, 32), np.float32), "ramp": ramp})
    capsys.readouterr()
    assert main(["inspect", str(a)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "empty" in line)
    assert f" {'x'.join(map(str, reversed(shape)))} " in line, out  # ggml order, ne0 first
    assert main(["diff", str(a), str(a)]) == 0
    assert main(["diff", str(a), str(b), "--tol", "0.5"]) == 0  # the empty tensors compare equal
    assert main(["diff", str(a), str(b), "--tol", "0.1"]) == 1
    assert "ramp" in capsys.readouterr().out
    assert main(["diff", str(a), str(c)]) == 1
    assert "empty" in capsys.readouterr().out
    run_fails(capsys, ["quantize", a, tmp_path / "q.gguf", "Q8_0"], "dimension of size 0")
    assert not (tmp_path / "q.gguf").exists()


# -- 4. a property test over the option parsers -------------------------------------------------------

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Pieces that have broken parsers before (Unicode digits int() refuses, surrogates, separators), mixed with
# arbitrary Unicode, unpaired surrogates included.
DIGITS = [*"0123456789²³¹٣١۲०〇½Ⅻ⑦", *"KMGkmgB"]
PIECES = [*DIGITS, *"=:,._-+ \t\n\x00\ud800\udcff\udfffß", "q4_k", "Q8_0", "q8_1", "iq2_xxs", "f16", "Q4_K_M",
          "int:", "float:", "bool:", "str:", "1e40", "nan", "attn_q", "(", "[", "*", "{ftype}", "general.name",
          "split.count", "tokenizer.ggml.tokens"]
TEXT = st.one_of(st.text(st.characters(exclude_categories=()), max_size=12),
                 st.lists(st.sampled_from(PIECES), max_size=6).map("".join),
                 st.lists(st.sampled_from(DIGITS), min_size=1, max_size=4).map("".join))


def parsed_or_refused(fn, text: str) -> None:
    from gguforge.cli import _one_line
    try:
        fn(text)
    except UserError as e:
        assert len(f"error: {_one_line(e.message)}".splitlines()) == 1


def encoded(md) -> None:
    from gguforge.format.writer import encode_header
    encode_header(md, [])


def metadata_with(overrides: dict):
    from gguforge.convert.metadata import apply_overrides
    from gguforge.format.writer import Metadata
    md = Metadata()
    md.str("general.name", "x")
    apply_overrides(md, overrides)
    encoded(md)


def kv_override(text: str):
    from gguforge.format.writer import Metadata
    from gguforge.quantize.overrides import apply_kv_overrides, parse_kv_overrides
    md = Metadata()
    apply_kv_overrides(md, parse_kv_overrides([text]))
    encoded(md)


def parsers() -> dict:
    from gguforge.cli import output_for_type, parse_preset_list
    from gguforge.convert.plan import parse_outtype_preset
    from gguforge.format.split import parse_size
    from gguforge.quantize.overrides import parse_prune_layers
    from gguforge.quantize.presets import PRESETS, parse_ggml_type, parse_tensor_type_option
    return {
        "--split-max-size": parse_size,
        "quantize TYPE": parse_preset_list,
        "convert-hf --outtype preset": parse_outtype_preset,
        "--output-tensor-type": parse_ggml_type,
        "--tensor-type": parse_tensor_type_option,
        "--prune-layers": parse_prune_layers,
        "--override-kv": kv_override,
        "--override-kv key": lambda s: kv_override(f"{s}=int:1"),
        "--override-kv str": lambda s: kv_override(f"general.name=str:{s}"),
        "--metadata key": lambda s: metadata_with({s: 1}),
        "--metadata value": lambda s: metadata_with({"general.x": s, "general.y": [s]}),
        "--outfile {ftype}": lambda s: output_for_type(s, PRESETS["Q8_0"], True),
    }


PARSERS = ["--split-max-size", "quantize TYPE", "convert-hf --outtype preset", "--output-tensor-type", "--tensor-type",
           "--prune-layers", "--override-kv", "--override-kv key", "--override-kv str", "--metadata key",
           "--metadata value", "--outfile {ftype}"]


def test_the_property_covers_every_parser():
    assert sorted(parsers()) == sorted(PARSERS)


@pytest.mark.parametrize("option", PARSERS)
@FUZZ
@given(text=TEXT)
@example(text="²")  # the values that broke the parsers before, always tried
@example(text="²M")
@example(text="\ud800")
@example(text="\udcff=int:1")
def test_every_option_parser_parses_or_refuses(option, text):
    """In-process: each parser returns a value or raises UserError (one line), whatever text it gets."""
    parsed_or_refused(parsers()[option], text)


# The same through the whole command (option mapping, regex compilation, planning), without writing.
CLI_OPTIONS = {
    "quantize": ["TYPE", "--split-max-size", "--tensor-type", "--output-tensor-type", "--token-embedding-type",
                 "--override-kv", "--prune-layers", "NTHREADS"],
    "convert-hf": ["--outtype", "--split-max-size", "--model-name", "--pre-tokenizer"],
}


@pytest.mark.parametrize("command, option", [(c, o) for c in CLI_OPTIONS for o in CLI_OPTIONS[c]])
@settings(FUZZ, max_examples=15)
@given(value=TEXT)
def test_every_size_type_and_key_option_through_the_cli(model, gguf_file, tmp_path, capsys, command, option, value):
    out = tmp_path / "out.gguf"
    if command == "quantize":
        args = ["quantize", str(gguf_file), str(out), value if option == "TYPE" else "Q4_K_M"]
        args += [value] if option == "NTHREADS" else [] if option == "TYPE" else [f"{option}={value}"]
    else:
        args = ["convert-hf", str(model), "--outfile", str(out), f"{option}={value}"]
    code = main([*args, "--dry-run", "-q"])
    err = capsys.readouterr().err
    assert code in (0, EXIT_BAD_INPUT), err
    assert "internal error" not in err and "Traceback" not in err
    if code and not err.startswith("Usage: "):  # (click's usage errors have their own layout)
        one_error(code, err)
    assert not out.exists()


# -- verify --mmproj helpers, with numbers worked out by hand ------------------------------------------


def test_compare_normalises_by_the_reference():
    from gguforge.verify_vision import compare
    candidate, reference = np.array([[1.0, 2.0, 2.0]]), np.array([[1.0, 2.0, 4.0]])  # sums of squares 9 and 21
    got = compare(candidate, reference)
    assert got["nmse"] == pytest.approx(4 / 21)  # error 2^2 over the reference's 21, not the candidate's 9
    assert got["nmse_db"] == pytest.approx(10 * np.log10(4 / 21))
    assert got["max_abs_diff"] == 2.0
    assert compare(reference, candidate)["nmse"] == pytest.approx(4 / 9)
    assert compare(np.zeros(3), np.zeros(3))["nmse"] == 0.0
    assert compare(np.ones(3), np.zeros(3))["nmse"] == np.inf


def ramp_image() -> np.ndarray:
    """2 rows x 4 columns, value 12 x + 100 y (+ the channel): bilinear sampling reproduces it exactly."""
    y, x = np.mgrid[0:2, 0:4]
    return np.stack([12 * x + 100 * y + c for c in range(3)], axis=-1).astype(np.uint8)


def test_bilinear_resize_of_a_non_square_image():
    from gguforge.verify_vision import resize_bilinear
    # Down to 2 x 1: the output pixels' centres fall on source positions x = 0.5, 2.5 and y = 0.5.
    small = resize_bilinear(ramp_image(), width=2, height=1)
    assert small.shape == (1, 2, 3)
    assert small[..., 0].tolist() == [[56, 80]]  # 12 * 0.5 + 50, 12 * 2.5 + 50
    assert small[..., 2].tolist() == [[58, 82]]
    # Up to 8 x 4: centres at x = -0.25 (clamped to 0), 0.25, ..., 3.25 (clamped to 3); y = 0, 0.25, 0.75, 1.
    big = resize_bilinear(ramp_image(), width=8, height=4)
    assert big.shape == (4, 8, 3)
    xs, ys = [0, 3, 9, 15, 21, 27, 33, 36], [0, 25, 75, 100]
    assert big[..., 0].tolist() == [[x + y for x in xs] for y in ys]
    assert np.array_equal(resize_bilinear(ramp_image(), width=4, height=2), ramp_image())


@pytest.fixture(scope="module")
def f32_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hardening-f32") / "m-f32.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(path), "--outtype", "f32", "-q"]) == 0
    return path


def test_explicit_types_as_llama_quantize(f32_file, tmp_path, capsys):
    """llama-quantize itself: --output-tensor-type / --token-embedding-type q4_k on 64-wide rows abort it
    (GGML_ASSERT in gguf.cpp), which gguforge refuses up front; --tensor-type q4_k falls back, byte for byte."""
    from helpers import llama_tool
    quantize = llama_tool("llama-quantize")
    for option in ("--output-tensor-type", "--token-embedding-type"):
        r = subprocess.run([str(quantize), option, "q4_k", str(f32_file), str(tmp_path / "llama.gguf"), "Q4_K_M"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "GGML_ASSERT" in r.stderr, r.stderr[-2000:]
        run_fails(capsys, ["quantize", f32_file, tmp_path / "ours.gguf", "Q4_K_M", option, "q4_k"], option)
        (tmp_path / "llama.gguf").unlink(missing_ok=True)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    r = subprocess.run([str(quantize), "--tensor-type", "attn_q=q4_k", str(f32_file), str(theirs), "Q4_K_M", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert main(["quantize", str(f32_file), str(ours), "Q4_K_M", "--tensor-type", "attn_q=q4_k", "-q"]) == 0
    assert ours.read_bytes() == theirs.read_bytes()
