"""Dequantize step: quantized Hugging Face checkpoints read as float weights.

`quantization_config` in config.json (or hf_quant_config.json, as llama.cpp's converter reads it) names
how the weights are stored. Each quantized weight is paired with its scale and auxiliary tensors; the
pair becomes one `Dequantized` tensor that stands where the weight stood (or, for the formats llama.cpp's
converter builds anew, after all stored tensors), and the auxiliary tensors disappear: the architecture
rules never see them. Values are computed a block of leading-axis rows at a time, reading only the
matching scale rows, with the float operations of llama.cpp's converter (`conversion/base.py`,
`ModelBase.dequant_model`): the stored values widened to float32 exactly, times the scale widened to
float32, one float32 multiply.

- fp8: `W_scale_inv` (or Mistral's `qscale_weight`) per block of `weight_block_size` (a block
  that overhangs the weight is cut off) or, without blocks, per channel / per tensor (broadcast).
  e4m3 (finite, NaN at S.1111.111) and e5m2 (IEEE-like) are decoded by table, exactly.
- gptq: 2/4/8-bit values packed in int32 along the input axis (`qweight` [in/pack, out]), `qzeros`
  packed along the output axis, `scales` [groups, out] and `g_idx` (the group of each input row);
  zero points are stored minus one (`checkpoint_format` gptq) or as they are (gptq_v2). The result
  is transposed to [out, in] (`dequant_gptq`).
- awq (GEMM): not in llama.cpp's converter; AutoAWQ's `dequantize_gemm` (awq/utils/packing_utils.py):
  4-bit values packed along the output axis in the order 0 2 4 6 1 3 5 7, (q - zero) * scale in
  float16, transposed to [out, in].
- compressed-tensors: float-/int-/naive-quantized weights with `weight_scale` (channel, block or
  tensor strategy); pack-quantized int groups (`weight_packed`, `weight_scale`, `weight_shape`,
  optional packed `weight_zero_point`) (`dequant_packed`).
- modelopt FP8: `weight_scale` without blocks.

Activation scales (`activation_scale`, `input_scale`, `qscale_act`, `k_scale`, `v_scale`) are dropped.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from .read import FLOAT_DTYPES, SAFETENSORS_DTYPES, Checkpoint, SourceTensor, bf16_bits_to_f32, read_json_object

SUPPORTED = "fp8, gptq (2/4/8 bits), awq (gemm), compressed-tensors (float-, int-, naive- and pack-quantized) " \
            "and modelopt FP8"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
ACTIVATION_SCALES = (".activation_scale", "_activation_scale", ".qscale_act", ".input_scale", ".k_scale",
                     ".v_scale", ".input_zero_point")


# -- values ---------------------------------------------------------------------------------------

def _fp8_table(exponent_bits: int, mantissa_bits: int, finite_only: bool) -> np.ndarray:
    """float32 value of each of the 256 codes, from the bit fields (exact: every value fits float32).

    e4m3 ("fn": finite, no infinities) has NaN at S.1111.111 only; e5m2 has IEEE infinities and NaNs.
    Example (e4m3): 0x38 = 0.0111.000 -> 2**(7-7) = 1.0; 0x01 -> 2**-9 (the smallest subnormal)."""
    codes = np.arange(256)
    bias = (1 << (exponent_bits - 1)) - 1
    e = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1)
    m = (codes & ((1 << mantissa_bits) - 1)).astype(np.float64) / (1 << mantissa_bits)
    magnitude = np.where(e == 0, m * 2.0 ** (1 - bias), (1 + m) * 2.0 ** (e - bias))
    value = np.where(codes & 0x80, -magnitude, magnitude)
    top = e == (1 << exponent_bits) - 1
    if finite_only:
        value[top & (m == (1 - 2.0 ** -mantissa_bits))] = np.nan
    else:
        value[top] = np.where(m[top] == 0, np.copysign(np.inf, value[top]), np.nan)
    return value.astype(np.float32)


FP8_TABLES = {"F8_E4M3": _fp8_table(4, 3, True), "F8_E5M2": _fp8_table(5, 2, False)}


LOOKUP_SLICE = 1 << 18  # codes looked up per step: bounds the intp index copy to 2 MB


def decode_fp8(raw: np.ndarray, table: np.ndarray) -> np.ndarray:
    """FP8 codes -> float32 by table; numpy's lookup with uint8 indices is 4x slower than with intp ones,
    so the codes are widened a slice at a time."""
    out = np.empty(raw.shape, np.float32)
    flat_in, flat_out = raw.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, LOOKUP_SLICE):
        stop = start + LOOKUP_SLICE
        np.take(table, flat_in[start:stop].astype(np.intp), out=flat_out[start:stop])
    return out


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as float32, exactly (torch's `.float()`)."""
    if dtype in FP8_TABLES:
        return decode_fp8(raw, FP8_TABLES[dtype])
    if dtype == "BF16":
        return bf16_bits_to_f32(raw)
    return raw.astype(np.float32)


