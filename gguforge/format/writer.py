"""Write step: a streaming GGUF writer.

The header (metadata and every tensor's name, shape, type and offset) is
written first from the plan; then tensor data is streamed in the same order,
chunk by chunk. Output goes to a temporary file beside the target that is
renamed only when complete, so a failure or Ctrl-C never leaves a partial file.
"""

from __future__ import annotations

import errno
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import UserError
from ..signals import termination_as_exception
from .atomic import commit, create_temp, expect, unlink_quietly
from .types import tensor_nbytes

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32


# Inclusive (low, high) of each GGUF integer type.
INT_RANGES = {
    GGUFValueType.UINT8: (0, 2**8 - 1), GGUFValueType.INT8: (-2**7, 2**7 - 1),
    GGUFValueType.UINT16: (0, 2**16 - 1), GGUFValueType.INT16: (-2**15, 2**15 - 1),
    GGUFValueType.UINT32: (0, 2**32 - 1), GGUFValueType.INT32: (-2**31, 2**31 - 1),
    GGUFValueType.UINT64: (0, 2**64 - 1), GGUFValueType.INT64: (-2**63, 2**63 - 1),
}


def _fits_float32(value: float) -> bool:
    try:
        struct.pack("<f", value)
    except OverflowError:
        return False
    return True


def _value_problem(value: Any, vtype: GGUFValueType) -> str | None:
    """Why `value` cannot be stored as `vtype`, or None."""
    if vtype == GGUFValueType.STRING:
        if not isinstance(value, str):
            return f"{value!r} is not a string"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{_shown(value)} is not valid Unicode (it holds an unpaired surrogate)"
        return None
    if vtype == GGUFValueType.BOOL:
        # np.bool_ too: quantize copies BOOL arrays (e.g. qwen35.attention.recurrent_layers) as numpy arrays
        return None if isinstance(value, (bool, np.bool_)) else f"{value!r} is not true or false"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"{value!r} is not a number"
    if vtype in INT_RANGES:
        if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
            return f"{value} is not a whole number"
        low, high = INT_RANGES[vtype]
        return None if low <= value <= high else f"{value} does not fit a {vtype.name}"
    try:
        as_float = float(value)
    except OverflowError:
        return f"{value} does not fit a {vtype.name}"
    if not math.isfinite(as_float):
        return f"{value} is not a finite number"
    if vtype == GGUFValueType.FLOAT32 and not _fits_float32(as_float):
        return f"{value} does not fit a {vtype.name}"
    return None


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _all_fine(items, kind: GGUFValueType) -> bool:
    """True when every item surely passes _value_problem, checked in bulk (False: look one by one)."""
    if isinstance(items, np.ndarray) and items.size and items.dtype.kind in "iuf":
        if kind in INT_RANGES and items.dtype.kind in "iu":
            low, high = INT_RANGES[kind]
            return low <= int(items.min()) and int(items.max()) <= high
        if kind in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64) and items.dtype.kind == "f":
            return bool(np.isfinite(items).all()) and (kind == GGUFValueType.FLOAT64 or items.dtype.itemsize <= 4)
        return False
    kinds = set(map(type, items))
    if not kinds:
        return True
    if kind == GGUFValueType.STRING:
        if kinds != {str}:
            return False
        try:
            "".join(items).encode("utf-8")  # an unpaired surrogate anywhere fails the whole
        except UnicodeEncodeError:
            return False
        return True
    if kind in INT_RANGES and kinds == {int}:
        low, high = INT_RANGES[kind]
        return low <= min(items) and max(items) <= high
    if kind in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64) and kinds <= {float, int}:
        if not all(map(math.isfinite, items)):
            return False
        return kind == GGUFValueType.FLOAT64 or max(map(abs, items)) <= _FLOAT32_MAX
    return False


def _shown(text: str) -> str:
    return ascii(text[:40] + ("..." if len(text) > 40 else ""))


