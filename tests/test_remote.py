"""convert-hf HUB_ID --remote against a hub look-alike on 127.0.0.1 (scripts/hub_server.py): the same
bytes as a local conversion, every fault retried or one clear error with nothing written, bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import make_mocks
from helpers import qwen2moe_config, qwen2moe_tensors, write_checkpoint
from hub_server import HEADER_ZONE, HubServer

from gguforge.archs.options import ConvertOptions
from gguforge.checkpoint import remote as remote_mod
from gguforge.checkpoint.remote import RemoteOptions
from gguforge.convert.pipeline import convert_hf, convert_hf_many
from gguforge.errors import UserError
from gguforge.format.split import SplitOptions

REPO = "tiny-org/Tiny-MoE-Chat"
# Small blocks (window / 2 connections) so that the tiny mocks span many range requests.
FAST = dict(window=48 << 10, connections=3, retries=3, backoff=0.01, timeout=2.0)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A sharded bf16 Qwen2-MoE checkpoint (numpy only) of about 330 KB."""
    config = qwen2moe_config()
    return write_checkpoint(tmp_path_factory.mktemp("moe") / "m", config, qwen2moe_tensors(config), shards=2, bf16=True)


@pytest.fixture(scope="module")
def f32_dir(tmp_path_factory):
    """float32 values that bf16 cannot represent, one file."""
    config = qwen2moe_config()
    return write_checkpoint(tmp_path_factory.mktemp("f32") / "m", config, qwen2moe_tensors(config, seed=3))


@pytest.fixture(scope="module")
def hub(moe_dir, f32_dir):
    with HubServer({REPO: moe_dir, "tiny-org/Tiny-F32": f32_dir}) as server:
        yield server


@pytest.fixture
def stats(monkeypatch):
    """The read-ahead counters of the last remote conversion (taken when its source closes)."""
    seen = {}
    close = remote_mod.RemoteSource.close

    def recording(self):
        seen.update(peak_live=self.peak_live, direct=self.direct, total=self.total, blocks=len(self.blocks))
        close(self)

    monkeypatch.setattr(remote_mod.RemoteSource, "close", recording)
    return seen


def local(model_dir: Path, out: Path, repo: str, outtype: str, split=None) -> bytes:
    """The local conversion of the same files, named as the hub id names it."""
    plan, target = convert_hf(str(model_dir), str(out), ConvertOptions(outtype=outtype), display_name=repo, split=split)
    return b"".join(s.path.read_bytes() for s in plan.shards)


def remote(hub, out: Path, repo: str, outtype: str, split=None, **kw) -> bytes:
    options = RemoteOptions(endpoint=hub.url, **{**FAST, **kw})
    plan, target = convert_hf(repo, str(out), ConvertOptions(outtype=outtype), remote=options, split=split)
    return b"".join(s.path.read_bytes() for s in plan.shards)


# -- same bytes -----------------------------------------------------------------------------------

MOCK_CASES = [(arch, "hub" if make_mocks.spec(arch).hub else "causal", outtype)
              for arch, outtype in zip(make_mocks.ARCHS, ["auto", "f16", "Q4_K_M"] * len(make_mocks.ARCHS))]


def integer_tensor_bytes(model: Path) -> int:
    """Bytes of the checkpoint's integer tensors (read while planning, as metadata, not on the schedule)."""
    from safetensors import safe_open
    total = 0
    for path in model.glob("*.safetensors"):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                part = f.get_slice(name)
                if part.get_dtype().startswith(("I", "U")):
                    total += int(np.prod(part.get_shape())) * int(part.get_dtype()[1:]) // 8
    return total


@pytest.mark.parametrize("arch,layout,outtype", MOCK_CASES, ids=[f"{a}-{l}-{o}" for a, l, o in MOCK_CASES])
def test_every_architecture_mock_converts_remotely_to_the_local_bytes(arch, layout, outtype, mock_model, hub,
                                                                      tmp_path, stats):
    pytest.importorskip("torch")
    model = mock_model(arch, layout=layout, dtype="bfloat16")
    repo = f"mock-org/{arch}-{layout}"
    hub.repos[repo] = model
    assert remote(hub, tmp_path / "r.gguf", repo, outtype) == local(model, tmp_path / "l.gguf", repo, outtype)
    # the plan foresaw every tensor read: nothing was fetched outside the schedule but the integer tensors
    # planning reads as metadata (qwen4exp's hash constants); held bytes stayed within the window plus one
    # block per reading thread (a block it needs before the read-ahead got to it)
    assert stats["direct"] == integer_tensor_bytes(model) and stats["blocks"] > 4
    assert stats["peak_live"] <= FAST["window"] + (os.cpu_count() or 1) * RemoteOptions(**FAST).block