def read_columns(t: SourceTensor, start: int, stop: int) -> np.ndarray:
    """Columns [start, stop) of a 2-D tensor, one read per row: the leading rows of a weight stored
    transposed (GPTQ, AWQ) without reading the whole tensor."""
    storage = SAFETENSORS_DTYPES[t.dtype]
    rows, cols = t.shape
    out = np.empty((rows, stop - start), storage)
    if stop > start:
        for r in range(rows):
            t._shard.read_into(out[r], t.start + (r * cols + start) * storage.itemsize)
    return out


def unpack_int32(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Values of `bits` bits packed little-end first into int32 along `axis` (32/bits per word),
    spread out along that axis. Example (bits 4, axis 0): [[0x21]] -> [[1], [2], [0], ..., [0]]."""
    shifts = np.arange(0, 32 - (bits - 1), bits, dtype=np.uint32)
    words = np.expand_dims(packed.astype(np.uint32, copy=False), axis + 1)
    shape = [1] * words.ndim
    shape[axis + 1] = len(shifts)
    values = (words >> shifts.reshape(shape)) & np.uint32((1 << bits) - 1)
    new = list(packed.shape)
    new[axis] *= len(shifts)
    return values.astype(np.int32).reshape(new)


# -- the dequantized tensor -------------------------------------------------------------------------

class Dequantized:
    """A weight computed from its quantized parts; stands in the checkpoint where a SourceTensor would."""

    computed = True

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, rows: Callable[[int, int], np.ndarray],
                 parts: tuple[str, ...], note: str, fp8: bool = False):
        self.name, self.shape, self.dtype, self._rows = name, tuple(shape), dtype, rows
        self.parts = parts  # the stored tensors it is computed from
        self.note = note  # the step, as --dry-run shows it
        self.fp8 = fp8  # dequantized from FP8 (--fp8-as-q8 keeps it as Q8_0)

    @property
    def compute_dtype(self) -> np.dtype:
        return np.dtype(np.float16) if self.dtype == "F16" else np.dtype(np.float32)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self._rows(start, stop)

    def __repr__(self) -> str:
        return f"Dequantized({self.name}, {list(self.shape)}, {self.note})"


@dataclass
class QuantSource:
    """What the checkpoint's quantization was, for the planner and --dry-run."""

    method: str
    detail: str
    dequantized: int = 0
    dropped: int = 0
    fp8: frozenset = frozenset()  # checkpoint names of weights dequantized from FP8
    auto_type: str | None = None  # stored float type 'auto' follows (BF16/F16), looked up before dequantizing

    def summary(self) -> str:
        return (f"source: {self.method} ({self.detail}): {self.dequantized} weights dequantized to float, "
                f"{self.dropped} scale/auxiliary tensors consumed")


# -- config -------------------------------------------------------------------------------------------

def quantization_config(root: Path, config: dict) -> dict | None:
    """quantization_config with its method, merged with hf_quant_config.json where the reference reads
    that file (ModelBase.prepare_tensors: when quant_algo or quantized_layers is missing)."""
    qc = config.get("quantization_config")
    if qc is None:
        text = config.get("text_config")
        qc = text.get("quantization_config") if isinstance(text, dict) else None
    if qc is not None and not isinstance(qc, dict):
        raise UserError(f"config.json: quantization_config must be an object, got {qc!r}")
    qc = dict(qc or {})
    extra = root / "hf_quant_config.json"
    if (not qc.get("quant_algo") or not qc.get("quantized_layers")) and extra.is_file():
        hf = read_json_object(extra, "hf_quant_config.json")
        inner = hf.get("quantization") if isinstance(hf.get("quantization"), dict) else {}
        producer = hf.get("producer") if isinstance(hf.get("producer"), dict) else {}
        if qc.get("quant_method") is None:
            qc["quant_method"] = str(producer.get("name") or "").lower()
        for key in ("quant_algo", "quant_method", "format", "config_groups", "quantized_layers"):
            if inner.get(key) is not None:
                qc[key] = inner[key]
    return qc if qc.get("quant_method") is not None else None


def _unsupported(what: str) -> UserError:
    return UserError(f"{what} is not supported", hint=f"gguforge converts {SUPPORTED} checkpoints; "
                     "dequantize it to bf16/f16 safetensors first")


def _is_nvfp4(qc: dict) -> bool:
    layers = qc.get("quantized_layers") if isinstance(qc.get("quantized_layers"), dict) else {}
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
    return (str(qc.get("quant_algo")).endswith("NVFP4") or "nvfp4" in str(qc.get("format"))
            or any(isinstance(v, dict) and str(v.get("quant_algo")).endswith("NVFP4") for v in layers.values())
            or any(isinstance(g, dict) and "nvfp4" in str(g.get("format")) for g in groups.values()))


# -- the step ---------------------------------------------------------------------------------------------

def dequantize(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint with every quantized weight replaced by its float values, aux tensors removed."""
    qc = quantization_config(checkpoint.root, checkpoint.config)
    if qc is None:
        return checkpoint
    method = str(qc.get("quant_method"))
    handlers = {"fp8": _fp8, "gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed, "modelopt": _modelopt}
    if _is_nvfp4(qc):
        raise _unsupported(f"quantization {method} with NVFP4 weights")
    if method not in handlers:
        raise _unsupported(f"quantization_config.quant_method {method!r}")
    tensors = checkpoint.tensors
    source = QuantSource(method, "", auto_type=_auto_type(tensors))
    replaced, added, dropped = handlers[method](qc, tensors, source)
    _check_all_paired(tensors, replaced, added, dropped, method)
    out: dict = {}
    for name, t in tensors.items():
        if name in dropped:
            continue
        out[name] = replaced.get(name, t)
    for name, t in added.items():
        if name in out:
            raise UserError(f"{name} is stored as is and also computed from {', '.join(t.parts)}",
                            hint="the checkpoint holds a weight twice; it is damaged")
        out[name] = t
    computed = [*replaced.values(), *added.values()]
    source.dequantized = len(computed)
    source.dropped = len(dropped)
    source.fp8 = frozenset(t.name for t in computed if t.fp8)
    return dataclasses.replace(checkpoint, tensors=out, quantization=source)  # a RemoteCheckpoint stays one


def _auto_type(tensors: dict) -> str | None:
    """The reference's --outtype auto looks at the stored tensors before dequantizing: the first one
    with two or more dimensions that is bf16 or f16 (others are passed over)."""
    return next((t.dtype for t in tensors.values() if len(t.shape) >= 2 and t.dtype in ("BF16", "F16")), None)


def _check_all_paired(tensors, replaced, added, dropped, method) -> None:
    """Quantized data left without its scale would be taken for a weight: refuse it by name."""
    for name, t in tensors.items():
        if name in replaced or name in dropped:
            continue
        if t.dtype in FP8_DTYPES:
            raise UserError(f"{name}: {t.dtype} weight without a scale tensor ({name}_scale_inv, "
                            f"{name.removesuffix('weight')}weight_scale or {name.removesuffix('weight')}qscale_weight)",
                            hint="the download is incomplete, or the checkpoint is damaged")
        if name.endswith((".qweight", ".weight_packed")):
            raise UserError(f"{name}: packed {method} weights but its scales are missing",
                            hint="the download is incomplete, or the checkpoint is damaged")


def _part(tensors: dict, name: str, of: str, method: str) -> SourceTensor:
    t = tensors.get(name)
    if t is None:
        raise UserError(f"{of}: {method} weight without its {name.rsplit('.', 1)[-1]} tensor ({name} is missing)",
                        hint="the download is incomplete, or the checkpoint is damaged")
    return t


def _floats(t: SourceTensor, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise UserError(f"{t.name}: {what} stored as {t.dtype}; expected F32, F16 or BF16")


# -- scaled weights (fp8, compressed-tensors float/int, modelopt) ------------------------------------------

def _block_size(qc: dict, key: str) -> tuple[int, ...] | None:
    block = qc.get(key)
    if block is None:
        return None
    if (not isinstance(block, list) or not block
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise UserError(f"config.json: quantization_config {key} must be a list of positive integers, got {block!r}")
    return tuple(block)


def scaled(weight: SourceTensor, scale: SourceTensor, block: tuple[int, ...] | None, note: str,
           fp8: bool, key: str) -> Dequantized:
    """weight.float() * scale.float(), the scale repeated over `block` and cut to the weight's shape,
    or (no block) broadcast with size-1 axes appended (llama.cpp: dequant_simple)."""
    _floats(scale, "scale")
    wshape, sshape = weight.shape, scale.shape
    if not wshape:
        raise UserError(f"{weight.name}: a quantized weight cannot be a scalar")
    if block is not None:
        lead = len(wshape) - len(block)  # axes before the blocked ones: one scale per index
        expected = list(wshape[:max(lead, 0)]) + [-(-d // b) for d, b in zip(wshape[max(lead, 0):], block)]
        if lead < 0 or list(sshape) != expected:
            raise UserError(f"{scale.name}: shape {list(sshape)} does not fit weight {weight.name} {list(wshape)} "
                            f"with {key} {list(block)} (expected {expected})",
                            hint=f"the scales were made with another block size than {key} says, or the "
                            "checkpoint is damaged")
        aligned = tuple(sshape)
    else:
        if len(sshape) > len(wshape):
            raise _scale_shape(scale, weight)
        aligned = tuple(sshape) + (1,) * (len(wshape) - len(sshape))
        if any(s not in (1, w) for s, w in zip(aligned, wshape)):
            raise _scale_shape(scale, weight)
    blocks = (1,) * (len(wshape) - len(block or ())) + tuple(block or ())
    b0 = blocks[0]

    def rows(start: int, stop: int) -> np.ndarray:
        values = to_float32(weight.raw_rows(start, stop), weight.dtype)
        first, last = (0, 1) if aligned[0] == 1 else (start // b0, -(-stop // b0))
        s = to_float32(scale.raw_rows(first, last), scale.dtype).reshape((last - first,) + aligned[1:])
        if b0 > 1 and aligned[0] > 1:  # scale rows repeated over the rows of their block
            s = np.take(s, np.arange(start, stop) // b0 - first, axis=0)
        for axis in range(1, len(wshape)):
            b = blocks[axis]
            if b == 1:
                continue
            if axis == len(wshape) - 1 and wshape[axis] % b == 0:
                # whole blocks along the last axis: broadcast each scale over its block (same products)
                shape = values.shape
                values = values.reshape(shape[:-1] + (shape[-1] // b, b))
                values *= s[..., None]
                return values.reshape(shape)
            s = np.take(s, np.arange(wshape[axis]) // b, axis=axis)  # cut to the weight where blocks overhang
        values *= s
        return values

    return Dequantized(weight.name, wshape, "F32", rows, (weight.name, scale.name), note, fp8)


def _scale_shape(scale: SourceTensor, weight: SourceTensor) -> UserError:
    return UserError(f"{scale.name}: shape {list(scale.shape)} cannot scale weight {weight.name} {list(weight.shape)} "
                     "(a per-tensor, per-channel or per-block scale was expected)",
                     hint="the checkpoint is damaged, or its quantization_config does not describe it")


def _fp8_note(weight: SourceTensor, suffix: str, block) -> str:
    kind = {"F8_E4M3": "fp8 e4m3", "F8_E5M2": "fp8 e5m2"}.get(weight.dtype, weight.dtype)
    grid = "x".join(map(str, block)) if block else "channel/tensor"
    return f"dequant {kind} * {suffix} ({grid})"


def _fp8(qc: dict, tensors: dict, source: QuantSource):
    block = _block_size(qc, "weight_block_size")
    replaced, dropped = {}, set()
    for name in tensors:
        if name.endswith("_scale_inv"):
            weight_name = name.removesuffix("_scale_inv")
            suffix = "scale_inv"
        elif name.endswith(".qscale_weight"):
            weight_name = name.removesuffix("qscale_weight") + "weight"
            suffix = "qscale_weight"
        else:
            if name.endswith(ACTIVATION_SCALES):
                dropped.add(name)
            continue
        weight = _part(tensors, weight_name, name, "fp8 scale")
        replaced[weight_name] = scaled(weight, tensors[name], block, _fp8_note(weight, suffix, block),
                                       True, "weight_block_size")
        dropped.add(name)
    fmt = qc.get("fmt") or qc.get("activation_scheme")
    source.detail = f"block {list(block)}" if block else "per channel"
    if fmt:
        source.detail += f", {fmt}"
    return replaced, {}, dropped


def _modelopt(qc: dict, tensors: dict, source: QuantSource):
    replaced, dropped = {}, set()
    for name in tensors:
        if name.endswith(".weight_scale"):
            weight_name = name.removesuffix("_scale")
            dropped.add(name)
            if weight_name in tensors:
                weight = tensors[weight_name]
                replaced[weight_name] = scaled(weight, tensors[name], None, _fp8_note(weight, "weight_scale", None),
                                               weight.dtype in FP8_DTYPES, "")
        elif name.endswith(ACTIVATION_SCALES):
            dropped.add(name)
    source.detail = str(qc.get("quant_algo") or "FP8")
    return replaced, {}, dropped


# -- compressed-tensors ---------------------------------------------------------------------------------

def _compressed(qc: dict, tensors: dict, source: QuantSource):
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UserError("config.json: compressed-tensors quantization_config has no config_groups")
    if len(groups) > 1:
        raise _unsupported(f"compressed-tensors with {len(groups)} config_groups")
    group = next(iter(groups.values()))
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        raise UserError("config.json: compressed-tensors config group has no 'weights' scheme")
    strategy, bits, kind = weights.get("strategy"), weights.get("num_bits"), weights.get("type", "int")
    if fmt in ("float-quantized", "int-quantized", "naive-quantized"):
        if strategy not in ("channel", "block", "tensor") or weights.get("group_size") is not None:
            raise _unsupported(f"compressed-tensors {fmt} with strategy {strategy!r}")
        block = _block_size(weights, "block_structure")
        fp8 = fmt == "float-quantized" and kind == "float" and bits == 8
        replaced, dropped = {}, set()
        for name in tensors:
            if name.endswith(".weight_scale"):
                weight_name = name.removesuffix("_scale")
                weight = _part(tensors, weight_name, name, "compressed-tensors scale")
                if weight_name.removesuffix("weight") + "weight_zero_point" in tensors:
                    raise _unsupported(f"compressed-tensors {fmt} with zero points ({weight_name}_zero_point)")
                note = (_fp8_note(weight, "weight_scale", block) if weight.dtype in FP8_DTYPES
                        else f"dequant {weight.dtype.lower()} * weight_scale ({strategy})")
                replaced[weight_name] = scaled(weight, tensors[name], block, note, fp8, "block_structure")
                dropped.add(name)
            elif name.endswith(ACTIVATION_SCALES):
                dropped.add(name)
        source.method = f"compressed-tensors {fmt}"
        source.detail = f"{kind}{bits}, {strategy}" + (f" {list(block)}" if block else "")
        return replaced, {}, dropped
    if fmt == "pack-quantized":
        if strategy != "group" or kind != "int" or bits not in (2, 4, 8) \
                or not isinstance(weights.get("group_size"), int) or weights["group_size"] <= 0:
            raise _unsupported(f"compressed-tensors pack-quantized with strategy {strategy!r}, type {kind!r}, "
                               f"num_bits {bits!r}, group_size {weights.get('group_size')!r}")
        added, dropped = {}, set()
        for name in tensors:
            if name.endswith(".weight_packed"):
                base = name.removesuffix("_packed")
                parts = {k: _part(tensors, base + k, name, "pack-quantized") for k in ("_scale", "_shape")}
                zero = tensors.get(base + "_zero_point")
                added[base] = _packed(tensors[name], parts["_scale"], parts["_shape"], zero, bits,
                                      weights["group_size"])
                dropped |= {name, base + "_scale", base + "_shape"} | ({zero.name} if zero is not None else set())
            elif name.endswith(ACTIVATION_SCALES):
                dropped.add(name)
        source.method = "compressed-tensors pack-quantized"
        source.detail = f"int{bits}, group {weights['group_size']}" + \
            (", asymmetric" if not weights.get("symmetric", True) else "")
        return {}, added, dropped
    raise _unsupported(f"compressed-tensors format {fmt!r}")


def _int_dtype(t: SourceTensor, want: str, what: str) -> None:
    if t.dtype != want:
        raise UserError(f"{t.name}: {what} stored as {t.dtype}; expected {want}")


def _packed(packed: SourceTensor, scale: SourceTensor, shape_t: SourceTensor, zero: SourceTensor | None,
            bits: int, group: int) -> Dequantized:
    """compressed-tensors pack-quantized int groups (llama.cpp: dequant_packed): values packed along
    the input axis, zero points along the output axis; (q - zero) * scale in float32."""
    _int_dtype(packed, "I32", "packed weight")
    _floats(scale, "scale")
    if shape_t.dtype not in ("I64", "I32") or shape_t.shape != (2,):
        raise UserError(f"{shape_t.name}: expected the weight's shape as 2 integers, found {shape_t.dtype} "
                        f"{list(shape_t.shape)}")
    rows_n, cols = (int(v) for v in shape_t.raw_rows(0, 2))
    per = 32 // bits
    n_groups = -(-cols // group)
    name = packed.name.removesuffix("_packed")
    if rows_n <= 0 or cols <= 0 or cols % group:
        raise UserError(f"{shape_t.name}: weight shape [{rows_n}, {cols}] is not made of whole groups of {group}")
    if packed.shape != (rows_n, -(-cols // per)):
        raise UserError(f"{packed.name}: shape {list(packed.shape)} does not hold a [{rows_n}, {cols}] weight "
                        f"of {bits}-bit values (expected {[rows_n, -(-cols // per)]})")
    if scale.shape != (rows_n, n_groups):
        raise UserError(f"{scale.name}: shape {list(scale.shape)} does not fit weight {name} [{rows_n}, {cols}] "
                        f"in groups of {group} (expected {[rows_n, n_groups]})")
    if zero is not None:
        _int_dtype(zero, "I32", "packed zero point")
        if zero.shape != (-(-rows_n // per), n_groups):
            raise UserError(f"{zero.name}: shape {list(zero.shape)} does not fit weight {name} [{rows_n}, {cols}] "
                            f"(expected {[-(-rows_n // per), n_groups]})")

    def rows(start: int, stop: int) -> np.ndarray:
        q = unpack_int32(packed.raw_rows(start, stop), bits, 1)[:, :cols]
        q = q.reshape(stop - start, n_groups, group)
        if zero is None:
            q = q - (1 << (bits - 1))
        else:
            first = start // per
            z = unpack_int32(zero.raw_rows(first, -(-stop // per)), bits, 0)
            q = q - z[start - first * per:stop - first * per, :, None]
        s = to_float32(scale.raw_rows(start, stop), scale.dtype)
        return (q.astype(np.float32) * s[:, :, None]).reshape(stop - start, cols)

    note = f"dequant pack-quantized int{bits} (group {group}" + (", zero point)" if zero is not None else ")")
    return Dequantized(name, (rows_n, cols), "F32", rows, tuple(t.name for t in (packed, scale, shape_t, zero) if t),
                       note)


# -- GPTQ and AWQ ------------------------------------------------------------------------------------------

def _bits(qc: dict, allowed: tuple[int, ...], method: str) -> int:
    bits = qc.get("bits", qc.get("w_bit"))
    if bits not in allowed:
        raise _unsupported(f"{method} with {bits!r}-bit weights")
    return bits


def _gptq(qc: dict, tensors: dict, source: QuantSource):
    bits = _bits(qc, (2, 4, 8), "gptq")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _unsupported(f"gptq checkpoint_format {fmt!r}")
    added, dropped = {}, set()
    for name in tensors:
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            parts = [_part(tensors, base + k, name, "gptq") for k in (".qweight", ".qzeros", ".scales", ".g_idx")]
            added[base + ".weight"] = _gptq_weight(base + ".weight", *parts, bits, fmt == "gptq")
            dropped |= {p.name for p in parts}
    source.detail = f"{bits}-bit, {fmt} zero points, group_size {qc.get('group_size')}" + \
        (", desc_act" if qc.get("desc_act") else "")
    return {}, added, dropped


def _gptq_weight(name: str, qweight, qzeros, scales, g_idx, bits: int, zeros_minus_one: bool) -> Dequantized:
    """scales[g] * (q - zero[g]) per input row of group g = g_idx[row], in float32, transposed to [out, in]
    (llama.cpp: dequant_gptq)."""
    per = 32 // bits
    for t, what in ((qweight, "qweight"), (qzeros, "qzeros")):
        _int_dtype(t, "I32", what)
    _floats(scales, "scales")
    if len(qweight.shape) != 2 or len(scales.shape) != 2:
        raise UserError(f"{qweight.name}: expected 2-D qweight and scales, found {list(qweight.shape)} and "
                        f"{list(scales.shape)}")
    k, n = qweight.shape[0] * per, qweight.shape[1]
    groups = scales.shape[0]
    for t, want in ((scales, (groups, n)), (qzeros, (groups, -(-n // per))), (g_idx, (k,))):
        if t.shape != want:
            raise UserError(f"{t.name}: shape {list(t.shape)} does not fit {qweight.name} {list(qweight.shape)} "
                            f"({bits}-bit: a [{n}, {k}] weight; expected {list(want)})")
    if g_idx.dtype not in ("I32", "I64"):
        raise UserError(f"{g_idx.name}: stored as {g_idx.dtype}; expected I32")
    index = g_idx.raw_rows(0, k)
    if index.size and (index.min() < 0 or index.max() >= groups):
        raise UserError(f"{g_idx.name}: group index {int(index.max() if index.max() >= groups else index.min())} "
                        f"out of range (the scales have {groups} groups)")

    def rows(start: int, stop: int) -> np.ndarray:
        q = unpack_int32(read_columns(qweight, start, stop), bits, 0)  # [in, out cols]
        z0 = start // per
        z = unpack_int32(read_columns(qzeros, z0, -(-stop // per)), bits, 1)[:, start - z0 * per:stop - z0 * per]
        if zeros_minus_one:
            z = z + 1
        s = to_float32(read_columns(scales, start, stop), scales.dtype)
        g = g_idx.raw_rows(0, k)
        q -= z[g]
        values = q.astype(np.float32)
        values *= s[g]
        return np.ascontiguousarray(values.T)

    note = f"dequant gptq int{bits} (g_idx, qzeros{' + 1' if zeros_minus_one else ''}, scales) >> transpose"
    return Dequantized(name, (n, k), "F32", rows, (qweight.name, qzeros.name, scales.name, g_idx.name), note)


AWQ_REVERSE_ORDER = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # AutoAWQ: output column i is nibble AWQ_REVERSE_ORDER[i]


def _awq(qc: dict, tensors: dict, source: QuantSource):
    bits = _bits(qc, (4,), "awq")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise _unsupported(f"awq version {version!r} (only gemm packing)")
    group = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(group, int) or group <= 0:
        raise UserError(f"config.json: awq group_size must be a positive integer, got {group!r}")
    added, dropped = {}, set()
    for name in tensors:
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            parts = [_part(tensors, base + k, name, "awq") for k in (".qweight", ".qzeros", ".scales")]
            added[base + ".weight"] = _awq_weight(base + ".weight", *parts, group)
            dropped |= {p.name for p in parts}
    source.detail = f"int4 gemm, group_size {group}"
    return {}, added, dropped


def _awq_weight(name: str, qweight, qzeros, scales, group: int) -> Dequantized:
    """(q - zero) * scale in float16 per input group, transposed to [out, in] (AutoAWQ: dequantize_gemm)."""
    for t, what in ((qweight, "qweight"), (qzeros, "qzeros")):
        _int_dtype(t, "I32", what)
    if scales.dtype != "F16":
        raise UserError(f"{scales.name}: awq scales stored as {scales.dtype}; expected F16")
    if len(qweight.shape) != 2:
        raise UserError(f"{qweight.name}: expected a 2-D qweight, found {list(qweight.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if k % group:
        raise UserError(f"{qweight.name}: {k} input rows are not whole groups of {group}")
    for t, want in ((scales, (k // group, n)), (qzeros, (k // group, n // 8))):
        if t.shape != want:
            raise UserError(f"{t.name}: shape {list(t.shape)} does not fit {qweight.name} {list(qweight.shape)} "
                            f"(a [{n}, {k}] weight in groups of {group}; expected {list(want)})")
    order = (np.arange(n).reshape(-1, 8)[:, AWQ_REVERSE_ORDER]).reshape(-1)

    def unpacked(t: SourceTensor, c0: int, c1: int) -> np.ndarray:
        return unpack_int32(read_columns(t, c0, c1), 4, 1)

    def rows(start: int, stop: int) -> np.ndarray:
        c0, c1 = start // 8, -(-stop // 8)
        pick = order[start:stop] - c0 * 8  # columns of the unpacked words [8*c0, 8*c1)
        q = unpacked(qweight, c0, c1)[:, pick]
        z = unpacked(qzeros, c0, c1)[:, pick]
        s = read_columns(scales, start, stop)
        diff = (q - np.repeat(z, group, axis=0)).astype(np.float16)
        return np.ascontiguousarray((diff * np.repeat(s, group, axis=0)).T)

    return Dequantized(name, (n, k), "F16", rows, (qweight.name, qzeros.name, scales.name),
                       f"dequant awq int4 gemm (qzeros, scales, group {group}, float16) >> transpose")
