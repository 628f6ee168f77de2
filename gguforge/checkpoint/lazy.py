"""Transform step: lazy tensor expressions.

Architecture code describes each output tensor as an expression over source
tensors (slice, stack, concatenate, gather rows, elementwise maps). Shapes are
known at once, so the whole file can be planned from headers; data is produced
later, a block of leading-axis rows at a time, so memory stays bounded.
"""

from __future__ import annotations

from math import prod
from typing import Callable, Sequence

import numpy as np

from .read import SAFETENSORS_DTYPES, SourceTensor

RowFn = Callable[[int, int], np.ndarray]


class Lazy:
    """A tensor whose rows (slices along axis 0) are computed on demand."""

    def __init__(self, shape: Sequence[int], dtype, rows: RowFn, sources: Sequence[str] = (),
                 source: SourceTensor | None = None, stored: tuple[str, RowFn] | None = None):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self._rows = rows
        self.sources = tuple(sources)
        # Set only when this is an untouched source tensor: the writer may copy its bytes directly.
        self.source = source
        # (safetensors dtype, row function) when the values are the stored ones, only moved around
        # (sliced, gathered, stacked): then a tensor written in its stored type skips the float
        # round trip. Value-changing operations drop it.
        self.stored = stored
        # Named steps applied on the way from the checkpoint (shown by --dry-run), e.g. ("AddOne",).
        self.notes: tuple[str, ...] = ()

    def noted(self, *notes: str) -> "Lazy":
        """This tensor with `notes` appended to the steps it records (the data is shared)."""
        out = object.__new__(Lazy)
        out.__dict__.update(self.__dict__)
        out.notes = self.notes + tuple(n for n in notes if n)
        return out

    # -- construction -----------------------------------------------------
    @classmethod
    def from_source(cls, t: SourceTensor) -> "Lazy":
        if getattr(t, "computed", False):  # a dequantized weight (dequant.py): values only, no stored bits
            return cls(t.shape, t.compute_dtype, t.rows, (t.name,)).noted(t.note)
        return cls(t.shape, t.compute_dtype, t.rows, (t.name,), source=t, stored=(t.dtype, t.raw_rows))

    def _moved(self, fn: Callable[[np.ndarray], np.ndarray], shape) -> "Lazy":
        """A pure data movement within each block of rows, applied to the values and the stored bits alike."""
        stored = None
        if self.stored is not None:
            kind, raw = self.stored
            stored = (kind, lambda s, e: fn(raw(s, e)))
        return Lazy(shape, self.dtype, lambda s, e: fn(self.rows(s, e)), self.sources, stored=stored)

    def stored_rows(self, start: int, stop: int) -> np.ndarray:
        return self.stored[1](start, stop)

    @classmethod
    def from_array(cls, a: np.ndarray, name: str = "<array>") -> "Lazy":
        a = np.asarray(a)
        return cls(a.shape, a.dtype, lambda s, e: a[s:e], (name,))

    # -- access -----------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def n_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elems(self) -> int:
        return prod(self.shape[1:])

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = self._rows(start, stop)
        expected = (stop - start,) + self.shape[1:]
        assert out.shape == expected, f"lazy rows gave {out.shape}, expected {expected}"
        return out

    def numpy(self) -> np.ndarray:
        return self.rows(0, self.n_rows)

    def __repr__(self) -> str:
        return f"Lazy({self.shape}, {self.dtype}, from {', '.join(self.sources)})"

    # -- row-preserving operations -----------------------------------------
    def per_rows(self, fn: Callable[[np.ndarray], np.ndarray], shape=None, dtype=None) -> "Lazy":
        """Apply `fn` to each block of rows; it must keep the number of rows."""
        return Lazy(shape or self.shape, dtype or self.dtype, lambda s, e: fn(self.rows(s, e)), self.sources)

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> "Lazy":
        """Elementwise function (same shape, same dtype)."""
        dtype = self.dtype
        return self.per_rows(lambda a: np.asarray(fn(a), dtype=dtype))

    def slice_axis(self, axis: int, start: int, stop: int) -> "Lazy":
        """Keep [start, stop) of a non-leading axis."""
        axis = axis % self.ndim
        if axis == 0:
            return self.take_rows(np.arange(start, stop))
        shape = list(self.shape)
        shape[axis] = stop - start
        index = (slice(None),) * axis + (slice(start, stop),)
        return self._moved(lambda a: a[index], shape)

    def take_axis(self, axis: int, index: np.ndarray) -> "Lazy":
        """Gather positions `index` of a non-leading axis (e.g. permuting input columns)."""
        axis = axis % self.ndim
        if axis == 0:
            return self.take_rows(index)
        index = np.asarray(index)
        shape = list(self.shape)
        shape[axis] = len(index)
        return self._moved(lambda a: np.take(a, index, axis=axis), shape)

    def swap_last_axes(self) -> "Lazy":
        """Exchange the last two axes (of a tensor with three or more), e.g. [E, H, F] -> [E, F, H]."""
        assert self.ndim >= 3, self.shape
        shape = self.shape[:-2] + (self.shape[-1], self.shape[-2])
        return self._moved(lambda a: np.ascontiguousarray(np.swapaxes(a, -1, -2)), shape)

    def reshape_rest(self, rest: Sequence[int]) -> "Lazy":
        """Reshape the non-leading axes (e.g. squeeze conv1d [C,1,K] -> [C,K])."""
        rest = tuple(rest)
        assert prod(rest) == self.row_elems, (rest, self.shape)
        return self._moved(lambda a: a.reshape((a.shape[0],) + rest), (self.n_rows,) + rest)

    def flatten(self) -> "Lazy":
        """View as 1-D (rows of a 1-D tensor are single elements)."""
        if self.ndim == 1:
            return self
        width = self.row_elems

        def flat(rows_of):
            def rows(s, e):
                first, last = s // width, (e + width - 1) // width
                block = rows_of(first, last).reshape(-1)
                off = first * width
                return block[s - off:e - off]
            return rows

        stored = None if self.stored is None else (self.stored[0], flat(self.stored[1]))
        return Lazy((prod(self.shape),), self.dtype, flat(self.rows), self.sources, stored=stored)

    # -- row-moving operations ----------------------------------------------
    def take_rows(self, index: np.ndarray) -> "Lazy":
        """Gather rows along axis 0: output row i is input row index[i]."""
        index = np.asarray(index, dtype=np.int64)

        def gather(rows_of, dtype):
            def rows(s, e):
                want = index[s:e]
                if len(want) == 0:
                    return np.empty((0,) + self.shape[1:], dtype)
                # Read each run of consecutive source rows in one call.
                breaks = np.flatnonzero(np.diff(want) != 1) + 1
                parts = [rows_of(int(run[0]), int(run[-1]) + 1) for run in np.split(want, breaks)]
                return parts[0] if len(parts) == 1 else np.concatenate(parts)
            return rows

        stored = None
        if self.stored is not None:
            stored = (self.stored[0], gather(self.stored[1], SAFETENSORS_DTYPES[self.stored[0]]))
        return Lazy((len(index),) + self.shape[1:], self.dtype, gather(self.rows, self.dtype), self.sources,
                    stored=stored)