@pytest.mark.parametrize("repo,outtype,split", [
    ("tiny-org/Tiny-F32", "f32", None),  # float32 values bf16 cannot represent, copied as stored
    ("tiny-org/Tiny-F32", "bf16", SplitOptions(0, 9)),  # rounded; split output
    (REPO, "Q4_K_M", SplitOptions(0, 12)),  # one-pass preset, split output
    (REPO, "bf16", None),
])
def test_remote_equals_local(repo, outtype, split, hub, tmp_path, stats):
    model = hub.repos[repo]
    (tmp_path / "r").mkdir()
    (tmp_path / "l").mkdir()
    got = remote(hub, tmp_path / "r", repo, outtype, split)
    assert got == local(model, tmp_path / "l", repo, outtype, split)
    assert [p.name for p in sorted((tmp_path / "r").iterdir())] == [p.name for p in sorted((tmp_path / "l").iterdir())]
    assert stats["direct"] == 0


def test_library_api_remote(hub, moe_dir, tmp_path):
    import gguforge
    options = RemoteOptions(endpoint=hub.url, revision=hub.commit)  # remote=True: HF_ENDPOINT's hub
    path = gguforge.convert_hf(REPO, tmp_path / "r.gguf", outtype="bf16", remote=options)
    assert path.read_bytes() == local(moe_dir, tmp_path / "l.gguf", REPO, "bf16")


def test_several_outtypes_in_one_pass_read_the_checkpoint_once(hub, moe_dir, tmp_path, stats):
    (tmp_path / "r").mkdir()
    (tmp_path / "l").mkdir()
    template = "{ftype}.gguf"
    before = hub.bytes_sent
    options = RemoteOptions(endpoint=hub.url, **FAST)
    convert_hf_many(REPO, str(tmp_path / "r" / template), ConvertOptions(outtype="BF16,Q8_0,Q4_K_M"), remote=options)
    sent = hub.bytes_sent - before
    convert_hf_many(str(moe_dir), str(tmp_path / "l" / template), ConvertOptions(outtype="BF16,Q8_0,Q4_K_M"),
                    display_name=REPO)
    for name in ("bf16.gguf", "q8_0.gguf", "q4_k_m.gguf"):
        assert (tmp_path / "r" / name).read_bytes() == (tmp_path / "l" / name).read_bytes()
    data = sum(p.stat().st_size for p in moe_dir.glob("*.safetensors"))
    assert stats["direct"] == 0 and sent < 1.1 * data  # each byte over the network once (plus small files)


# -- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("faults", [
    [("drop", dict(count=3, after=2))],
    [("truncate", dict(count=3, after=1))],
    [("503", dict(count=3, after=0)), ("503", dict(count=2, after=5))],  # bursts
    [("429", dict(count=2, after=1, seconds=0.05))],  # honours Retry-After
    [("slow", dict(count=3, after=1, seconds=0.3))],
    [("stall", dict(count=1, after=3, seconds=3.0))],  # half a body, then silence: the read timeout fires
], ids=["drop", "truncate", "503-bursts", "429-retry-after", "slow", "stall"])
def test_faults_are_retried_to_the_same_bytes(faults, hub, moe_dir, tmp_path):
    expected = local(moe_dir, tmp_path / "l.gguf", REPO, "bf16")
    injected = [hub.inject(kind, **kw) for kind, kw in faults]
    before = len(hub.requests)
    try:
        got = remote(hub, tmp_path / "r.gguf", REPO, "bf16", timeout=1.0)
        assert [f.count for f in injected] == [0] * len(injected)  # every fault happened ...
    finally:
        for f in injected:
            f.count = 0
    assert got == expected
    assert len(hub.requests) - before > 8  # ... within a run of many range requests


def test_retries_exhausted_is_one_error_and_nothing_written(hub, tmp_path):
    fault = hub.inject("503", count=1000, after=2)
    try:
        with pytest.raises(UserError, match=r"giving up after 2 retries \(HTTP 503\)"):
            remote(hub, tmp_path / "out.gguf", REPO, "bf16", retries=2)
    finally:
        fault.count = 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change", ["same size", "shorter"])
def test_a_file_replaced_mid_run_is_one_error_and_nothing_written(change, tmp_path):
    config = qwen2moe_config()
    model = write_checkpoint(tmp_path / "m", config, qwen2moe_tensors(config), shards=2, bf16=True)

    def replace(path: Path) -> None:
        data = bytearray(path.read_bytes())
        if change == "shorter":
            data = data[:len(data) // 2]
        else:
            data[-64:] = bytes(64)
        new = path.with_suffix(".new")
        new.write_bytes(data)
        os.replace(new, path)

    out = tmp_path / "out"
    out.mkdir()
    with HubServer({REPO: model}) as server:
        server.inject("replace", after=3, action=replace, match="00001-of")
        with pytest.raises(UserError, match="changed on the hub during the conversion") as e:
            remote(server, out, REPO, "bf16")
    assert "nothing was written" in str(e.value)
    assert list(out.iterdir()) == []


# -- the command ----------------------------------------------------------------------------------


def run(hub, tmp_path, *args, token=None, **env_extra):
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "TMPDIR": str(temp),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(key, None)
    if token:
        env["HF_TOKEN"] = token
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "gguforge", "convert-hf", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path)


