"""`gguforge inspect` and `gguforge diff`: what is inside a GGUF file, and how two files differ.

Both read headers through gguf.GGUFReader (memory-mapped, nothing loaded up
front). A split file given by its first shard is read as a whole; its split.*
keys describe the packaging, not the model, so diff ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from .format.split import SPLIT_KEYS, split_siblings
from .errors import UserError
from .format.reader import open_reader, raw_rows
from .parallel import row_chunks
from .quantize.run import to_f32

ARRAY_PREVIEW = 5
STRING_PREVIEW = 60


@dataclass
class KV:
    type_name: str  # STRING, UINT32, ARRAY[STRING] ...
    value: object


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first), as llama.cpp prints shapes
    ggml_type: T
    nbytes: int
    reader_tensor: object

    @property
    def n_elements(self) -> int:
        return prod(self.shape)


@dataclass
class GGUFContents:
    path: Path
    files: list[Path]
    version: int
    metadata: dict[str, KV]
    tensors: list[TensorInfo]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)


def load(path: Path) -> GGUFContents:
    """Header, metadata and tensor list of a GGUF file (all shards, given the first of a split file)."""
    path = Path(path)
    reader = open_reader(path, empty_tensors=True)
    metadata = {key: _kv(f) for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    readers, files = [reader], [path]
    count = int(metadata["split.count"].value) if "split.count" in metadata else 1
    if count > 1 and int(metadata.get("split.no", KV("", 0)).value) == 0:
        for shard in split_siblings(path, count)[1:]:
            if not shard.is_file():
                raise UserError(f"{path} is split into {count} files, but {shard.name} is missing")
            readers.append(open_reader(shard, empty_tensors=True))
            files.append(shard)
    tensors = [TensorInfo(t.name, tuple(int(d) for d in t.shape.tolist()), T(t.tensor_type), int(t.n_bytes), t)
               for r in readers for t in r.tensors]
    version = int(reader.fields["GGUF.version"].contents()) if "GGUF.version" in reader.fields else 0
    return GGUFContents(path, files, version, metadata, tensors)


def _kv(field) -> KV:
    vtype = field.types[0]
    if vtype == V.ARRAY:
        inner = field.types[-1].name if len(field.types) > 1 else "?"
        return KV(f"ARRAY[{inner}]", field.contents())
    return KV(vtype.name, field.contents())


def format_value(value, preview: int = ARRAY_PREVIEW) -> str:
    """A value on one line: long arrays as their length and first items, long strings cut short."""
    if isinstance(value, list):
        if len(value) <= preview:
            return "[" + ", ".join(format_value(v) for v in value) + "]"
        head = ", ".join(format_value(v) for v in value[:preview])
        return f"[{head}, ...] ({len(value):,d} items)"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= STRING_PREVIEW else f"{text[:STRING_PREVIEW]}...' ({len(value):,d} chars)"
    if isinstance(value, float):
        return f"{value:.7g}"
    return str(value)


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def inspect_lines(contents: GGUFContents) -> list[str]:
    size = sum(f.stat().st_size for f in contents.files)
    files = "" if len(contents.files) == 1 else f" in {len(contents.files)} shards"
    lines = [f"{contents.path}: GGUF v{contents.version}, {size:,d} bytes{files}, "
             f"{len(contents.metadata)} metadata keys, {len(contents.tensors)} tensors", "", "metadata:"]
    width = max((len(k) for k in contents.metadata), default=0)
    for key, kv in contents.metadata.items():
        lines.append(f"  {key:{width}s}  {kv.type_name:14s} {format_value(kv.value)}")
    if contents.tensors:
        lines += ["", "tensors:"]
        width = max(len(t.name) for t in contents.tensors)
        lines.append(f"  {'name':{width}s}  {'shape':>16s}  {'type':6s} {'bytes':>14s}")
        for t in contents.tensors:
            lines.append(f"  {t.name:{width}s}  {shape_text(t.shape):>16s}  {t.ggml_type.name:6s} {t.nbytes:>14,d}")
        lines += ["", "by type:"]
        for name, (count, elements, nbytes) in type_totals(contents.tensors).items():
            lines.append(f"  {name:6s} {count:5d} tensors {elements:>16,d} weights {nbytes:>16,d} bytes "
                         f"{8 * nbytes / max(elements, 1):6.2f} bits per weight")
        lines.append(f"  {'total':6s} {len(contents.tensors):5d} tensors {contents.n_elements:>16,d} weights "
                     f"{contents.nbytes:>16,d} bytes {8 * contents.nbytes / max(contents.n_elements, 1):6.2f} "
                     "bits per weight")
    return lines


def type_totals(tensors: list[TensorInfo]) -> dict[str, tuple[int, int, int]]:
    """Type name -> (tensors, weights, bytes), largest share of bytes first."""
    totals: dict[str, list[int]] = {}
    for t in tensors:
        row = totals.setdefault(t.ggml_type.name, [0, 0, 0])
        row[0] += 1
        row[1] += t.n_elements
        row[2] += t.nbytes
    return {k: tuple(v) for k, v in sorted(totals.items(), key=lambda kv: -kv[1][2])}


# ---------------------------------------------------------------------------------------------
# diff


@dataclass
class DiffResult:
    lines: list[str]
    metadata_differences: int
    tensor_differences: int

    @property
    def equal(self) -> bool:
        return not (self.metadata_differences or self.tensor_differences)


def diff(a: GGUFContents, b: GGUFContents, tol: float | None = None) -> DiffResult:
    """Metadata and per-tensor differences. With `tol`, tensors are equal when their values (as f32)
    are within tol of each other, whatever their types; without it, when their bytes are equal."""
    lines: list[str] = []
    md_a = {k: v for k, v in a.metadata.items() if k not in SPLIT_KEYS}
    md_b = {k: v for k, v in b.metadata.items() if k not in SPLIT_KEYS}
    md_lines = []
    for key in md_a.keys() | md_b.keys():
        if key not in md_b:
            md_lines.append((key, f"  - {key} = {format_value(md_a[key].value)} (only in A)"))
        elif key not in md_a:
            md_lines.append((key, f"  + {key} = {format_value(md_b[key].value)} (only in B)"))
        elif md_a[key] != md_b[key]:
            va, vb = md_a[key], md_b[key]
            types = f" ({va.type_name} -> {vb.type_name})" if va.type_name != vb.type_name else ""
            md_lines.append((key, f"  ~ {key}: {_changed_value(va.value, vb.value)}{types}"))
    order = {k: i for i, k in enumerate([*md_a, *[k for k in md_b if k not in md_a]])}
    if md_lines:
        lines.append("metadata:")
        lines += [text for _, text in sorted(md_lines, key=lambda kv: order[kv[0]])]

    tensors_a = {t.name: t for t in a.tensors}
    tensors_b = {t.name: t for t in b.tensors}
    t_lines = []
    for name in [*tensors_a, *[n for n in tensors_b if n not in tensors_a]]:
        ta, tb = tensors_a.get(name), tensors_b.get(name)
        if tb is None:
            t_lines.append(f"  - {name} (only in A)")
        elif ta is None:
            t_lines.append(f"  + {name} (only in B)")
        elif (problem := _tensor_difference(ta, tb, tol)) is not None:
            t_lines.append(f"  ~ {name}: {problem}")
    if t_lines:
        lines.append("tensors:")
        lines += t_lines
    n_common = len(tensors_a.keys() & tensors_b.keys())
    verdict = "equal" if not (md_lines or t_lines) else "different"
    within = f" within {tol:g}" if tol is not None and verdict == "equal" else ""
    lines.append(f"{len(md_lines)} metadata differences, {len(t_lines)} tensor differences "
                 f"({n_common} tensors in both): files are {verdict}{within}")
    return DiffResult(lines, len(md_lines), len(t_lines))


def _changed_value(va, vb) -> str:
    if isinstance(va, list) and isinstance(vb, list):
        if len(va) != len(vb):
            return f"{len(va):,d} -> {len(vb):,d} items"
        first = next(i for i, (x, y) in enumerate(zip(va, vb)) if x != y)
        return f"item {first} of {len(va):,d}: {format_value(va[first])} -> {format_value(vb[first])}"
    return f"{format_value(va)} -> {format_value(vb)}"


def _tensor_difference(ta: TensorInfo, tb: TensorInfo, tol: float | None) -> str | None:
    if _ggml_dims(ta.shape) != _ggml_dims(tb.shape):
        return f"shape {shape_text(ta.shape)} -> {shape_text(tb.shape)}"
    types = f"type {ta.ggml_type.name} -> {tb.ggml_type.name}" if ta.ggml_type != tb.ggml_type else ""
    if not types and _same_bytes(ta, tb):
        return None
    max_diff = max_abs_diff(ta, tb)
    if tol is not None and max_diff is not None and max_diff <= tol:
        return None
    size = f", bytes {ta.nbytes:,d} -> {tb.nbytes:,d}" if ta.nbytes != tb.nbytes else ""
    measured = "" if max_diff is None else f", max abs diff {max_diff:.6g}"
    return f"{types or 'data differs'}{size}{measured}"


def _ggml_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Trailing ne=1 dimensions mean nothing to ggml (llama-quantize drops them: 64x1 is 64)."""
    dims = list(shape)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def _dequantizable(ggml_type: T) -> bool:
    return ggml_type not in (T.I8, T.I16, T.I32, T.I64, T.F64)


