"""Reading GGUF files: a validated, memory-mapped gguf.GGUFReader per file, split sets opened as one.

Every way a file can be broken (truncated, wrong magic or version, unknown type ids, bad UTF-8,
missing shards) is one UserError line.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType

from ..errors import UserError, not_a_file
from .types import block_size
from .split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT, split_siblings

SUPPORTED_VERSIONS = (2, 3)


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
    if (count := kv(SPLIT_COUNT) or 1) > 1:
        if kv(SPLIT_NO) != 0:
            raise UserError(f"{path} is shard {kv(SPLIT_NO) + 1} of {count} of a split GGUF",
                            hint="give the first shard (NAME-00001-of-...)")
        for i, shard in enumerate(split_siblings(Path(path), count)[1:], start=1):
            if not shard.is_file():
                raise UserError(f"{path} is split into {count} files, but {shard.name} is missing")
            r = open_reader(shard)
            if kv(SPLIT_NO, r) != i or kv(SPLIT_COUNT, r) != count:
                raise UserError(f"{shard} is not shard {i + 1} of {count} (its split.no/split.count disagree)")
            shard_readers.append(r)
        total = sum(len(r.tensors) for r in (reader, *shard_readers))
        if kv(SPLIT_TENSORS_COUNT) not in (None, total):
            raise UserError(f"{path}: split.tensors.count is {kv(SPLIT_TENSORS_COUNT)} but the shards hold {total}")
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


def open_reader(path: Path, *, empty_tensors: bool = False):
    """A validated gguf.GGUFReader for one file. empty_tensors: accept tensors with a dimension of 0, as
    ggml's reader does (gguf_init_from_file_impl refuses only negative ones); inspect and diff show them,
    the converter and quantize do not take them."""
    GGUFReader = _fast_reader_class()

    path = Path(path)
    if not path.is_file():
        raise not_a_file(path)
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
    _check_counts(path, reader)
    _check_tensor_shapes(path, reader, empty_tensors)
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


INTEGER_TYPES = (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                 GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)


def counted_keys(reader) -> list[str]:
    """Keys whose values are used as counts: split.* and the architecture's block and expert counts."""
    keys = [SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT]
    arch = reader.get_field("general.architecture")
    if arch is not None and arch.types == [GGUFValueType.STRING]:
        name = arch.contents()
        keys += [f"{name}.block_count", f"{name}.expert_count", f"{name}.expert_used_count"]
    return keys


def _check_counts(path: Path, reader) -> None:
    """Every count the tools rely on is one non-negative integer (not a string, float or array)."""
    for key in counted_keys(reader):
        f = reader.get_field(key)
        if f is None:
            continue
        if len(f.types) != 1 or f.types[0] not in INTEGER_TYPES or f.contents() < 0:
            kind = "/".join(t.name for t in f.types)
            raise UserError(f"{path}: {key} must be a non-negative integer, but it is a {kind} "
                            f"({str(f.contents())[:40]})", hint="the file is corrupt")


def _check_tensor_shapes(path: Path, reader, empty_tensors: bool = False) -> None:
    """No dimension of size 0 (unless `empty_tensors`), and rows that hold whole blocks of the tensor's type."""
    for t in reader.tensors:
        ne = [int(d) for d in t.shape.tolist()]
        if not ne:
            raise UserError(f"{path}: tensor {t.name} has no dimensions", hint="the file is corrupt")
        if min(ne) == 0 and not empty_tensors:
            raise UserError(f"{path}: tensor {t.name} has a dimension of size 0 ({ne}), which this command "
                            "cannot use", hint="gguforge inspect and diff show such files")
        block, _ = block_size(t.tensor_type)
        if ne[0] % block:
            raise UserError(f"{path}: tensor {t.name} has rows of {ne[0]} values, not a whole number of "
                            f"{T(t.tensor_type).name} blocks of {block}", hint="the file is corrupt")


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


def numpy_shape(reader_tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(reader_tensor.shape.tolist()))


def raw_rows(reader_tensor) -> np.ndarray:
    """The tensor's bytes as (rows, bytes per row), a view into the memory map."""
    ne = [int(d) for d in reader_tensor.shape.tolist()]
    block, size = block_size(reader_tensor.tensor_type)
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


