"""Peak memory of converting a qwen4exp checkpoint whose PLE n-gram table is >= 1 GB (12 float32 shards),
side by side with the same checkpoint's tiny table: the table is streamed shard by shard into one tensor.

    python scripts/bench_ple_memory.py [--gib 1.0] [--outtype f32]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_mocks  # noqa: E402

PREFIX = "model.layers.2.ple.ple_embedding.ngram_embedding.shard_{}.weight"


def peak_of(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in MiB of the child, seconds)."""
    import time
    start = time.perf_counter()
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return int(r.stdout.split()[-1]) // 1024, time.perf_counter() - start


def big_table(src: Path, dst: Path, gib: float) -> int:
    """dst: src with 12 shards totalling `gib` GiB, written shard by shard (one safetensors file each)."""
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    n, width = 12, sd[PREFIX.format(0)].shape[1]
    rows = int(gib * 2**30 / 4 / width / n) + 1
    weight_map = {}
    for i in range(n):
        del sd[PREFIX.format(i)]
        fname = f"ple-{i:05d}.safetensors"
        save_file({PREFIX.format(i): np.random.default_rng(i).standard_normal((rows, width), np.float32)},
                  str(dst / fname), metadata={"format": "pt"})
        weight_map[PREFIX.format(i)] = fname
    save_file(sd, str(dst / "model-rest.safetensors"), metadata={"format": "pt"})
    (dst / "model.safetensors").unlink()
    weight_map.update({k: "model-rest.safetensors" for k in sd})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return rows * n * width * 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--outtype", default="f32")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = make_mocks.make_mock("qwen4exp", tmp / "small")
        nbytes = big_table(small, tmp / "big", args.gib)
        results = {}
        for name in ("small", "big"):
            out = tmp / f"{name}.gguf"
            results[name] = peak_of([sys.executable, "-m", "gguforge", "convert-hf", str(tmp / name),
                                     "--outfile", str(out), "--outtype", args.outtype, "-q"])
            out.unlink()
    (rs, ts), (rb, tb) = results["small"], results["big"]
    print(f"PLE table {nbytes / 2**30:.2f} GiB, --outtype {args.outtype}")
    print(f"peak RSS: tiny table {rs} MiB, big table {rb} MiB (ratio {rb / rs:.2f}); "
          f"time {ts:.1f} s vs {tb:.1f} s")


if __name__ == "__main__":
    main()
