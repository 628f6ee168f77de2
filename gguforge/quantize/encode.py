"""Quantize step: turn a block of float rows into the bytes of a GGUF tensor type.

The native extension does the work when it is built; the numpy versions here
cover the float types and Q8_0 so conversion never depends on it.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

FLOAT_TYPES = (T.F32, T.F16, T.BF16)

try:
    from . import native as _native
    if not hasattr(_native, "quantize"):
        _native = None
except ImportError:  # the extension is not built (e.g. running from a source tree)
    _native = None


native_bf16_to_f32 = _native.bf16_to_f32 if _native is not None else None
native_count_nonfinite = _native.count_nonfinite if _native is not None else None
native_bf16_to_f16 = getattr(_native, "bf16_to_f16", None)


def native_supports(ggml_type: T) -> bool:
    return _native is not None and _native.supported(ggml_type)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even; NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's reference Q8_0: scale d = amax/127 stored as fp16, values roundf(x * (1/d))."""
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    scaled = (blocks * inv).astype(np.float64)  # the product is rounded in float32 first, as in C
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int8)  # roundf: half away from zero
    out = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out


def encode(a: np.ndarray, ggml_type: T) -> np.ndarray:
    """Bytes (as a contiguous array) of `a` stored as `ggml_type`; rows run along the last axis."""
    if ggml_type == T.F32:
        return np.ascontiguousarray(a, dtype=np.float32)
    if ggml_type == T.F16:
        if _native is not None and a.dtype == np.float32:
            return _native.f32_to_f16(np.ascontiguousarray(a))
        return np.ascontiguousarray(a, dtype=np.float16)
    if ggml_type == T.BF16:
        if _native is not None:
            return _native.f32_to_bf16(np.ascontiguousarray(a, dtype=np.float32))
        return f32_to_bf16_bits(a)
    block, _ = GGML_QUANT_SIZES[ggml_type]
    rows = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, a.shape[-1] if a.ndim else 1)
    if native_supports(ggml_type):
        return _native.quantize(rows, ggml_type, threads=1)
    if ggml_type == T.Q8_0:
        return quantize_q8_0(rows)
    raise RuntimeError(f"{ggml_type.name} needs the native extension, which is not built "
                       "(reinstall gguforge with a C compiler available)")


def row_bytes(n: int, ggml_type: T) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return n // block * size
