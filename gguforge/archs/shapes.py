"""Shape types an architecture declares its tensors with.

`Dim`s remember the config values they come from, so a mismatch can say why:

    model.layers.3.self_attn.k_proj.weight: shape [128, 64] but config implies [64, 64]
    (num_key_value_heads=2 x head_dim=32)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dim:
    """One expected dimension and the config values it is computed from (size None: not checked)."""

    size: int | None
    why: str = ""

    def _combine(self, other, op, sign: str) -> "Dim":
        other = other if isinstance(other, Dim) else Dim(other, str(other))
        size = None if self.size is None or other.size is None else op(self.size, other.size)
        return Dim(size, f"{self.why} {sign} {other.why}")

    def __mul__(self, other) -> "Dim":
        return self._combine(other, lambda a, b: a * b, "x")

    def __rmul__(self, other) -> "Dim":
        return Dim(other, str(other))._combine(self, lambda a, b: a * b, "x")

    def __add__(self, other) -> "Dim":
        return self._combine(other, lambda a, b: a + b, "+")

    def matches(self, n: int) -> bool:
        return self.size is None or self.size == n

    def __str__(self) -> str:
        return "?" if self.size is None else str(self.size)


ANY = Dim(None)

Shape = tuple  # of Dim | int


@dataclass(frozen=True)
class Expected:
    """The shape (or accepted alternative shapes) of one checkpoint tensor."""

    shapes: tuple[Shape, ...]
    optional: bool = False  # checked when present, not required

    @classmethod
    def of(cls, *dims, optional: bool = False) -> "Expected":
        return cls((tuple(dims),), optional)

    def matches(self, shape: tuple[int, ...]) -> bool:
        return any(len(s) == len(shape) and all(as_dim(d).matches(n) for d, n in zip(s, shape)) for s in self.shapes)


def as_dim(d) -> Dim:
    """A shape entry as a Dim (plain integers name themselves)."""
    return d if isinstance(d, Dim) else Dim(d, str(d))


def format_shape(shape) -> str:
    return "[" + ", ".join(str(as_dim(d)) for d in shape) + "]"


def mismatch_message(name: str, found: tuple[int, ...], expected: Expected) -> str:
    want = expected.shapes[0]
    why = [as_dim(d).why for i, d in enumerate(want)
           if as_dim(d).why and not as_dim(d).why.isdigit() and (i >= len(found) or not as_dim(d).matches(found[i]))]
    also = " or ".join(format_shape(s) for s in expected.shapes[1:])
    return (f"{name}: shape {list(found)} but config implies {format_shape(want)}"
            + (f" (or {also})" if also else "") + (f" ({'; '.join(why)})" if why else ""))
