"""Quantized checkpoints as sources (FP8, GPTQ, AWQ, compressed-tensors, modelopt): dequantized as
llama.cpp's converter does, byte for byte.

Each quantized mock is made here from a float mock (scripts/make_mocks.py) the way its format stores it:
FP8 through torch's float8 dtypes, int formats packed into int32 words. The float values each format
means are computed here too, independently of gguforge (`expected`), for the formats the reference
converter lacks (AWQ) and for the logits check in llama.cpp.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import gguforge, read_gguf, run_reference_converter

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from gguforge.cli import main  # noqa: E402

AUX_SUFFIXES = ("_scale_inv", "weight_scale", "qscale_weight", ".qweight", ".qzeros", ".scales", ".g_idx",
                "weight_packed", "weight_shape", "weight_zero_point", "input_scale", "activation_scale")


# -- making quantized mocks -------------------------------------------------------------------------

def quantizable(name: str, t) -> bool:
    """The linear weights a quantized release stores quantized (routers, norms, embeddings, convs stay)."""
    return ("visual" not in name and t.ndim >= 2
            and (name.endswith("proj.weight") or name.endswith(("experts.gate_up_proj", "experts.down_proj"))))


def pack_int32(values: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """Pack unsigned `bits`-bit values into int32 along `axis`, element j of each word at shift bits*j
    (or element order[j] there)."""
    per = 32 // bits
    v = np.moveaxis(np.asarray(values, np.int64), axis, -1)
    pad = -v.shape[-1] % per
    v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.int64)], axis=-1) if pad else v
    v = v.reshape(v.shape[:-1] + (-1, per))
    if order is not None:
        v = v[..., order]
    words = np.zeros(v.shape[:-1], np.uint64)
    for j in range(per):
        words |= (v[..., j].astype(np.uint64) & ((1 << bits) - 1)) << np.uint64(bits * j)
    return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis)


def fp8_blocks(w, block, fp8, scale_dtype):
    """(fp8 weight, scale_inv): one scale per block of the last two axes (blocks overhanging the
    weight are padded with zeros), or per output row when block is None."""
    fmax = torch.finfo(fp8).max
    w = w.float()
    if block is None:
        scale = (w.abs().amax(dim=-1, keepdim=True) / fmax).clamp(min=1e-12).to(scale_dtype)
        return (w / scale.float()).to(fp8), scale
    (br, bc), (r, c) = block, w.shape[-2:]
    gr, gc = -(-r // br), -(-c // bc)
    padded = torch.zeros(*w.shape[:-2], gr * br, gc * bc)
    padded[..., :r, :c] = w
    amax = padded.reshape(*w.shape[:-2], gr, br, gc, bc).abs().amax(dim=(-3, -1))
    scale = (amax / fmax).clamp(min=1e-12).to(scale_dtype)
    full = scale.float().repeat_interleave(br, -2).repeat_interleave(bc, -1)[..., :r, :c]
    return (w / full).to(fp8), scale


def fp8_expected(q, scale, block):
    s = scale.float()
    if block is not None:
        s = s.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :q.shape[-2], :q.shape[-1]]
    return q.float() * s


def gptq(w: np.ndarray, bits: int, group: int, v2: bool, rng, desc_act: bool):
    """GPTQ tensors of a [out, in] weight, and the float values they mean."""
    n, k = w.shape
    maxq = (1 << bits) - 1
    g_idx = (np.arange(k) // group).astype(np.int32)
    if desc_act:
        g_idx = rng.permutation(g_idx).astype(np.int32)
    wt = w.T
    groups = k // group
    scales = np.empty((groups, n), np.float16)
    zeros = np.empty((groups, n), np.int64)
    for g in range(groups):
        rows = wt[g_idx == g]
        lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        s = np.maximum((hi - lo) / maxq, 1e-4).astype(np.float16)
        scales[g] = s
        zeros[g] = np.clip(np.round(-lo / s.astype(np.float32)), 1, maxq)  # >= 1: gptq stores zero - 1
    q = np.clip(np.round(wt / scales[g_idx].astype(np.float32)) + zeros[g_idx], 0, maxq).astype(np.int64)
    tensors = {"qweight": pack_int32(q, bits, 0), "qzeros": pack_int32(zeros - (0 if v2 else 1), bits, 1),
               "scales": scales, "g_idx": g_idx}
    expected = (scales[g_idx].astype(np.float32) * (q - zeros[g_idx]).astype(np.float32)).T
    return tensors, expected


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's packing order of 8 output columns in a word


def awq(w: np.ndarray, group: int):
    """AutoAWQ GEMM tensors of a [out, in] weight, and the float16 values AutoAWQ computes from them."""
    wt = w.T  # [in, out]
    k, n = wt.shape
    g = wt.reshape(k // group, group, n)
    lo, hi = np.minimum(g.min(1), 0), np.maximum(g.max(1), 0)
    scales = np.maximum((hi - lo) / 15, 1e-4).astype(np.float16)
    zeros = np.clip(np.round(-lo / scales.astype(np.float32)), 0, 15).astype(np.int64)
    q = np.clip(np.round(g / scales[:, None].astype(np.float32)) + zeros[:, None], 0, 15).astype(np.int64)
    q = q.reshape(k, n)
    tensors = {"qweight": pack_int32(q, 4, 1, AWQ_ORDER), "qzeros": pack_int32(zeros, 4, 1, AWQ_ORDER),
               "scales": scales}
    diff = (q - np.repeat(zeros, group, axis=0)).astype(np.float16)
    return tensors, (diff * np.repeat(scales, group, axis=0)).T


def pack_quantized(w: np.ndarray, group: int, asym: bool):
    """compressed-tensors pack-quantized int4 groups of a [out, in] weight, and their float values."""
    r, c = w.shape
    g = w.reshape(r, c // group, group)
    if asym:
        lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        scale = torch.tensor(np.maximum((hi - lo) / 15, 1e-4)).to(torch.bfloat16)
        sf = scale.float().numpy()
        zero = np.clip(np.round(-lo / sf), 0, 15).astype(np.int64)
    else:
        scale = torch.tensor(np.maximum(np.abs(g).max(-1) / 7, 1e-4)).to(torch.bfloat16)
        sf = scale.float().numpy()
        zero = np.full(sf.shape, 8, np.int64)
    q = np.clip(np.round(g / sf[..., None]) + zero[..., None], 0, 15).astype(np.int64)
    tensors = {"weight_packed": torch.from_numpy(pack_int32(q.reshape(r, c), 4, 1)), "weight_scale": scale,
               "weight_shape": torch.tensor([r, c], dtype=torch.int64)}
    if asym:
        tensors["weight_zero_point"] = torch.from_numpy(pack_int32(zero, 4, 0))
    expected = ((q - zero[..., None]).astype(np.float32) * sf[..., None]).reshape(r, c)
    return tensors, expected


METHODS = {
    "fp8-block": dict(quant_method="fp8", weight_block_size=[32, 48], activation_scheme="dynamic"),
    "fp8-e5m2-channel": dict(quant_method="fp8", activation_scheme="dynamic"),
    "fp8-b32": dict(quant_method="fp8", weight_block_size=[32, 32], activation_scheme="dynamic"),  # divides the mocks
    "fp8-qscale": dict(quant_method="fp8"),  # Mistral's naming: per-tensor qscale_weight, qscale_act
    "gptq4-desc": dict(quant_method="gptq", bits=4, group_size=16, desc_act=True, sym=False),
    "gptq2-v2": dict(quant_method="gptq", bits=2, group_size=32, checkpoint_format="gptq_v2"),
    "gptq8": dict(quant_method="gptq", bits=8, group_size=64),
    "awq": dict(quant_method="awq", bits=4, group_size=32, version="gemm", zero_point=True),
    "ct-fp8-block": dict(quant_method="compressed-tensors", format="float-quantized", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                           "block_structure": [16, 48], "symmetric": True}}}),
    "ct-int8-channel": dict(quant_method="compressed-tensors", format="int-quantized", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}}}),
    "ct-pack4-asym": dict(quant_method="compressed-tensors", format="pack-quantized", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                           "symmetric": False}}}),
    "ct-pack4-sym": dict(quant_method="compressed-tensors", format="pack-quantized", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16,
                                           "symmetric": True}}}),
    "modelopt-fp8": None,  # hf_quant_config.json, no quantization_config
}


def quantize_tensor(method: str, name: str, w, rng) -> tuple[dict, object]:
    """{checkpoint name: stored tensor} for one float weight, and the float values they mean."""
    qc = METHODS[method] or {}
    base = name.removesuffix(".weight")
    a = w.float().numpy()
    if method.startswith("fp8"):
        block = qc.get("weight_block_size")
        fp8 = torch.float8_e5m2 if "e5m2" in method else torch.float8_e4m3fn
        q, s = fp8_blocks(w, block, fp8, torch.bfloat16 if block is None else torch.float32)
        out = {name: q, name + "_scale_inv": s}
        if name.endswith(".weight"):
            out[base + ".activation_scale"] = torch.tensor([1.5])  # unused by the converters: dropped
        return out, fp8_expected(q, s, block)
    if method == "fp8-qscale":
        scale = (w.float().abs().max() / 448).reshape(1)
        q = (w.float() / scale).to(torch.float8_e4m3fn)
        return {name: q, base + ".qscale_weight": scale, base + ".qscale_act": torch.tensor([0.5])}, q.float() * scale
    if method == "modelopt-fp8":
        scale = (w.float().abs().max() / 448).reshape(())
        q = (w.float() / scale).to(torch.float8_e4m3fn)
        return {name: q, base + ".weight_scale": scale, base + ".input_scale": torch.tensor(0.5)}, q.float() * scale
    if method.startswith("gptq"):
        t, expected = gptq(a, qc["bits"], qc["group_size"], qc.get("checkpoint_format") == "gptq_v2", rng,
                           qc.get("desc_act", False))
        return {f"{base}.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}, expected
    if method == "awq":
        t, expected = awq(a, qc["group_size"])
        return {f"{base}.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}, expected
    if method == "ct-fp8-block":
        block = qc["config_groups"]["group_0"]["weights"]["block_structure"]
        q, s = fp8_blocks(w, block, torch.float8_e4m3fn, torch.bfloat16)
        return {name: q, name + "_scale": s}, fp8_expected(q, s, block)
    if method == "ct-int8-channel":
        s = (w.float().abs().amax(-1, keepdim=True) / 127).to(torch.float32)
        q = torch.round(w.float() / s).clamp(-128, 127).to(torch.int8)
        return {name: q, name + "_scale": s}, q.float() * s
    group = qc["config_groups"]["group_0"]["weights"]["group_size"]
    t, expected = pack_quantized(a, group, method.endswith("asym"))
    return {f"{base}.{k}": v for k, v in t.items()}, expected


def quantize_checkpoint(src: Path, dst: Path, method: str, seed: int = 0) -> tuple[Path, dict]:
    """`src` (a float mock) stored the way `method` stores it, in `dst`; and {weight name: the float
    values the quantized tensors mean} for the weights that were quantized."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    rng = np.random.default_rng(seed)
    out, meant = {}, {}
    for name, t in tensors.items():
        if quantizable(name, t) and (t.ndim == 2 or method.startswith("fp8")):
            stored, values = quantize_tensor(method, name, t, rng)
            out.update(stored)
            meant[name] = values
        else:
            out[name] = t
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if METHODS[method] is None:
        (dst / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "0.29"}, "quantization": {"quant_algo": "FP8"}}))
    else:
        config["quantization_config"] = METHODS[method]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, meant


