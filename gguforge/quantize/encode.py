"""Quantize step: turn a block of float rows into the bytes of a GGUF tensor type.

All of it runs in the native extension (built by `pip install`), bit-exact with ggml.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import native


def native_supports(ggml_type: T) -> bool:
    return native.supported(ggml_type)


def encode(a: np.ndarray, ggml_type: T) -> np.ndarray:
    """Bytes (as a contiguous array) of `a` stored as `ggml_type`; rows run along the last axis."""
    if ggml_type == T.F32:
        return np.ascontiguousarray(a, dtype=np.float32)
    if ggml_type == T.F16:
        if a.dtype == np.float16:
            return np.ascontiguousarray(a)
        return native.f32_to_f16(np.ascontiguousarray(a, dtype=np.float32))
    if ggml_type == T.BF16:
        return native.f32_to_bf16(np.ascontiguousarray(a, dtype=np.float32))
    rows = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, a.shape[-1] if a.ndim else 1)
    return native.quantize(rows, ggml_type, threads=1)
