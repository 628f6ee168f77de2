"""Applying an importance matrix while quantizing, as llama-quantize --imatrix does, plus a coverage report.

Upstream (facts, not code): tools/quantize/quantize.cpp load_imatrix / prepare_imatrix (normalisation,
--include-weights / --exclude-weights, the quantize.imatrix.* keys) and src/llama-quant.cpp
llama_model_quantize_impl (non-finite check, per-tensor lookup and size check, "did not find weights",
per-expert slices: the row r of a 3-D tensor uses imatrix[r // ne1]).

Beyond llama-quantize: tensors that an imatrix has no data for (MTP layers, which llama-imatrix never
runs; experts never routed) are counted in a coverage report, a one-line warning by default
(`missing="static"`) or an error (`missing="error"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UserError
from ..format.imatrix import importance, read_imatrix
from ..format.types import FLOAT_TYPES
from ..format.writer import Metadata
from .encode import encode
from .rules import requiring_imatrix, tensor_requires_imatrix

KEY_FILE = "quantize.imatrix.file"
KEY_DATASET = "quantize.imatrix.dataset"
KEY_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_N_CHUNKS = "quantize.imatrix.chunks_count"
KV_MAX_BYTES = 127  # llama_model_kv_override::val_str is char[128]
MISSING_POLICIES = ("static", "error")
# Never collected by llama-imatrix (GET_ROWS) or only with --process-output: not counted as missing.
EXEMPT = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")


@dataclass
class ImatrixOptions:
    path: str | Path
    include: Sequence[str] = ()   # --include-weights: keep only entries whose name contains one of these
    exclude: Sequence[str] = ()   # --exclude-weights: drop entries whose name contains one of these
    missing: str = "static"       # tensors without data: "static" (warn, as llama-quantize) or "error"
    computed: object = None       # a format.imatrix.Imatrix already in memory (convert-hf --imatrix-text);
                                  # `path` then only names it (quantize.imatrix.file)

    def __post_init__(self) -> None:
        if self.include and self.exclude:
            raise UserError("--include-weights and --exclude-weights cannot be used together")
        if self.missing not in MISSING_POLICIES:
            raise UserError(f"--imatrix-missing must be static or error, not {self.missing!r}")
        if not str(self.path):
            raise UserError("--imatrix needs a file name")


def imatrix_option(value, include: Sequence[str] = (), exclude: Sequence[str] = (),
                   missing: str = "static") -> ImatrixOptions | None:
    """The library API's `imatrix=` argument: a path (str or Path), an ImatrixOptions, or None."""
    if value is None or isinstance(value, ImatrixOptions):
        if value is None and (include or exclude):
            raise UserError("include_weights/exclude_weights need an imatrix")
        return value
    return ImatrixOptions(str(value), tuple(include), tuple(exclude), missing)


@dataclass
class LoadedImatrix:
    file: str                      # as given (written to quantize.imatrix.file)
    weights: dict[str, np.ndarray]  # entry -> float32 flat (n_mat * ne0,), after include/exclude
    covered: dict[str, np.ndarray]  # entry -> bool (n_mat,): experts with data (legacy: all)
    filtered: set[str]              # entries dropped by --include-weights / --exclude-weights
    datasets: list[str]
    chunk_count: int
    legacy: bool
    missing: str = "static"
    # (entry, n_expert) -> the entry as (n_expert, ne0): one array per tensor for every output of a
    # many-preset run, so outputs of the same type encode a chunk once (they key on the array)
    shaped: dict = field(default_factory=dict, repr=False)


def load_imatrix(options: ImatrixOptions) -> LoadedImatrix | None:
    """Read, normalise and filter the file as llama-quantize does; None when the filters leave nothing
    (llama-quantize then quantizes without an imatrix and writes no quantize.imatrix.* keys)."""
    im = options.computed if options.computed is not None else read_imatrix(options.path)
    if not im.legacy and not im.has_metadata:
        raise UserError(f"{options.path}: missing imatrix metadata (imatrix.datasets, imatrix.chunk_count and "
                        "imatrix.chunk_size), which llama-quantize requires", hint="the file is incomplete")
    weights = importance(im)
    names = set(weights)
    if options.exclude:
        names = {n for n in names if not any(s in n for s in options.exclude)}
    if options.include:
        names = {n for n in names if any(s in n for s in options.include)}
    filtered = set(weights) - names
    if not names:
        return None
    weights = {n: weights[n] for n in sorted(names)}
    for name, w in weights.items():  # llama_model_quantize_impl: "imatrix contains non-finite value"
        if not np.isfinite(w).all():
            raise UserError(f"{options.path}: imatrix entry {name} has non-finite values")
    covered = {n: (np.ones(1, bool) if im.legacy else im.entries[n].counts > 0) for n in names}
    return LoadedImatrix(str(options.path), weights, covered, filtered, list(im.datasets), im.chunk_count,
                         im.legacy, options.missing)


