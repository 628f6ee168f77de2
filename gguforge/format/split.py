"""Split output: which tensors go to which shard file, and the shards' names and split.* keys.

The rules are llama.cpp's (gguf-py GGUFWriter, gguf-split, llama-model-loader):
a new shard starts when the current one already holds --split-max-tensors
tensors or the next tensor would push it past --split-max-size bytes; every
shard holds at least one tensor; shards are named
`{stem}-{i:05d}-of-{n:05d}.gguf` (1-based); the first shard carries every
key, the others only split.no (UINT16, 0-based), split.count (UINT16) and
split.tensors.count (INT32); a plan of one shard keeps the plain file name
and has no split keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .writer import Metadata, OutputFiles, TensorEntry, write_gguf_outputs

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = "split.no", "split.count", "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
UNITS = {"K": 1000, "M": 1000**2, "G": 1000**3}  # decimal, as llama.cpp's converter


def parse_size(text: str) -> int:
    """'300M' -> 300_000_000; plain digits are bytes."""
    text = text.strip()
    unit = UNITS.get(text[-1:].upper(), 1) if text else 1
    digits = text[:-1] if unit != 1 else text
    if not (digits.isascii() and digits.isdigit()):  # str.isdigit() alone accepts '²', which int() refuses
        raise UserError(f"--split-max-size {text!r}: expected a whole number with an optional K, M or G "
                        "(for example 300M or 2G)")
    return int(digits) * unit


@dataclass(frozen=True)
class SplitOptions:
    max_size: int = 0  # bytes per shard, 0 = no limit
    max_tensors: int = 0  # tensors per shard, 0 = no limit

    def __post_init__(self):
        if self.max_size < 0 or self.max_tensors < 0:
            raise UserError("--split-max-size and --split-max-tensors must not be negative")

    @property
    def active(self) -> bool:
        return bool(self.max_size or self.max_tensors)


@dataclass
class Shard:
    path: Path
    start: int  # tensor indices [start, stop) in write order
    stop: int
    nbytes: int

    @property
    def n_tensors(self) -> int:
        return self.stop - self.start


def plan_groups(tensors: list[TensorEntry], options: SplitOptions | None) -> list[tuple[int, int]]:
    """Contiguous [start, stop) tensor ranges, one per shard."""
    if options is None or not options.active or not tensors:
        return [(0, len(tensors))]
    groups, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        full = (options.max_tensors and i - start >= options.max_tensors) or \
               (options.max_size and size + t.nbytes > options.max_size)
        if i > start and full:
            groups.append((start, i))
            start, size = i, 0
        size += t.nbytes
    groups.append((start, len(tensors)))
    return groups


def shard_paths(target: Path, count: int) -> list[Path]:
    if count == 1:
        return [target]
    stem = target.name[:-len(".gguf")] if target.name.endswith(".gguf") else target.name
    return [target.with_name(f"{stem}-{i + 1:05d}-of-{count:05d}.gguf") for i in range(count)]


def plan_shards(target: Path, tensors: list[TensorEntry], options: SplitOptions | None = None,
                groups: list[tuple[int, int]] | None = None) -> list[Shard]:
    groups = groups if groups is not None else plan_groups(tensors, options)
    paths = shard_paths(Path(target), len(groups))
    return [Shard(path, a, b, sum(t.nbytes for t in tensors[a:b])) for path, (a, b) in zip(paths, groups)]


def shard_metadata(metadata: Metadata, shards: list[Shard]) -> list[Metadata]:
    """Full metadata (plus split keys) for the first shard; only the split keys for the others."""
    if len(shards) == 1:
        return [metadata]
    total = shards[-1].stop
    out = []
    for i in range(len(shards)):
        md = Metadata()
        if i == 0:
            md.items.update(metadata.items)
        md.u16(SPLIT_NO, i)
        md.u16(SPLIT_COUNT, len(shards))
        md.i32(SPLIT_TENSORS_COUNT, total)
        out.append(md)
    return out


def format_shard_plan(shards: list[Shard]) -> list[str]:
    if len(shards) == 1:
        return []
    return [f"{s.path.name}: {s.n_tensors} tensors, {s.nbytes:,d} bytes" for s in shards]


def split_siblings(first: Path, count: int) -> list[Path]:
    """The other shards of a split file, found from the first one's name and split.count."""
    m = SHARD_NAME.match(first.name)
    if not m or int(m["no"]) != 1 or int(m["count"]) != count:
        raise UserError(f"{first} has split.count {count} but is not named like a first shard "
                        f"(NAME-00001-of-{count:05d}.gguf)")
    return [first.with_name(f"{m['stem']}-{i + 1:05d}-of-{count:05d}.gguf") for i in range(count)]


def write_shards(shards: list[Shard], metadata: Metadata, tensors: list[TensorEntry], chunks,
                 progress=None, resume=None) -> None:
    """Write the planned files (a single shard is a plain, unsplit file) atomically, all or none."""
    write_gguf_outputs([output_files(shards, metadata, tensors)], lambda: ((i, (data,)) for i, data in chunks()),
                       progress, resume)


def output_files(shards: list[Shard], metadata: Metadata, tensors: list[TensorEntry]) -> OutputFiles:
    """What the writer (and format/resume.py) needs of one planned output."""
    return OutputFiles([s.path for s in shards], shard_metadata(metadata, shards), [(s.start, s.stop) for s in shards],
                       tensors)


def write_many_shards(outputs: list[tuple[list[Shard], Metadata, list[TensorEntry]]], chunks, progress=None,
                      resume=None) -> None:
    """Several planned outputs (shards, metadata, tensors) from one stream: `chunks()` yields (tensor
    index, one data per output); every file of every output appears, or none."""
    write_gguf_outputs([output_files(*o) for o in outputs], chunks, progress, resume)
