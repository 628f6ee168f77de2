"""gguforge.quantize(...) as a library call (the package itself is callable, see __init__.py)."""

from __future__ import annotations

from pathlib import Path

from .presets import parse_ggml_type
from .rules import QuantOptions
from .run import quantize_gguf, quantize_gguf_many


def quantize_file(source: str | Path, target: str | Path, qtype: str, *, threads: int | None = None,
                  force: bool = False, **options) -> Path:
    """Quantize a GGUF file as llama-quantize would (same per-tensor types, byte-identical tensors);
    returns the output path (the first shard of a split output). Several types in one pass:
    qtype "Q4_K_M,Q6_K,Q8_0" with {ftype} in `target` returns the list of paths. Other keyword arguments are
    `QuantOptions` fields (pure, output_tensor_type, token_embedding_type, leave_output_tensor,
    tensor_type_overrides, allow_requantize, no_fallback); types may be given by name ("Q8_0").
    imatrix: an importance-matrix file (llama-quantize --imatrix), with include_weights / exclude_weights
    (substrings) and imatrix_missing ("static" or "error")."""
    from .imatrix import imatrix_option
    imatrix = imatrix_option(options.pop("imatrix", None), options.pop("include_weights", ()),
                             options.pop("exclude_weights", ()), options.pop("imatrix_missing", "static"))
    if imatrix is not None:
        options["imatrix"] = imatrix
    for key in ("output_tensor_type", "token_embedding_type"):
        if isinstance(options.get(key), str):
            options[key] = parse_ggml_type(options[key])
    if "tensor_type_overrides" in options:
        options["tensor_type_overrides"] = [(pattern, parse_ggml_type(t) if isinstance(t, str) else t)
                                            for pattern, t in options["tensor_type_overrides"]]
    if isinstance(qtype, str) and "," in qtype:
        return quantize_many(source, target, qtype, QuantOptions(**options), threads=threads, force=force)
    result = quantize_gguf(source, target, qtype, QuantOptions(**options), threads=threads, force=force)
    return result.shards[0].path if result.shards else Path(target)


def quantize_many(source, target, qtypes: str, options: QuantOptions, *, threads, force) -> list[Path]:
    """Several presets ("Q4_K_M,Q6_K,Q8_0") in one pass; `target` names each output with {ftype} (lower
    case) or {FTYPE}; returns the paths written (the first shard of each split output)."""
    from ..errors import UserError
    from ..format.text import fill_ftype, has_ftype_field
    from .presets import parse_preset
    entries = qtypes.split(",")
    if any(not e.strip() for e in entries):
        raise UserError(f"types {qtypes!r} have an empty entry")
    presets = [parse_preset(e) for e in entries]
    if len(set(presets)) != len(presets):
        raise UserError(f"types {qtypes!r} name a preset twice")
    if not has_ftype_field(str(target)):
        raise UserError(f"several types need an output name with {{ftype}} (got {target})")
    outputs = [(Path(fill_ftype(str(target), p.name)), p) for p in presets]
    results = quantize_gguf_many(source, outputs, options, threads=threads, force=force)
    return [r.shards[0].path if r.shards else r.target for r in results]
