#!/usr/bin/env python3
"""Benchmark convert-hf --remote on loopback: parallel range reads against a per-connection rate limit.

Serves a generated bf16 Qwen3.5-4B-shaped checkpoint (scripts/bench_convert.py's generator; default one
layer and a 64k vocabulary, about 0.5 GB) from scripts/hub_server.py on 127.0.0.1, every connection
limited to --rate bytes per second, so the test is about parallelism rather than the disk (keep
rate x connections below what the machine converts locally, or the conversion is what is measured).
Times in one run, side by side:

- gguforge convert-hf --remote with 1 connection and with 8 (--connections),
- llama.cpp's convert_hf_to_gguf.py --remote (gguf-py SafetensorRemote: one range request per tensor,
  one at a time) on the same server: HF_ENDPOINT points its snapshot_download at it, and its
  SafetensorRemote.BASE_DOMAIN (fixed to huggingface.co in gguf-py) is set to the same URL,
- the local conversion of the same directory (no network), for peak RSS.

Throughput is network bytes (the safetensors files) over wall time, also as a fraction of the
aggregate limit of the connections used (rate x connections) and of the 8-connection aggregate.

    python scripts/bench_remote.py                        # 0.5 GB, 6 MB/s per connection
    python scripts/bench_remote.py --layers 8 --vocab 248320 --rate 50e6 --no-reference   # 3.1 GB: peak RSS
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_convert import QWEN35_4B, make_checkpoint, measure, reference_tree  # noqa: E402
from hub_server import HubServer  # noqa: E402

REPO = "bench-org/Qwen3.5-bench"

# llama.cpp's converter with its remote reader pointed at the loopback hub (gguf-py hard-codes
# huggingface.co) and the generated tokenizer named (it is not in the converter's hash table).
REFERENCE_REMOTE = """
import os, sys, runpy
sys.path.insert(0, sys.argv.pop(1))
import gguf.utility
gguf.utility.SafetensorRemote.BASE_DOMAIN = os.environ["HF_ENDPOINT"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen35"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=65536, help="vocabulary (the embedding is most of a 1-layer model)")
    ap.add_argument("--rate", type=float, default=6e6, help="bytes per second per connection")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--outtype", default="bf16")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gguforge-bench")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()

    model = args.workdir / f"qwen35-4b-{args.layers}L-{args.vocab}"
    if not (model / "model.safetensors.index.json").exists():
        print(f"generating {model} ...", flush=True)
        QWEN35_4B["vocab_size"] = args.vocab  # Qwen3.5-4B's dimensions otherwise
        make_checkpoint(model, args.layers)
    shards = sorted(model.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL)  # warm the page cache
    print(f"model: {model.name} ({size / 1e9:.2f} GB bf16), {args.rate / 1e6:.0f} MB/s per connection")

    out = args.workdir / "remote-out.gguf"
    home = Path(tempfile.mkdtemp(prefix="bench-hf-home-"))
    rows = []
    with HubServer({REPO: model}, rate=args.rate) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_TOKEN", None)
        ours = [sys.executable, "-m", "gguforge", "convert-hf", REPO, "--remote", "--outfile", str(out), "--quiet",
                "--outtype", args.outtype, "--force"]
        for n in sorted({1, args.connections}):
            hub.peak_connections, hub.transfers = 0, []
            t, rss = measure(ours + ["--remote-connections", str(n)], env=env)
            rows.append((f"gguforge --remote, {n} connection{'s' * (n > 1)}", n, t, rss, hub.peak_connections,
                         hub.busy_seconds()))
        if not args.no_reference:
            ref = reference_tree(Path.home() / ".cache" / "gguforge-bench")
            renv = {**env, "PYTHONPATH": str(ref / "gguf-py")}
            hub.peak_connections, hub.transfers = 0, []
            try:
                t, rss = measure([sys.executable, "-c", REFERENCE_REMOTE, str(ref), str(ref / "convert_hf_to_gguf.py"),
                                  REPO, "--remote", "--outfile", str(out), "--outtype", args.outtype, "--no-mtp"],
                                 env=renv)
                rows.append(("llama.cpp convert_hf_to_gguf.py --remote", 1, t, rss, hub.peak_connections,
                             hub.busy_seconds()))
            except RuntimeError as e:
                print(f"llama.cpp --remote failed: {str(e)[-600:]}")
    local_t, local_rss = measure([sys.executable, "-m", "gguforge", "convert-hf", str(model), "--outfile", str(out),
                                  "--quiet", "--outtype", args.outtype, "--force"])
    out.unlink(missing_ok=True)

    aggregate = args.rate * args.connections
    print(f"\nwall: the whole command (start-up, small files, headers, conversion); transfer: the time the server "
          f"was sending safetensors bytes on at least one connection. Limits: {args.rate / 1e6:g} MB/s x "
          f"connections.\n")
    print(f"| run | wall s | MB/s (wall) | transfer s | MB/s (transfer) | of its connections' limit "
          f"| of the {args.connections}-connection limit | peak RSS | server connections |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, t, rss, peak, transfer in rows:
        rate = size / transfer
        print(f"| {name} | {t:.1f} | {size / t / 1e6:.0f} | {transfer:.1f} | {rate / 1e6:.0f} | "
              f"{rate / (args.rate * n):.0%} | {rate / aggregate:.0%} | {rss / 2**20:.0f} MB | {peak} |")
    print(f"| gguforge, local directory (no network) | {local_t:.1f} | {size / local_t / 1e6:.0f} | | | | | "
          f"{local_rss / 2**20:.0f} MB | |")
    base = {name: t for name, _, t, *_ in rows}
    many = base.get(f"gguforge --remote, {args.connections} connections")
    if many:
        for name, t in base.items():
            if t != many:
                print(f"{name}: {t / many:.2f}x the time of {args.connections} connections")


if __name__ == "__main__":
    main()
