#!/usr/bin/env python3
"""Benchmark `gguforge quantize` against llama.cpp's llama_model_quantize, side by side.

In one run, on the same input and thread count:
  1. per preset: `gguforge quantize bf16.gguf out PRESET` vs llama_model_quantize (llama-cpp-python),
     with a check that both files are byte-identical;
  2. HF -> Q4_K_M: `gguforge convert-hf --outtype Q4_K_M` in one pass vs llama.cpp's
     convert_hf_to_gguf.py (bf16) followed by llama_model_quantize;
  3. many presets in one pass: `gguforge quantize bf16.gguf 'out-{ftype}.gguf' Q4_K_M,Q5_K_M,Q6_K,Q8_0`
     vs the four separate gguforge runs (target: <= 0.9x their sum), each output byte-identical to its
     separate run.

The input is a generated random bf16 checkpoint with Qwen3.5-4B dimensions and few layers
(scripts/bench_convert.py builds it; 4 layers is about 1.9 GB), or a small one for quick runs.
Nothing here is a test.

    python scripts/bench_quantize.py                         # Qwen3.5-4B dims, 4 layers
    python scripts/bench_quantize.py --size small            # ~0.2 GB, a quick run
    python scripts/bench_quantize.py --presets Q4_K_M,Q8_0 --threads 2 --no-one-pass
    python scripts/bench_quantize.py --presets ladder --threads 2 --no-one-pass   # Q2_K ... Q5_1
    python scripts/bench_quantize.py --presets none --no-one-pass --threads 2       # only the many-presets run
    python scripts/bench_quantize.py --presets lattice --imatrix synthetic --threads 2 --no-one-pass --many none
        # IQ1_S ... TQ2_0 and COPY against llama-quantize (the program: only it takes an imatrix), both given
        # the same importance matrix (`synthetic`: random positive importance for every weight, written once)

With --imatrix the llama.cpp side is the llama-quantize program built by scripts/llama_tools.py (its time
includes its start-up and lattice-table set-up, as a user sees it); bits per weight are those of the
written file (tensor data over weights).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_convert  # noqa: E402  (checkpoint generator, timing wrapper, llama.cpp tree)

PRESETS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0")
LADDER = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # --presets ladder
LATTICE = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
           "MXFP4_MOE", "Q1_0", "TQ1_0", "TQ2_0", "COPY")  # --presets lattice
FTYPES = {"Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7,  # LLAMA_FTYPE_MOSTLY_*
          "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "IQ4_NL": 25, "IQ4_XS": 30,
          "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9}

# Same layout as Qwen3.5-4B, scaled down: a quick run still exercises every tensor kind.
SMALL = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
             linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64, linear_value_head_dim=64,
             vocab_size=32768)

# llama_model_quantize in a fresh process, as llama-quantize would run (quiet: it logs every tensor).
LLAMA_QUANTIZE = """
import ctypes, sys
import llama_cpp
quiet = llama_cpp.llama_log_callback(lambda *a: None)  # kept referenced: llama.cpp calls it later
llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
src, dst, ftype, threads = sys.argv[1:]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(ftype), int(threads)
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p))
"""


def checkpoint(workdir: Path, size: str, layers: int) -> Path:
    model = workdir / f"qwen35-{'4b' if size == '4b' else 'small'}-{layers}L"
    if not (model / "model.safetensors.index.json").exists():
        print(f"generating {model} ...", flush=True)
        if size == "small":
            bench_convert.QWEN35_4B = {**bench_convert.QWEN35_4B, **SMALL}
        bench_convert.make_checkpoint(model, layers)
    return model


def digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def gguforge(*args: str) -> list[str]:
    # this checkout's gguforge, whatever else is installed
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from gguforge.cli import run; "
            "sys.argv[0] = 'gguforge'; run()", *args, "--quiet"]


def llama_quantize(src: Path, dst: Path, preset: str, threads: int) -> list[str]:
    return [sys.executable, "-c", LLAMA_QUANTIZE, str(src), str(dst), str(FTYPES[preset]), str(threads)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("4b", "small"), default="4b", help="Qwen3.5-4B dimensions, or small ones")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--no-one-pass", action="store_true", help="skip the HF -> Q4_K_M comparison")
    ap.add_argument("--many", default="Q4_K_M,Q5_K_M,Q6_K,Q8_0",
                    help="presets written in one pass and compared with separate runs ('none': skip)")
    ap.add_argument("--imatrix", help="an importance matrix for both sides, or 'synthetic' (written once)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gguforge-bench")
    args = ap.parse_args()
    presets = [p.strip().upper() for p in args.presets.split(",") if p.strip() and p.strip().lower() != "none"]
    presets = [q for p in presets for q in {"LADDER": LADDER, "LATTICE": LATTICE}.get(p, (p,))]
    threads = str(args.threads)

    model = checkpoint(args.workdir, args.size, args.layers)
    shards = sorted(model.glob("*.safetensors"))
    print(f"model: {model} ({sum(p.stat().st_size for p in shards) / 1e9:.2f} GB bf16), threads: {threads}")
    bf16 = args.workdir / f"{model.name}-bf16.gguf"
    if not bf16.exists():
        subprocess.run(gguforge("convert-hf", str(model), "--outfile", str(bf16), "--outtype", "bf16"), check=True)
    subprocess.run(["cat", str(bf16), *map(str, shards)], stdout=subprocess.DEVNULL)  # warm the page cache
    ours, theirs = args.workdir / "bench-ours.gguf", args.workdir / "bench-llama.gguf"

    imatrix = None
    if args.imatrix:
        imatrix = synthetic_imatrix(bf16, args.workdir) if args.imatrix == "synthetic" else Path(args.imatrix)
    rows = []
    for preset in presets:
        with_im = ["--imatrix", str(imatrix)] if imatrix else []
        if imatrix is None:
            llama_cmd = llama_quantize(bf16, theirs, preset, args.threads)
        else:
            llama_cmd = [str(llama_program()), *with_im, str(bf16), str(theirs), preset, threads]
        t_llama, rss_llama = bench_convert.measure(llama_cmd)
        bpw = bits_per_weight(theirs)
        missing = our_missing_kernels(bf16, preset, imatrix)
        if missing:
            rows.append((f"bf16 GGUF -> {preset} ({bpw:.2f} bpw)", None, 0, t_llama, rss_llama,
                         f"no kernel for {missing}"))
            bench_convert.drop(theirs)
            continue
        t_ours, rss_ours = bench_convert.measure(
            gguforge("quantize", str(bf16), str(ours), preset, "--threads", threads, "--force", *with_im))
        same = digest(ours) == digest(theirs)
        rows.append((f"bf16 GGUF -> {preset} ({bpw:.2f} bpw)", t_ours, rss_ours, t_llama, rss_llama,
                     "yes" if same else "NO"))
        bench_convert.drop(ours), bench_convert.drop(theirs)

    if not args.no_one_pass:
        ref = bench_convert.reference_tree(Path.home() / ".cache" / "gguforge-bench")
        env = {**os.environ, "PYTHONPATH": str(ref / "gguf-py")}
        t_ours, rss_ours = bench_convert.measure(
            gguforge("convert-hf", str(model), "--outfile", str(ours), "--outtype", "q4_k_m", "--threads", threads,
                     "--force"))
        ref_bf16 = args.workdir / "bench-llama-bf16.gguf"
        t_conv, rss_conv = bench_convert.measure(
            [sys.executable, "-c", bench_convert.REFERENCE_RUNNER, str(ref), str(ref / "convert_hf_to_gguf.py"),
             str(model), "--outfile", str(ref_bf16), "--outtype", "bf16", "--no-mtp"], env=env)
        t_quant, rss_quant = bench_convert.measure(llama_quantize(ref_bf16, theirs, "Q4_K_M", args.threads))
        rows.append(("HF -> Q4_K_M (one pass vs convert + quantize)", t_ours, rss_ours, t_conv + t_quant,
                     max(rss_conv, rss_quant), f"({t_conv:.1f} s + {t_quant:.1f} s)"))
        for path in (ours, theirs, ref_bf16):
            bench_convert.drop(path)

    many = [] if args.many.strip().lower() == "none" else [p.strip().upper() for p in args.many.split(",")]
    many_row = many and many_presets(bf16, args.workdir, many, threads)

    if rows:
        print("\n| job | gguforge s | gguforge peak RSS | llama.cpp s | llama.cpp peak RSS | llama.cpp / gguforge "
              "| identical |")
        print("|---|---|---|---|---|---|---|")
    for job, t, rss, rt, rrss, same in rows:
        if t is None:
            print(f"| {job} | - | - | {rt:.1f} | {rrss / 2**20:.0f} MB | - | {same} |")
            continue
        print(f"| {job} | {t:.1f} | {rss / 2**20:.0f} MB | {rt:.1f} | {rrss / 2**20:.0f} MB | {rt / t:.2f}× | {same} |")
    if many_row:
        t_one, rss_one, times, rss_sep, same = many_row
        print(f"\n| {len(many)} presets ({','.join(many)}) | one pass s | peak RSS | separate runs s (sum) | max peak RSS "
              "| one pass / sum | identical |")
        print("|---|---|---|---|---|---|---|")
        print(f"| gguforge quantize | {t_one:.1f} | {rss_one / 2**20:.0f} MB | {sum(times):.1f} "
              f"({' + '.join(f'{t:.1f}' for t in times)}) | {rss_sep / 2**20:.0f} MB | {t_one / sum(times):.2f}× "
              f"| {same} |")


def llama_program() -> Path:
    import llama_tools
    return llama_tools.llama_tools("llama-quantize")["llama-quantize"]


def bits_per_weight(path: Path) -> float:
    from gguf import GGUFReader
    tensors = GGUFReader(path).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def our_missing_kernels(bf16: Path, preset: str, imatrix: Path | None) -> str:
    """The types of the preset's plan this gguforge build has no quantizer for ("" when it has all)."""
    sys.path.insert(0, str(ROOT))
    from gguforge.quantize import native
    from gguforge.quantize.imatrix import ImatrixOptions
    from gguforge.quantize.rules import QuantOptions
    from gguforge.quantize.run import quantize_gguf
    options = QuantOptions(imatrix=ImatrixOptions(imatrix) if imatrix else None)
    plans = quantize_gguf(bf16, bf16.with_name("unused.gguf"), preset, options, dry_run=True).plans
    return ", ".join(sorted({p.dst_type.name for p in plans if p.converts and not native.supported(p.dst_type)}))


