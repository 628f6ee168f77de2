"""`gguforge quantize`: GGUF in, GGUF out, with llama-quantize's per-tensor types.

The input is memory-mapped with gguf.GGUFReader; tensors are visited in
llama-quantize's order (rules.py), converted a block of rows at a time on a
thread pool, and streamed to the GGUF writer. Tensors whose type does not change are
copied byte for byte. The output metadata is laid out as llama-quantize writes
it (/work/shared/reference/quant-spec.md §7.10).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType

from ..convert.pipeline import ordered_parallel, row_chunks
from ..convert.split import SplitOptions, plan_shards, write_shards
from ..convert.write import Metadata, TensorEntry
from ..errors import UserError
from . import native
from .encode import encode
from .presets import Preset, parse_preset
from .rules import QuantOptions, TensorIn, TensorPlan, ggml_n_dims, plan_quantization

QUANT_VERSION = 2
SUPPORTED_VERSIONS = (2, 3)
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
FLOAT_SOURCES = (T.F32, T.F16, T.BF16)



# ---------------------------------------------------------------------------------------------
# Input


@dataclass
class SourceGGUF:
    path: Path
    reader: object  # gguf.GGUFReader
    arch: str
    n_layer_all: int | None
    n_expert: int
    shard_readers: list = field(default_factory=list)  # shards 2..n of a split input

    @property
    def tensors(self):
        if not self.shard_readers:
            return self.reader.tensors
        return [t for r in (self.reader, *self.shard_readers) for t in r.tensors]

    @property
    def shard_count(self) -> int:
        return 1 + len(self.shard_readers)

    def tensor_shards(self) -> dict[str, int]:
        """Tensor name -> index of the input shard holding it."""
        return {t.name: i for i, r in enumerate((self.reader, *self.shard_readers)) for t in r.tensors}

    def field(self, key: str):
        f = self.reader.get_field(key)
        return None if f is None else f.contents()


def open_gguf(path: Path) -> SourceGGUF:
    """Open and validate a GGUF file (the first shard of a split one brings the rest); one UserError line
    for every way it can be broken."""
    reader = open_reader(path)

    def kv(key, r=reader):
        f = r.get_field(key)
        return None if f is None else f.contents()

    shard_readers = []
    if (count := kv("split.count") or 1) > 1:
        from ..convert.split import split_siblings
        if kv("split.no") != 0:
            raise UserError(f"{path} is shard {kv('split.no') + 1} of {count} of a split GGUF",
                            hint="give the first shard (NAME-00001-of-...)")
        for i, shard in enumerate(split_siblings(Path(path), count)[1:], start=1):
            if not shard.is_file():
                raise UserError(f"{path} is split into {count} files, but {shard.name} is missing")
            r = open_reader(shard)
            if kv("split.no", r) != i or kv("split.count", r) != count:
                raise UserError(f"{shard} is not shard {i + 1} of {count} (its split.no/split.count disagree)")
            shard_readers.append(r)
        total = sum(len(r.tensors) for r in (reader, *shard_readers))
        if kv("split.tensors.count") not in (None, total):
            raise UserError(f"{path}: split.tensors.count is {kv('split.tensors.count')} but the shards hold {total}")
    arch = kv("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{path} has no general.architecture")
    block_count = kv(f"{arch}.block_count")
    return SourceGGUF(Path(path), reader, arch, None if block_count is None else int(block_count),
                      int(kv(f"{arch}.expert_count") or 0), shard_readers)


def _fast_reader_class():
    from gguf import GGUFReader

    class FastArrayReader(GGUFReader):
        """gguf.GGUFReader with arrays parsed in one pass: the same fields and parts, built much faster.

        The stock reader makes several numpy views per array element through a generic path, which
        takes tens of seconds for a 248k-token vocabulary.
        """

        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order == "S":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            item_type, n, offs = GGUFValueType(raw_itype[0]), int(alen[0]), orig_offs + 12
            types = [GGUFValueType.ARRAY, item_type]
            nptype = self.gguf_scalar_to_np.get(item_type)
            if nptype is not None:
                values = self._get(offs, nptype, n)
                if len(values) != n:
                    raise ValueError("an array runs past the end of the file")
                return 12 + int(values.nbytes), [raw_itype, alen, *values.reshape(n, 1)], list(range(2, 2 + n)), types
            if item_type != GGUFValueType.STRING:
                return super()._get_field_parts(orig_offs, raw_type)
            buf = self.data.view(np.ndarray)  # slicing a plain ndarray is much cheaper than a memmap
            parts, idxs = [raw_itype, alen], []
            for _ in range(n):
                length = buf[offs:offs + 8].view("<u8")
                text = buf[offs + 8:offs + 8 + int(length[0])]
                if len(length) != 1 or len(text) != int(length[0]):
                    raise ValueError("a string runs past the end of the file")
                parts += (length, text)
                idxs.append(len(parts) - 1)
                offs += 8 + len(text)
            return offs - orig_offs, parts, idxs, types

    return FastArrayReader


def open_reader(path: Path):
    """A validated gguf.GGUFReader for one file."""
    GGUFReader = _fast_reader_class()

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = GGUFReader(path)
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, struct.error, UnicodeDecodeError,
            OSError) as e:
        # GGUFReader reports truncation, bad versions and unknown type ids with assorted exceptions.
        raise UserError(f"{path}: {_reader_error(path, e)}") from None
    if reader.byte_order == "S":
        raise UserError(f"{path} is a big-endian GGUF file, which is not supported")
    _check_strings(path, reader)
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size:
            raise UserError(f"{path}: the file is truncated (the data of tensor {t.name} runs past its end)")
    return reader


def _check_strings(path: Path, reader) -> None:
    """GGUFReader decodes string values only when they are read: check them all here, once."""
    for key, f in reader.fields.items():
        if f.types and f.types[-1] == GGUFValueType.STRING:
            try:
                # One decode per field: an ASCII separator cannot complete a multi-byte sequence, so the
                # joined text is valid exactly when every string is.
                b"\0".join([f.parts[i] for i in f.data]).decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: the value of {key} is not valid UTF-8 (the file is corrupt)") from None


def _reader_error(path: Path, e: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 8:
        version = struct.unpack("<I", head[4:])[0]
        if version not in SUPPORTED_VERSIONS:
            return f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
    unknown_type = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
    if unknown_type:
        return f"unknown tensor type id {unknown_type.group(1)} (corrupt file, or written by a newer ggml)"
    return f"the file is truncated or corrupt ({str(e) or type(e).__name__})"


# ---------------------------------------------------------------------------------------------
# Plan


def numpy_shape(reader_tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(reader_tensor.shape.tolist()))


def plan_file(source: SourceGGUF, preset: Preset, options: QuantOptions) -> list[TensorPlan]:
    if source.n_layer_all is None and not preset.is_float:
        raise UserError(f"{source.path} has no {source.arch}.block_count, which the {preset.name} rules need")
    tensors = [TensorIn(t.name, numpy_shape(t), t.tensor_type) for t in source.tensors]
    return plan_quantization(tensors, preset, arch=source.arch, n_layer_all=source.n_layer_all or 0,
                             n_expert=source.n_expert, options=options)


def output_metadata(source: SourceGGUF, preset: Preset) -> Metadata:
    """Every input KV in input order, split keys dropped, then quantization_version and file_type last."""
    md = Metadata()
    for key, f in source.reader.fields.items():
        if key.startswith("GGUF.") or key in SPLIT_KEYS:
            continue  # GGUF.* are the reader's pseudo-fields for the header counts
        if key == "general.alignment" and f.contents() != 32:
            continue  # the writer always aligns to 32; a copied other value would mislead readers
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            item_type = f.types[-1]
            if len(f.types) != 2:
                raise UserError(f"{source.path}: metadata key {key} is a nested array, which is not supported")
            if item_type == GGUFValueType.STRING:
                md.set(key, f.contents(), vtype, item_type)
            else:  # numeric: keep it as one numpy array instead of a Python list
                parts = [f.parts[i] for i in f.data]
                value = np.concatenate(parts) if parts else np.empty(0, np.uint8)
                md.set(key, value, vtype, item_type)
        else:
            md.set(key, f.contents(), vtype)
    md.u32("general.quantization_version", QUANT_VERSION)
    md.u32("general.file_type", int(preset.file_type))
    return md


def output_entry(plan: TensorPlan) -> TensorEntry:
    """llama-quantize writes ggml_n_dims dimensions: trailing ne=1 (leading in numpy order) dropped."""
    n_dims = ggml_n_dims(plan.shape)
    return TensorEntry(plan.name, plan.shape[len(plan.shape) - n_dims:], plan.dst_type)


# ---------------------------------------------------------------------------------------------
# Data


def raw_rows(reader_tensor) -> np.ndarray:
    """The tensor's bytes as (rows, bytes per row), a view into the memory map."""
    ne = [int(d) for d in reader_tensor.shape.tolist()]
    block, size = GGML_QUANT_SIZES[T(reader_tensor.tensor_type)]
    data = reader_tensor.data.reshape(-1).view(np.uint8)
    return data.reshape(prod(ne[1:]), ne[0] // block * size)


def release_pages(mapped: np.ndarray, span: tuple[int, int]) -> None:
    """Drop consumed input pages from the memory map, so resident memory stays near the chunks in flight
    instead of growing to the size of the input (pages touched again are simply re-read from the file)."""
    mm = getattr(mapped, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    first, last = -(-span[0] // mmap.PAGESIZE) * mmap.PAGESIZE, span[1] // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


def to_f32(raw: np.ndarray, src: T, n_per_row: int) -> np.ndarray:
    """Rows of `src` bytes as float32. F16/BF16 are exact; quantized types are dequantized."""
    if src == T.F32:
        return raw.view(np.float32)
    if src == T.F16:
        return native.f16_to_f32(raw.view(np.uint16))
    if src == T.BF16:
        return native.bf16_to_f32(raw.view(np.uint16))
    if native.supported(src):
        return native.dequantize(raw, src, raw.shape[0] * n_per_row)
    from gguf.quants import dequantize
    return dequantize(raw, src).reshape(raw.shape[0], n_per_row).astype(np.float32, copy=False)


def count_nonfinite(raw: np.ndarray, src: T) -> int:
    view = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[src]
    return native.count_nonfinite(raw.view(view), bf16=src == T.BF16)


def convert_chunk(plan: TensorPlan, rows: np.ndarray):
    """Output bytes for a block of input rows (llama-quantize: validate, to f32, quantize)."""
    if plan.src_type in FLOAT_SOURCES and count_nonfinite(rows, plan.src_type):
        raise UserError(f"tensor {plan.name} has invalid data (NaN or Inf values)")
    if not plan.converts:
        return rows  # same type: the mapped bytes as they are
    return encode(to_f32(rows, plan.src_type, plan.shape[-1]), plan.dst_type)


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class QuantizeResult:
    plans: list[TensorPlan]
    target: Path
    preset: Preset
    shards: list = field(default_factory=list)  # convert.split.Shard per output file


def same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def quantize_gguf(source_path, target_path, preset: str | Preset, options: QuantOptions | None = None, *,
                  threads: int | None = None, force: bool = False, dry_run: bool = False,
                  progress_factory=None, split: SplitOptions | None = None,
                  keep_split: bool = False) -> QuantizeResult:
    preset = parse_preset(preset)
    options = options or QuantOptions()
    source_path, target = Path(source_path), Path(target_path)
    if same_file(source_path, target):
        raise UserError(f"the output {target} is the input file", hint="choose another output file name")
    if keep_split and split is not None and split.active:
        raise UserError("--keep-split cannot be combined with --split-max-size/--split-max-tensors")
    source = open_gguf(source_path)
    plans = plan_file(source, preset, options)
    groups = None
    if keep_split:
        # As llama-quantize --keep-split: tensors in input order, each in its input shard's output shard.
        shard_of, position = source.tensor_shards(), {t.name: i for i, t in enumerate(source.tensors)}
        plans.sort(key=lambda p: (shard_of[p.name], position[p.name]))
        counts = [sum(1 for p in plans if shard_of[p.name] == k) for k in range(source.shard_count)]
        groups = [(sum(counts[:k]), sum(counts[:k + 1])) for k in range(source.shard_count)]
    entries = [output_entry(p) for p in plans]
    shards = plan_shards(target, entries, split, groups)
    result = QuantizeResult(plans, target, preset, shards)
    if dry_run:
        return result
    for shard in shards:
        if same_file(source_path, shard.path):
            raise UserError(f"the output {shard.path} is the input file", hint="choose another output file name")
        if shard.path.exists() and not force:
            raise UserError(f"{shard.path} already exists", hint="pass --force to overwrite it")

    metadata = output_metadata(source, preset)
    by_name = {t.name: t for t in source.tensors}
    threads = threads or os.cpu_count() or 1

    def jobs():
        for i, plan in enumerate(plans):
            tensor = by_name[plan.name]
            raw = raw_rows(tensor)
            for start, stop in row_chunks(raw.shape[0], plan.shape[-1]):
                span = (tensor.data_offset + start * raw.shape[1], tensor.data_offset + stop * raw.shape[1])
                yield i, plan, raw[start:stop], (tensor.data, span)

    def chunks():
        for (i, _, _, source), data in ordered_parallel(
                jobs(), lambda i, plan, rows, source: convert_chunk(plan, rows), threads, ahead=2 * threads):
            yield i, data
            release_pages(*source)  # resumed only once the writer has written `data`

    def write(advance=None):
        write_shards(shards, metadata, entries, chunks, advance)

    total = sum(e.nbytes for e in entries)
    if progress_factory is None:
        write()
    else:
        with progress_factory(total, f"writing {target.name}") as advance:
            write(advance)
    return result


def format_plan(plans: list[TensorPlan]) -> list[str]:
    """One line per tensor (name, shape in ggml order, src -> dst, bytes, reason)."""
    lines = []
    for p in plans:
        shape = "x".join(str(d) for d in reversed(p.shape))
        lines.append(f"{p.name:40s} {shape:>20s} {p.src_type.name:>5s} -> {p.dst_type.name:<5s} "
                     f"{p.dst_nbytes:>13,d}  {p.reason}")
    return lines