def test_cli_remote_leaves_no_tensor_data_on_disk(hub, moe_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = run(hub, tmp_path, REPO, "--remote", "--outfile", str(out / "x.gguf"), "--outtype", "bf16", "--quiet",
            "--remote-connections", "4", "--remote-window", "64K", "--revision", hub.commit)
    assert r.returncode == 0, r.stderr
    assert (out / "x.gguf").read_bytes() == local(moe_dir, tmp_path / "l.gguf", REPO, "bf16")
    assert list((tmp_path / "tmp").iterdir()) == []  # the small files' temporary folder is gone
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.stat().st_size > 64 << 10]


def test_cli_dry_run_reads_only_headers(hub, tmp_path):
    before = len(hub.requests)
    r = run(hub, tmp_path, REPO, "--remote", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "blk.0.ffn_down_exps.weight" in r.stdout
    ranges = [rng for method, path, rng in hub.requests[before:] if path.endswith(".safetensors") and method == "GET"]
    assert ranges and all(int(rng.split("=")[1].split("-")[0]) < HEADER_ZONE for rng in ranges)
    assert list(tmp_path.glob("*.gguf")) == []


@pytest.mark.parametrize("args,message", [
    (("tiny-org/absent", "--remote"), "tiny-org/absent: no such model on the Hugging Face hub"),
    ((REPO, "--remote", "--revision", "v9"), "no revision 'v9'"),
    ((REPO, "--remote-connections", "2"), "--remote-connections needs --remote"),
    (("--remote",), "--remote needs a hub model id"),
    ((REPO, "--remote", "--remote-window", "lots"), "--remote-window 'lots'"),
    ((REPO, "--remote", "--imatrix-text", "calibration.txt"), "--remote cannot be combined with --imatrix-text"),
])
def test_cli_bad_remote_input_is_one_line(hub, tmp_path, args, message):
    r = run(hub, tmp_path, *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.glob("*.gguf")) == []


def test_cli_offline_is_one_line(hub, tmp_path):
    r = run(hub, tmp_path, REPO, "--remote", HF_HUB_OFFLINE="1")
    assert r.returncode == 2 and "HF_HUB_OFFLINE is set" in r.stderr and "Traceback" not in r.stderr


def test_cli_token_from_hf_token(moe_dir, tmp_path):
    with HubServer({REPO: moe_dir}, token="hf_secret") as private:
        denied = run(private, tmp_path, REPO, "--remote", "--dry-run")
        allowed = run(private, tmp_path, REPO, "--remote", "--dry-run", token="hf_secret")
    assert denied.returncode == 2 and "HF_TOKEN" in denied.stderr
    assert allowed.returncode == 0, allowed.stderr


# -- memory ---------------------------------------------------------------------------------------


def peak_rss(cmd: list[str], env: dict) -> int:
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, r.returncode)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    rss, rc = out.stdout.split()
    assert rc == "0", out.stderr
    return int(rss)


def test_memory_is_the_local_bound_plus_the_window(tmp_path):
    """A float32 checkpoint of 200 MB converted remotely with a 16 MB window peaks at what the local
    conversion does plus the window and the HTTP stack (measured by hand for 3.1 GB: scripts/bench_remote.py)."""
    config = qwen2moe_config(vocab_size=98304, hidden_size=256, num_hidden_layers=1, num_attention_heads=4)
    tensors = qwen2moe_tensors(config)
    model = write_checkpoint(tmp_path / "big", config, tensors)
    size = sum(t.nbytes for t in tensors.values())
    assert size > 190e6
    del tensors
    window = 16 << 20
    with HubServer({REPO: model}) as server:
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf")}
        env.pop("HF_TOKEN", None)
        cmd = [sys.executable, "-m", "gguforge", "convert-hf", "--outtype", "f16", "--quiet", "--threads", "2",
               "--force"]
        here = peak_rss([*cmd, str(model), "--outfile", str(tmp_path / "l.gguf")], env)
        there = peak_rss([*cmd, REPO, "--remote", "--remote-window", str(window), "--outfile",
                          str(tmp_path / "r.gguf")], env)
    assert (tmp_path / "r.gguf").read_bytes()[-4096:] == (tmp_path / "l.gguf").read_bytes()[-4096:]
    # the HTTP stack (huggingface_hub, httpx) and the pool of block buffers cost about 40 MB more
    overhead = 64 << 20
    assert size > 2 * (window + overhead)  # holding the tensors would show
    assert there < here + window + overhead, (here, there)


def test_progress_counts_network_bytes(hub, moe_dir, tmp_path):
    bars = []

    @contextmanager
    def factory(total, description):
        bar = [total, description, 0]
        bars.append(bar)

        def advance(n):
            bar[2] += n
        yield advance

    options = RemoteOptions(endpoint=hub.url, **FAST)
    convert_hf(REPO, str(tmp_path / "r.gguf"), ConvertOptions(outtype="bf16"), remote=options, progress_factory=factory)
    ((total, description, received),) = bars
    header_and_data = sum(p.stat().st_size for p in moe_dir.glob("*.safetensors"))
    assert description.startswith(f"reading {REPO}, writing r.gguf")
    assert received == total and header_and_data - 2 * 4096 < total < header_and_data  # tensor bytes, once
