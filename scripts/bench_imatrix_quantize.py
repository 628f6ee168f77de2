"""`gguforge quantize --imatrix` against `llama-quantize --imatrix`, side by side in one run.

    python scripts/bench_imatrix_quantize.py [--embd 1024] [--ff 2816] [--layers 4] [--experts 0]
                                             [--presets Q4_K_M,IQ4_XS] [--threads 2] [--repeat 2]

Writes a synthetic llama-architecture BF16 GGUF (outlier-heavy weights) and an importance matrix with an
entry for every matrix llama-imatrix would collect (per expert for --experts > 0), then times both
tools on the same input, imatrix and thread count (best of --repeat, wall clock, process start
included), checks the outputs are byte-identical and prints the ratio. llama-quantize is built from the
pinned llama.cpp tree (scripts/llama_tools.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic_model(path: Path, embd: int, ff: int, layers: int, experts: int, seed: int = 0) -> list[tuple]:
    """A llama GGUF llama-quantize loads; returns [(name, numpy shape)] of its matrices."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from gguforge.quantize import native

    rng = np.random.default_rng(seed)
    heads = max(1, embd // 128)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("bench")
    w.add_context_length(4096)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(max(1, heads // 4))
    w.add_rope_dimension_count(embd // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(512)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    mats = []

    def matrix(name, *shape):
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        a.reshape(-1)[rng.integers(0, a.size, 16)] *= 30
        bits = native.f32_to_bf16(a)
        w.add_tensor(name, bits, raw_shape=bits.shape, raw_dtype=T.BF16)
        mats.append((name, shape))

    kv = max(1, heads // 4) * (embd // heads)
    matrix("token_embd.weight", 512, embd)
    matrix("output.weight", 512, embd)
    w.add_tensor("output_norm.weight", np.ones(embd, np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(embd, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(embd, np.float32))
        matrix(p + "attn_q.weight", embd, embd)
        matrix(p + "attn_k.weight", kv, embd)
        matrix(p + "attn_v.weight", kv, embd)
        matrix(p + "attn_output.weight", embd, embd)
        if experts:
            w.add_tensor(p + "ffn_gate_inp.weight", rng.standard_normal((experts, embd)).astype(np.float32))
            matrix(p + "ffn_gate_exps.weight", experts, ff, embd)
            matrix(p + "ffn_up_exps.weight", experts, ff, embd)
            matrix(p + "ffn_down_exps.weight", experts, embd, ff)
        else:
            matrix(p + "ffn_gate.weight", ff, embd)
            matrix(p + "ffn_up.weight", ff, embd)
            matrix(p + "ffn_down.weight", embd, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return mats


def synthetic_imatrix(path: Path, mats: list[tuple], seed: int = 1) -> None:
    from gguforge.format.imatrix import Imatrix, ImatrixEntry, write_imatrix

    rng = np.random.default_rng(seed)
    entries = {}
    for name, shape in mats:
        if not name.startswith("blk."):
            continue  # as llama-imatrix: no token_embd, no output without --process-output
        n_mat, ne0 = (shape[0] if len(shape) == 3 else 1), shape[-1]
        counts = rng.integers(500, 3000, n_mat).astype(np.float32)
        sums = (rng.gamma(0.7, 2.0, (n_mat, ne0)) * counts[:, None]).astype(np.float32)
        entries[name] = ImatrixEntry(sums, counts)
    write_imatrix(path, Imatrix(entries, ["synthetic.txt"], 100, 512))


def best(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if r.returncode:
            raise SystemExit(f"{cmd[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embd", type=int, default=1024)
    ap.add_argument("--ff", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=0)
    ap.add_argument("--presets", default="Q4_K_M,IQ4_XS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    from llama_tools import llama_tools

    quantize = str(llama_tools("llama-quantize")["llama-quantize"])
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model, im = d / "model-bf16.gguf", d / "imatrix.gguf"
        mats = synthetic_model(model, a.embd, a.ff, a.layers, a.experts)
        synthetic_imatrix(im, mats)
        n = sum(int(np.prod(s)) for _, s in mats)
        print(f"llama BF16, {a.layers} layers, embd {a.embd}, ff {a.ff}, experts {a.experts}: "
              f"{n / 1e6:.1f}M weights in matrices; threads={a.threads}, best of {a.repeat}")
        print(f"{'preset':8s} {'llama-quantize':>15s} {'gguforge':>10s} {'ratio':>7s}  identical")
        for preset in a.presets.split(","):
            theirs, ours = d / f"llama-{preset}.gguf", d / f"ours-{preset}.gguf"
            t_llama = best([quantize, "--imatrix", str(im), str(model), str(theirs), preset, str(a.threads)],
                           a.repeat)
            t_ours = best([sys.executable, "-m", "gguforge", "quantize", str(model), str(ours), preset, "-q",
                           "--force", "--threads", str(a.threads), "--imatrix", str(im)], a.repeat)
            same = theirs.read_bytes() == ours.read_bytes()
            print(f"{preset:8s} {t_llama:14.2f}s {t_ours:9.2f}s {t_ours / t_llama:6.2f}x  {'yes' if same else 'NO'}")
            theirs.unlink()
            ours.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