def _kv_text(text: str) -> str:
    """strncpy(val_str, text, 127): at most 127 bytes (cut on a character boundary here)."""
    raw = text.encode("utf-8", "surrogateescape").split(b"\0", 1)[0][:KV_MAX_BYTES]
    return raw.decode("utf-8", "ignore")


def add_metadata(md: Metadata, im: LoadedImatrix | None) -> None:
    """The four keys llama-quantize adds as KV overrides, after every other key, in its order and types."""
    if im is None:
        return
    md.str(KEY_FILE, _kv_text(im.file))
    if im.datasets:
        md.str(KEY_DATASET, _kv_text(im.datasets[0]))
    md.u32(KEY_N_ENTRIES, len(im.weights))
    if im.chunk_count > 0:
        md.u32(KEY_N_CHUNKS, im.chunk_count)


# -- per tensor -------------------------------------------------------------------------------------


def _experts(shape: Sequence[int]) -> int:
    """ggml ne[2] of a numpy-order shape."""
    return int(shape[-3]) if len(shape) >= 3 else 1


@dataclass
class TensorImatrix:
    """What one tensor gets: the importance (n_expert, ne0) or None, and how many experts have data."""
    weights: np.ndarray | None
    with_data: int
    total: int
    status: str  # "imatrix", "partial", "no entry", "filtered", "exempt"


def for_tensor(im: LoadedImatrix | None, lookup_name: str, name: str, shape: Sequence[int]) -> TensorImatrix:
    """llama_model_quantize_impl's lookup for a tensor that is converted: the entry for `lookup_name`
    (the input name, before --prune-layers renumbering) must hold ne0 * ne2 values; token_embd may
    mismatch (ignored), any other tensor may not."""
    n_exp, ne0 = _experts(shape), int(shape[-1])
    if im is None:
        return TensorImatrix(None, 0, n_exp, "none")
    w = im.weights.get(lookup_name)
    if w is None:
        status = "filtered" if lookup_name in im.filtered else "exempt" if name in EXEMPT else "no entry"
        return TensorImatrix(None, 0, n_exp, status)
    if w.size != ne0 * n_exp:
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            return TensorImatrix(None, 0, n_exp, "exempt")
        raise UserError(f"imatrix size {w.size} is different from tensor size {ne0 * n_exp} for {name}",
                        hint="the importance matrix was computed for another model")
    cov = im.covered[lookup_name]
    with_data = n_exp if cov.size == 1 and cov[0] else int(cov.sum()) if cov.size == n_exp else n_exp
    shaped = im.shaped.get((lookup_name, n_exp))
    if shaped is None:
        shaped = im.shaped[(lookup_name, n_exp)] = w.reshape(n_exp, ne0)
    return TensorImatrix(shaped, with_data, n_exp, "imatrix" if with_data == n_exp else "partial")


