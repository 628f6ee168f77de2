"""Quantization presets (llama-quantize's TYPE argument) and ggml type-name parsing.

Names, aliases and LLAMA_FTYPE numbers follow llama.cpp's tools/quantize/quantize.cpp
(QUANT_OPTIONS) and include/llama.h (enum llama_ftype).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from gguforge.errors import UserError
from gguforge.format.types import FLOAT_TYPES


@dataclass(frozen=True)
class Preset:
    name: str              # canonical upper-case name, e.g. "Q4_K_M"
    file_type: FT          # written as general.file_type
    default_type: T        # ggml type most tensors get (llama_ftype_get_default_type)

    @property
    def is_float(self) -> bool:
        # Float presets skip the whole mixture logic (no rules, no --tensor-type, no fallback).
        return self.default_type in FLOAT_TYPES


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (  # llama-quantize's listing order
        Preset("Q4_0", FT.MOSTLY_Q4_0, T.Q4_0),
        Preset("Q4_1", FT.MOSTLY_Q4_1, T.Q4_1),
        Preset("Q5_0", FT.MOSTLY_Q5_0, T.Q5_0),
        Preset("Q5_1", FT.MOSTLY_Q5_1, T.Q5_1),
        Preset("Q2_K", FT.MOSTLY_Q2_K, T.Q2_K),
        Preset("Q2_K_S", FT.MOSTLY_Q2_K_S, T.Q2_K),  # its Q2_K tensors need an importance matrix
        Preset("Q3_K_S", FT.MOSTLY_Q3_K_S, T.Q3_K),
        Preset("Q3_K_M", FT.MOSTLY_Q3_K_M, T.Q3_K),
        Preset("Q3_K_L", FT.MOSTLY_Q3_K_L, T.Q3_K),
        Preset("IQ4_NL", FT.MOSTLY_IQ4_NL, T.IQ4_NL),
        Preset("IQ4_XS", FT.MOSTLY_IQ4_XS, T.IQ4_XS),
        Preset("Q4_K_S", FT.MOSTLY_Q4_K_S, T.Q4_K),
        Preset("Q4_K_M", FT.MOSTLY_Q4_K_M, T.Q4_K),
        Preset("Q5_K_S", FT.MOSTLY_Q5_K_S, T.Q5_K),
        Preset("Q5_K_M", FT.MOSTLY_Q5_K_M, T.Q5_K),
        Preset("Q6_K", FT.MOSTLY_Q6_K, T.Q6_K),
        Preset("Q8_0", FT.MOSTLY_Q8_0, T.Q8_0),
        Preset("F16", FT.MOSTLY_F16, T.F16),
        Preset("BF16", FT.MOSTLY_BF16, T.BF16),
        Preset("F32", FT.ALL_F32, T.F32),
    )
}

ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# llama-quantize presets gguforge cannot write yet: the lattice (codebook) types and the ternary/FP4/1-2
# bit ones.
# name -> (LLAMA_FTYPE, why not).
_LATTICE = "the IQ1/IQ2/IQ3 lattice (codebook) types are not implemented"
UNSUPPORTED: dict[str, tuple[int, str]] = {
    **{name: (int(FT[f"MOSTLY_{name}"]), _LATTICE) for name in (
        "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M")},
    # llama.h LLAMA_FTYPE_MOSTLY_TQ1_0 .. _Q2_0 (gguf-py lacks Q2_0)
    **{name: (ftype, "its types are not implemented") for name, ftype in (
        ("TQ1_0", 36), ("TQ2_0", 37), ("MXFP4_MOE", 38), ("Q1_0", 40), ("Q2_0", 41))},
}


def preset_names() -> list[str]:
    return [*PRESETS, *ALIASES]


def parse_preset(name: str | Preset) -> Preset:
    """Case-insensitive preset lookup; also accepts the numeric LLAMA_FTYPE like llama-quantize does."""
    if isinstance(name, Preset):
        return name
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    if key.isascii() and key.isdigit():  # not '²' (isdigit() accepts it, int() does not)
        for preset in PRESETS.values():
            if preset.file_type == int(key):
                return preset
        key = next((n for n, (ftype, _) in UNSUPPORTED.items() if ftype == int(key)), key)
    if key in UNSUPPORTED:
        raise UserError(f"gguforge cannot write {key} yet: {UNSUPPORTED[key][1]}",
                        hint="supported types: " + ", ".join(preset_names()))
    raise UserError(
        f"unknown quantization type {name!r}",
        hint="valid types: " + ", ".join(preset_names()),
    )


def writable_types() -> list[T]:
    """The ggml types gguforge can write a tensor in: those the native quantizer's type table holds."""
    from .native import supported
    return [t for t in T if supported(t)]


def parse_ggml_type(name: str) -> T:
    """A ggml type gguforge can write, by name, case-insensitive ('q8_0', 'Q6_K', 'f16', ...), as
    --tensor-type, --output-tensor-type and --token-embedding-type accept. ggml knows more (Q8_1, ...)."""
    key = name.strip().upper()
    hint = "types gguforge can write: " + ", ".join(t.name.lower() for t in writable_types())
    ggml_type = T.__members__.get(key)
    if ggml_type is None:
        raise UserError(f"unknown ggml type {name!r}", hint=hint)
    if ggml_type not in writable_types():
        raise UserError(f"gguforge cannot write {ggml_type.name} tensors (given as {name!r})", hint=hint)
    return ggml_type


def parse_tensor_type_option(option: str) -> tuple[str, T]:
    """Parse one --tensor-type 'REGEX=TYPE'. llama-quantize lower-cases the pattern, so we do too."""
    pattern, sep, type_name = option.partition("=")
    if not sep:
        raise UserError(f"malformed --tensor-type {option!r}", hint="expected REGEX=TYPE, e.g. attn_v=q8_0")
    if not pattern:
        raise UserError(f"--tensor-type {option!r} is missing the tensor name pattern")
    if not type_name:
        raise UserError(f"--tensor-type {option!r} is missing the quantization type")
    return pattern.lower(), parse_ggml_type(type_name)
