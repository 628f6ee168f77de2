"""`gguforge quantize`: GGUF in, GGUF out, with llama-quantize's per-tensor types.

The input is memory-mapped with gguf.GGUFReader; tensors are visited in
llama-quantize's order (rules.py), converted a block of rows at a time on a
thread pool, and streamed to the GGUF writer. Tensors whose type does not change are
copied byte for byte. The output metadata is laid out as llama-quantize writes
it (src/llama-quant.cpp: llama_model_quantize_impl, gguf_set_kv then the per-tensor infos).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType

from ..parallel import ordered_parallel, row_chunks
from ..format.reader import SourceGGUF, numpy_shape, open_gguf, raw_rows, release_pages
from ..format.atomic import replacing
from ..format.split import SPLIT_KEYS, SplitOptions, plan_shards, write_many_shards
from ..format.text import plan_line
from ..format.types import FLOAT_TYPES, QUANT_VERSION
from ..format.writer import Metadata, TensorEntry
from ..errors import UserError
from . import native
from .encode import missing_kernels
from .imatrix import (NEEDS_IMATRIX_HINT, Coverage, LoadedImatrix, add_metadata as add_imatrix_metadata,
                      check_required, coverage_for, encode_rows, load_imatrix, mtp_first_block,
                      without_imatrix_refusal)
from .overrides import apply_kv_overrides, check_prune_layers, overridden_getter, parse_kv_override
from .presets import Preset, guessed_file_type, parse_preset
from .rules import (QuantOptions, TensorIn, TensorPlan, llama_quantize_order, model_is_70b, model_n_gqa,
                    plan_quantization, prune_and_renumber, written_shape)




# ---------------------------------------------------------------------------------------------
# Plan


def plan_for_gguf(path, preset: str | Preset, options: QuantOptions | None = None) -> list[TensorPlan]:
    """Plan for a GGUF file on disk (validated), in llama-quantize's output order."""
    return plan_file(open_gguf(Path(path)), parse_preset(preset), options or QuantOptions())


# Architectures llama.cpp loads without hyper-parameters (llama-model.cpp load_hparams returns early for
# LLM_ARCH_CLIP, the mmproj files of mtmd): llama-quantize plans them with zero layers.
NO_HPARAMS_ARCHS = frozenset({"clip"})


def kv_overrides(options: QuantOptions) -> list:
    return [parse_kv_override(o) if isinstance(o, str) else o for o in options.kv_overrides]


def plan_file(source: SourceGGUF, preset: Preset, options: QuantOptions, has_imatrix: bool = False) -> list[TensorPlan]:
    # The model loader applies --override-kv before reading the hyper-parameters the rules use.
    get = overridden_getter(source.field, kv_overrides(options), source.arch)
    block_count, n_expert = get(f"{source.arch}.block_count"), get(f"{source.arch}.expert_count")
    n_layer_all = 0 if source.arch in NO_HPARAMS_ARCHS else block_count
    if n_layer_all is None and not preset.is_float:
        raise UserError(f"{source.path} has no {source.arch}.block_count, which the {preset.name} rules need")
    check_prune_layers(options.prune_layers, None if block_count is None else int(block_count), source.arch)
    tensors = [TensorIn(t.name, numpy_shape(t), t.tensor_type) for t in source.tensors]
    return plan_quantization(tensors, preset, arch=source.arch, n_layer_all=int(n_layer_all or 0),
                             n_expert=int(n_expert or 0), options=options,
                             model_is_70b=model_is_70b(source.arch, get),
                             n_gqa=model_n_gqa(source.arch, get), has_imatrix=has_imatrix)