def synthetic_imatrix(bf16: Path, workdir: Path) -> Path:
    """An importance matrix for every 2-D/3-D weight of the model: random positive sums over 16 chunks of 512
    (the same file for both tools; its values only steer the search, not the amount of work)."""
    out = workdir / f"{bf16.stem}-synthetic-imatrix.gguf"
    if out.exists():
        return out
    import numpy as np
    from gguf import GGUFReader
    sys.path.insert(0, str(ROOT))
    from gguforge.format.imatrix import Imatrix, ImatrixEntry, write_imatrix
    rng = np.random.default_rng(0)
    entries = {}
    for t in GGUFReader(bf16).tensors:
        ne = [int(d) for d in t.shape]  # ggml order
        if len(ne) < 2 or not t.name.endswith(".weight") or "norm" in t.name or t.name == "token_embd.weight":
            continue
        n_mat = ne[2] if len(ne) > 2 else 1
        counts = np.full(n_mat, 16 * 512, np.float32)
        sums = (rng.gamma(0.7, 2.0, (n_mat, ne[0])) * counts[:, None]).astype(np.float32)
        entries[t.name] = ImatrixEntry(sums, counts)
    write_imatrix(out, Imatrix(entries, ["synthetic"], 16, 512))
    return out


def many_presets(bf16: Path, workdir: Path, presets: list[str], threads: str):
    """One `quantize` writing every preset, then one run per preset (the input stays in the page cache; each
    output is hashed, then deleted and synced so writeback does not spill into the next timing)."""
    one = [workdir / f"bench-many-{p.lower()}.gguf" for p in presets]
    sep = workdir / "bench-separate.gguf"
    t_one, rss_one = bench_convert.measure(
        gguforge("quantize", str(bf16), str(workdir / "bench-many-{ftype}.gguf"), ",".join(presets),
                 "--threads", threads, "--force"))
    hashes = []
    for path in one:
        hashes.append(digest(path))
        bench_convert.drop(path)
    times, rss_sep, same = [], 0, True
    for preset, h in zip(presets, hashes):
        t, rss = bench_convert.measure(gguforge("quantize", str(bf16), str(sep), preset, "--threads", threads,
                                                "--force"))
        times.append(t)
        rss_sep = max(rss_sep, rss)
        same = same and digest(sep) == h
        bench_convert.drop(sep)
    return t_one, rss_one, times, rss_sep, "yes" if same else "NO"


if __name__ == "__main__":
    main()
