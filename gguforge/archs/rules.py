"""One rule per checkpoint tensor: HF name, GGUF name, expected shape and a *named* value transform.

An architecture lists its tensors as `Rule`s (see `DecoderArch.layer_rules`), so a tensor's name, the
shape it must have and what happens to its values are declared together and cannot drift apart. Every
deviation from the Hugging Face layout is an `Op` with a name, a docstring and a worked example; ops
compose left to right with `>>` and `--dry-run` prints them per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..checkpoint.lazy import Lazy
from ..errors import UserError
from .shapes import Expected


class Op:
    """A named change of a tensor's values or layout, applied lazily (row block by row block)."""

    def apply(self, t: Lazy) -> Lazy:
        raise NotImplementedError

    def __call__(self, t: Lazy, name: str = "") -> Lazy:
        return self.apply_named(t, name).noted(*t.notes, str(self))

    def apply_named(self, t: Lazy, name: str) -> Lazy:
        return self.apply(t)

    def __rshift__(self, other: "Op") -> "Op":
        return Chain((self, other))

    def __str__(self) -> str:
        return type(self).__name__


@dataclass(frozen=True, eq=False)
class Chain(Op):
    """Several ops, applied left to right."""

    ops: tuple[Op, ...]

    def __call__(self, t: Lazy, name: str = "") -> Lazy:
        for op in self.ops:
            t = op(t, name)
        return t

    def __rshift__(self, other: Op) -> Op:
        return Chain(self.ops + (other,))

    def __str__(self) -> str:
        return " >> ".join(map(str, self.ops))


class AddOne(Op):
    """w + 1: HF stores the norm weight zero-centred (it computes x * (1 + w)); llama.cpp multiplies by w.

    Example: [-0.25, 0.5] -> [0.75, 1.5].
    """

    def apply(self, t: Lazy) -> Lazy:
        return t.map(lambda a: a + 1)


class NegExp(Op):
    """-exp(w), computed in float64 and rounded once (numpy's float32 exp is not correctly rounded).

    Gated DeltaNet's decay: HF stores A_log, llama.cpp reads ssm_a = -exp(A_log). Example: [0, ln 2] -> [-1, -2].
    """

    def apply(self, t: Lazy) -> Lazy:
        return t.map(lambda a: -np.exp(a.astype(np.float64)))


class Squeeze(Op):
    """Drop the size-1 axes after the first: a depthwise conv1d [C, 1, K] becomes [C, K]. Example: [8, 1, 4] -> [8, 4]."""

    def apply(self, t: Lazy) -> Lazy:
        if t.ndim < 3:
            return t  # already squeezed
        return t.reshape_rest([d for d in t.shape[1:] if d != 1])


@dataclass(frozen=True, eq=False)
class SelectRows(Op):
    """Rows `index` of the tensor, in that order (e.g. one part of a fused projection). `label` names the part."""

    index: np.ndarray
    label: str

    def apply(self, t: Lazy) -> Lazy:
        return t.take_rows(self.index)

    def __str__(self) -> str:
        return f"SelectRows({self.label})"


def tiled_v_order(nk: int, nv: int, block: int) -> np.ndarray:
    """Indices taking nv blocks of `block` elements from grouped to tiled V-head order.

    HF's V head g*r+j (r = nv/nk) reads K head g; ggml broadcasts K heads by tiling, so V head p
    reads K head p % nk. New position j*nk+g therefore takes old head g*r+j.
    Example (nk=2, nv=4, block=1): [0, 2, 1, 3].
    """
    heads = np.arange(nv).reshape(nk, nv // nk).T.reshape(-1)
    return (heads[:, None] * block + np.arange(block)).reshape(-1)


@dataclass(frozen=True, eq=False)
class TiledVHeads(Op):
    """Reorder V heads from HF's grouped order to ggml's tiled order along `axis` (see tiled_v_order);
    the first `keep` entries (the Q and K part of a fused projection) stay in place.

    Example (nk=2, nv=4, block=1, keep=0): heads [a0, a1, b0, b1] -> [a0, b0, a1, b1].
    """

    nk: int
    nv: int
    block: int
    axis: int = 0
    keep: int = 0

    def apply_named(self, t: Lazy, name: str) -> Lazy:
        if self.nk == self.nv:
            return t
        want = self.keep + self.nv * self.block
        if t.ndim <= self.axis or t.shape[self.axis] != want:
            raise UserError(f"{name or 'tensor'} has shape {list(t.shape)}; expected {want} on axis {self.axis} "
                            f"(linear_num_value_heads={self.nv})")
        order = np.concatenate([np.arange(self.keep), self.keep + tiled_v_order(self.nk, self.nv, self.block)])
        return t.take_rows(order) if self.axis == 0 else t.take_axis(self.axis, order)

    def __str__(self) -> str:
        where = "rows" if self.axis == 0 else f"axis {self.axis}"
        return f"TiledVHeads({where}" + (f", after {self.keep}" if self.keep else "") + ")"


@dataclass(frozen=True)
class Rule:
    """One checkpoint tensor: its HF name, GGUF name, expected shape and value transform.

    In `layer_rules` names are leaves (after 'model.layers.N.' and 'blk.N.'). `gguf` None means the
    tensor is consumed by the architecture's generator (expert stacking, splitting a fused projection):
    its shape is still checked before anything is written.
    """

    hf: str
    gguf: str | None
    shape: tuple | Expected
    op: Op | None = None
    optional: bool = False  # checked when present, not required

    @property
    def expected(self) -> Expected:
        if isinstance(self.shape, Expected):
            return Expected(self.shape.shapes, self.optional or self.shape.optional)
        return Expected.of(*self.shape, optional=self.optional)

    def then(self, op: Op) -> "Rule":
        """This rule with `op` applied after its own."""
        return replace(self, op=op if self.op is None else self.op >> op)

    def first(self, op: Op) -> "Rule":
        """This rule with `op` applied before its own."""
        return replace(self, op=op if self.op is None else op >> self.op)

    def apply(self, t: Lazy, name: str = "") -> Lazy:
        return t if self.op is None else self.op(t, name or self.hf)
