#!/usr/bin/env python3
"""Time this checkout against another revision of gguforge, side by side in one run.

Builds REV in a git worktree (its native extension in place), generates one random bf16 checkpoint
with Qwen3.5-4B dimensions (scripts/bench_convert.py), then runs each job with both versions,
alternating, several rounds, and prints the best wall and CPU time of each and the ratios (this / REV).
Outputs of the two versions are compared byte for byte (deliberate format changes show as "no").
Nothing here is a test.

    python scripts/bench_revisions.py 6b53d7b                 # convert + quantize jobs, 4 layers
    python scripts/bench_revisions.py HEAD~5 --rounds 5 --layers 8 --jobs convert-bf16,quantize-Q4_K_M
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

JOBS = ("convert-bf16", "convert-q8_0", "convert-Q4_K_M", "quantize-Q4_K_M", "quantize-Q8_0")


def worktree(rev: str, where: Path) -> Path:
    """REV checked out under `where` with its extension built in place (reused when present)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = where / f"gguforge-{sha[:12]}"
    if not (tree / "setup.py").is_file():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), sha], check=True,
                       capture_output=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True,
                   capture_output=True)
    return tree


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(code_root: Path, args: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `python -m gguforge ARGS` importing gguforge from code_root. CPU time
    (user + system, all threads) is the steadier figure on a shared machine."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    t, c = time.perf_counter(), cpu_seconds()
    r = subprocess.run([sys.executable, "-m", "gguforge", *args], cwd=cwd, env=env, capture_output=True, text=True)
    dt, dc = time.perf_counter() - t, cpu_seconds() - c
    if r.returncode:
        raise SystemExit(f"{code_root}: gguforge {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return dt, dc


def job_args(job: str, model: Path, bf16_gguf: Path, out: Path) -> list[str]:
    kind, arg = job.split("-", 1)
    if kind == "convert":
        return ["convert-hf", str(model), "--outfile", str(out), "--outtype", arg, "--quiet", "--force"]
    return ["quantize", str(bf16_gguf), str(out), arg, "--quiet", "--force"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the revision to compare with (e.g. a commit before a refactor)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gguforge-bench-revisions")
    args = ap.parse_args()
    import bench_convert

    args.workdir.mkdir(parents=True, exist_ok=True)
    other = worktree(args.rev, args.workdir)
    model = args.workdir / f"qwen35-4b-{args.layers}l"
    if not (model / "config.json").is_file():
        bench_convert.make_checkpoint(model, args.layers)
    bf16_gguf = args.workdir / "model-bf16.gguf"
    run(ROOT, ["convert-hf", str(model), "--outfile", str(bf16_gguf), "--outtype", "bf16", "--quiet", "--force"],
        args.workdir)
    versions = {"this": ROOT, args.rev: other}
    print(f"this checkout vs {args.rev} ({other.name}); {args.layers} layers, best of {args.rounds}, "
          f"{os.cpu_count()} cores")
    r = args.rev
    print(f"| job | this wall s | {r} wall s | this / {r} (wall) | this CPU s | {r} CPU s | this / {r} (CPU) "
          "| same bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for job in args.jobs.split(","):
        wall = {name: float("inf") for name in versions}
        cpu = dict(wall)
        outs = {name: args.workdir / f"out-{i}.gguf" for i, name in enumerate(versions)}
        for _ in range(args.rounds):
            for name, code in versions.items():  # alternate, so load changes hit both alike
                w, c = run(code, job_args(job, model, bf16_gguf, outs[name]), args.workdir)
                wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
        same = filecmp.cmp(*outs.values(), shallow=False)
        print(f"| {job} | {wall['this']:.2f} | {wall[r]:.2f} | {wall['this'] / wall[r]:.2f} | {cpu['this']:.2f} "
              f"| {cpu[r]:.2f} | {cpu['this'] / cpu[r]:.2f} | {'yes' if same else 'no'} |")
        for path in outs.values():
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