def _same_bytes(ta: TensorInfo, tb: TensorInfo) -> bool:
    return np.array_equal(ta.reader_tensor.data.reshape(-1).view(np.uint8),
                          tb.reader_tensor.data.reshape(-1).view(np.uint8))


def max_abs_diff(ta: TensorInfo, tb: TensorInfo) -> float | None:
    """Largest |a - b| over the two tensors dequantized to f32, a row block at a time (inf for a NaN in
    one but not the other; None for types that do not dequantize, such as integer tensors)."""
    if not (_dequantizable(ta.ggml_type) and _dequantizable(tb.ggml_type)):
        return None
    raw_a, raw_b = raw_rows(ta.reader_tensor), raw_rows(tb.reader_tensor)
    n_per_row = ta.shape[0]
    worst = 0.0
    for start, stop in row_chunks(raw_a.shape[0], n_per_row):
        va = to_f32(raw_a[start:stop], ta.ggml_type, n_per_row).reshape(-1)
        vb = to_f32(raw_b[start:stop], tb.ggml_type, n_per_row).reshape(-1)
        nan_a, nan_b = np.isnan(va), np.isnan(vb)
        if (nan_a != nan_b).any():
            return float("inf")
        va, vb = va[~nan_a].astype(np.float64), vb[~nan_b].astype(np.float64)
        d = np.where(va == vb, 0.0, np.abs(va - vb))  # equal infinities count as equal
        if d.size:
            worst = max(worst, float(d.max()))
    return worst