def output_metadata(source: SourceGGUF, preset: Preset, options: QuantOptions | None = None,
                    imatrix: LoadedImatrix | None = None) -> Metadata:
    """Every input KV in input order, split keys dropped, then quantization_version and file_type, then
    --override-kv's keys, then (--prune-layers) the new block count."""
    md = Metadata()
    for key, f in source.reader.fields.items():
        if key.startswith("GGUF.") or key in SPLIT_KEYS:
            continue  # GGUF.* are the reader's pseudo-fields for the header counts
        if key == "general.alignment" and f.contents() != 32:
            continue  # the writer always aligns to 32; a copied other value would mislead readers
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            item_type = f.types[-1]
            if len(f.types) != 2:
                raise UserError(f"{source.path}: metadata key {key} is a nested array, which is not supported")
            if item_type == GGUFValueType.STRING:
                md.set(key, f.contents(), vtype, item_type)
            else:  # numeric: keep it as one numpy array instead of a Python list
                parts = [f.parts[i] for i in f.data]
                value = np.concatenate(parts) if parts else np.empty(0, np.uint8)
                md.set(key, value, vtype, item_type)
        else:
            md.set(key, f.contents(), vtype)
    md.u32("general.quantization_version", QUANT_VERSION)
    md.u32("general.file_type", copied_file_type(source) if preset.only_copy else int(preset.file_type))
    if options is not None:
        apply_kv_overrides(md, kv_overrides(options))
        add_imatrix_metadata(md, imatrix)  # llama-quantize appends them to the --override-kv list
        if options.prune_layers:
            _, n_blocks = prune_and_renumber(llama_quantize_order(t.name for t in source.tensors), options.prune_layers)
            md.u32(f"{source.arch}.block_count", n_blocks)
    return md


def copied_file_type(source: SourceGGUF) -> int:
    """What COPY writes as general.file_type: the input's (llama_model_loader's ftype: general.file_type,
    else guessed from its tensor types)."""
    stored = source.field("general.file_type")
    if stored is not None:
        return int(stored)
    by_name = {t.name: t.tensor_type for t in source.tensors}
    return guessed_file_type([T(by_name[n]) for n in llama_quantize_order(by_name)])


def output_entry(plan: TensorPlan) -> TensorEntry:
    return TensorEntry(plan.name, written_shape(plan.shape), plan.dst_type)


# ---------------------------------------------------------------------------------------------
# Data


def to_f32(raw: np.ndarray, src: T, n_per_row: int) -> np.ndarray:
    """Rows of `src` bytes as float32. F16/BF16 are exact; quantized types are dequantized."""
    if src == T.F32:
        return raw.view(np.float32)
    if src == T.F16:
        return native.f16_to_f32(raw.view(np.uint16))
    if src == T.BF16:
        return native.bf16_to_f32(raw.view(np.uint16))
    if native.supported(src):
        return native.dequantize(raw, src, raw.shape[0] * n_per_row)
    from gguf.quants import dequantize
    return dequantize(raw, src).reshape(raw.shape[0], n_per_row).astype(np.float32, copy=False)


def count_nonfinite(raw: np.ndarray, src: T) -> int:
    view = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[src]
    return native.count_nonfinite(raw.view(view), bf16=src == T.BF16)


def convert_chunks(plans: list[TensorPlan], rows: np.ndarray, start: int = 0, weights=None) -> list:
    """Output bytes of a block of input rows [start, start + len(rows)) for each plan of the same input
    tensor (one per output of a many-preset run; llama-quantize: validate, to f32, quantize): the rows
    are checked and widened to float32 once, and each distinct output type is encoded once. `weights`:
    per plan, the tensor's importance matrix (n_expert, ne0) or None."""
    first = plans[0]
    if first.src_type in FLOAT_TYPES and count_nonfinite(rows, first.src_type):
        raise UserError(f"tensor {first.name} has invalid data (NaN or Inf values)")
    wide, encoded, out = None, {}, []
    weights = weights or [None] * len(plans)
    for plan, w in zip(plans, weights):
        if not plan.converts:
            out.append(rows)
            continue
        key = (plan.dst_type, id(w))  # (the imatrix gives every output the same array for a tensor)
        if key not in encoded:
            if wide is None:
                wide = to_f32(rows, plan.src_type, plan.shape[-1])
            encoded[key] = encode_rows(wide, plan.dst_type, w, start, rows_per_expert(plan))
        out.append(encoded[key])
    return out