class Metadata:
    """Ordered GGUF key/value pairs with explicit value types."""

    def __init__(self):
        self.items: dict[str, tuple[GGUFValueType, Any, GGUFValueType | None]] = {}

    def set(self, key: str, value: Any, vtype: GGUFValueType, item_type: GGUFValueType | None = None):
        # Values come from configs, tokenizers and override files: refuse what the file format cannot
        # store, or llama.cpp could not use, here, once for every key.
        key_problem = _value_problem(key, GGUFValueType.STRING)  # keys are GGUF strings too
        if key_problem:
            raise UserError(f"metadata key {key_problem} (check the --metadata file or the override options)")
        items = value if vtype == GGUFValueType.ARRAY else (value,)
        kind = item_type if vtype == GGUFValueType.ARRAY else vtype
        if not _all_fine(items, kind):  # (a vocabulary is 10^5 strings: look one by one only for the message)
            for item in items:
                problem = _value_problem(item, kind)
                if problem:
                    raise UserError(f"metadata {key}: {problem} (check config.json, the tokenizer files or the "
                                    f"--metadata file)")
        self.items.pop(key, None)  # re-setting moves the key to the end, like llama.cpp
        self.items[key] = (vtype, value, item_type)

    def u32(self, key, v): self.set(key, int(v), GGUFValueType.UINT32)
    def u16(self, key, v): self.set(key, int(v), GGUFValueType.UINT16)
    def i32(self, key, v): self.set(key, int(v), GGUFValueType.INT32)
    def f32(self, key, v): self.set(key, float(v), GGUFValueType.FLOAT32)
    def bool(self, key, v): self.set(key, bool(v), GGUFValueType.BOOL)
    def str(self, key, v): self.set(key, str(v), GGUFValueType.STRING)

    def array(self, key, values, item_type: GGUFValueType):
        self.set(key, list(values), GGUFValueType.ARRAY, item_type)

    def get(self, key, default=None):
        return self.items[key][1] if key in self.items else default

    def __contains__(self, key):
        return key in self.items

    def remove(self, key):
        self.items.pop(key, None)


_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}
_ARRAY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8", GGUFValueType.BOOL: "?",
}


def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(vtype: GGUFValueType, value, item_type=None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _pack_string(value)
    if vtype == GGUFValueType.ARRAY:
        head = struct.pack("<IQ", int(item_type), len(value))
        if item_type == GGUFValueType.STRING:
            return head + b"".join(_pack_string(v) for v in value)
        return head + np.asarray(value, dtype=_ARRAY_DTYPES[item_type]).tobytes()
    return struct.pack(_SCALAR_FORMATS[vtype], value)


@dataclass
class TensorEntry:
    """What the header says about one tensor. `shape` is numpy order (ggml ne reversed)."""
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)


