"""How a tensor plan is printed (convert-hf --dry-run and quantize --dry-run share one layout)."""

from __future__ import annotations


def plan_line(name: str, shape: tuple[int, ...], types: str, nbytes: int, detail: str = "") -> str:
    """name, shape in ggml order (ne0 first), type(s), bytes, then what decided it."""
    ne = "x".join(str(d) for d in reversed(shape))
    return f"{name:40s} {ne:>22s} {types:>14s} {nbytes:>13,d}" + (f"  {detail}" if detail else "")


FTYPE_FIELDS = ("{ftype}", "{outtype}", "{FTYPE}", "{OUTTYPE}")


def has_ftype_field(template: str) -> bool:
    return any(f in template for f in FTYPE_FIELDS)


def fill_ftype(template: str, label: str) -> str:
    """An output name template: {ftype}/{outtype} become the type's name in lower case, {FTYPE}/{OUTTYPE}
    in upper case (Q4_K_M)."""
    for field, value in zip(FTYPE_FIELDS, (label.lower(), label.lower(), label.upper(), label.upper())):
        template = template.replace(field, value)
    return template
