"""Promises kept under a hostile or careless user (issue 16): usage errors, confined reads, output
races and special files, exit codes and messages. Interruption is in test_interrupt.py, config and
tokenizer values in test_hostile_values.py.

Every failure must be exit 2 with one clear line on stderr (usage errors: click's usage message),
nothing written, no temp file left, the input untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import gguforge
from gguforge.cli import _click_classes, app, main
from gguforge.errors import EXIT_BAD_INPUT, UserError
from gguforge.format import atomic
from gguforge.format.writer import atomic_outputs

from helpers import gguforge as run_cli, qwen2moe_config, read_gguf, qwen2moe_tensors, write_checkpoint


def digest(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def one_error(stderr: str, *needles: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    for needle in needles:
        assert needle in lines[0], stderr
    return lines[0]


def no_temp_files(directory: Path) -> bool:
    return not any(p.name.endswith(".part") for p in directory.rglob("*"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    config = qwen2moe_config()
    return write_checkpoint(tmp_path_factory.mktemp("hostile") / "model", config, qwen2moe_tensors(config), shards=2)


@pytest.fixture(scope="module")
def gguf_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile-gguf") / "m.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(path), "-q"]) == 0
    return path


# -- 1. usage errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["convert-hf", "--outtpye", "f16"], ["quantize", "a.gguf"], ["no-such-command"], ["convert-hf", "-t", "abc"],
    ["convert-hf", "--threads", "0"], ["convert-hf", "--threads", "-1"], ["quantize", "a", "b", "Q8_0", "-t", "10**9"],
    ["quantize", "a", "b", "Q8_0", "--threads", "99999999999"], ["diff", "a.gguf"], ["inspect"], ["diff", "a", "b", "--tol", "x"],
    ["--no-such-flag"], ["convert-hf", "--split-max-tensors", "many"],
], ids=lambda a: " ".join(a))
def test_usage_errors_exit_2_with_the_usage_message(args, tmp_path):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    assert "Usage: gguforge" in r.stderr and "Error: " in r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_installed_typer_raises_a_class_main_catches():
    """Whatever typer is installed (click's exceptions or its vendored copy), its usage errors are caught."""
    caught = _click_classes("ClickException")
    with pytest.raises(Exception) as info:
        app(args=["convert-hf", "--outtpye"], standalone_mode=False, prog_name="gguforge")
    assert isinstance(info.value, caught), type(info.value).__mro__


def usage_error_classes() -> list[type]:
    classes = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            classes.append(__import__(module, fromlist=["UsageError"]).UsageError)
        except ImportError:
            pass
    return classes


@pytest.mark.parametrize("cls", usage_error_classes(), ids=lambda c: c.__module__)
def test_both_click_families_are_usage_errors(cls, gguf_file, monkeypatch, capsys):
    """click's own UsageError (typer < 0.22 raises it) and typer's vendored one (typer 0.29) alike."""
    import gguforge.inspect

    def raise_usage(path):
        raise cls("made-up usage error")
    monkeypatch.setattr(gguforge.inspect, "load", raise_usage)
    assert main(["inspect", str(gguf_file)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Error: made-up usage error" in err and "internal error" not in err


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"gguforge {gguforge.__version__} (gguf-py {version('gguf')})"
    assert re.fullmatch(r"gguforge \S+ \(gguf-py \d+\.\d+\S*\)", r.stdout.strip())


# -- 3. reads confined to the model directory -----------------------------------------------------------


def copy_model(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "model"))


def point_index_at(root: Path, fname) -> None:
    path = root / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = fname
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("fname", ["../secret.safetensors", "sub/../../secret.safetensors", "{abs}", "",
                                   "model-00001-of-00002.safetensors\0x", 5, None])
def test_index_paths_outside_the_model_are_refused(model, tmp_path, fname):
    root = copy_model(model, tmp_path)
    secret = tmp_path / "secret.safetensors"
    shutil.copy(root / "model-00001-of-00002.safetensors", secret)  # a readable file outside the model
    point_index_at(root, str(secret) if fname == "{abs}" else fname)
    before = digest(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli("convert-hf", str(root), "--outfile", str(out / "x.gguf"))
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    one_error(r.stderr, "model.safetensors.index.json")
    assert list(out.iterdir()) == [] and digest(tmp_path) == before


def test_a_folder_link_out_of_the_model_is_refused(model, tmp_path):
    root = copy_model(model, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(root / "model-00001-of-00002.safetensors", elsewhere / "model-00001-of-00002.safetensors")
    (root / "sub").symlink_to(elsewhere)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: ("sub/" + v if v.startswith("model-00001") else v) for k, v in index["weight_map"].items()}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    r = run_cli("convert-hf", str(root), "--outfile", str(tmp_path / "x.gguf"))
    assert r.returncode == EXIT_BAD_INPUT
    one_error(r.stderr, "outside the model directory")


def test_hub_cache_snapshot_links_keep_working(model, tmp_path):
    """Every file of a hub snapshot is a symbolic link to ../../blobs/HASH: that must convert."""
    repo = tmp_path / "hub" / "models--org--Tiny"
    snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in model.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    out = tmp_path / "x.gguf"
    r = run_cli("convert-hf", str(snapshot), "--outfile", str(out), "-q")
    assert r.returncode == 0, r.stderr
    reference = tmp_path / "ref.gguf"
    assert run_cli("convert-hf", str(model), "--outfile", str(reference), "-q").returncode == 0
    a, b = read_gguf(out), read_gguf(reference)
    assert a.keys() == b.keys() and all(a[n].data.tobytes() == b[n].data.tobytes() for n in a)


# -- 4. output races and special files -------------------------------------------------------------------


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    target = tmp_path / "x.gguf"
    with pytest.raises(UserError, match="created or changed by someone else"):
        with atomic_outputs([target]) as (f,):
            f.write(b"ours")
            target.write_bytes(b"theirs")  # another process creates the output meanwhile
    assert target.read_bytes() == b"theirs" and no_temp_files(tmp_path)


def test_a_replaced_file_that_changes_during_the_run_is_not_replaced(tmp_path):
    target = tmp_path / "x.gguf"
    target.write_bytes(b"old")  # the caller allowed replacing this file (--force) ...
    with pytest.raises(UserError, match="created or changed by someone else"):
        with atomic_outputs([target]) as (f,):
            f.write(b"ours")
            target.unlink()
            target.write_bytes(b"theirs")  # ... not the one that took its place
    assert target.read_bytes() == b"theirs" and no_temp_files(tmp_path)


def test_split_outputs_race_on_one_shard_leaves_none(tmp_path):
    targets = [tmp_path / f"x-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with pytest.raises(UserError):
        with atomic_outputs(targets) as files:
            for f in files:
                f.write(b"ours")
            targets[2].write_bytes(b"theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == [targets[2].name]


def test_no_replace_move_without_renameat2(tmp_path, monkeypatch):
    """The link-then-unlink fallback refuses an existing name too."""
    monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"a")
    dst.write_bytes(b"b")
    with pytest.raises(FileExistsError):
        atomic.rename_noreplace(str(src), dst)
    assert dst.read_bytes() == b"b" and src.exists()
    dst.unlink()
    atomic.rename_noreplace(str(src), dst)
    assert dst.read_bytes() == b"a" and not src.exists()


def test_two_runs_to_the_same_output_one_wins(model, tmp_path):
    out = tmp_path / "x.gguf"
    args = [sys.executable, "-m", "gguforge", "convert-hf", str(model), "--outfile", str(out), "-q", "-t", "1"]
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, EXIT_BAD_INPUT], results
    loser = next(err for code, err in results if code)
    assert "already exists" in loser or "created or changed by someone else" in loser
    assert out.read_bytes()[:4] == b"GGUF" and no_temp_files(tmp_path)


def special_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    real = tmp_path / "real.gguf"
    real.write_bytes(b"keep")
    link = tmp_path / "link.gguf"
    link.symlink_to(real)
    devnull = tmp_path / "null.gguf"
    devnull.symlink_to(os.devnull)
    directory = tmp_path / "dir.gguf"
    directory.mkdir()
    (directory / "inside").write_bytes(b"keep")
    return {"fifo": fifo, "symlink": link, "link to /dev/null": devnull, "directory": directory}


@pytest.mark.parametrize("command", ["convert-hf", "quantize"])
def test_force_never_replaces_anything_but_a_regular_file(model, gguf_file, tmp_path, command):
    for kind, target in special_files(tmp_path).items():
        before = (target.is_symlink(), os.lstat(target).st_mode, os.lstat(target).st_ino)
        if command == "convert-hf":
            args = ("convert-hf", str(model), "--outfile", str(target), "--force")
        else:
            args = ("quantize", str(gguf_file), str(target), "Q8_0", "--force")
        if kind == "directory" and command == "convert-hf":
            continue  # --outfile DIR writes the default name inside it
        r = run_cli(*args)
        assert r.returncode == EXIT_BAD_INPUT, (kind, r.stderr)
        one_error(r.stderr, "not a regular file")
        assert (target.is_symlink(), os.lstat(target).st_mode, os.lstat(target).st_ino) == before, kind
    assert (tmp_path / "real.gguf").read_bytes() == b"keep" and no_temp_files(tmp_path)
    assert Path(os.devnull).is_char_device()


def test_force_onto_dev_null_is_refused(model, tmp_path):
    r = run_cli("convert-hf", str(model), "--outfile", os.devnull, "--force")
    assert r.returncode == EXIT_BAD_INPUT
    one_error(r.stderr, "character device")
    assert Path(os.devnull).is_char_device()


def test_long_output_names(model, tmp_path):
    name = "n" * 240 + ".gguf"  # 245 characters: legal, but NAME.XXXXXXXX.part would not be
    r = run_cli("convert-hf", str(model), "--outfile", str(tmp_path / name), "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / name).is_file() and no_temp_files(tmp_path)
    too_long = "n" * 300 + ".gguf"
    r = run_cli("convert-hf", str(model), "--outfile", str(tmp_path / too_long))
    assert r.returncode == EXIT_BAD_INPUT
    one_error(r.stderr, too_long, "too long")


def test_temp_names_fit_name_max_for_multibyte_names(tmp_path):
    target = tmp_path / ("é" * 120 + ".gguf")  # 245 bytes of UTF-8
    prefix = atomic.temp_prefix(target)
    assert len((prefix + "X" * atomic.RANDOM_CHARS + atomic.TEMP_SUFFIX).encode()) <= 255
    with atomic_outputs([target]) as (f,):
        f.write(b"x")
    assert target.read_bytes() == b"x"


def test_stale_temp_files_of_a_killed_run_are_removed(model, tmp_path):
    out = tmp_path / "x.gguf"
    prefix = atomic.temp_prefix(out)
    stale = tmp_path / f"{prefix}abcd1234.part"
    stale.write_bytes(b"GGUF partial")  # as SIGKILL leaves it: nobody holds its lock
    unrelated = tmp_path / ".other.gguf.abcd1234.part"
    unrelated.write_bytes(b"not ours")
    r = run_cli("convert-hf", str(model), "--outfile", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and unrelated.exists() and r.stderr == ""


def test_a_live_runs_temp_file_is_left_alone(tmp_path):
    target = tmp_path / "x.gguf"
    with atomic_outputs([target]) as (f,):
        f.write(b"first")
        f.flush()
        (live,) = [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
        atomic.remove_stale_temps(tmp_path, atomic.temp_prefix(target))
        assert live.exists()
    assert target.read_bytes() == b"first"


def test_unremovable_stale_temp_files_are_named_in_one_warning(tmp_path, monkeypatch, capsys):
    target = tmp_path / "x.gguf"
    stale = tmp_path / f"{atomic.temp_prefix(target)}abcd1234.part"
    stale.write_bytes(b"partial")

    def refuse(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(atomic.os, "unlink", refuse)
    atomic.remove_stale_temps(tmp_path, atomic.temp_prefix(target))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and stale.name in err[0]


# -- 6. exit codes and messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("second", ["same", "different"])
def test_closed_stdout_is_never_a_diff_verdict(gguf_file, model, tmp_path, second):
    other = gguf_file
    if second == "different":
        other = tmp_path / "f32.gguf"
        assert run_cli("convert-hf", str(model), "--outfile", str(other), "--outtype", "f32", "-q").returncode == 0
    for args in (("diff", str(gguf_file), str(other)), ("inspect", str(gguf_file))):
        proc = subprocess.Popen([sys.executable, "-m", "gguforge", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # nobody will read: every write fails with EPIPE
        err = proc.stderr.read()
        assert proc.wait() == EXIT_BAD_INPUT, err
        one_error(err, "cannot write to standard output")


def test_full_stdout_is_a_clear_error(gguf_file):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "gguforge", "inspect", str(gguf_file)], stdout=full,
                           stderr=subprocess.PIPE, text=True)
    assert r.returncode == EXIT_BAD_INPUT
    one_error(r.stderr, "cannot write to standard output")


@pytest.mark.parametrize("command", ["inspect", "diff", "quantize"])
def test_a_directory_where_a_file_is_expected(gguf_file, tmp_path, command):
    args = {"inspect": ("inspect", str(tmp_path)), "diff": ("diff", str(gguf_file), str(tmp_path)),
            "quantize": ("quantize", str(tmp_path), str(tmp_path / "q.gguf"), "Q8_0")}[command]
    r = run_cli(*args)
    assert r.returncode == EXIT_BAD_INPUT
    one_error(r.stderr, "is a directory")


def test_a_missing_output_directory_with_a_slash_is_an_error(model, gguf_file, tmp_path):
    r = run_cli("convert-hf", str(model), "--outfile", "newdir/", cwd=tmp_path)
    assert r.returncode == EXIT_BAD_INPUT
    one_error(r.stderr, "newdir/: no such directory")
    r = run_cli("quantize", str(gguf_file), "newdir/", "Q8_0", cwd=tmp_path)
    assert r.returncode == EXIT_BAD_INPUT
    one_error(r.stderr, "newdir/: no such directory")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "newdir").mkdir()
    r = run_cli("convert-hf", str(model), "--outfile", "newdir/", "-q", cwd=tmp_path)
    assert r.returncode == 0 and len(list((tmp_path / "newdir").glob("*.gguf"))) == 1


def test_missing_output_directory(model, tmp_path):
    r = run_cli("convert-hf", str(model), "--outfile", str(tmp_path / "nope" / "x.gguf"))
    assert r.returncode == EXIT_BAD_INPUT
    one_error(r.stderr, "does not exist")


def test_unwritable_output_directory(model, tmp_path, monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    assert main(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf"), "-q"]) == EXIT_BAD_INPUT
    one_error(capsys.readouterr().err, "cannot write", "Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_directories_for_real(model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        r = run_cli("convert-hf", str(model), "--outfile", str(locked / "x.gguf"))
        assert r.returncode == EXIT_BAD_INPUT
        one_error(r.stderr, "cannot write")
        r = run_cli("convert-hf", str(model), cwd=locked)  # the default name, in the working directory
        assert r.returncode == EXIT_BAD_INPUT
        one_error(r.stderr, "cannot write")
    finally:
        locked.chmod(0o755)


def test_invalid_hub_id(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "gguforge", "convert-hf", "Qwen/a..b"], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == EXIT_BAD_INPUT
    one_error(r.stderr, "Qwen/a..b", "not a valid hub model id")


@pytest.mark.parametrize("missing", ["torch", "transformers", "llama_cpp"])
def test_verify_without_its_dependencies(model, gguf_file, monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now raises ImportError
    assert main(["verify", str(model), str(gguf_file)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    one_error(err, "verify needs", f"{missing} is missing")
    assert "pip install" in err


@pytest.mark.parametrize("which, needle", [("dir", "not a model directory"), ("file", "no such file"),
                                           ("file-is-dir", "is a directory"), ("no-config", "no config.json")])
def test_verify_inputs_are_checked_before_loading_models(model, gguf_file, tmp_path, capsys, which, needle):
    hf_dir, gguf = model, gguf_file
    if which == "dir":
        hf_dir = tmp_path / "nope"
    elif which == "file":
        gguf = tmp_path / "nope.gguf"
    elif which == "file-is-dir":
        gguf = tmp_path
    else:
        hf_dir = tmp_path
    assert main(["verify", str(hf_dir), str(gguf)]) == EXIT_BAD_INPUT
    one_error(capsys.readouterr().err, needle)


@pytest.mark.parametrize("args, needle", [
    (("convert-hf", ""), "MODEL is empty"), (("convert-hf", "{model}", "--outfile", ""), "--outfile is empty"),
    (("convert-hf", "{model}", "--model-name", " "), "--model-name is empty"),
    (("convert-hf", "{model}", "--pre-tokenizer", ""), "--pre-tokenizer is empty"),
    (("convert-hf", "{model}", "--outfile", "afile/x.gguf"), "ot a directory"),
])
def test_careless_empty_or_odd_values(model, tmp_path, args, needle):
    (tmp_path / "afile").write_bytes(b"")
    r = run_cli(*(a.format(model=model) for a in args), cwd=tmp_path)
    assert r.returncode == EXIT_BAD_INPUT
    one_error(r.stderr, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_empty_temp_file_is_stale_only_once_it_is_old(tmp_path):
    target = tmp_path / "x.gguf"
    empty = tmp_path / f"{atomic.temp_prefix(target)}abcd1234.part"
    empty.write_bytes(b"")  # as a run killed right after creating it leaves it, or a live run's first instant
    atomic.remove_stale_temps(tmp_path, atomic.temp_prefix(target))
    assert empty.exists()
    old = empty.stat().st_mtime - atomic.JUST_CREATED_S - 1
    os.utime(empty, (old, old))
    atomic.remove_stale_temps(tmp_path, atomic.temp_prefix(target))
    assert not empty.exists()


def test_special_files_among_the_inputs_never_block(model, tmp_path):
    """A FIFO would block a read forever, /dev/zero never end: neither is read as a file."""
    root = copy_model(model, tmp_path)
    (root / "generation_config.json").symlink_to("/dev/zero")
    os.mkfifo(root / "README.md")
    fifo = tmp_path / "over.json"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "gguforge", "convert-hf", str(root), "--outfile",
                        str(tmp_path / "x.gguf"), "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for bad in (fifo, Path("/dev/zero"), tmp_path):
        r = subprocess.run([sys.executable, "-m", "gguforge", "convert-hf", str(model), "--metadata", str(bad),
                            "--outfile", str(tmp_path / "y.gguf")], capture_output=True, text=True, timeout=120)
        assert r.returncode == EXIT_BAD_INPUT
        one_error(r.stderr, "not a regular file")


def test_a_model_folder_name_that_is_not_utf8(model, tmp_path):
    root = Path(shutil.copytree(model, os.fsdecode(bytes(tmp_path) + b"/m\xff")))
    r = run_cli("convert-hf", str(root), "--outfile", str(tmp_path / "x.gguf"), "-q")
    assert r.returncode == 0, r.stderr
    from gguf import GGUFReader
    assert GGUFReader(str(tmp_path / "x.gguf")).get_field("general.name").contents() == "M\ufffd"


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_an_output_created_after_the_existence_check(model, tmp_path, monkeypatch, capsys, force):
    """Between the 'already exists?' check and the start of writing, another process creates the output:
    without --force it is kept (not taken for a file --force allowed replacing)."""
    import gguforge.convert.pipeline as pipeline
    original = pipeline.write_plan
    target = tmp_path / "x.gguf"

    def create_then_write(*args, **kwargs):
        target.write_bytes(b"theirs")
        return original(*args, **kwargs)
    monkeypatch.setattr(pipeline, "write_plan", create_then_write)
    code = main(["convert-hf", str(model), "--outfile", str(target), "-q", *(["--force"] if force else [])])
    if force:
        assert code == 0 and target.read_bytes()[:4] == b"GGUF"
    else:
        assert code == EXIT_BAD_INPUT and target.read_bytes() == b"theirs"
        one_error(capsys.readouterr().err, "already exists")
    assert no_temp_files(tmp_path)