def _pad(n: int) -> int:
    return (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT


def encode_header(metadata: Metadata, tensors: list[TensorEntry]) -> bytes:
    out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata.items))]
    for key, (vtype, value, item_type) in metadata.items.items():
        out.append(_pack_string(key) + struct.pack("<I", int(vtype)) + _pack_value(vtype, value, item_type))
    offset = 0
    for t in tensors:
        ne = tuple(reversed(t.shape)) or (1,)
        out.append(_pack_string(t.name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                   + struct.pack("<IQ", int(t.ggml_type), offset))
        offset += t.nbytes + _pad(t.nbytes)
    header = b"".join(out)
    return header + b"\0" * _pad(len(header))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class FileSpan:
    """Bytes to copy unchanged from another file: the kernel copies them (copy_file_range),
    so they never pass through Python."""
    fd: int
    offset: int
    nbytes: int


SPAN_PIECE = 64 << 20


def _write_chunk(f, data) -> int:
    if not isinstance(data, FileSpan):
        view = memoryview(data).cast("B")
        f.write(view)
        return len(view)
    f.flush()
    done = 0
    try:
        while done < data.nbytes:
            n = os.copy_file_range(data.fd, f.fileno(), min(SPAN_PIECE, data.nbytes - done), data.offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short copy")
            done += n
    except (AttributeError, OSError) as e:  # no copy_file_range here (other OS, file system): copy by hand
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
    f.seek(0, os.SEEK_END)  # the copy moved the file offset behind the buffered writer's back
    while done < data.nbytes:
        piece = os.pread(data.fd, min(SPAN_PIECE, data.nbytes - done), data.offset + done)
        if not piece:
            raise OSError(errno.EIO, "source file ended early")
        f.write(piece)
        done += len(piece)
    return done


WRITE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextmanager
def synced(files: list[Any], target: Path) -> Iterator[None]:
    """The block fills and writes `files`; when it completes they are flushed and fsynced, and they are
    closed in every case. A full disk or a file size limit, while opening, writing or syncing, is one
    line naming `target`."""
    try:
        yield
        for f in files:
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in WRITE_ERRORS:
            raise UserError(f"cannot write {target}: {e.strerror} (disk full or file size limit)") from None
        raise
    finally:
        for f in files:
            try:
                f.close()
            except OSError:  # its buffer could not be written: the error above already says why
                pass


@contextmanager
def atomic_outputs(targets: list[Path]) -> Iterator[list[Any]]:
    """Binary files beside each target, moved onto them only when all are complete (else all removed).

    What may be replaced is decided here, once: a target absent now must still be absent at the end;
    one present now must be a regular file and still the same file at the end (format/atomic.py).
    """
    targets = [Path(t) for t in targets]
    temps: list[str] = []
    files: list[Any] = []
    with termination_as_exception():  # for library callers too: a signal unwinds, cleanup runs
        try:
            expected = [expect(t) for t in targets]
            with synced(files, targets[0]):
                for target in targets:
                    fd, tmp = create_temp(target)
                    temps.append(tmp)
                    os.fchmod(fd, 0o666 & ~_umask())
                    files.append(os.fdopen(fd, "wb", buffering=8 << 20))
                yield files
            try:
                commit(temps, targets, expected)
            except OSError as e:
                raise UserError(f"cannot write {e.filename or targets[0]}: {e.strerror}") from None
        finally:
            for tmp in temps:
                unlink_quietly(tmp)


def write_gguf_shards(targets: list[Path], metadatas: list[Metadata], groups: list[tuple[int, int]],
                      tensors: list[TensorEntry], chunks: Callable[[], Iterable[tuple[int, Any]]],
                      progress: Callable[[int], None] | None = None) -> None:
    """Write a split GGUF: shard k holds tensors[a:b] for groups[k] == (a, b), with metadatas[k].

    `chunks()` yields (tensor index over all shards, bytes-like or FileSpan) in tensor order; each
    tensor's chunks must add up to exactly its planned size. All shards are renamed into
    place together, and none is left behind on failure.
    """
    write_gguf_outputs([OutputFiles(targets, metadatas, groups, tensors)],
                       lambda: ((i, (data,)) for i, data in chunks()), progress)


@dataclass
class OutputFiles:
    """One output of write_gguf_outputs: a GGUF file, or the shards of a split one (see write_gguf_shards)."""
    targets: list[Path]
    metadatas: list[Metadata]
    groups: list[tuple[int, int]]
    tensors: list[TensorEntry]


def write_gguf_outputs(outputs: list[OutputFiles], chunks: Callable[[], Iterable[tuple[int, Any]]],
                       progress: Callable[[int], None] | None = None, resume=None) -> None:
    """Write several GGUF outputs (each possibly split) from one stream of chunks.

    Every output has the same number of tensors; `chunks()` yields (tensor index, one bytes-like or
    FileSpan per output) in tensor order. All files of all outputs are renamed into place together,
    and none is left behind on failure. With `resume` (format/resume.py: its files hold the headers and
    tensors before `resume.first`), chunks start at tensor `resume.first`, each finished tensor is
    journaled, and a failure keeps the files for the next run.
    """
    n_tensors = len(outputs[0].tensors)
    if any(len(o.tensors) != n_tensors for o in outputs):
        raise RuntimeError("outputs written together must have the same number of tensors")
    targets = [t for o in outputs for t in o.targets]
    with atomic_outputs(targets) if resume is None else resume.files() as files:
        shard_files = []  # per output, the file each tensor goes to
        at = 0
        for o in outputs:
            mine = files[at:at + len(o.targets)]
            at += len(o.targets)
            for f, md, (a, b) in zip(mine, o.metadatas, o.groups):
                if resume is None:
                    f.write(encode_header(md, o.tensors[a:b]))
            shard_files.append([mine[k] for k, (a, b) in enumerate(o.groups) for _ in range(a, b)])
        current, written = (0 if resume is None else resume.first), [0] * len(outputs)

        def close_tensor(i):
            for o, fs, n in zip(outputs, shard_files, written):
                if n != o.tensors[i].nbytes:
                    raise RuntimeError(f"{o.tensors[i].name}: wrote {n} bytes, planned {o.tensors[i].nbytes}")
                fs[i].write(b"\0" * _pad(n))
            if resume is not None:
                resume.written(i)

        for index, datas in chunks():
            while index != current:
                close_tensor(current)
                current, written = current + 1, [0] * len(outputs)
            for k, data in enumerate(datas):
                n = _write_chunk(shard_files[k][index], data)
                written[k] += n
                if progress:
                    progress(n)
        if current < n_tensors:
            while True:
                close_tensor(current)
                if current == n_tensors - 1:
                    break
                current, written = current + 1, [0] * len(outputs)
