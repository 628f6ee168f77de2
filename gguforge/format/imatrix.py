"""Importance-matrix files: llama-imatrix's GGUF format and its legacy `.dat` format.

What the files hold (facts from llama.cpp: tools/imatrix/imatrix.cpp save_imatrix / save_imatrix_legacy,
common/imatrix-loader.cpp common_imatrix_load, tools/quantize/quantize.cpp load_imatrix):

- GGUF: `general.type = "imatrix"`, `imatrix.datasets` (array of str), `imatrix.chunk_count` and
  `imatrix.chunk_size` (u32); per weight two F32 tensors in sorted name order, `<w>.in_sum2` (ggml ne
  [ne0, n_mat], raw sums of x^2 per input column, expert-major) and `<w>.counts` (ne [1, n_mat], token
  counts as floats); trailing 1-dims are dropped by the gguf writer.
- `.dat` (little-endian): int32 n_entries; per entry (sorted) int32 len, name, int32 ncall, int32 nval,
  float values[nval] = sum/count*ncall; then an optional trailer int32 chunk_count, int32 len, dataset.

`importance()` turns either into what llama-quantize hands to the quantizers: per expert sum/count
(an expert never routed gets 1.0), or for `.dat` values/ncall. Every broken file is one UserError line.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType

from ..errors import UserError, not_a_file
from .reader import INTEGER_TYPES, open_reader
from .writer import Metadata, TensorEntry, atomic_outputs, write_gguf_shards

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
# A token count beyond this cannot come from a real run (and would overflow lround's long in llama.cpp).
MAX_COUNT = float(2 ** 53)
MAX_NAME = 1 << 16  # bytes; GGUF tensor names are at most 63


@dataclass
class ImatrixEntry:
    sums: np.ndarray    # float32 (n_mat, ne0): raw sums of x^2 per input column, expert-major
    counts: np.ndarray  # float32 (n_mat,): tokens seen per expert (legacy: (1,) holding ncall)

    @property
    def n_mat(self) -> int:
        return int(self.counts.shape[0])


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    legacy: bool = False  # a .dat file: sums hold sum/count*ncall, counts hold [ncall]
    has_metadata: bool = True  # GGUF: all three imatrix.* keys present (llama-quantize requires them)
    path: Path | None = field(default=None, compare=False)


def _lround(x: np.ndarray) -> np.ndarray:
    """C lround (half away from zero) of non-negative float32 counts, as int64."""
    return np.floor(x.astype(np.float64) + 0.5).astype(np.int64)


def _check_values(path, name: str, sums: np.ndarray, counts: np.ndarray) -> None:
    if not np.isfinite(sums).all():
        raise UserError(f"{path}: imatrix entry {name} holds NaN or Inf values (the file is corrupt)")
    if (sums < 0).any():
        raise UserError(f"{path}: imatrix entry {name} holds negative sums of squares (the file is corrupt)")
    if not np.isfinite(counts).all() or (counts < 0).any() or (counts > MAX_COUNT).any():
        bad = counts[~(np.isfinite(counts) & (counts >= 0) & (counts <= MAX_COUNT))][0]
        raise UserError(f"{path}: imatrix entry {name} has an impossible token count ({bad}) (the file is corrupt)")


# -- reading ----------------------------------------------------------------------------------------


def read_imatrix(path) -> Imatrix:
    """Read an imatrix file, GGUF or legacy `.dat` (told apart by the GGUF magic, as llama.cpp does)."""
    path = Path(path)
    if not path.is_file():
        raise not_a_file(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    im = _read_gguf(path) if magic == b"GGUF" else _read_dat(path)
    im.path = path
    return im


def _read_u32(path, reader, key) -> int | None:
    f = reader.get_field(key)
    if f is None:
        return None
    if len(f.types) != 1 or f.types[0] not in INTEGER_TYPES or not 0 <= int(f.contents()) < 2 ** 32:
        raise UserError(f"{path}: {key} must be an unsigned 32-bit integer (the file is corrupt)")
    return int(f.contents())


def _read_gguf(path: Path) -> Imatrix:
    reader = open_reader(path)
    kind = reader.get_field(KEY_TYPE)
    if kind is not None and (kind.types != [GGUFValueType.STRING] or kind.contents() != "imatrix"):
        what = kind.contents() if kind.types == [GGUFValueType.STRING] else "not a string"
        raise UserError(f"{path} is not an importance matrix (its general.type is {str(what)[:40]!r})",
                        hint="give the file llama-imatrix or gguforge imatrix wrote")
    if kind is None and reader.get_field("general.architecture") is not None:
        raise UserError(f"{path} is a model GGUF, not an importance matrix",
                        hint="give the file llama-imatrix or gguforge imatrix wrote")
    datasets: list[str] = []
    f = reader.get_field(KEY_DATASETS)
    if f is not None:
        if f.types != [GGUFValueType.ARRAY, GGUFValueType.STRING] and not (
                f.types == [GGUFValueType.ARRAY] and not f.data):
            raise UserError(f"{path}: {KEY_DATASETS} must be an array of strings (the file is corrupt)")
        datasets = [str(s) for s in f.contents()] if f.data else []
    chunk_count = _read_u32(path, reader, KEY_CHUNK_COUNT)
    chunk_size = _read_u32(path, reader, KEY_CHUNK_SIZE)
    has_metadata = f is not None and chunk_count is not None and chunk_size is not None

    halves: dict[str, list] = {}
    for t in reader.tensors:
        for suffix, slot in ((SUM_SUFFIX, 0), (COUNT_SUFFIX, 1)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                halves.setdefault(t.name[:-len(suffix)], [None, None])[slot] = t
    if not halves:
        raise UserError(f"{path}: the importance matrix holds no entries")
    entries: dict[str, ImatrixEntry] = {}
    for name in sorted(halves):
        s, c = halves[name]
        if s is None or c is None:
            missing = SUM_SUFFIX if s is None else COUNT_SUFFIX
            raise UserError(f"{path}: imatrix entry {name} has no {name}{missing} tensor (the file is corrupt)")
        for t in (s, c):
            if T(t.tensor_type) != T.F32:
                raise UserError(f"{path}: {t.name} is {T(t.tensor_type).name}, but imatrix tensors must be F32")
        counts = np.array(c.data, dtype=np.float32).reshape(-1)
        sums = np.array(s.data, dtype=np.float32).reshape(-1)
        if counts.size < 1 or sums.size % counts.size:
            raise UserError(f"{path}: imatrix entry {name} has {sums.size} sums for {counts.size} counts, "
                            "which do not divide into whole rows (the file is corrupt)")
        _check_values(path, name, sums, counts)
        entries[name] = ImatrixEntry(sums.reshape(counts.size, -1), counts)
    return Imatrix(entries, datasets, chunk_count or 0, chunk_size or 0, legacy=False, has_metadata=has_metadata)


class _Cursor:
    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left():
            raise UserError(f"{self.path}: the imatrix file is truncated or corrupt (reading {what})",
                            hint="is it an importance matrix written by llama-imatrix or gguforge imatrix?")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _text(path, raw: bytes, what: str) -> str:
    try:
        return raw.split(b"\0", 1)[0].decode("utf-8")  # llama.cpp reads it as a C string
    except UnicodeDecodeError:
        raise UserError(f"{path}: {what} is not valid UTF-8 (the file is corrupt)") from None


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    cur = _Cursor(path, data)
    n_entries = cur.i32("the entry count")
    # each entry takes at least 16 bytes (len, ncall, nval, one value): a larger count is not a count
    if n_entries < 1 or n_entries > cur.left() // 16:
        raise UserError(f"{path}: not an importance matrix (neither GGUF nor a legacy .dat file with entries)",
                        hint="give the file llama-imatrix or gguforge imatrix wrote")
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        length = cur.i32(f"the name length of entry {i + 1}")
        if not 0 < length <= MAX_NAME:
            raise UserError(f"{path}: entry {i + 1} has a name of {length} bytes (the file is corrupt)")
        name = _text(path, cur.take(length, f"the name of entry {i + 1}"), f"the name of entry {i + 1}")
        ncall = cur.i32(f"entry {name}")
        nval = cur.i32(f"entry {name}")
        if ncall < 0:
            raise UserError(f"{path}: imatrix entry {name} has a negative call count ({ncall}) (the file is corrupt)")
        if nval < 1 or nval > cur.left() // 4:
            raise UserError(f"{path}: imatrix entry {name} claims {nval} values (the file is truncated or corrupt)")
        if name in entries:
            raise UserError(f"{path}: imatrix entry {name} appears twice (the file is corrupt)")
        sums = np.frombuffer(cur.take(4 * nval, f"entry {name}"), dtype="<f4").astype(np.float32)
        counts = np.array([ncall], dtype=np.float32)
        _check_values(path, name, sums, counts)
        entries[name] = ImatrixEntry(sums.reshape(1, nval), counts)
    chunk_count, datasets = 0, []
    if cur.left() >= 4:  # the optional trailer; what llama.cpp cannot read of it, it ignores
        chunk_count = cur.i32("the chunk count")
        if chunk_count < 0:
            raise UserError(f"{path}: the chunk count is negative ({chunk_count}) (the file is corrupt)")
        if cur.left() >= 4:
            length = cur.i32("the dataset name")
            if 0 < length <= cur.left():
                datasets.append(_text(path, cur.take(length, "the dataset name"), "the dataset name"))
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True, has_metadata=True)


# -- what llama-quantize makes of it ---------------------------------------------------------------


def importance(im: Imatrix) -> dict[str, np.ndarray]:
    """Per entry, the float32 weights llama-quantize passes to the quantizers, flat (n_mat * ne0,),
    expert-major (tools/quantize/quantize.cpp load_imatrix)."""
    out: dict[str, np.ndarray] = {}
    for name, e in im.entries.items():
        if im.legacy:
            ncall = int(_lround(e.counts)[0]) if e.counts.size else 0
            flat = e.sums.reshape(-1).astype(np.float32)
            out[name] = flat / np.float32(ncall) if ncall > 0 else flat.copy()
            continue
        counts = _lround(e.counts).astype(np.float32)  # int64 counts, then (float) in the division
        w = np.empty(e.sums.shape, dtype=np.float32)
        seen = counts > 0
        w[seen] = e.sums[seen] / counts[seen, None]
        w[~seen] = 1.0
        out[name] = w.reshape(-1)
    return out


# -- writing ----------------------------------------------------------------------------------------


def write_imatrix(path, im: Imatrix, fmt: str = "gguf") -> None:
    """Write `im` as llama-imatrix would: "gguf" (save_imatrix) or "dat" (save_imatrix_legacy); atomically."""
    path = Path(path)
    if fmt == "gguf":
        if im.legacy:
            raise UserError("a legacy .dat importance matrix holds no token counts; it cannot be written as GGUF "
                            "without knowing the chunk size")
        _write_gguf(path, im)
    elif fmt == "dat":
        _write_dat(path, im)
    else:
        raise UserError(f"unknown imatrix output format {fmt!r} (choose gguf or dat)")


def _write_gguf(path: Path, im: Imatrix) -> None:
    md = Metadata()
    md.str(KEY_TYPE, "imatrix")
    md.array(KEY_DATASETS, list(im.datasets), GGUFValueType.STRING)
    md.u32(KEY_CHUNK_COUNT, im.chunk_count)
    md.u32(KEY_CHUNK_SIZE, im.chunk_size)
    tensors: list[TensorEntry] = []
    blobs: list[np.ndarray] = []
    for name in sorted(im.entries):
        e = im.entries[name]
        n_mat = e.n_mat
        sums = np.ascontiguousarray(e.sums, dtype=np.float32).reshape(n_mat, -1)
        if n_mat == 0 or sums.shape[1] == 0:
            continue  # save_imatrix skips entries without values
        counts = np.ascontiguousarray(e.counts, dtype=np.float32).reshape(n_mat, 1)
        # ggml ne [ne0, n_mat] and [1, n_mat], with trailing 1-dims dropped (gguf.cpp, ggml_n_dims)
        sum_shape = (n_mat, sums.shape[1]) if n_mat > 1 else (sums.shape[1],)
        count_shape = (n_mat, 1) if n_mat > 1 else (1,)
        tensors += [TensorEntry(name + SUM_SUFFIX, sum_shape, T.F32),
                    TensorEntry(name + COUNT_SUFFIX, count_shape, T.F32)]
        blobs += [sums, counts]
    write_gguf_shards([path], [md], [(0, len(tensors))], tensors, lambda: enumerate(blobs))


def _write_dat(path: Path, im: Imatrix) -> None:
    out = [b""]
    stored = 0
    for name in sorted(im.entries):
        e = im.entries[name]
        n_mat = e.n_mat
        if n_mat == 0:
            continue
        counts = _lround(e.counts)
        if im.legacy:
            ncall, values = int(counts[0]), e.sums.reshape(-1).astype("<f4")
        else:
            if not counts.any():
                continue  # save_imatrix_legacy: an entry without data cannot be stored
            if im.chunk_size <= 0:
                raise UserError("the importance matrix has no chunk size; it cannot be written as .dat")
            ncall = int((int(counts.max()) + im.chunk_size - 1) // im.chunk_size)
            count = counts.astype(np.float32)
            value = e.sums.reshape(n_mat, -1).astype(np.float32)
            zero = count == 0
            value = np.where(zero[:, None], np.float32(1), value)
            count = np.where(zero, np.float32(1), count)
            values = ((value / count[:, None]) * np.float32(ncall)).astype("<f4").reshape(-1)
        raw = name.encode("utf-8")
        out.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size) + values.tobytes())
        stored += 1
    dataset = im.datasets[-1].encode("utf-8") if im.datasets else b""
    out[0] = struct.pack("<i", stored)
    out.append(struct.pack("<ii", im.chunk_count, len(dataset)) + dataset)
    with atomic_outputs([path]) as (f,):
        for piece in out:
            f.write(piece)


def describe(im: Imatrix) -> str:
    """One line: entries, chunks, datasets."""
    kind = "legacy .dat" if im.legacy else "GGUF"
    ds = f", dataset {im.datasets[0]!r}" if im.datasets else ""
    return f"{len(im.entries)} entries ({kind}, {im.chunk_count} chunks{ds})"


__all__ = ["Imatrix", "ImatrixEntry", "read_imatrix", "write_imatrix", "importance", "describe",
           "KEY_DATASETS", "KEY_CHUNK_COUNT", "KEY_CHUNK_SIZE"]
