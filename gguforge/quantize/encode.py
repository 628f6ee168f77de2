"""Quantize step: turn a block of float rows into the bytes of a GGUF tensor type.

All of it runs in the native extension (built by `pip install`), bit-exact with ggml.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import native


def native_supports(ggml_type: T) -> bool:
    return native.supported(ggml_type)


def missing_kernels(tensors) -> str | None:
    """The line refusing to write when a tensor's type has no native quantizer in this build, or None.
    `tensors`: (name, ggml type) of the tensors to be encoded."""
    missing = [(name, T(t)) for name, t in tensors if not native.supported(t)]
    if not missing:
        return None
    types = ", ".join(sorted({t.name for _, t in missing}))
    return (f"gguforge has no quantizer for {types} yet: {len(missing)} tensor(s) would need it "
            f"(e.g. {missing[0][0]} -> {missing[0][1].name})")


def encode(a: np.ndarray, ggml_type: T, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Bytes (as a contiguous array) of `a` stored as `ggml_type`; rows run along the last axis.
    `imatrix`: float32 importance (row length,) for every row (llama-quantize --imatrix); float types
    and the types whose quantizer ignores it take no notice."""
    if ggml_type == T.F32:
        return np.ascontiguousarray(a, dtype=np.float32)
    if ggml_type == T.F16:
        if a.dtype == np.float16:
            return np.ascontiguousarray(a)
        return native.f32_to_f16(np.ascontiguousarray(a, dtype=np.float32))
    if ggml_type == T.BF16:
        return native.f32_to_bf16(np.ascontiguousarray(a, dtype=np.float32))
    rows = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, a.shape[-1] if a.ndim else 1)
    if imatrix is not None and native.uses_imatrix(ggml_type):
        return native.quantize(rows, ggml_type, threads=1, imatrix=imatrix)
    return native.quantize(rows, ggml_type, threads=1)