def float_twin(src: Path, dst: Path, meant: dict) -> Path:
    """The float mock with each quantized weight replaced by the values its quantized form means: what
    a perfect dequantization gives (for transformers, which cannot run most of these formats on CPU)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for name, values in meant.items():
        tensors[name] = torch.from_numpy(np.ascontiguousarray(np.asarray(values, np.float32)))
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


# -- the checks ------------------------------------------------------------------------------------------

def assert_same_as_reference(tree, model: Path, tmp_path: Path, outtype: str, pre: str, *extra: str) -> Path:
    from test_vs_llama_converter import assert_same_metadata
    tag = outtype + "".join(extra)
    ours, ref = tmp_path / f"ours-{tag}.gguf", tmp_path / f"ref-{tag}.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", outtype, "--quiet", *extra]) == 0
    r = run_reference_converter(tree, model, ref, outtype, pre, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_gguf(ours), read_gguf(ref)
    assert list(a) == list(b), (tag, sorted(a.keys() ^ b.keys()))  # same tensors, same order
    for name in b:
        assert (a[name].tensor_type, list(a[name].shape)) == (b[name].tensor_type, list(b[name].shape)), (tag, name)
        assert a[name].data.tobytes() == b[name].data.tobytes(), (tag, name)
    assert assert_same_metadata(ours, ref, tag) == []
    return ours


def no_aux_tensors(path: Path) -> None:
    names = list(read_gguf(path))
    assert not [n for n in names if n.endswith(AUX_SUFFIXES) or "scale" in n], names


REFERENCE_CASES = [  # (arch, layout, method, [(outtype, extra flags)])
    ("qwen3", "causal", "fp8-block", [("f32", ()), ("bf16", ("--fp8-as-q8",))]),
    ("qwen3moe", "causal", "fp8-e5m2-channel", [("f16", ("--fp8-as-q8",))]),
    ("qwen35moe", "hub", "fp8-block", [("auto", ()), ("q8_0", ("--fp8-as-q8",))]),
    ("qwen3", "causal", "modelopt-fp8", [("f32", ("--fp8-as-q8",))]),
    ("qwen3", "causal", "gptq4-desc", [("f32", ())]),
    ("qwen3moe", "causal", "gptq2-v2", [("bf16", ())]),
    ("qwen3", "causal", "gptq8", [("f16", ())]),
    ("qwen3", "causal", "ct-fp8-block", [("bf16", ("--fp8-as-q8",))]),
    ("qwen3moe", "causal", "ct-int8-channel", [("f32", ())]),
    ("qwen3", "causal", "ct-pack4-asym", [("q8_0", ())]),
    ("qwen35", "causal", "ct-pack4-sym", [("bf16", ())]),
]


@pytest.mark.parametrize("arch,layout,method,runs", REFERENCE_CASES,
                         ids=[f"{a}-{b}-{m}" for a, b, m, _ in REFERENCE_CASES])
def test_same_file_as_reference_converter(tree, mock_model, tmp_path, arch, layout, method, runs):
    src = mock_model(arch, layout=layout)
    model, meant = quantize_checkpoint(src, tmp_path / "quantized", method)
    assert meant
    pre = "qwen35" if arch.startswith("qwen35") else "qwen2"
    extra = ("--no-mtp",) if arch.startswith("qwen35") and layout == "causal" else ()
    for outtype, flags in runs:
        ours = assert_same_as_reference(tree, model, tmp_path, outtype, pre, *flags, *extra)
        no_aux_tensors(ours)
        if "--fp8-as-q8" in flags:  # the FP8 weights became Q8_0, the others kept the outtype
            from gguf import GGMLQuantizationType as T
            types = {n: t.tensor_type for n, t in read_gguf(ours).items()}
            q8 = {n for n, t in types.items() if t == T.Q8_0}
            assert any(".attn_q" in n for n in q8) and any(".ffn_down" in n for n in q8), sorted(q8)
            assert outtype == "q8_0" or "token_embd.weight" not in q8


def _f32_tensor(path: Path, name: str) -> np.ndarray:
    t = read_gguf(path)[name]
    return np.asarray(t.data, np.float32).reshape(list(reversed([int(d) for d in t.shape])))


@pytest.mark.parametrize("method", ["awq", "fp8-qscale"])
def test_values_are_what_the_format_means(mock_model, tmp_path, method):
    """Where the reference converter cannot be run (it has no AWQ) or a format only exists elsewhere
    (Mistral's qscale_weight naming): every weight of the F32 file equals the values computed here from
    the integers or codes before they were packed (AutoAWQ's float16 dequantization for AWQ), so a wrong
    packing order or zero point cannot cancel out."""
    src = mock_model("qwen3")
    model, meant = quantize_checkpoint(src, tmp_path / "q", method)
    out = tmp_path / "f32.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", "f32", "--quiet"]) == 0
    no_aux_tensors(out)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for hf, gg in names.items():
        for layer in (0, 1):
            want = np.asarray(meant[f"model.layers.{layer}.{hf}.weight"], np.float32)
            np.testing.assert_array_equal(_f32_tensor(out, f"blk.{layer}.{gg}.weight"), want, err_msg=hf)
    assert len(meant) == 2 * len(names)


@pytest.mark.parametrize("arch,layout,method,outtype,bound,against", [
    ("qwen3moe", "causal", "fp8-b32", "f32", 1e-6, "quantized"),
    ("qwen3moe", "causal", "gptq4-desc", "f32", 1e-6, "float"),
    ("qwen3", "causal", "awq", "f32", 1e-6, "float"),
    ("qwen35moe", "hub", "fp8-block", "bf16", 1e-3, "float"),
])
def test_llama_cpp_runs_the_dequantized_model(quiet_llama, mock_model, tmp_path, arch, layout, method, outtype, bound,
                                              against):
    """llama.cpp loads the converted file and its logits match transformers: loading the quantized
    checkpoint itself where transformers can on a CPU (FP8 with blocks that divide the weights, per
    expert), else running the float values the quantized checkpoint means (GPTQ, AWQ and packed FP8
    experts need GPU kernels or packages transformers does not bring)."""
    from gguforge.verify import verify
    src = mock_model(arch, layout=layout)
    model, meant = quantize_checkpoint(src, tmp_path / "q", method)
    out = tmp_path / "m.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", outtype, "--quiet"]) == 0
    report = verify(model if against == "quantized" else float_twin(src, tmp_path / "twin", meant), out)
    assert report.nmse <= bound and report.top1_agreement >= 0.9, report.format()


def test_dry_run_shows_each_dequantization(mock_model, tmp_path, capsys):
    src = mock_model("qwen35moe", layout="hub")
    model, meant = quantize_checkpoint(src, tmp_path / "q", "fp8-block")
    capsys.readouterr()
    assert main(["convert-hf", str(model), "--dry-run", "--outtype", "bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    gate = next(line for line in lines if line.startswith("blk.0.ffn_gate_exps.weight"))
    assert "dequant fp8 e4m3 * scale_inv (32x48)" in gate and "gate half" in gate, gate
    q = next(line for line in lines if line.startswith("blk.3.attn_q.weight"))
    assert "dequant fp8 e4m3" in q, q
    embd = next(line for line in lines if line.startswith("token_embd.weight"))
    assert "dequant" not in embd
    summary = next(line for line in lines if line.startswith("source: fp8"))
    assert f"{len(meant)} weights dequantized" in summary, summary
    assert not [line for line in lines if "scale_inv" in line.split()[0]]


# -- refusals -----------------------------------------------------------------------------------------

def _edit(model: Path, drop=(), replace=None, config=None) -> None:
    path = model / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if k not in drop}
    tensors.update(replace or {})
    save_file(tensors, str(path))
    if config is not None:
        c = json.loads((model / "config.json").read_text())
        c["quantization_config"] = config
        (model / "config.json").write_text(json.dumps(c))


W = "model.layers.1.self_attn.k_proj.weight"


@pytest.mark.parametrize("case,method,message", [
    ("missing scale", "fp8-block", f"{W}: F8_E4M3 weight without a scale tensor"),
    ("scale shape", "fp8-block", f"{W}_scale_inv: shape [3, 2] does not fit weight {W} [64, 64] with "
                                 "weight_block_size [32, 48] (expected [2, 2])"),
    ("block size", "fp8-block", "model.layers.0.mlp.down_proj.weight_scale_inv: shape [2, 3] does not fit weight "
                                "model.layers.0.mlp.down_proj.weight [64, 128] with weight_block_size [16, 16] "
                                "(expected [4, 8])"),
    ("bad block", "fp8-block", "weight_block_size must be a list of positive integers, got [0, 128]"),
    ("missing qzeros", "gptq4-desc", "model.layers.1.self_attn.k_proj.qweight: gptq weight without its qzeros"),
    ("unknown method", "fp8-block", "quantization_config.quant_method 'bitsandbytes' is not supported"),
    ("nvfp4", "fp8-block", "NVFP4 weights is not supported"),
    ("gptq 3-bit", "gptq4-desc", "gptq with 3-bit weights is not supported"),
])
def test_bad_quantized_checkpoints_are_one_line(mock_model, tmp_path, capsys, case, method, message):
    model, _ = quantize_checkpoint(mock_model("qwen3"), tmp_path / "q", method)
    qc = dict(METHODS[method])
    if case == "missing scale":
        _edit(model, drop=[W + "_scale_inv"])
    elif case == "scale shape":
        _edit(model, replace={W + "_scale_inv": torch.ones(3, 2)})
    elif case == "block size":
        _edit(model, config=dict(qc, weight_block_size=[16, 16]))
    elif case == "bad block":
        _edit(model, config=dict(qc, weight_block_size=[0, 128]))
    elif case == "missing qzeros":
        _edit(model, drop=["model.layers.1.self_attn.k_proj.qzeros"])
    elif case == "unknown method":
        _edit(model, config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    elif case == "nvfp4":
        _edit(model, config={"quant_method": "modelopt", "quant_algo": "NVFP4"})
    elif case == "gptq 3-bit":
        _edit(model, config=dict(qc, bits=3))
    out = tmp_path / "out.gguf"
    capsys.readouterr()
    assert main(["convert-hf", str(model), "--outfile", str(out), "--outtype", "f32"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: "), err
    assert len(err.strip().splitlines()) <= 2, err  # the error and at most a hint
    assert not out.exists() and not list(tmp_path.glob("*.gguf"))


def test_unsupported_line_names_what_is_supported(mock_model, tmp_path):
    """As users see it (a subprocess): exit 2, the method named, the supported ones listed, no traceback."""
    model, _ = quantize_checkpoint(mock_model("qwen3"), tmp_path / "q", "fp8-block")
    _edit(model, config={"quant_method": "bitsandbytes"})
    r = gguforge("convert-hf", str(model), "--outfile", str(tmp_path / "o.gguf"))
    assert r.returncode == 2 and "'bitsandbytes' is not supported" in r.stderr, r.stderr
    assert "fp8, gptq" in r.stderr and "awq" in r.stderr and "compressed-tensors" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.glob("*.gguf"))


def test_fp8_as_q8_with_a_preset_is_refused(mock_model, tmp_path, capsys):
    model, _ = quantize_checkpoint(mock_model("qwen3"), tmp_path / "q", "fp8-block")
    assert main(["convert-hf", str(model), "--outfile", str(tmp_path / "o.gguf"), "--outtype", "Q4_K_M",
                 "--fp8-as-q8"]) == 2
    assert "--fp8-as-q8 applies to the converter's own types" in capsys.readouterr().err


# -- values --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,name", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_fp8_table_is_torchs_for_every_code(dtype, name):
    from gguforge.checkpoint.dequant import FP8_TABLES
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(dtype).float().numpy()
    got = FP8_TABLES[name]
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))  # -0.0, subnormals, infinities


def test_one_pass_preset_equals_llama_quantize_of_the_f32_file(quiet_llama, mock_model, tmp_path):
    """A preset from a quantized source quantizes the dequantized float32 values: the same bytes as
    llama-quantize run on gguforge's (reference-identical) F32 file."""
    from helpers import llama_quantize
    model, _ = quantize_checkpoint(mock_model("qwen35", size="q256"), tmp_path / "q", "fp8-block")
    f32, one_pass, theirs = tmp_path / "f32.gguf", tmp_path / "one.gguf", tmp_path / "theirs.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(f32), "--outtype", "f32", "--quiet"]) == 0
    assert main(["convert-hf", str(model), "--outfile", str(one_pass), "--outtype", "Q4_K_M", "--quiet"]) == 0
    llama_quantize(f32, theirs, "Q4_K_M")
    a, b = read_gguf(one_pass), read_gguf(theirs)
    assert sorted(a) == sorted(b) and list(a) == list(read_gguf(f32))  # the converter's order
    assert sum(t.tensor_type.name == "Q4_K" for t in b.values()) >= 4
    for name in b:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert a[name].data.tobytes() == b[name].data.tobytes(), name


# -- memory ----------------------------------------------------------------------------------------------

def peak_rss_of(cmd: list[str]) -> int:
    import bench_convert  # scripts/ (conftest puts it on the path)
    return bench_convert.measure(cmd)[1]


# CI: 218 MB of FP8 (one matrix alone is 235 MB as float32); by hand, scripts/bench_fp8.py: 2.2 GB.
@pytest.mark.parametrize("hidden,ffn,layers", [(4096, 14336, 1)])
def test_fp8_conversion_memory_stays_within_todays_bound(tmp_path, hidden, ffn, layers):
    """Converting FP8 to f16 peaks no higher than converting a bf16 checkpoint of the same matrices to f16
    (today's chunk-streaming bound), and far below the size of one dequantized matrix."""
    from bench_fp8 import big_checkpoint
    peaks = {}
    for kind in ("fp8", "bf16"):
        model = big_checkpoint(tmp_path / kind, hidden, ffn, layers, fp8=kind == "fp8")
        out = tmp_path / f"{kind}.gguf"
        peaks[kind] = peak_rss_of([sys.executable, "-m", "gguforge", "convert-hf", str(model), "--outfile", str(out),
                                   "--outtype", "f16", "--quiet", "--threads", "2"])
        assert out.stat().st_size > 2 * hidden * ffn * 3 * layers
        if kind == "fp8":
            float32_bytes = 4 * (model / "model.safetensors").stat().st_size
        out.unlink()
    assert peaks["fp8"] <= 1.1 * peaks["bf16"] + (16 << 20), {k: v >> 20 for k, v in peaks.items()}
    assert peaks["fp8"] < float32_bytes / 4, (peaks["fp8"] >> 20, float32_bytes >> 20)
