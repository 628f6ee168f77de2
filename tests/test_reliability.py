"""Reliability: every bad input is one clear error, nothing partial is left behind, inputs are never touched.

Each CLI case asserts the exit code, a one-line message (plus an optional hint) without a traceback,
no output or `.NAME.*.part` temp file left, and the input files unchanged (hashed before and after).
(test_bad_inputs.py covers the reader's refusals; test_quantize_cmd.py the quantize refusals.)
"""

from __future__ import annotations

import hashlib
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gguforge.cli import main
from gguforge.archs.options import ConvertOptions
from gguforge.convert.plan import plan_conversion
from gguforge.checkpoint.read import open_checkpoint
from gguforge.errors import EXIT_BAD_INPUT, UserError

from helpers import gguforge, read_gguf, qwen2moe_config, qwen2moe_tensors, write_checkpoint


def digest(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_one_error(stderr: str, *needles: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], stderr
    return lines[0]


def convert_fails(model: Path, out_dir: Path, *needles: str, extra=(), code=EXIT_BAD_INPUT) -> str:
    """Run convert-hf on a bad model: one error line, nothing written, input unchanged."""
    out_dir.mkdir(exist_ok=True)
    before = digest(model)
    r = gguforge("convert-hf", str(model), "--outfile", str(out_dir / "x.gguf"), *extra)
    assert r.returncode == code, r.stderr
    line = assert_one_error(r.stderr, *needles)
    assert list(out_dir.iterdir()) == []  # no output, no .x.gguf.*.part
    assert digest(model) == before
    return line


@pytest.fixture
def config():
    return qwen2moe_config()


def checkpoint(tmp_path: Path, config: dict, edit=None, name="model") -> Path:
    tensors = qwen2moe_tensors(qwen2moe_config())  # weights as the default config implies
    if edit:
        edit(tensors)
    return write_checkpoint(tmp_path / name, config, tensors)


# -- config / weights disagreements ---------------------------------------------------------------


def test_shape_mismatch_names_tensor_shapes_and_config_values(tmp_path, config):
    def widen_k(t):
        t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    line = convert_fails(checkpoint(tmp_path, config, widen_k), tmp_path / "out",
                         "model.layers.1.self_attn.k_proj.weight: shape [64, 64] but config implies [32, 64]")
    assert line.endswith("(num_key_value_heads=2 x hidden_size/num_attention_heads=16)")


def test_config_from_another_model_is_caught_on_the_first_tensor(tmp_path):
    # Weights of the default config, config claiming another hidden size: the embedding disagrees first.
    convert_fails(checkpoint(tmp_path, qwen2moe_config(hidden_size=128)), tmp_path / "out",
                  "shape [512, 64] but config implies [512, 128] (hidden_size=128)")


def test_expert_shape_mismatch(tmp_path):
    convert_fails(checkpoint(tmp_path, qwen2moe_config(moe_intermediate_size=16)), tmp_path / "out",
                  "mlp.experts.0.", "moe_intermediate_size=16")


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.v_proj.weight", "model.norm.weight",
                                  "model.layers.1.mlp.shared_expert.down_proj.weight"])
def test_missing_expected_tensor_is_named(tmp_path, config, name):
    convert_fails(checkpoint(tmp_path, config, lambda t: t.pop(name)), tmp_path / "out",
                  f"tensor {name} is missing")


def test_missing_untied_output_head(tmp_path, config):
    convert_fails(checkpoint(tmp_path, config, lambda t: t.pop("lm_head.weight")), tmp_path / "out",
                  "lm_head.weight is missing")


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers",
                                 "rms_norm_eps"])
def test_missing_config_key_is_named(tmp_path, config, key):
    del config[key]
    convert_fails(checkpoint(tmp_path, config), tmp_path / "out", f"config.json has no {key}")


@pytest.mark.parametrize("key, value", [("hidden_size", "64"), ("num_attention_heads", 0),
                                        ("rms_norm_eps", "small"), ("num_experts", 2.5),
                                        ("rope_parameters", [1, 2])])
def test_config_value_of_the_wrong_kind_is_named(tmp_path, config, key, value):
    config[key] = value
    convert_fails(checkpoint(tmp_path, config), tmp_path / "out", f"config.json: {key} must be")


def test_non_float_weight_is_refused_before_writing(tmp_path, config):
    def to_int(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.int32)
    convert_fails(checkpoint(tmp_path, config, to_int), tmp_path / "out",
                  "model.layers.0.self_attn.q_proj.bias: dtype I32 cannot be converted")


def test_packed_and_per_expert_layouts_both_validate(tmp_path, config):
    for packed in (False, True):
        root = write_checkpoint(tmp_path / f"p{packed}", config, qwen2moe_tensors(config, packed=packed))
        plan_conversion(open_checkpoint(root), ConvertOptions())
    tensors = qwen2moe_tensors(config, packed=True)
    tensors["model.layers.1.mlp.experts.down_proj"] = tensors["model.layers.1.mlp.experts.down_proj"][:3]
    with pytest.raises(UserError, match=r"experts\.down_proj: shape \[3, 64, 32\] but config implies "
                                        r"\[4, 64, 32\] \(num_experts=4\)"):
        plan_conversion(open_checkpoint(write_checkpoint(tmp_path / "bad", config, tensors)), ConvertOptions())