def _common_stored(parts: Sequence[Lazy]) -> str | None:
    kinds = {p.stored[0] if p.stored is not None else None for p in parts}
    return kinds.pop() if len(kinds) == 1 else None


def concat_rows(parts: Sequence[Lazy]) -> Lazy:
    """Concatenate along axis 0."""
    rest = parts[0].shape[1:]
    assert all(p.shape[1:] == rest for p in parts), [p.shape for p in parts]
    dtype = np.result_type(*[p.dtype for p in parts])
    bounds = np.cumsum([0] + [p.n_rows for p in parts])

    def joined(get, cast):
        def rows(s, e):
            out = []
            for p, lo, hi in zip(parts, bounds[:-1], bounds[1:]):
                a, b = max(s, lo), min(e, hi)
                if a < b:
                    out.append(cast(get(p, int(a - lo), int(b - lo))))
            return out[0] if len(out) == 1 else np.concatenate(out)
        return rows

    kind = _common_stored(parts)
    stored = None if kind is None else (kind, joined(Lazy.stored_rows, lambda a: a))
    sources = [s for p in parts for s in p.sources]
    return Lazy((int(bounds[-1]),) + rest, dtype, joined(Lazy.rows, lambda a: a.astype(dtype, copy=False)),
                sources, stored=stored)


def stack(parts: Sequence[Lazy]) -> Lazy:
    """Stack equally shaped tensors on a new leading axis (e.g. per-expert matrices)."""
    shape = parts[0].shape
    assert all(p.shape == shape for p in parts), [p.shape for p in parts]
    dtype = np.result_type(*[p.dtype for p in parts])

    def rows(s, e):
        return np.stack([p.numpy().astype(dtype, copy=False) for p in parts[s:e]])

    def stored_rows(s, e):
        return np.stack([p.stored_rows(0, p.n_rows) for p in parts[s:e]])

    kind = _common_stored(parts)
    sources = [s for p in parts for s in p.sources]
    return Lazy((len(parts),) + shape, dtype, rows, sources,
                stored=None if kind is None else (kind, stored_rows))


def concat_axis(parts: Sequence[Lazy], axis: int) -> Lazy:
    """Concatenate along a non-leading axis, rows produced together (e.g. fusing gate and up)."""
    first = parts[0]
    axis = axis % first.ndim
    assert axis > 0 and all(p.n_rows == first.n_rows for p in parts)
    shape = list(first.shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    dtype = np.result_type(*[p.dtype for p in parts])

    def rows(s, e):
        return np.concatenate([p.rows(s, e).astype(dtype, copy=False) for p in parts], axis=axis)

    def stored_rows(s, e):
        return np.concatenate([p.stored_rows(s, e) for p in parts], axis=axis)

    kind = _common_stored(parts)
    return Lazy(shape, dtype, rows, [s for p in parts for s in p.sources],
                stored=None if kind is None else (kind, stored_rows))
