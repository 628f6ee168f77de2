"""convert-hf end to end: read -> plan -> (transform + quantize in parallel) -> write."""

from __future__ import annotations

import mmap
import os
import queue
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UserError
from ..format.types import FLOAT_TYPES
from ..parallel import CHUNK_BYTES, ordered_parallel, row_chunks
from ..quantize import native
from ..quantize.encode import encode
from ..quantize.imatrix import NEEDS_IMATRIX_HINT, encode_rows
from ..archs.options import ConvertOptions
from .plan import Plan, PlannedTensor, output_path, plan_conversion
from ..checkpoint.read import SAFETENSORS_DTYPES, open_checkpoint, resolve_model
from ..format.atomic import replacing
from ..format.split import SplitOptions, plan_shards, write_many_shards, write_shards
from ..format.writer import FileSpan

RAW_COPY = {t.name: t for t in FLOAT_TYPES}  # safetensors dtype name -> the same GGUF type


class BufferPool:
    """Reusable byte buffers for raw-copy chunks: a fresh 16 MB array per chunk costs more in page
    faults than the copy itself. Buffers go back to the pool once their chunk is written."""

    def __init__(self, nbytes: int, count: int):
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self.free.put(np.empty(nbytes, np.uint8))

    def take(self) -> np.ndarray:
        return self.free.get()

    def give(self, buffer: np.ndarray) -> None:
        self.free.put(buffer)


def raw_copy_possible(t: PlannedTensor) -> bool:
    """An untouched source tensor written in its stored type."""
    lazy = t.tensor
    return lazy.source is not None and RAW_COPY.get(lazy.source.dtype) == t.ggml_type


def stored_bits_suffice(t: PlannedTensor) -> bool:
    """Values only moved around (or untouched) and written in their stored type, or bf16 -> F16:
    work on the stored bits, no float32 round trip."""
    stored = t.tensor.stored
    if stored is None:
        return False
    return RAW_COPY.get(stored[0]) == t.ggml_type or direct_bf16_to_f16(t)


def direct_bf16_to_f16(t: PlannedTensor) -> bool:
    """bf16 values stored as F16: one native pass over the stored bits."""
    stored = t.tensor.stored
    return stored is not None and stored[0] == "BF16" and t.ggml_type == T.F16


def buffers_needed(t: PlannedTensor) -> int:
    """Pooled buffers a chunk job uses: one for the stored bytes read from an untouched source (when
    the kernel cannot copy them), one more for a bf16 -> F16 output."""
    source = t.tensor.source
    if source is None:
        return 0
    if direct_bf16_to_f16(t):
        return 2
    return 1 if raw_copy_possible(t) and source.span(0, 0) is None else 0


