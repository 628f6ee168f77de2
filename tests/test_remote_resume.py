"""convert-hf --remote --resume: an interrupted run keeps its finished tensors (checked by SHA-256 when
resumed), the resumed output equals an uninterrupted one byte for byte and fetches fewer bytes; a journal
kept for other inputs or options is refused; nothing partial ever takes the output's name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import GGUFReader

from helpers import qwen2moe_config, qwen2moe_tensors, write_checkpoint
from hub_server import HubServer

from gguforge.archs.options import ConvertOptions
from gguforge.checkpoint.remote import RemoteOptions
from gguforge.convert.pipeline import convert_hf, convert_hf_many
from gguforge.errors import UserError
from gguforge.format.resume import journal_path, part_path
from gguforge.format.split import SplitOptions

REPO = "tiny-org/Tiny-MoE-Chat"
FAST = dict(window=48 << 10, connections=2, retries=1, backoff=0.01, timeout=2.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A sharded Qwen2-MoE checkpoint with float32 values bf16 cannot represent (about 660 KB)."""
    config = qwen2moe_config()
    return write_checkpoint(tmp_path_factory.mktemp("moe") / "m", config, qwen2moe_tensors(config), shards=2)


@pytest.fixture
def hub(model, tmp_path):
    copy = tmp_path / "served"  # the test may replace a file: a copy per test
    copy.mkdir()
    for p in model.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    with HubServer({REPO: copy}) as server:
        yield server


def convert(hub, out: Path, outtype="bf16", split=None, force=False, **kw):
    options = RemoteOptions(endpoint=hub.url, resume=True, **{**FAST, **kw})
    if "," in outtype:
        return convert_hf_many(REPO, str(out), ConvertOptions(outtype=outtype), remote=options, split=split,
                               force=force)
    return [convert_hf(REPO, str(out), ConvertOptions(outtype=outtype), remote=options, split=split, force=force)]


def whole(hub, out: Path, outtype="bf16", split=None) -> tuple[dict[str, bytes], int]:
    """An uninterrupted run: its files, and how many tensor data requests it made."""
    before = hub.data_requests
    return files_of(convert(hub, out, outtype, split)), hub.data_requests - before


def interrupted(hub, out: Path, requests: int, **kw) -> None:
    """A run that fails for good (HTTP 503 from then on) halfway through its `requests` data requests."""
    fault = hub.inject("503", count=10 ** 6, after=requests // 2)
    try:
        with pytest.raises(UserError, match="giving up after"):
            convert(hub, out, **kw)
    finally:
        fault.count = 0


def files_of(results) -> dict[str, bytes]:
    return {s.path.name: s.path.read_bytes() for plan, _ in results for s in plan.shards}


def kept_tensors(journal: Path) -> int:
    return len(journal.read_text().splitlines()) - 1


@pytest.mark.parametrize("outtype,split", [
    ("bf16", None),
    ("Q8_0", SplitOptions(0, 7)),  # split: finished shards kept whole, the unfinished one continued
    ("bf16,Q4_K_M", None),  # several outputs from one pass, journaled together
], ids=["single", "split", "several-outtypes"])
def test_resume_gives_the_uninterrupted_bytes_and_fetches_less(outtype, split, hub, tmp_path):
    (tmp_path / "whole").mkdir()
    (tmp_path / "out").mkdir()
    name = "{ftype}.gguf" if "," in outtype else "x.gguf"
    before = hub.bytes_sent
    expected, requests = whole(hub, tmp_path / "whole" / name, outtype, split)
    sent = hub.bytes_sent - before
    assert not [p for p in (tmp_path / "whole").iterdir() if p.name.startswith(".")]  # nothing kept when done

    out = tmp_path / "out" / name
    interrupted(hub, out, requests, outtype=outtype, split=split)
    assert not [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]  # no final file
    first_target = sorted(expected)[0] if "," in outtype else next(iter(expected))
    journal = journal_path(tmp_path / "out" / first_target)
    assert kept_tensors(journal) > 2

    before = hub.bytes_sent
    got = files_of(convert(hub, out, outtype, split))
    resumed = hub.bytes_sent - before
    assert got == expected
    assert resumed < 0.85 * sent, (resumed, sent)  # the kept tensors were not fetched again
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(expected)  # journal and parts gone


def test_a_corrupted_kept_tensor_is_detected_and_written_again(hub, tmp_path, capfd):
    out = tmp_path / "x.gguf"
    expected, requests = whole(hub, tmp_path / "whole.gguf")
    interrupted(hub, out, requests)
    journal, part = journal_path(out), part_path(out)
    kept = kept_tensors(journal)
    assert kept > 3
    bad = GGUFReader(tmp_path / "whole.gguf").tensors[kept - 2]  # the same layout as the part file
    data = bytearray(part.read_bytes())
    data[bad.data_offset + 1] ^= 0x40  # one bit of a kept tensor
    part.write_bytes(data)
    capfd.readouterr()
    got = files_of(convert(hub, out))
    err = capfd.readouterr().err
    assert got == {"x.gguf": expected["whole.gguf"]}
    assert f"{bad.name} does not match its hash" in err and f"resume: kept {kept - 2} of" in err


def test_a_changed_source_file_refuses_the_journal_and_force_starts_over(hub, tmp_path):
    out = tmp_path / "x.gguf"
    interrupted(hub, out, whole(hub, tmp_path / "probe.gguf")[1])
    served = hub.repos[REPO]
    shard = sorted(served.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8)  # same size, other bytes: another ETag
    shard.write_bytes(data)
    with pytest.raises(UserError, match="the source files have changed on the hub") as e:
        convert(hub, out)
    assert "--force" in e.value.hint
    assert not out.exists() and journal_path(out).exists() and part_path(out).exists()  # left as they were
    got = files_of(convert(hub, out, force=True))
    assert got["x.gguf"] == files_of(convert(hub, tmp_path / "whole.gguf"))["whole.gguf"]
    assert not journal_path(out).exists() and not part_path(out).exists()


def test_other_options_refuse_the_journal(hub, tmp_path):
    out = tmp_path / "x.gguf"
    interrupted(hub, out, whole(hub, tmp_path / "probe.gguf")[1])
    with pytest.raises(UserError, match="another output|other conversion options"):
        convert(hub, out, outtype="f16")
    assert not out.exists() and kept_tensors(journal_path(out)) > 2


def test_sigint_keeps_the_resumable_state(hub, tmp_path):
    """The command, interrupted with SIGINT once tensors are journaled, exits 130 with no output file;
    the same command with --resume then finishes it to the bytes of an uninterrupted run."""
    out = tmp_path / "x.gguf"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    cmd = [sys.executable, "-m", "gguforge", "convert-hf", REPO, "--remote", "--resume", "--outfile", str(out),
           "--outtype", "bf16", "--quiet", "--remote-connections", "1", "--remote-window", "16K"]
    slow = hub.inject("slow", count=10 ** 6, after=30, seconds=0.1)
    journal = journal_path(out)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not (journal.exists() and kept_tensors(journal) >= 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        slow.count = 0
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert not out.exists() and part_path(out).exists() and kept_tensors(journal) >= 3
    assert json.loads(journal.read_text().splitlines()[0])["commit"] == hub.commit
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == files_of(convert(hub, tmp_path / "whole.gguf"))["whole.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".gguf", ".part", ".json")) == \
        ["whole.gguf", "x.gguf"]


def test_resume_needs_remote(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gguforge", "convert-hf", "some/model", "--resume"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--resume needs --remote" in r.stderr and "Traceback" not in r.stderr