def rows_per_expert(plan: TensorPlan) -> int:
    """ggml ne[1]: the rows of one expert matrix (of the whole matrix for a 2-D tensor)."""
    return plan.shape[-2] if len(plan.shape) >= 2 else 1


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class QuantizeResult:
    plans: list[TensorPlan]
    target: Path
    preset: Preset
    shards: list = field(default_factory=list)  # convert.split.Shard per output file
    coverage: Coverage | None = None  # --imatrix: which tensors got importance data
    warnings: list = field(default_factory=list)  # one line each, for the CLI to print
    weights: dict = field(default_factory=dict, repr=False)  # tensor name -> importance (n_expert, ne0)


def same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def quantize_gguf(source_path, target_path, preset: str | Preset, options: QuantOptions | None = None, *,
                  threads: int | None = None, force: bool = False, dry_run: bool = False,
                  progress_factory=None, split: SplitOptions | None = None,
                  keep_split: bool = False) -> QuantizeResult:
    return quantize_gguf_many(source_path, [(target_path, preset)], options, threads=threads, force=force,
                              dry_run=dry_run, progress_factory=progress_factory, split=split,
                              keep_split=keep_split)[0]


def quantize_gguf_many(source_path, outputs, options: QuantOptions | None = None, *,
                       threads: int | None = None, force: bool = False, dry_run: bool = False,
                       progress_factory=None, split: SplitOptions | None = None,
                       keep_split: bool = False) -> list[QuantizeResult]:
    """Quantize to several presets in one pass: `outputs` is [(target path, preset), ...]. Each input
    chunk is read, checked and widened to float32 once and encoded once per distinct output type; each
    output is byte-identical to its own quantize_gguf run, and all outputs are moved into place
    together (all of them appear, or none)."""
    options = options or QuantOptions()
    wanted = [(Path(target), parse_preset(preset)) for target, preset in outputs]
    if not wanted:
        raise UserError("no output type given")
    source_path = Path(source_path)
    for target, _ in wanted:
        if same_file(source_path, target):
            raise UserError(f"the output {target} is the input file", hint="choose another output file name")
    if keep_split and split is not None and split.active:
        raise UserError("--keep-split cannot be combined with --split-max-size/--split-max-tensors")
    source = open_gguf(source_path)
    im = load_imatrix(options.imatrix) if options.imatrix is not None else None
    mtp_first = mtp_first_block(source.arch, source.field)
    results = []
    for target, preset in wanted:
        plans = plan_file(source, preset, options, has_imatrix=im is not None)
        groups = None
        if keep_split:
            # As llama-quantize --keep-split: tensors in input order, each in its input shard's output shard.
            shard_of, position = source.tensor_shards(), {t.name: i for i, t in enumerate(source.tensors)}
            plans.sort(key=lambda p: (shard_of[p.src_name], position[p.src_name]))
            counts = [sum(1 for p in plans if shard_of[p.src_name] == k) for k in range(source.shard_count)]
            groups = [(sum(counts[:k]), sum(counts[:k + 1])) for k in range(source.shard_count)]
        shards = plan_shards(target, [output_entry(p) for p in plans], split, groups)
        result = QuantizeResult(plans, target, preset, shards)
        apply_imatrix(result, im, mtp_first, dry_run)
        if (line := missing_kernels((p.name, p.dst_type) for p in plans if p.converts)) is not None:
            if not dry_run:
                raise UserError(line)
            result.warnings.append(line + "; the dry run completed")
        if options.imatrix is not None and im is None:
            result.warnings.insert(0, f"no entries of {options.imatrix.path} are left after --include-weights/"
                                      "--exclude-weights: quantizing without an importance matrix")
        results.append(result)
    seen: dict[Path, str] = {}
    for r in results:
        for shard in r.shards:
            key = Path(os.path.abspath(shard.path))
            if key in seen:
                raise UserError(f"{seen[key]} and {r.preset.name} would both be written to {shard.path}",
                                hint="put {ftype} in the output name, or list each type once")
            seen[key] = r.preset.name
    if dry_run:
        return results
    for r in results:
        for shard in r.shards:
            if same_file(source_path, shard.path):
                raise UserError(f"the output {shard.path} is the input file", hint="choose another output file name")
            if shard.path.exists() and not force:
                raise UserError(f"{shard.path} already exists", hint="pass --force to overwrite it")

    order = [p.src_name for p in results[0].plans]
    if any([p.src_name for p in r.plans] != order for r in results):
        raise RuntimeError("presets planned the tensors in different orders")
    written = [(r.shards, output_metadata(source, r.preset, options, im), [output_entry(p) for p in r.plans])
               for r in results]
    by_name = {t.name: t for t in source.tensors}
    threads = threads or os.cpu_count() or 1

    def jobs():
        for i, name in enumerate(order):
            tensor = by_name[name]
            raw = raw_rows(tensor)
            plans = [r.plans[i] for r in results]
            weights = [r.weights.get(p.name) for r, p in zip(results, plans)]
            for start, stop in row_chunks(raw.shape[0], plans[0].shape[-1]):
                span = (tensor.data_offset + start * raw.shape[1], tensor.data_offset + stop * raw.shape[1])
                yield i, plans, raw[start:stop], (tensor.data, span), start, weights

    def job(i, plans, rows, source, start, weights):
        return convert_chunks(plans, rows, start, weights)

    def chunks():
        for (i, _, _, source, _, _), data in ordered_parallel(jobs(), job, threads, ahead=2 * threads):
            yield i, data
            release_pages(*source)  # resumed only once the writer has written `data`

    def write(advance=None):
        write_many_shards(written, chunks, advance)

    total = sum(e.nbytes for _, _, entries in written for e in entries)
    names = ", ".join(r.target.name for r in results)
    with replacing(force):  # checked again when the output is moved into place (it may appear meanwhile)
        if progress_factory is None:
            write()
        else:
            with progress_factory(total, f"writing {names}") as advance:
                write(advance)
    return results