# -- the mocks of all four architectures (needs torch + transformers) ----------------------------


MOCKS = [("qwen2moe", "causal")] + [(a, layout) for a in ("qwen3next", "qwen35", "qwen35moe")
                                    for layout in ("causal", "hub")]


@pytest.mark.parametrize("arch, layout", MOCKS)
def test_mocks_pass_validation(mock_model, arch, layout):
    pytest.importorskip("transformers")
    root = mock_model(arch, layout)
    mtp_options = () if arch == "qwen2moe" else (ConvertOptions(no_mtp=True),)  # qwen2moe refuses MTP flags
    if layout == "hub":
        mtp_options += (ConvertOptions(mtp_only=True),)
    for options in (ConvertOptions(),) + mtp_options:
        plan_conversion(open_checkpoint(root), options)


def rewrite_tensor(root: Path, name: str, array: np.ndarray) -> None:
    """Replace one tensor of a (float32, single-file) mock checkpoint."""
    from safetensors.numpy import load_file, save_file
    path = root / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name] = array
    save_file(tensors, str(path))


@pytest.mark.parametrize("arch, name, rows, why", [
    ("qwen3next", "model.layers.0.linear_attn.in_proj_qkvz.weight", 160, "linear_num_value_heads=4"),
    ("qwen3next", "model.layers.1.self_attn.q_proj.weight", 64, "2 x num_attention_heads=4"),
    ("qwen35", "model.layers.0.linear_attn.in_proj_b.weight", 2, "linear_num_value_heads=4"),
    ("qwen35moe", "model.layers.2.linear_attn.A_log", 2, "linear_num_value_heads=4"),
])
def test_hybrid_arch_mismatches(tmp_path, mock_model, arch, name, rows, why):
    pytest.importorskip("transformers")
    import shutil
    root = Path(shutil.copytree(mock_model(arch, "causal"), tmp_path / "m"))
    shape = open_checkpoint(root).tensors[name].shape
    rewrite_tensor(root, name, np.zeros((rows, *shape[1:]), np.float32))
    line = convert_fails(root, tmp_path / "out", f"{name}: shape [{rows}")
    assert why in line


# -- disk full, Ctrl-C, SIGTERM -----------------------------------------------------------------------


def under_ulimit(kib: int, *args: str) -> subprocess.CompletedProcess:
    """The CLI with a file size limit: Python ignores SIGXFSZ, so writes past it fail with EFBIG."""
    command = " ".join(["ulimit -f", str(kib), ";", "exec", sys.executable, "-m", "gguforge", *args])
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True)


def test_disk_full_convert(tmp_path, config):
    model = checkpoint(tmp_path, config)
    before = digest(model)
    out = tmp_path / "out"
    out.mkdir()
    r = under_ulimit(100, "convert-hf", str(model), "--outfile", str(out / "x.gguf"), "--outtype", "f32")
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    assert_one_error(r.stderr, "cannot write", "x.gguf", "File too large")
    assert list(out.iterdir()) == [] and digest(model) == before


def test_disk_full_quantize(tmp_path, config):
    model = checkpoint(tmp_path, config)
    source = tmp_path / "f32.gguf"
    assert gguforge("convert-hf", str(model), "--outfile", str(source), "--outtype", "f32", "-q").returncode == 0
    before = digest(source)
    out = tmp_path / "out"
    out.mkdir()
    r = under_ulimit(100, "quantize", str(source), str(out / "q.gguf"), "F16")
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    assert_one_error(r.stderr, "cannot write", "File too large")
    assert list(out.iterdir()) == [] and digest(source) == before


@pytest.fixture(scope="module")
def large_model(tmp_path_factory) -> Path:
    """~300 MB of float32 weights: converting it takes long enough to interrupt mid-write."""
    config = qwen2moe_config(hidden_size=1024, vocab_size=32768, num_attention_heads=16, num_key_value_heads=4)
    return write_checkpoint(tmp_path_factory.mktemp("large") / "model", config, qwen2moe_tensors(config))


def wait_for_growing_temp(proc: subprocess.Popen, out: Path) -> Path:
    """Poll until the `.x.gguf.*.part` temp file exists and has grown past the header twice."""
    sizes = []
    for _ in range(100_000):  # an iteration cap, not a time limit
        if proc.poll() is not None:
            pytest.fail(f"the conversion ended before it could be interrupted: {proc.stderr.read()}")
        temps = list(out.glob(".x.gguf.*.part"))
        if temps:
            size = temps[0].stat().st_size if temps[0].exists() else 0
            if size > (1 << 20) and (not sizes or size > sizes[-1]):
                sizes.append(size)
                if len(sizes) >= 2:
                    return temps[0]
        time.sleep(0.002)
    pytest.fail("the temp file never grew")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT],
                         ids=["ctrl-c", "sigterm", "sighup", "sigquit"])