def nonfinite_in_file(fd: int, offset: int, nbytes: int, source_dtype: str) -> int:
    """NaN/Inf count of stored values, looked at through a short-lived memory map (no copy)."""
    if nbytes == 0:
        return 0
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with mmap.mmap(fd, nbytes + offset - base, flags, mmap.PROT_READ, offset=base) as mapped:
        values = np.frombuffer(mapped, dtype=SAFETENSORS_DTYPES[source_dtype], offset=offset - base,
                               count=nbytes // SAFETENSORS_DTYPES[source_dtype].itemsize)
        count = _count_nonfinite(values, source_dtype)
        del values  # the map cannot close while numpy still points into it
    return count


def encode_chunk(t: PlannedTensor, start: int, stop: int, check_finite: bool, buffer: np.ndarray | None = None,
                 out_buffer: np.ndarray | None = None):
    lazy = t.tensor
    if raw_copy_possible(t) and (span := lazy.source.span(start, stop)) is not None:
        # Same type on both sides: the kernel copies the stored bytes into the output.
        if check_finite and nonfinite_in_file(*span, lazy.source.dtype):
            raise _nonfinite(t)
        return FileSpan(*span)
    if stored_bits_suffice(t):
        kind = lazy.stored[0]
        raw = lazy.source.raw_rows(start, stop, buffer) if lazy.source is not None else lazy.stored_rows(start, stop)
        if check_finite and _count_nonfinite(raw, kind):
            raise _nonfinite(t)
        if t.ggml_type == T.F16 and kind == "BF16":
            out = None if out_buffer is None else out_buffer[:raw.nbytes].view(np.float16).reshape(raw.shape)
            return native.bf16_to_f16(raw, out)
        return np.ascontiguousarray(raw)
    rows = lazy.rows(start, stop)
    if check_finite and rows.dtype.kind == "f" and _count_nonfinite(rows, None):
        raise _nonfinite(t)
    return encode_rows_of(t, rows, start)


def encode_rows_of(t: PlannedTensor, rows: np.ndarray, start: int):
    """The output bytes of leading-axis rows [start, ...) of `t`'s values."""
    if t.imatrix is not None:  # leading-axis rows: experts of a 3-D tensor, matrix rows of a 2-D one
        ne0 = t.shape[-1]
        per_leading = t.tensor.row_elems // ne0
        return encode_rows(rows.reshape(-1, ne0), t.ggml_type, t.imatrix, start * per_leading, t.shape[-2])
    return encode(rows, t.ggml_type)


def _count_nonfinite(a: np.ndarray, source_dtype: str | None) -> int:
    """NaN/Inf in float32/float16 values, or in bf16 bits when source_dtype is "BF16"."""
    return native.count_nonfinite(a, bf16=source_dtype == "BF16")


def _nonfinite(t: PlannedTensor) -> UserError:
    return UserError(f"tensor {t.name} (from {', '.join(t.sources[:2])}) contains NaN or Inf values",
                     hint="the checkpoint is damaged; pass --allow-nonfinite to convert it anyway")


def write_plan(plan: Plan, target: Path, options: ConvertOptions, progress=None,
               split: SplitOptions | None = None, tensor_done=None, resume=None) -> None:
    """`tensor_done(i)`: called once every chunk of tensor i is encoded (its source bytes are not read again);
    `resume`: a format.resume.Resume holding the tensors before its `first`."""
    threads = options.threads or os.cpu_count() or 1
    check = not options.allow_nonfinite

    def jobs():
        for i in range(resume.first if resume else 0, len(plan.tensors)):
            t = plan.tensors[i]
            for start, stop in row_chunks(t.tensor.n_rows, t.tensor.row_elems):
                yield i, t, start, stop

    ahead = 2 * threads
    pool = BufferPool(CHUNK_BYTES, 2 * (ahead + 2))  # a job holds at most two: it never waits for one

    def job(i, t, start, stop):
        fits = (stop - start) * t.tensor.row_elems * 4 <= CHUNK_BYTES  # a single huge row does not
        buffers = [pool.take() for _ in range(buffers_needed(t) if fits else 0)]
        try:
            return encode_chunk(t, start, stop, check, *buffers), buffers
        except BaseException:
            for b in buffers:
                pool.give(b)
            raise

    def chunks():
        for (i, *_), (data, buffers) in announce_done(ordered_parallel(jobs(), job, threads, ahead), tensor_done):
            yield i, data
            for b in buffers:  # written by now: the buffers can be reused
                pool.give(b)

    shards = plan.shards or plan_shards(target, plan.tensors, split)
    write_shards(shards, plan.metadata, plan.tensors, chunks, progress, resume)


def announce_done(results, tensor_done):
    """ordered_parallel's results (in job order, jobs (i, ...)), calling tensor_done(i) when tensor i's last
    chunk has been encoded, i.e. when the first result of a later tensor (or the end) arrives."""
    last = None
    for result in results:
        i = result[0][0]
        if tensor_done is not None and last is not None and i != last:
            tensor_done(last)
        last = i
        yield result
    if tensor_done is not None and last is not None:
        tensor_done(last)


def check_output(target: Path, model_dir: Path, force: bool) -> None:
    if target.exists():
        if target.resolve().parent == model_dir.resolve() and target.suffix != ".gguf":
            raise UserError(f"refusing to overwrite {target}: it is part of the input checkpoint")
        if not force:
            raise UserError(f"{target} already exists", hint="pass --force to overwrite it")


def refuse_unwritable(plans) -> None:
    """A plan that only a dry run may show (e.g. Q2_K_S without an importance matrix) stops the run here."""
    for plan in plans:
        if plan.refusal:
            raise UserError(plan.refusal, hint=NEEDS_IMATRIX_HINT)


@contextmanager
def opened_checkpoint(model: str, options: ConvertOptions, revision: str | None = None, remote=None):
    """The checkpoint a conversion reads: a directory, a hub id downloaded into the cache, or with `remote`
    (checkpoint.remote.RemoteOptions) a hub id read over HTTP without a local copy."""
    if remote is None:
        yield open_checkpoint(resolve_model(model, revision), allow_pickle=options.allow_pickle)
        return
    from ..checkpoint.remote import open_remote
    with open_remote(model, remote) as checkpoint:
        yield checkpoint


@contextmanager
def write_progress(checkpoint, plans: list[Plan], progress_factory, names: str, first: int = 0):
    """(advance, tensor_done) for the writer: the advance() it reports written bytes to (None: no bar), and
    what it tells when a tensor is finished. A remote checkpoint is told the order its tensors will be
    read in (from output tensor `first` on) and when each is finished, and its bar counts the bytes
    received over the network instead."""
    source = getattr(checkpoint, "source", None)
    done = None
    if source is not None:
        from ..checkpoint.remote import read_order
        reads = tensor_reads(plans)
        source.schedule(read_order(checkpoint, [((), 0)] * first + reads[first:]))
        done = source.finished
    if progress_factory is None:
        yield None, done
    elif source is None:
        with progress_factory(sum(p.nbytes for p in plans), f"writing {names}") as advance:
            yield advance, done
    else:
        with progress_factory(source.total, f"reading {checkpoint.repo}, writing {names}") as advance:
            source.http.progress = advance
            yield None, done


@contextmanager
def resumable(checkpoint, plans: list[Plan], options: ConvertOptions, force: bool):
    """convert-hf --remote --resume: the outputs' kept state (format/resume.py), None otherwise. `force`
    discards a journal kept for another input or other options instead of refusing it."""
    source = getattr(checkpoint, "source", None)
    if source is None or not source.options.resume:
        yield None
        return
    from ..format.resume import Resume
    from ..format.split import output_files
    resume = Resume([output_files(p.shards, p.metadata, p.tensors) for p in plans],
                    resume_fingerprint(checkpoint, options), restart=force)
    try:
        yield resume
    finally:
        resume.close()


def resume_fingerprint(checkpoint, options: ConvertOptions) -> dict:
    """What decides the output bytes besides the outputs' headers (format/resume.py adds those)."""
    import hashlib
    from dataclasses import replace
    from .. import __version__
    imatrix = options.imatrix
    if imatrix is not None:
        digest = hashlib.sha256()
        with open(imatrix.path, "rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                digest.update(piece)
        imatrix = [digest.hexdigest(), repr(replace(imatrix, path=""))]
    return {"gguforge": __version__, "repo": checkpoint.repo, "commit": checkpoint.commit,
            "files": [[f.name, f.size, f.etag] for f in checkpoint.source.files],
            "options": repr(replace(options, threads=None, imatrix=None)), "imatrix": imatrix}


def tensor_reads(plans: list[Plan]) -> list[tuple[tuple[str, ...], int]]:
    """Per output tensor, in writing order: its source tensors, and how often a chunk job reads them (once,
    or once per distinct kernel copy / stored-bits conversion when several outputs are written)."""
    out = []
    for i, t in enumerate(plans[0].tensors):
        ts = [p.tensors[i] for p in plans]
        direct = {(id(u.tensor), u.ggml_type) for u in ts if raw_copy_possible(u) or stored_bits_suffice(u)}
        values = {id(u.tensor) for u in ts if not (raw_copy_possible(u) or stored_bits_suffice(u))}
        out.append((t.tensor.sources, len(direct) + len(values)))
    return out


def convert_hf(model: str, outfile: str | None, options: ConvertOptions, *, force: bool = False,
               dry_run: bool = False, progress_factory=None, display_name: str | None = None,
               split: SplitOptions | None = None, revision: str | None = None, remote=None):
    """`revision`: of a hub id; `remote`: read the hub id over HTTP (checkpoint.remote.RemoteOptions)."""
    with opened_checkpoint(model, options, revision, remote) as checkpoint:
        return _convert_hf(checkpoint, model, outfile, options, force, dry_run, progress_factory, display_name, split)


def _convert_hf(checkpoint, model, outfile, options, force, dry_run, progress_factory, display_name, split):
    root = checkpoint.root
    if display_name is None and not Path(model).exists() and "/" in model:
        display_name = model  # the hub id: "Org/Name" gives general.organization and the file name
    plan = plan_conversion(checkpoint, options, display_name)
    target = output_path(plan, outfile)
    plan.shards = plan_shards(target, plan.tensors, split)  # computed once: checked, written, reported
    if dry_run:
        return plan, target
    refuse_unwritable([plan])
    for shard in plan.shards:
        check_output(shard.path, root, force)
    with replacing(force), resumable(checkpoint, [plan], options, force) as resume:  # replacing: checked again
        first = resume.first if resume else 0  # when the output is moved into place (it may appear meanwhile)
        with write_progress(checkpoint, [plan], progress_factory, target.name, first) as (advance, done):
            write_plan(plan, target, options, advance, split=split, tensor_done=done, resume=resume)
    return plan, target


# ---------------------------------------------------------------------------------------------
# convert-hf --outtype A,B,...: several outputs from one read of the checkpoint


def encode_chunks(ts: list[PlannedTensor], start: int, stop: int, check_finite: bool) -> list:
    """encode_chunk for one tensor in several outputs: outputs that share the tensor's values (the same
    Lazy) read and transform its rows once, and each distinct (values, type, importance) is encoded once.
    Kernel copies and stored-bits conversions are made per output (they never widen to float32)."""
    rows_of: dict[int, np.ndarray] = {}
    done: dict[tuple, object] = {}
    out = []
    for t in ts:
        lazy = t.tensor
        key = (id(lazy), t.ggml_type, id(t.imatrix) if t.imatrix is not None else None)
        if key not in done:
            if raw_copy_possible(t) or stored_bits_suffice(t):
                done[key] = encode_chunk(t, start, stop, check_finite)
            else:
                rows = rows_of.get(id(lazy))
                if rows is None:
                    rows = rows_of[id(lazy)] = lazy.rows(start, stop)
                    if check_finite and rows.dtype.kind == "f" and _count_nonfinite(rows, None):
                        raise _nonfinite(t)
                done[key] = encode_rows_of(t, rows, start)
        out.append(done[key])
    return out


def write_plans(plans: list[Plan], options: ConvertOptions, progress=None, tensor_done=None, resume=None) -> None:
    """Write every plan's (already sharded) output from one pass over the tensors; all or none appear."""
    threads = options.threads or os.cpu_count() or 1
    check = not options.allow_nonfinite

    def jobs():
        for i in range(resume.first if resume else 0, len(plans[0].tensors)):
            ts = [p.tensors[i] for p in plans]
            for start, stop in row_chunks(ts[0].tensor.n_rows, ts[0].tensor.row_elems):
                yield i, ts, start, stop

    def chunks():
        results = ordered_parallel(jobs(), lambda i, ts, start, stop: encode_chunks(ts, start, stop, check),
                                   threads, 2 * threads)
        for (i, *_), data in announce_done(results, tensor_done):
            yield i, data

    write_many_shards([(p.shards, p.metadata, p.tensors) for p in plans], chunks, progress, resume)


def split_outtypes(outtype: str) -> list[str]:
    """--outtype A,B,...: the entries (each checked when planned); empty entries are refused."""
    entries = outtype.split(",")
    if any(not e.strip() for e in entries):
        raise UserError(f"--outtype {outtype!r} has an empty entry", hint="separate the types with single commas: "
                        "Q4_K_M,Q8_0")
    return [e.strip() for e in entries]


def convert_hf_many(model: str, outfile: str | None, options: ConvertOptions, *, force: bool = False,
                    dry_run: bool = False, progress_factory=None, display_name: str | None = None,
                    split: SplitOptions | None = None, revision: str | None = None,
                    remote=None) -> list[tuple[Plan, Path]]:
    """convert_hf for every type in `options.outtype` ("Q4_K_M,Q6_K,Q8_0"): each output equals its own
    convert_hf run byte for byte, the checkpoint is read once, and all outputs appear together or none."""
    from ..format.text import has_ftype_field
    types = split_outtypes(options.outtype)
    if outfile and not Path(outfile).is_dir() and len(types) > 1 and not has_ftype_field(outfile):
        raise UserError(f"several output types need an --outfile with {{ftype}}, e.g. model-{{ftype}}.gguf, or a "
                        f"directory (got {outfile})")
    with opened_checkpoint(model, options, revision, remote) as checkpoint:
        return _convert_hf_many(checkpoint, model, outfile, options, types, force, dry_run, progress_factory,
                                display_name, split)


def _convert_hf_many(checkpoint, model, outfile, options, types, force, dry_run, progress_factory, display_name,
                     split) -> list[tuple[Plan, Path]]:
    from dataclasses import replace
    root = checkpoint.root
    if display_name is None and not Path(model).exists() and "/" in model:
        display_name = model
    out: list[tuple[Plan, Path]] = []
    mapped = loaded = None
    for outtype in types:
        plan = plan_conversion(checkpoint, replace(options, outtype=outtype), display_name, mapped, loaded)
        mapped, loaded = plan.mapped, plan.imatrix or loaded
        target = output_path(plan, outfile)
        for earlier, where in out:
            if earlier.type_label == plan.type_label:
                raise UserError(f"--outtype {options.outtype!r} names {plan.type_label} twice")
            if [t.name for t in earlier.tensors] != [t.name for t in plan.tensors]:
                raise UserError(f"--outtype {earlier.type_label} and {plan.type_label} write different tensors",
                                hint="convert to them one at a time")
        plan.shards = plan_shards(target, plan.tensors, split)
        out.append((plan, target))
    seen: dict[Path, str] = {}
    for plan, _ in out:
        for shard in plan.shards:
            key = Path(os.path.abspath(shard.path))
            if key in seen:
                raise UserError(f"{seen[key]} and {plan.type_label} would both be written to {shard.path}",
                                hint="put {ftype} in --outfile")
            seen[key] = plan.type_label
    if dry_run:
        return out
    refuse_unwritable([plan for plan, _ in out])
    for plan, _ in out:
        for shard in plan.shards:
            check_output(shard.path, root, force)
    plans = [plan for plan, _ in out]
    with replacing(force), resumable(checkpoint, plans, options, force) as resume:
        names = ", ".join(target.name for _, target in out)
        with write_progress(checkpoint, plans, progress_factory, names, resume.first if resume else 0) as (advance,
                                                                                                          done):
            write_plans(plans, options, advance, done, resume)
    return out