def apply_imatrix(result: QuantizeResult, im: LoadedImatrix | None, mtp_first: int | None, dry_run: bool) -> None:
    """Each converted tensor's importance weights (llama_model_quantize_impl's lookup, size check and
    "did not find weights" fallback), the types that cannot do without them, and the coverage report."""
    preset, plans = result.preset, result.plans
    if im is None:
        line = without_imatrix_refusal(plans, preset)
        if line:
            if not dry_run:
                raise UserError(line, hint=NEEDS_IMATRIX_HINT)
            result.warnings.append(line + "; the dry run completed, but writing it needs --imatrix")
        return
    coverage, found = coverage_for(im, [(p.name, p.src_name, p.shape, p.dst_type, p.converts) for p in plans],
                                   mtp_first)
    result.coverage = coverage
    result.weights = {name: t.weights for name, t in found.items() if t.weights is not None}
    check_required(plans, preset, result.weights)
    line = coverage.summary()
    if line:
        if im.missing == "error" and not dry_run:
            coverage.enforce("error")
        result.warnings.append(line)


def format_plan(plans: list[TensorPlan], coverage: Coverage | None = None) -> list[str]:
    """One line per tensor (name, shape in ggml order, src -> dst, bytes, reason; with --imatrix, whether
    it gets importance data)."""
    def detail(p: TensorPlan) -> str:
        note = coverage.short(p.name) if coverage is not None else ""
        return f"{p.reason}; {note}" if note else p.reason
    return [plan_line(p.name, p.shape, f"{p.src_type.name} -> {p.dst_type.name}", p.dst_nbytes, detail(p))
            for p in plans]
