"""The library API: gguforge.convert_hf and gguforge.quantize, importable without torch."""

from __future__ import annotations

import subprocess
import sys

import gguf
import pytest

import gguforge
from gguforge.cli import embedded_model_dir, main


def test_convert_then_quantize_equals_the_cli(tmp_path):
    model = embedded_model_dir()
    path = gguforge.convert_hf(model, tmp_path / "lib-{ftype}.gguf", outtype="bf16")
    assert path == tmp_path / "lib-bf16.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(tmp_path / "cli.gguf"), "--outtype", "bf16", "-q"]) == 0
    assert path.read_bytes() == (tmp_path / "cli.gguf").read_bytes()

    q = gguforge.quantize(path, tmp_path / "q.gguf", "Q8_0", output_tensor_type="F16")
    assert main(["quantize", str(path), str(tmp_path / "q-cli.gguf"), "Q8_0", "--output-tensor-type", "f16",
                 "-q"]) == 0
    assert q.read_bytes() == (tmp_path / "q-cli.gguf").read_bytes()
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q).tensors}
    assert types["output.weight"] == gguf.GGMLQuantizationType.F16


def test_default_name_and_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = gguforge.convert_hf(embedded_model_dir(), outtype="f16", split_max_tensors=10)
    assert first.name.endswith("-00001-of-00004.gguf") or "-00001-of-" in first.name
    assert first.is_file()


def test_bad_input_raises_user_error(tmp_path):
    with pytest.raises(gguforge.UserError, match="unknown output type"):
        gguforge.convert_hf(embedded_model_dir(), tmp_path / "x.gguf", outtype="q9_9")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(gguforge.UserError, match="no such file"):
        gguforge.quantize(tmp_path / "missing.gguf", tmp_path / "y.gguf", "Q8_0")
    with pytest.raises(TypeError):
        gguforge.convert_hf(embedded_model_dir(), tmp_path / "z.gguf", no_such_option=True)


def test_import_gguforge_loads_no_torch():
    code = "import sys, gguforge; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_quantize_is_callable_before_and_after_the_subpackage_is_imported():
    code = ("import gguforge; a = callable(gguforge.quantize); import gguforge.quantize.run; "
            "from gguforge import quantize; print(a, callable(gguforge.quantize), callable(quantize))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["True", "True", "True"], r.stderr
