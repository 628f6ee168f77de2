"""Interruption (issue 16, class 5): every catchable termination signal, at any point, cleans up and
exits 128 + signal with one line; split output appears all or nothing.

These run the CLI in-process and send the signal to the test process itself at a chosen point (the
CLI's handlers are in place for the call and restored after it). Mid-write interruption of a real
subprocess, and a SIGKILL followed by a new run, are in test_reliability.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from gguforge.cli import main
from gguforge.format import atomic
from gguforge.signals import Terminated, deferred, termination_as_exception

from helpers import qwen2moe_config, qwen2moe_tensors, write_checkpoint

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]
NAMES = ["sigint", "sigterm", "sighup", "sigquit"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    config = qwen2moe_config()
    return write_checkpoint(tmp_path_factory.mktemp("interrupt") / "model", config, qwen2moe_tensors(config))


def expected_line(sig: int) -> str:
    return "interrupted" if sig == signal.SIGINT else f"interrupted by {signal.Signals(sig).name}"


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("sig", SIGNALS, ids=NAMES)
def test_signal_before_writing_starts(model, tmp_path, monkeypatch, capsys, sig):
    """While the checkpoint is still being read: exit 128 + signal, one line, nothing written."""
    import gguforge.convert.pipeline as pipeline
    original = pipeline.open_checkpoint

    def open_then_signal(*args, **kwargs):
        checkpoint = original(*args, **kwargs)
        os.kill(os.getpid(), sig)
        return checkpoint
    monkeypatch.setattr(pipeline, "open_checkpoint", open_then_signal)
    code = main(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf"), "-q"])
    assert code == 128 + sig
    assert capsys.readouterr().err.strip().splitlines() == [expected_line(sig)]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", SIGNALS, ids=NAMES)
def test_signal_while_split_shards_are_moved_into_place(model, tmp_path, monkeypatch, capsys, sig):
    """A signal between two shards' moves is held back until every shard is in place."""
    original = atomic.place
    moved = []

    def place_then_signal(temp, target, expected):
        original(temp, target, expected)
        moved.append(target)
        if len(moved) == 1:
            os.kill(os.getpid(), sig)
    monkeypatch.setattr(atomic, "place", place_then_signal)
    code = main(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf"), "-q",
                 "--split-max-tensors", "10"])
    assert code == 128 + sig
    assert capsys.readouterr().err.strip().splitlines() == [expected_line(sig)]
    names = leftovers(tmp_path)
    assert names == [f"x-0000{i}-of-00004.gguf" for i in range(1, 5)]  # all of them, and no temp file


@pytest.mark.parametrize("sig", SIGNALS, ids=NAMES)
def test_signal_while_writing_split_shards_leaves_nothing(model, tmp_path, monkeypatch, capsys, sig):
    import gguforge.format.writer as writer
    original = writer._write_chunk
    calls = []

    def write_then_signal(f, data):
        calls.append(1)
        if len(calls) == 20:
            os.kill(os.getpid(), sig)
        return original(f, data)
    monkeypatch.setattr(writer, "_write_chunk", write_then_signal)
    code = main(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf"), "-q",
                 "--split-max-tensors", "10", "-t", "1"])
    assert code == 128 + sig and len(calls) >= 20
    assert capsys.readouterr().err.strip().splitlines() == [expected_line(sig)]
    assert leftovers(tmp_path) == []


def test_a_failed_move_takes_back_the_shards_already_placed(model, tmp_path, monkeypatch, capsys):
    original = atomic.place

    def fail_on_third(temp, target, expected):
        if target.name.startswith("x-00003"):
            raise OSError(5, "Input/output error", str(target))
        original(temp, target, expected)
    monkeypatch.setattr(atomic, "place", fail_on_third)
    code = main(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf"), "-q", "--split-max-tensors", "10"])
    assert code == 2
    assert "cannot write" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_handlers_are_restored_after_a_command(model, tmp_path):
    before = {s: signal.getsignal(s) for s in SIGNALS}
    assert main(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf"), "-q"]) == 0
    assert {s: signal.getsignal(s) for s in SIGNALS} == before


def test_deferred_delivers_after_the_block():
    seen = []
    with termination_as_exception():
        with pytest.raises(Terminated) as info:
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                seen.append("block finished")
        assert info.value.signum == signal.SIGTERM
    assert seen == ["block finished"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_library_callers_are_cleaned_up_too(tmp_path, sig):
    """Without the CLI's handlers, the writer turns termination signals into exceptions while it writes."""
    from gguforge.format.writer import atomic_outputs
    before = signal.getsignal(sig)
    with pytest.raises(Terminated):
        with atomic_outputs([tmp_path / "x.gguf"]) as (f,):
            f.write(b"partial")
            os.kill(os.getpid(), sig)
            for _ in range(10**6):  # the handler raises at the next bytecode boundary
                pass
    assert leftovers(tmp_path) == [] and signal.getsignal(sig) == before


def test_a_second_signal_does_not_cut_the_cleanup_short(model, tmp_path, monkeypatch, capsys):
    """Ctrl-C pressed twice, or SIGTERM then SIGHUP: still one line, the first signal's code, no temp file."""
    import gguforge.format.atomic as atomic_module
    original = atomic_module.unlink_quietly

    def unlink_after_another_signal(path):
        os.kill(os.getpid(), signal.SIGHUP)  # arrives while the temp files are being removed
        original(path)
    monkeypatch.setattr(atomic_module, "unlink_quietly", unlink_after_another_signal)
    import gguforge.format.writer as writer
    monkeypatch.setattr(writer, "unlink_quietly", unlink_after_another_signal)
    original_write = writer._write_chunk

    def write_then_signal(f, data):
        os.kill(os.getpid(), signal.SIGTERM)
        return original_write(f, data)
    monkeypatch.setattr(writer, "_write_chunk", write_then_signal)
    code = main(["convert-hf", str(model), "--outfile", str(tmp_path / "x.gguf"), "-q", "-t", "1"])
    assert code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted by SIGTERM"]
    assert leftovers(tmp_path) == []