def test_interrupt_mid_write_leaves_nothing(tmp_path, large_model, sig):
    before = digest(large_model)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "gguforge", "convert-hf", str(large_model), "--outfile",
                             str(out / "x.gguf"), "--outtype", "f16", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        temp = wait_for_growing_temp(proc, out)
        proc.send_signal(sig)
        _, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, stderr  # as a shell reports a process the signal ended
    expected = "interrupted" if sig == signal.SIGINT else f"interrupted by {signal.Signals(sig).name}"
    assert stderr.strip().splitlines() == [expected], stderr
    assert not temp.exists() and list(out.iterdir()) == []
    assert digest(large_model) == before


def test_a_run_after_sigkill_removes_the_killed_runs_temp_file(tmp_path, large_model):
    """SIGKILL cannot be caught: its hidden temp file stays until the next run to that output removes it."""
    out = tmp_path / "out"
    out.mkdir()
    args = [sys.executable, "-m", "gguforge", "convert-hf", str(large_model), "--outfile", str(out / "x.gguf"),
            "--outtype", "f16", "--threads", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        temp = wait_for_growing_temp(proc, out)
        proc.kill()
        proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert temp.exists()  # left behind, as SIGKILL allows nothing else
    r = subprocess.run(args + ["--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["x.gguf"] and r.stderr == ""


# -- pickle checkpoints ---------------------------------------------------------------------------------


@pytest.fixture
def pickle_model(tmp_path, config):
    """The same weights as a safetensors checkpoint and as pytorch_model.bin (one tensor non-contiguous)."""
    torch = pytest.importorskip("torch")
    tensors = qwen2moe_tensors(config)
    safe = write_checkpoint(tmp_path / "safe" / "model", config, tensors)  # same name: same general.name
    root = write_checkpoint(tmp_path / "pickle" / "model", config, {})
    (root / "model.safetensors").unlink()
    state = {k: torch.from_numpy(v) for k, v in tensors.items()}
    state["model.layers.0.mlp.gate.weight"] = state["model.layers.0.mlp.gate.weight"].t().contiguous().t()
    torch.save(state, root / "pytorch_model.bin")
    return root, safe


def test_pickle_is_refused_without_the_flag(tmp_path, pickle_model):
    root, _ = pickle_model
    convert_fails(root, tmp_path / "out", "only pickle checkpoints")
    r = gguforge("convert-hf", str(root), "--outfile", str(tmp_path / "out" / "x.gguf"))
    assert "hint: " in r.stderr and "--allow-pickle" in r.stderr


def test_pickle_with_the_flag_equals_safetensors(tmp_path, pickle_model):
    root, safe = pickle_model
    before = digest(root)
    for src, extra in ((safe, ()), (root, ("--allow-pickle",))):
        r = gguforge("convert-hf", str(src), "--outfile", str(src.parent / "x.gguf"), "-q", *extra)
        assert r.returncode == 0, r.stderr
    a, b = read_gguf(root.parent / "x.gguf"), read_gguf(safe.parent / "x.gguf")  # file order may differ
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type and a[name].data.tobytes() == b[name].data.tobytes()
    assert digest(root) == before


def test_pickle_shape_mismatch_is_validated_too(tmp_path, pickle_model):
    torch = pytest.importorskip("torch")
    root, _ = pickle_model
    state = torch.load(root / "pytorch_model.bin", weights_only=True)
    state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    torch.save(state, root / "pytorch_model.bin")
    convert_fails(root, tmp_path / "out", "o_proj.weight: shape [64, 32] but config implies [64, 64]",
                  extra=("--allow-pickle",))


class RunsCode:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['MARKER'], 'w').write('pwned')",))


def test_pickle_that_runs_code_is_refused(tmp_path, pickle_model, monkeypatch):
    root, _ = pickle_model
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    (root / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": RunsCode()}))
    convert_fails(root, tmp_path / "out", "pytorch_model.bin: refused by torch's weights-only loader",
                  extra=("--allow-pickle",))
    assert not marker.exists()


def test_garbage_pickle_with_the_flag(tmp_path, pickle_model):
    root, _ = pickle_model
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    convert_fails(root, tmp_path / "out", "pytorch_model.bin: refused by torch's weights-only loader",
                  extra=("--allow-pickle",))
    (root / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a broken zip archive
    convert_fails(root, tmp_path / "out", "pytorch_model.bin: not a readable PyTorch checkpoint",
                  extra=("--allow-pickle",))


def test_pickle_without_torch_says_to_install_it(tmp_path, pickle_model, monkeypatch, capsys):
    root, _ = pickle_model
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    code = main(["convert-hf", str(root), "--outfile", str(tmp_path / "x.gguf"), "--allow-pickle", "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert_one_error(err, "needs torch")
    assert "pip install torch" in err and not (tmp_path / "x.gguf").exists()


def test_vocab_only_needs_no_weights(tmp_path, config):
    root = write_checkpoint(tmp_path / "m", config, {})
    r = gguforge("convert-hf", str(root), "--outfile", str(tmp_path / "v.gguf"), "--vocab-only", "-q")
    assert r.returncode == 0, r.stderr

