"""The compact base store: what llama-perplexity's KLD pass reads of its base file, and nothing else.

llama-perplexity --kl-divergence-base writes, per scored token, nv = 2*((n_vocab+1)/2) + 4 uint16
values (the uint16 code of every vocabulary entry plus two floats): 2*n_vocab + 8 bytes, 303,880 bytes
per token for a 151,936-entry vocabulary. Its KLD pass reads of them only the two floats, the target
token's code, and the entries whose decoded log-prob is above -16 (perplexity.cpp log_softmax with
const uint16_t *). Those are stored here, per token:

    scale f32, min_log_prob f32, target code u16, entry count u32        14 bytes
    per kept entry: index (delta to the previous kept index) + code       4 bytes (u16 deltas) or 6

(or, where that is smaller, a bitmap of the kept indices, n_vocab/8 bytes, for flat distributions such
as a random-weight model's, where almost every entry is kept), then each chunk's block is deflated.
For K kept entries per token the ratio to llama-perplexity's file is (2*n_vocab + 8) / (14 + 4*K)
before compression: >= 20x for a 152k vocabulary while K <= 3,795.

File layout: magic, u32 header length, JSON header (format version, text digest, n_ctx, n_chunk,
n_vocab, tokenizer digest, what the base was), the n_chunk * n_ctx evaluation tokens (int32), then per
chunk: u64 block length, deflated block.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .stats import BaseRecord

MAGIC = b"GGFEVALB"
VERSION = 1


@dataclass
class StoreHeader:
    text_sha256: str
    tokenizer: str  # digest of the evaluation tokens' vocabulary (the GGUF token list)
    n_ctx: int
    n_chunk: int
    n_vocab: int
    base: str  # what the base was computed from (a description, for the report)

    def to_json(self) -> bytes:
        return json.dumps({"version": VERSION, **self.__dict__}, sort_keys=True).encode()


def llama_file_bytes(n_vocab: int, n_ctx: int, n_chunk: int) -> int:
    """The size of llama-perplexity's --kl-divergence-base file for the same run (perplexity.cpp
    `perplexity` with a logits file): "_logits_", n_ctx, n_vocab, n_chunk, the tokens, then
    nv uint16 per scored token."""
    nv = 2 * ((n_vocab + 1) // 2) + 4
    return 8 + 4 + 4 + 4 + 4 * n_chunk * n_ctx + 2 * nv * n_chunk * (n_ctx - 1 - n_ctx // 2)


SPARSE, BITMAP = 0, 1


def encode_block(rec: BaseRecord) -> bytes:
    """One chunk's records, deflated. Kept indices as per-token deltas (u16, or u32 when a gap is wider),
    or as a bitmap over the vocabulary when that is smaller (flat distributions keep most entries)."""
    counts = np.diff(rec.offsets).astype(np.uint32)
    total, v = int(rec.offsets[-1]), rec.n_vocab
    deltas = rec.idx.astype(np.int64).copy()
    has = counts > 0
    starts = rec.offsets[:-1][has]
    deltas[1:] -= rec.idx[:-1]
    deltas[starts] = rec.idx[starts]  # each token's first index is absolute
    wide = bool(total and deltas.max() > 0xFFFF)
    if rec.n * ((v + 7) // 8) < total * (4 if wide else 2):
        bits = np.zeros((rec.n, v), dtype=bool)
        bits[np.repeat(np.arange(rec.n), counts.astype(np.int64)), rec.idx] = True
        where = np.packbits(bits, axis=1).tobytes()
        mode = BITMAP
    else:
        where = deltas.astype("<u4" if wide else "<u2").tobytes()
        mode = SPARSE
    parts = [struct.pack("<IIBB", rec.n, v, mode, wide), rec.scale.astype("<f4").tobytes(),
             rec.min_log_prob.astype("<f4").tobytes(), rec.q_target.astype("<u2").tobytes(),
             counts.astype("<u4").tobytes(), where, rec.q.astype("<u2").tobytes()]
    return zlib.compress(b"".join(parts), 6)


def decode_block(data: bytes) -> BaseRecord:
    raw = zlib.decompress(data)
    n, v, mode, wide = struct.unpack_from("<IIBB", raw)
    o = 10

    def take(dtype, count):
        nonlocal o
        a = np.frombuffer(raw, dtype=dtype, count=count, offset=o)
        o += a.nbytes
        return a

    scale, mlp, qt = take("<f4", n), take("<f4", n), take("<u2", n)
    counts = take("<u4", n).astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    if mode == BITMAP:
        bits = np.unpackbits(take(np.uint8, n * ((v + 7) // 8)).reshape(n, -1), axis=1, count=v)
        idx = np.flatnonzero(bits) % v  # row-major: token by token, ascending within a token
    else:
        deltas = take("<u4" if wide else "<u2", total).astype(np.int64)
        # undo the delta coding per token: a cumulative sum restarted at each token's first entry
        idx = np.cumsum(deltas)
        has = counts > 0
        starts = offsets[:-1][has]
        idx -= np.repeat(idx[starts] - deltas[starts], counts[has])
    q = take("<u2", total)
    if len(idx) != total:
        raise ValueError("kept entries and their count disagree")
    return BaseRecord(scale.astype(np.float32), mlp.astype(np.float32), qt.astype(np.uint16), offsets,
                      idx.astype(np.int32), q.astype(np.uint16), v)


class StoreWriter:
    def __init__(self, f, header: StoreHeader, tokens: np.ndarray):
        self.f = f
        head = header.to_json()
        f.write(MAGIC + struct.pack("<I", len(head)) + head)
        f.write(np.ascontiguousarray(tokens[: header.n_chunk * header.n_ctx], dtype="<i4").tobytes())

    def add(self, rec: BaseRecord) -> None:
        block = encode_block(rec)
        self.f.write(struct.pack("<Q", len(block)) + block)


class StoreReader:
    """A base store, opened and checked; chunks() reads each chunk once, in order."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            from ..errors import not_a_file
            raise not_a_file(self.path)
        self.f = open(self.path, "rb")
        try:
            magic = self.f.read(len(MAGIC))
            if magic != MAGIC:
                raise UserError(f"{self.path} is not a gguforge eval base file (from --save-base)")
            (n,) = struct.unpack("<I", self._read(4))
            meta = json.loads(self._read(n))
            if meta.pop("version", None) != VERSION:
                raise UserError(f"{self.path}: unsupported base file version")
            self.header = StoreHeader(**meta)
            count = self.header.n_chunk * self.header.n_ctx
            self.tokens = np.frombuffer(self._read(4 * count), dtype="<i4").astype(np.int64)
            self.data_start = self.f.tell()
        except (ValueError, TypeError, struct.error, UnicodeDecodeError) as e:
            self.f.close()
            raise UserError(f"{self.path}: damaged base file ({e})") from None
        except UserError:
            self.f.close()
            raise

    def _read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise UserError(f"{self.path}: the base file is truncated")
        return b

    def chunks(self):
        self.f.seek(self.data_start)
        for _ in range(self.header.n_chunk):
            (n,) = struct.unpack("<Q", self._read(8))
            try:
                yield decode_block(self._read(n))
            except (zlib.error, ValueError) as e:
                raise UserError(f"{self.path}: damaged base file ({e})") from None

    def close(self) -> None:
        self.f.close()
