"""llama-quantize's metadata and layer options: --override-kv, --prune-layers, --tensor-type-file.

Meanings as in llama.cpp (facts only, no code carried over):
- common/common.cpp string_parse_kv_override: `KEY=TYPE:VALUE` with TYPE int, float, bool (`true` or
  `false`) or str (at most 127 bytes); KEY under 128 bytes.
- src/llama-quant.cpp llama_model_quantize_impl: after the input's keys, general.quantization_version
  and general.file_type, each override is set in order (an existing key is replaced and moves to the
  end): int as UINT32 (PR 14182), float as FLOAT32, bool, str. The model loader sees the overrides too,
  so hyper-parameters the type rules read (block and expert counts, head counts) take the overridden
  values. With --prune-layers, `{arch}.block_count` is then set (UINT32) to the renumbered count.
- tools/quantize/quantize.cpp parse_layer_prune: comma-separated non-negative block numbers, sorted,
  duplicates dropped; parse_tensor_type_file: whitespace-separated `PATTERN=TYPE` words, each as one
  --tensor-type.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from gguf import GGMLQuantizationType as T, GGUFValueType

from ..errors import UserError
from ..format.split import SPLIT_KEYS
from .presets import parse_tensor_type_option

KEY_MAX = 127   # llama_model_kv_override.key is char[128]
STR_MAX = 127   # .val_str is char[128]
U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class KvOverride:
    key: str
    vtype: GGUFValueType  # as written: UINT32, FLOAT32, BOOL or STRING
    value: Any


def parse_kv_override(text: str) -> KvOverride:
    """One --override-kv KEY=TYPE:VALUE."""
    def bad(why: str) -> UserError:
        return UserError(f"--override-kv {text!r}: {why}",
                         hint="expected KEY=TYPE:VALUE with TYPE int, float, bool or str, "
                              "e.g. general.name=str:My Model")

    key, sep, rest = text.partition("=")
    if not sep:
        raise bad("no '='")
    if not key:
        raise bad("the key is empty")
    try:
        key_bytes = key.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("the key is not valid UTF-8") from None
    if len(key_bytes) > KEY_MAX:
        raise bad(f"the key is longer than {KEY_MAX} bytes")
    if key in SPLIT_KEYS:
        raise bad(f"{key} is set by the split options")
    kind, colon, value = rest.partition(":")
    if not colon or kind not in ("int", "float", "bool", "str"):
        raise bad(f"unknown type {kind!r}" if colon else "no TYPE: before the value")
    if kind == "int":
        try:
            number = int(value.strip(), 10)
        except ValueError:
            raise bad(f"{value!r} is not a whole number") from None
        if not 0 <= number <= U32_MAX:
            raise bad(f"{number} does not fit the UINT32 llama-quantize writes integer overrides as")
        return KvOverride(key, GGUFValueType.UINT32, number)
    if kind == "float":
        try:
            number = float(value.strip())
        except ValueError:
            raise bad(f"{value!r} is not a number") from None
        try:
            struct.pack("<f", number)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise bad(f"{value!r} is not a finite FLOAT32")
        return KvOverride(key, GGUFValueType.FLOAT32, number)
    if kind == "bool":
        if value not in ("true", "false"):
            raise bad(f"{value!r} is not true or false")
        return KvOverride(key, GGUFValueType.BOOL, value == "true")
    try:
        nbytes = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise bad("the value is not valid UTF-8") from None
    if nbytes > STR_MAX:
        raise bad(f"the string is longer than {STR_MAX} bytes")
    return KvOverride(key, GGUFValueType.STRING, value)


def parse_kv_overrides(texts: Sequence[str]) -> list[KvOverride]:
    return [parse_kv_override(t) for t in texts]


def overridden_getter(get: Callable[[str], Any], overrides: Sequence[KvOverride], arch: str) -> Callable[[str], Any]:
    """`get` (a metadata reader) with the overrides the model loader would apply; the counts the type
    rules read must be integers, as llama.cpp's loader requires."""
    values = {o.key: o for o in overrides}
    counted = {f"{arch}.{k}" for k in ("block_count", "expert_count", "attention.head_count",
                                        "attention.head_count_kv")}
    for key in counted & set(values):
        if values[key].vtype != GGUFValueType.UINT32:
            raise UserError(f"--override-kv {key}: llama.cpp reads {key} as an integer, so it must be int:N")

    def getter(key: str):
        return values[key].value if key in values else get(key)
    return getter


def apply_kv_overrides(metadata, overrides: Sequence[KvOverride]) -> None:
    for o in overrides:
        metadata.set(o.key, o.value, o.vtype)


def parse_prune_layers(text: str) -> list[int]:
    """--prune-layers 'L1,L2,...': sorted, without duplicates."""
    layers = []
    for part in text.split(","):
        digits = part.strip()
        if not (digits.isascii() and digits.isdigit()):
            raise UserError(f"--prune-layers {text!r}: {part!r} is not a block number",
                            hint="give comma-separated block numbers, e.g. --prune-layers 20,21")
        layers.append(int(digits))
    return sorted(set(layers))


def check_prune_layers(layers: Sequence[int], n_layer: int | None, arch: str) -> None:
    """Pruned blocks must exist (llama-quantize ignores others silently; a typo would prune nothing)."""
    if not layers:
        return
    if any(int(i) < 0 for i in layers):
        raise UserError(f"--prune-layers: block numbers cannot be negative ({min(layers)})")
    if n_layer is None:
        raise UserError(f"--prune-layers: the input has no {arch}.block_count")
    missing = [str(i) for i in layers if i >= n_layer]
    if missing:
        raise UserError(f"--prune-layers: block {', '.join(missing)} does not exist (the model has {n_layer} "
                        f"blocks, 0-{n_layer - 1})")
    if len(layers) >= n_layer:
        raise UserError("--prune-layers removes every block")


def read_tensor_type_file(path: str | Path) -> list[tuple[str, T]]:
    """--tensor-type-file: whitespace-separated PATTERN=TYPE words, each one --tensor-type."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--tensor-type-file {path}: not a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"--tensor-type-file {path}: {e.strerror or e}") from None
    out = []
    for word in text.split():
        try:
            out.append(parse_tensor_type_option(word))
        except UserError as e:
            raise UserError(f"--tensor-type-file {path}: {e.message}", hint=e.hint) from None
    return out