def encode_rows(rows: np.ndarray, dst: T, weights: np.ndarray | None, first_row: int, rows_per_expert: int):
    """Quantize float32 rows [first_row, first_row + len(rows)) of a tensor, row r with weights[r // ne1]
    (ggml_quantize_chunk per expert slice, as llama_tensor_quantize_impl never crosses an expert)."""
    if weights is None or dst in FLOAT_TYPES:
        return encode(rows, dst)
    n = rows.shape[0]
    first_expert, last_expert = first_row // rows_per_expert, (first_row + n - 1) // rows_per_expert
    if first_expert == last_expert:
        return encode(rows, dst, weights[first_expert])
    parts, r = [], 0
    while r < n:
        g = first_row + r
        k = min(n - r, rows_per_expert - g % rows_per_expert)
        parts.append(encode(rows[r:r + k], dst, weights[g // rows_per_expert]))
        r += k
    return np.concatenate(parts)


# -- coverage ---------------------------------------------------------------------------------------


@dataclass
class Coverage:
    """Per converted, quantized tensor: experts with imatrix data / experts, and why not."""
    rows: list[tuple[str, int, int, str]] = field(default_factory=list)  # name, with data, total, status
    mtp_first: int | None = None  # first MTP block (blk.N >= this is an MTP layer)

    def add(self, name: str, t: TensorImatrix) -> None:
        self.rows.append((name, t.with_data, t.total, t.status))

    def short(self, name: str) -> str:
        """What --dry-run notes for a tensor: 'imatrix', 'imatrix 7/8', 'no imatrix entry', ... or ''."""
        if len(getattr(self, "_index", ())) != len(self.rows):
            self._index = {row[0]: row for row in self.rows}
        row = self._index.get(name)
        if row is None:
            return ""
        _, got, total, status = row
        if status in ("imatrix", "partial"):
            return f"imatrix {got}/{total}" if total > 1 else "imatrix"
        return {"no entry": "no imatrix entry", "filtered": "imatrix filtered out",
                "exempt": "no imatrix (not collected)", "none": ""}[status]

    def _kind(self, name: str, status: str) -> str:
        from .rules import block_index
        b = block_index(name)
        if status == "partial":
            return "experts never routed"
        if self.mtp_first is not None and b is not None and b >= self.mtp_first:
            return "MTP layer"
        return "other"

    def problems(self) -> list[tuple[str, int, int, str]]:
        return [r for r in self.rows if r[3] in ("no entry", "partial")]

    def summary(self) -> str | None:
        """One line naming how many tensors lack data, and which kinds; None when every tensor is covered."""
        bad = self.problems()
        if not bad:
            return None
        kinds: dict[str, list] = {}
        for name, got, total, status in bad:
            kinds.setdefault(self._kind(name, status), []).append((name, got, total))
        parts = []
        for kind, items in kinds.items():
            if kind == "experts never routed":
                missing = sum(total - got for _, got, total in items)
                slices = sum(total for _, _, total in items)
                parts.append(f"{len(items)} with experts never routed ({missing} of {slices} expert slices static, "
                             f"e.g. {items[0][0]} {items[0][1]}/{items[0][2]})")
            else:
                parts.append(f"{len(items)} {'in MTP layers' if kind == 'MTP layer' else 'without an entry'} "
                             f"(e.g. {items[0][0]})")
        n = len(self.rows)
        return (f"the importance matrix lacks data for {len(bad)} of {n} quantized tensors: " + "; ".join(parts)
                + " - quantized without it there")

    def enforce(self, policy: str) -> None:
        line = self.summary()
        if line and policy == "error":
            raise UserError(line.replace(" - quantized without it there", ""),
                            hint="use an imatrix computed on this model with enough text, or "
                                 "--imatrix-missing static to quantize those tensors without it")


def coverage_for(im: LoadedImatrix | None, plans, mtp_first: int | None) -> tuple[Coverage, dict[str, TensorImatrix]]:
    """Look up every converted, quantized tensor; `plans` are (name, lookup name, shape, dst type, converts)."""
    cov, found = Coverage(mtp_first=mtp_first), {}
    if im is None:
        return cov, found
    for name, lookup, shape, dst, converts in plans:
        if not converts or dst in FLOAT_TYPES:
            continue
        t = for_tensor(im, lookup, name, shape)
        cov.add(name, t)
        found[name] = t
    return cov, found


NEEDS_IMATRIX_HINT = "pass --imatrix FILE (from llama-imatrix or gguforge imatrix)"


def without_imatrix_refusal(plans, preset) -> str | None:
    """The line refusing a preset whose types need an importance matrix when none is given (llama-quantize:
    "this quantization requires an imatrix!"), or None."""
    needing = requiring_imatrix(plans, preset)
    if not needing:
        return None
    types = sorted({p.dst_type.name for p in needing})
    return (f"cannot write {preset.name} without an importance matrix: {len(needing)} tensor(s) become "
            f"{' or '.join(types)}, which {'needs' if len(types) == 1 else 'need'} one (e.g. {needing[0].name})")


def check_required(plans, preset, weights: dict) -> None:
    """A tensor whose type needs importance weights but got none (its entry missing or filtered out):
    llama-quantize throws "Missing importance matrix for tensor ... in a very low-bit quantization"."""
    for p in plans:
        if p.converts and p.name not in weights and tensor_requires_imatrix(p.name, p.dst_type, preset):
            raise UserError(f"missing importance matrix for tensor {p.name} in a very low-bit quantization "
                            f"({preset.name}: {p.dst_type.name})", hint="the imatrix has no entry for it; "
                            "compute one on this model, or drop --include-weights/--exclude-weights")


def mtp_first_block(arch: str | None, get) -> int | None:
    """blk index of the first MTP layer: block_count - nextn_predict_layers (None without MTP layers)."""
    if not arch:
        return None
    n, k = get(f"{arch}.block_count"), get(f"{arch}.nextn_predict_layers")
    try:
        return int(n) - int(k) if n is not None and k else None
    except (TypeError, ValueError):
        return None
