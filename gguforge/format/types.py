"""Type and size facts of the GGUF format, from gguf-py (the library llama.cpp ships) where it has them."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType as T

# general.quantization_version written by every quantized file (gguf-py's constant, as llama.cpp writes it).
QUANT_VERSION = GGML_QUANT_VERSION
# Types that hold plain floats: cast, never quantized, and NaN/Inf-scannable as stored.
FLOAT_TYPES = (T.F32, T.F16, T.BF16)


def block_size(ggml_type: T) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return GGML_QUANT_SIZES[T(ggml_type)]


def tensor_nbytes(shape: tuple[int, ...], ggml_type: T) -> int:
    """Bytes of a tensor of numpy-order `shape` stored as `ggml_type` (rows must fill whole blocks)."""
    block, size = block_size(ggml_type)
    n = 1
    for d in shape:
        n *= d
    if shape and shape[-1] % block:
        raise ValueError(f"row of {shape[-1]} elements is not a multiple of the {T(ggml_type).name} block ({block})")
    return n // block * size
