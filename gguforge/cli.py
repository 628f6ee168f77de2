"""The `gguforge` command line.

Heavy modules (numpy, gguf, torch) are imported inside the commands so that
`gguforge --help` starts instantly. A UserError prints one line (and a hint)
on stderr and exits with EXIT_BAD_INPUT; a bug prints a traceback only with
--verbose.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # plain help: importing rich for it doubles start-up time
                  help="Convert Hugging Face checkpoints to GGUF and quantize them.")
_state = {"verbose": False}

EMBEDDED_MODEL = "tiny-qwen2moe"


def embedded_model_dir() -> Path:
    from importlib.resources import files
    return Path(str(files("gguforge") / "data" / EMBEDDED_MODEL))


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _echo(line: str) -> None:
    """One line of results on stdout. A stdout that cannot be written (a closed pipe, a full disk) is a
    user error (exit 2), never a verdict: `diff` must not report "different" because `| head` closed."""
    try:
        typer.echo(line)
    except OSError as e:
        _detach_stdout()
        raise UserError(f"cannot write to standard output: {e.strerror or e}") from None


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail a second time."""
    import os
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured by tests)
        pass


MAX_THREADS = 4096


def _check_not_empty(*named: tuple[str, str | None]) -> None:
    """An empty value given on purpose (often an unset shell variable) is an error, not the default."""
    for name, value in named:
        if value is not None and not value.strip():
            raise UserError(f"{name} is empty", hint="leave it out to get the default")


def _check_output_arg(text: str | None, what: str) -> None:
    """An output name ending in '/' names a directory: it must exist (never write a file called like it)."""
    if text and text.endswith("/") and not Path(text).is_dir():
        raise UserError(f"{what} {text}: no such directory", hint="create it first, or drop the trailing '/'")


def version_line() -> str:
    """gguforge's version and the gguf-py version it writes files with."""
    from importlib.metadata import PackageNotFoundError, version
    from . import __version__
    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "unknown"
    return f"gguforge {__version__} (gguf-py {gguf_version})"


def _version_callback(value: bool) -> None:
    if value:
        _echo(version_line())
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="print gguforge's and gguf-py's versions and exit")):
    """Convert Hugging Face checkpoints to GGUF and quantize them."""


def _list_archs() -> None:
    from .archs import registered
    for hf_name, cls in registered().items():
        _echo(f"{hf_name:45s} -> {cls.gguf_arch}")


# Options convert-hf and quantize share (a fresh typer.Option for each command).
def _include_weights_option():
    return typer.Option([], "--include-weights", metavar="S",
                        help="use imatrix data only for tensors whose name contains S (repeatable)")


def _exclude_weights_option():
    return typer.Option([], "--exclude-weights", metavar="S",
                        help="no imatrix data for tensors whose name contains S (repeatable)")


def _imatrix_missing_option():
    return typer.Option("static", "--imatrix-missing", metavar="static|error",
                        help="tensors the imatrix has no data for (MTP layers, experts never routed): quantize "
                        "them without it and warn (static), or refuse (error)")


@app.command("convert-hf")
def convert_hf_cmd(
    model: Optional[str] = typer.Argument(None, help="HF model directory or hub id (default: the built-in tiny model)"),
    outfile: Optional[str] = typer.Option(None, "--outfile", help="output file, directory, or template with {ftype}"),
    outtype: str = typer.Option("auto", "--outtype", help="f32, f16, bf16, q8_0, auto or a quantize preset "
                                "(Q4_K_M, ...); a comma-separated list writes every one in one pass"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="general.name (and the file name)"),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="JSON file of GGUF metadata overrides"),
    pre_tokenizer: Optional[str] = typer.Option(None, "--pre-tokenizer", help="name the pre-tokenizer by hand"),
    fuse_gate_up_exps: bool = typer.Option(False, "--fuse-gate-up-exps",
                                           help="fuse routed expert gate and up into ffn_gate_up_exps"),
    fuse_qkv: bool = typer.Option(False, "--fuse-qkv", help="fuse attention Q, K, V into attn_qkv"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, write nothing"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output file"),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, max=MAX_THREADS,
                                          help="worker threads (default: all cores)"),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="convert weights containing NaN/Inf"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load pytorch_model*.bin pickle checkpoints "
                                      "with torch (weights only; needs torch)"),
    vocab_only: bool = typer.Option(False, "--vocab-only", help="write metadata and vocabulary only"),
    mtp_only: bool = typer.Option(False, "--mtp", help="write only the multi-token-prediction draft head"),
    no_mtp: bool = typer.Option(False, "--no-mtp", "--no-nextn", help="drop multi-token-prediction tensors"),
    imatrix: Optional[str] = typer.Option(None, "--imatrix", metavar="FILE",  # str: written as given
                                          help="importance matrix for a quantize preset --outtype (one pass, as "
                                          "llama-quantize --imatrix of the converted file)"),
    include_weights: List[str] = _include_weights_option(),
    exclude_weights: List[str] = _exclude_weights_option(),
    imatrix_missing: str = _imatrix_missing_option(),
    imatrix_text: Optional[str] = typer.Option(None, "--imatrix-text", metavar="FILE", help="calibration text: "
                                               "compute the importance matrix first (gguforge imatrix, torch), "
                                               "then convert with it; no file in between"),
    imatrix_ctx: int = typer.Option(512, "--imatrix-ctx", min=1, help="--imatrix-text: tokens per chunk"),
    imatrix_chunks: Optional[int] = typer.Option(None, "--imatrix-chunks", min=1,
                                                 help="--imatrix-text: use at most this many chunks"),
    mmproj: bool = typer.Option(False, "--mmproj", help="write the vision encoder as mmproj-<name>-<TYPE>.gguf "
                                "(for llama.cpp's mtmd) instead of the text model"),
    fp8_as_q8: bool = typer.Option(False, "--fp8-as-q8", help="store weights dequantized from FP8 as Q8_0 "
                                   "instead of the outtype (f32/f16/bf16)"),
    list_archs: bool = typer.Option(False, "--list-archs", help="list supported architectures and exit"),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", metavar="N[K|M|G]",
                                                 help="split the output into shards of at most this size "
                                                 "(decimal units: K=1000)"),
    split_max_tensors: int = typer.Option(0, "--split-max-tensors", help="split the output into shards of at "
                                          "most this many tensors"),
    revision: Optional[str] = typer.Option(None, "--revision", help="hub id: branch, tag or commit to convert "
                                           "(default main; with --remote resolved once to a commit for the whole run)"),
    remote: bool = typer.Option(False, "--remote", help="hub id: read the safetensors over HTTP (range requests) "
                                "without downloading them; only config and tokenizer files touch the disk"),
    remote_connections: Optional[int] = typer.Option(None, "--remote-connections", min=1, max=64, metavar="N",
                                                     help="--remote: range requests in flight (default 8)"),
    remote_retries: Optional[int] = typer.Option(None, "--remote-retries", min=0, metavar="N",
                                                 help="--remote: failures in a row before giving up (default 5)"),
    remote_window: Optional[str] = typer.Option(None, "--remote-window", metavar="N[K|M|G]",
                                                help="--remote: bytes fetched ahead of the conversion (default 256M)"),
    remote_timeout: Optional[float] = typer.Option(None, "--remote-timeout", min=0.1, metavar="SECONDS",
                                                   help="--remote: seconds without data before a request is "
                                                   "retried (default 30)"),
    remote_backoff: Optional[float] = typer.Option(None, "--remote-backoff", min=0.0, metavar="SECONDS",
                                                   help="--remote: wait before the first retry, doubled for each "
                                                   "further one (default 1; a server's Retry-After wins)"),
    resume: bool = typer.Option(False, "--resume", help="--remote: keep the finished tensors if the run is interrupted "
                                "or fails, and continue from them (checked by SHA-256) when run again the same way"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="tracebacks for internal errors"),
):
    """Convert a Hugging Face checkpoint to GGUF."""
    _state["verbose"] = verbose
    if list_archs:
        _list_archs()
        return
    from .archs.options import ConvertOptions
    from .convert.pipeline import convert_hf
    from .progress import progress_factory

    if mtp_only and no_mtp:
        raise UserError("--mtp and --no-mtp cannot be combined")
    _check_output_arg(outfile, "--outfile")
    _check_not_empty(("MODEL", model), ("--outfile", outfile), ("--outtype", outtype), ("--model-name", model_name),
                     ("--pre-tokenizer", pre_tokenizer))
    overrides = {}
    if metadata is not None:
        from .checkpoint.read import read_json_object
        overrides = read_json_object(metadata, f"--metadata {metadata}")
    options = ConvertOptions(outtype=outtype, model_name=model_name, pre_tokenizer=pre_tokenizer,
                             metadata_overrides=overrides, threads=threads,
                             fuse_gate_up_exps=fuse_gate_up_exps, fuse_qkv=fuse_qkv, allow_nonfinite=allow_nonfinite,
                             vocab_only=vocab_only, mtp_only=mtp_only, no_mtp=no_mtp,
                             allow_pickle=allow_pickle, mmproj=mmproj, fp8_as_q8=fp8_as_q8,
                             imatrix=_imatrix_options(imatrix or imatrix_text, include_weights, exclude_weights,
                                                      imatrix_missing))
    source = model or str(embedded_model_dir())
    hub = dict(revision=revision, remote=_remote_options(remote, model, revision, imatrix_text, allow_pickle,
                                                         remote_connections, remote_retries, remote_window,
                                                         remote_timeout, remote_backoff, resume))
    if imatrix_text is not None:
        options.imatrix = _computed_imatrix(source, imatrix_text, imatrix, options, imatrix_ctx, imatrix_chunks,
                                            quiet)
    if quiet or not sys.stderr.isatty():  # hub downloads show their own bars: silence them with ours
        import os
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if model is None and not quiet:
        _say(f"no model given: converting the built-in tiny model ({EMBEDDED_MODEL})")
    split = _split_options(split_max_size, split_max_tensors)
    if "," in outtype:  # several types in one pass
        from .convert.pipeline import convert_hf_many
        outputs = convert_hf_many(source, outfile, options, force=force, dry_run=dry_run,
                                  progress_factory=progress_factory(quiet),
                                  display_name=EMBEDDED_MODEL if model is None else None, split=split, **hub)
    else:
        outputs = [convert_hf(source, outfile, options, force=force, dry_run=dry_run,
                              progress_factory=progress_factory(quiet),
                              display_name=EMBEDDED_MODEL if model is None else None, split=split, **hub)]
    for plan, target in outputs:
        shards = plan.shards
        if dry_run:
            _print_plan(plan, target)
            _print_shards(shards)
        elif not quiet:
            where = target if len(shards) == 1 else f"{len(shards)} shards {shards[0].path} ..."
            _say(f"wrote {where} ({plan.nbytes / 1e6:.1f} MB, {len(plan.tensors)} tensors, {plan.arch.gguf_arch})")
        if not quiet:
            for line in plan.warnings:
                _say(f"warning: {line}")


def _computed_imatrix(source: str, text: str, imatrix: Optional[str], options, ctx: int, chunks: Optional[int],
                      quiet: bool):
    """convert-hf --imatrix-text: the importance matrix computed in memory (named after the text file in
    quantize.imatrix.file), after the cheap checks that would refuse the conversion anyway."""
    from dataclasses import replace
    _check_not_empty(("--imatrix-text", text))
    if imatrix is not None:
        raise UserError("--imatrix and --imatrix-text cannot be combined")
    from .convert.plan import CONVERTER_OUTTYPES, parse_outtype_preset
    for outtype in options.outtype.split(","):
        if outtype.strip().lower() in (*CONVERTER_OUTTYPES, "auto"):
            raise UserError("--imatrix-text needs a quantize preset as --outtype (Q4_K_M, IQ4_XS, Q2_K_S, ...)",
                            hint=f"--outtype {outtype} writes float or q8_0 values, which use no importance matrix")
        parse_outtype_preset(outtype)
    _require("--imatrix-text", ("torch", "transformers"),
             hint='pip install "gguforge[verify]" (install torch==2.13.0 first)')
    from .imatrix.compute import ImatrixOptions, compute_imatrix
    from .progress import progress_factory
    run = compute_imatrix(source, text, ImatrixOptions(chunk_size=ctx, chunks=chunks, threads=options.threads,
                                                       convert=options),
                          progress=progress_factory(quiet, unit="tokens"))
    if not quiet:
        im = run.imatrix
        _say(f"imatrix: {len(im.entries)} entries from {im.chunk_count} chunks of {im.chunk_size} tokens "
             f"({run.n_tokens / max(run.seconds, 1e-9):,.0f} tokens/s)")
    return replace(options.imatrix, computed=run.imatrix)


def _remote_options(remote: bool, model: Optional[str], revision: Optional[str], imatrix_text, allow_pickle: bool,
                    connections, retries, window, timeout, backoff, resume: bool = False):
    """convert-hf --remote and its --remote-* settings (None without --remote)."""
    given = {"--remote-connections": connections, "--remote-retries": retries, "--remote-window": window,
             "--remote-timeout": timeout, "--remote-backoff": backoff, "--resume": resume or None}
    if not remote:
        if any(v is not None for v in given.values()):
            raise UserError(f"{next(k for k, v in given.items() if v is not None)} needs --remote")
        return None
    if model is None:
        raise UserError("--remote needs a hub model id (Org/Name)")
    for flag, used in (("--imatrix-text", imatrix_text is not None), ("--allow-pickle", allow_pickle)):
        if used:
            raise UserError(f"--remote cannot be combined with {flag}", hint="download the model first (without "
                            "--remote), or compute the importance matrix with `gguforge imatrix`")
    from .checkpoint.remote import RemoteOptions
    from .format.split import parse_size
    options = RemoteOptions(revision=revision, resume=resume)
    if window is not None:
        try:
            window = parse_size(window)
        except UserError:
            window = 0
        if window <= 0:
            raise UserError(f"--remote-window {given['--remote-window']!r}: expected a positive whole number with "
                            "an optional K, M or G (for example 64M)")
    for name, value in (("connections", connections), ("retries", retries), ("timeout", timeout),
                        ("backoff", backoff), ("window", window)):
        if value is not None:
            setattr(options, name, value)
    return options


def _split_options(max_size: Optional[str], max_tensors: int):
    from .format.split import SplitOptions, parse_size
    return SplitOptions(parse_size(max_size) if max_size else 0, max_tensors)


def _print_shards(shards) -> None:
    from .format.split import format_shard_plan
    for line in format_shard_plan(shards):
        _echo(line)


def _print_plan(plan, target) -> None:
    from .format.text import plan_line
    for t in plan.tensors:
        notes = getattr(t.tensor, "notes", ())
        detail = ("<- " + ", ".join(t.sources[:2]) + (f" (+{len(t.sources) - 2})" if len(t.sources) > 2 else "")
                  + (f"  [{' >> '.join(notes)}]" if notes else ""))
        if plan.coverage is not None and (note := plan.coverage.short(t.name)):
            detail += f"  [{note}]"
        _echo(plan_line(t.name, t.shape, t.ggml_type.name, t.nbytes, detail))
    n, size = plan.n_params, plan.nbytes
    if (source := getattr(plan, "source", None)) is not None:
        _echo(source.summary())
    _echo(f"{len(plan.tensors)} tensors, {n:,d} parameters, {size:,d} bytes, "
               f"{8 * size / max(n, 1):.2f} bits per weight -> {target} (dry run: nothing written)")


def _imatrix_options(path: Optional[str], include: List[str], exclude: List[str], missing: str):
    """--imatrix and its companions (quantize and convert-hf): None without --imatrix."""
    if path is None:
        if include or exclude:
            raise typer.BadParameter("--include-weights/--exclude-weights need --imatrix")
        return None
    if include and exclude:
        raise typer.BadParameter("--include-weights and --exclude-weights cannot be used together")
    from .quantize.imatrix import ImatrixOptions
    return ImatrixOptions(path, include, exclude, missing.strip().lower())


@app.command("quantize")
def quantize_cmd(
    source: Path = typer.Argument(..., help="input GGUF file"),
    target: str = typer.Argument(..., help="output GGUF file; with several TYPEs a name with {ftype} (q4_k_m) "
                                 "or {FTYPE} (Q4_K_M)"),
    qtype: str = typer.Argument(..., metavar="TYPE", help="a llama-quantize preset (Q4_K_M, Q8_0, IQ4_XS, F16, ...) "
                                "or its ftype id; a comma-separated list writes every one in one pass"),
    nthreads: Optional[str] = typer.Argument(None, metavar="NTHREADS", help="worker threads, as llama-quantize's "
                                             "last argument (same as --threads; 0: all cores)"),
    pure: bool = typer.Option(False, "--pure", help="every quantizable tensor gets TYPE's default type"),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="type for output.weight"),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type",
                                                       help="type for token_embd.weight"),
    leave_output_tensor: bool = typer.Option(False, "--leave-output-tensor", help="keep output.weight as it is"),
    tensor_type: List[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE for matching tensors (repeatable)"),
    tensor_type_file: List[Path] = typer.Option([], "--tensor-type-file", help="a file of REGEX=TYPE words, "
                                                "each one --tensor-type (repeatable)"),
    override_kv: List[str] = typer.Option([], "--override-kv", metavar="KEY=TYPE:VALUE",
                                          help="set a metadata key in the output: TYPE int, float, bool or str "
                                          "(repeatable)"),
    prune_layers: Optional[str] = typer.Option(None, "--prune-layers", metavar="L1,L2,...",
                                               help="remove these blocks and renumber the others"),
    imatrix: Optional[str] = typer.Option(None, "--imatrix", metavar="FILE",  # str: written as given
                                           help="importance matrix (GGUF or .dat, from llama-imatrix or gguforge "
                                           "imatrix) for the weighted quantizers, as llama-quantize --imatrix"),
    include_weights: List[str] = _include_weights_option(),
    exclude_weights: List[str] = _exclude_weights_option(),
    imatrix_missing: str = _imatrix_missing_option(),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="dequantize quantized tensors and "
                                          "quantize them again (loses quality)"),
    no_fallback: bool = typer.Option(False, "--no-fallback", help="refuse instead of falling back to another "
                                     "type when rows do not fill whole blocks"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the per-tensor plan, write nothing"),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, max=MAX_THREADS,
                                          help="worker threads (default: all cores)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output file"),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", metavar="N[K|M|G]",
                                                 help="split the output into shards of at most this size"),
    split_max_tensors: int = typer.Option(0, "--split-max-tensors", help="split the output into shards of at "
                                          "most this many tensors"),
    keep_split: bool = typer.Option(False, "--keep-split", help="write the output in the same shards as a "
                                    "split input"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="tracebacks for internal errors"),
):
    """Quantize a GGUF file with llama-quantize's per-tensor type rules (a split input: give the first shard)."""
    _state["verbose"] = verbose
    from .progress import progress_factory
    from .quantize.presets import parse_ggml_type
    from .quantize.overrides import parse_kv_overrides, parse_prune_layers
    from .quantize.rules import QuantOptions, fallback_summary, size_summary
    from .quantize.run import format_plan, quantize_gguf_many

    _check_output_arg(target, "output")
    presets = parse_preset_list(qtype)
    threads = _positional_threads(nthreads, threads)
    options = QuantOptions(
        pure=pure,
        output_tensor_type=parse_ggml_type(output_tensor_type) if output_tensor_type else None,
        token_embedding_type=parse_ggml_type(token_embedding_type) if token_embedding_type else None,
        leave_output_tensor=leave_output_tensor,
        tensor_type_overrides=_tensor_types_in_order(tensor_type, tensor_type_file),
        allow_requantize=allow_requantize,
        no_fallback=no_fallback,
        prune_layers=parse_prune_layers(prune_layers) if prune_layers is not None else (),
        kv_overrides=parse_kv_overrides(override_kv),
        imatrix=_imatrix_options(imatrix, include_weights, exclude_weights, imatrix_missing),
    )
    outputs = [(output_for_type(target, p, len(presets) > 1), p) for p in presets]
    results = quantize_gguf_many(source, outputs, options, threads=threads, force=force, dry_run=dry_run,
                                 progress_factory=progress_factory(quiet),
                                 split=_split_options(split_max_size, split_max_tensors), keep_split=keep_split)
    for result in results:
        preset = result.preset
        sizes = size_summary(result.plans)
        totals = (f"{len(result.plans)} tensors, {sizes.src_bytes / 1e6:.2f} MB -> {sizes.dst_bytes / 1e6:.2f} MB, "
                  f"{sizes.src_bpw:.2f} -> {sizes.dst_bpw:.2f} bits per weight")
        warning = fallback_summary(result.plans)
        if dry_run:
            if len(results) > 1:
                _echo(f"{preset.name} -> {result.target}:")
            for line in format_plan(result.plans, result.coverage):
                _echo(line)
            _print_shards(result.shards)
            _echo(f"{totals} ({preset.name}; dry run: nothing written)")
        elif not quiet:
            where = (result.target if len(result.shards) <= 1
                     else f"{len(result.shards)} shards {result.shards[0].path} ...")
            _say(f"wrote {where} ({preset.name}): {totals}")
        if warning and not quiet:
            _say(f"warning: {warning}" + (f" ({preset.name})" if len(results) > 1 else ""))
        for line in result.warnings:
            _say(f"warning: {line}" + (f" ({preset.name})" if len(results) > 1 else ""))


def parse_preset_list(text: str) -> list:
    """TYPE or TYPE1,TYPE2,...: every entry a preset, none twice (checked before anything is read)."""
    from .quantize.presets import parse_preset
    entries = text.split(",")
    if len(entries) > 1 and any(not e.strip() for e in entries):
        raise UserError(f"TYPE {text!r} has an empty entry", hint="separate the types with single commas: Q4_K_M,Q8_0")
    presets = [parse_preset(e) for e in entries]
    for i, p in enumerate(presets):
        if p in presets[:i]:
            raise UserError(f"TYPE {text!r} names {p.name} twice")
    return presets


def output_for_type(target: str, preset, several: bool) -> Path:
    """The output file of one preset: {ftype}/{FTYPE} (or {outtype}/{OUTTYPE}) in the name become its
    name, lower or upper case, as convert-hf --outfile does. Several types need one of them."""
    from .format.text import fill_ftype, has_ftype_field
    if several and not has_ftype_field(target):
        raise UserError(f"several types need an output name with {{ftype}}, e.g. model-{{ftype}}.gguf "
                        f"(got {target})")
    return Path(fill_ftype(target, preset.name))


def _positional_threads(nthreads: Optional[str], threads: Optional[int]) -> Optional[int]:
    """llama-quantize's optional last argument; <= 0 means all cores, as there."""
    if nthreads is None:
        return threads
    try:
        n = int(nthreads.strip(), 10)
    except ValueError:
        raise UserError(f"NTHREADS {nthreads!r} is not a whole number") from None
    if n > MAX_THREADS:
        raise UserError(f"NTHREADS {n} is more than {MAX_THREADS}")
    n = n if n > 0 else None
    if threads is not None and n != threads:
        raise UserError(f"NTHREADS {nthreads} and --threads {threads} disagree", hint="give one of them")
    return n


def _tensor_types_in_order(inline: List[str], files: List[Path]) -> list:
    """--tensor-type and --tensor-type-file entries in command-line order (the first matching pattern
    wins, as in llama-quantize, so the order matters); typer hands each option's values over separately."""
    from .quantize.overrides import read_tensor_type_file
    from .quantize.presets import parse_tensor_type_option
    names = ("--tensor-type", "--tensor-type-file")
    order = [n for arg in _state.get("argv") or [] for n in names if arg == n or arg.startswith(n + "=")]
    if sorted(order) != sorted([names[0]] * len(inline) + [names[1]] * len(files)):
        order = [names[0]] * len(inline) + [names[1]] * len(files)  # not called from the command line
    inline_values, file_values, out = iter(inline), iter(files), []
    for name in order:
        if name == names[0]:
            out.append(parse_tensor_type_option(next(inline_values)))
        else:
            out += read_tensor_type_file(next(file_values))
    return out


@app.command("inspect")
def inspect_cmd(
    gguf_file: Path = typer.Argument(..., help="GGUF file (the first shard of a split file reads them all)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="tracebacks for internal errors"),
):
    """Show a GGUF file's metadata, tensors, and totals and bits per weight by type."""
    _state["verbose"] = verbose
    from .inspect import inspect_lines, load
    for line in inspect_lines(load(gguf_file)):
        _echo(line)


@app.command("diff")
def diff_cmd(
    a: Path = typer.Argument(..., help="first GGUF file"),
    b: Path = typer.Argument(..., help="second GGUF file"),
    tol: Optional[float] = typer.Option(None, "--tol", help="compare tensor values (dequantized to f32) and "
                                        "accept differences up to this; without it, tensor bytes must match"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="tracebacks for internal errors"),
):
    """Compare two GGUF files: exit 0 when equal (within --tol), 1 when different, 2 on bad input."""
    _state["verbose"] = verbose
    from .inspect import diff, load
    if tol is not None and not tol >= 0:
        raise UserError("--tol must be a number >= 0")
    result = diff(load(a), load(b), tol)
    for line in result.lines:
        _echo(line)
    if not result.equal:
        raise typer.Exit(1)


@app.command("verify")
def verify_cmd(
    hf_dir: Path = typer.Argument(..., help="the original HF model directory"),
    gguf_file: Path = typer.Argument(..., help="the converted GGUF file"),
    max_nmse: Optional[float] = typer.Option(None, "--max-nmse", help="exit 1 above this logits NMSE"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="also compare this vision projector's image "
                                          "embeddings (llama.cpp's mtmd) with the checkpoint's vision tower"),
    image: Optional[Path] = typer.Option(None, "--image", help="with --mmproj: the image to compare on "
                                         "(default: a synthetic test image; PPM/PNG, any format with Pillow)"),
    max_image_nmse: float = typer.Option(1e-3, "--max-image-nmse", help="with --mmproj: exit 1 above this "
                                         "image-embedding NMSE"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Run the HF model (transformers) and the GGUF (llama.cpp) on the same tokens and compare; exit 1
    when a check fails."""
    _state["verbose"] = verbose
    hf_dir = _verify_inputs(hf_dir, gguf_file)
    if image is not None and mmproj is None:
        raise UserError("--image needs --mmproj (it is the image the vision projector is checked on)")
    if not max_image_nmse >= 0:
        raise UserError("--max-image-nmse must be a number >= 0")
    if mmproj is not None:
        from .verify_vision import choose_image, read_mmproj
        from .checkpoint.read import load_config
        choose_image(read_mmproj(mmproj), image)  # both read before torch loads: bad input fails fast
        if not isinstance(load_config(hf_dir).get("vision_config"), dict):
            raise UserError(f"--mmproj: {hf_dir} has no vision_config, so no vision tower to compare with")
    _require("verify", VERIFY_MODULES, hint='pip install "gguforge[verify]" (install torch==2.13.0 first)')
    if mmproj is not None:
        _require("verify --mmproj", ("llama_cpp.mtmd_cpp",), hint="it needs a llama-cpp-python with mtmd (0.3.36)")
    from .verify import verify
    report = verify(hf_dir, gguf_file)
    _echo(report.format())
    failed = []
    if max_nmse is not None and not report.nmse <= max_nmse:
        failed.append(f"NMSE {report.nmse:.3e} is above --max-nmse {max_nmse:.3e}")
    if not report.tokenizer_ok:
        failed.append(f"tokenizer parity failed on {len(report.token_mismatches)} text(s)")
    if mmproj is not None:
        from .verify_vision import verify_vision
        vision = verify_vision(hf_dir, gguf_file, mmproj, image=image)
        _echo(vision.format())
        if vision.problems:
            failed.append(f"image embeddings cannot be compared: {vision.problems[0]}")
        elif not vision.nmse <= max_image_nmse:
            failed.append(f"image-embedding NMSE {vision.nmse:.3e} is above --max-image-nmse {max_image_nmse:.3e}")
    if failed:
        _say("verify failed: " + "; ".join(failed))
        raise typer.Exit(1)


@app.command("imatrix")
def imatrix_cmd(
    model: str = typer.Argument(..., help="HF model directory or hub id"),
    text_file: Path = typer.Option(..., "-f", "--file", help="calibration text (UTF-8)"),
    chunk: int = typer.Option(512, "-c", "--ctx-size", min=1, help="tokens per chunk (llama-imatrix -c)"),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="use at most this many chunks"),
    output: str = typer.Option("imatrix.gguf", "-o", "--output", help="output file"),
    output_format: str = typer.Option("gguf", "--output-format", metavar="gguf|dat",
                                      help="llama-imatrix's GGUF format or the legacy .dat"),
    device: str = typer.Option("auto", "--device", metavar="cpu|cuda|auto", help="where torch runs the model"),
    dtype: str = typer.Option("auto", "--dtype", metavar="auto|float32|bfloat16|float16",
                              help="what the model runs in (auto: float32 on CPU, the checkpoint's type on GPU)"),
    process_output: bool = typer.Option(False, "--process-output", help="also collect output.weight"),
    batch_size: int = typer.Option(2048, "-b", "--batch-size", min=1, help="llama-imatrix -b (decides which "
                                   "small matmuls it skips)"),
    ubatch_size: int = typer.Option(512, "--ubatch-size", "-ub", min=1, help="llama-imatrix -ub"),
    fuse_qkv: bool = typer.Option(False, "--fuse-qkv", help="name entries for a convert-hf --fuse-qkv file"),
    fuse_gate_up_exps: bool = typer.Option(False, "--fuse-gate-up-exps",
                                           help="name entries for a convert-hf --fuse-gate-up-exps file"),
    pre_tokenizer: Optional[str] = typer.Option(None, "--pre-tokenizer",
                                                help="name the pre-tokenizer by hand (as convert-hf)"),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, max=MAX_THREADS,
                                          help="torch CPU threads (default: torch's)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output file"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="tracebacks for internal errors"),
):
    """Compute an importance matrix from a Hugging Face checkpoint (torch), named for its GGUF conversion."""
    _state["verbose"] = verbose
    fmt = output_format.strip().lower()
    if fmt not in ("gguf", "dat"):
        raise UserError(f"--output-format must be gguf or dat, not {output_format!r}")
    _check_not_empty(("MODEL", model), ("-o", output))
    _check_output_arg(output, "-o")
    target = Path(output)
    if target.exists() and not force:
        raise UserError(f"{target} already exists", hint="pass --force to overwrite it")
    if not target.absolute().parent.is_dir():  # found out before the model runs, not after
        raise UserError(f"-o {output}: directory {target.absolute().parent} does not exist")
    _require("imatrix", ("torch", "transformers"), hint='pip install "gguforge[verify]" (install torch==2.13.0 first)')
    from .format.atomic import replacing
    from .format.imatrix import write_imatrix
    from .imatrix.compute import ImatrixOptions, compute_imatrix
    from .progress import progress_factory

    from .archs.options import ConvertOptions
    options = ImatrixOptions(chunk_size=chunk, chunks=chunks, process_output=process_output, device=device,
                             dtype=dtype.strip().lower(), threads=threads, batch_size=batch_size,
                             ubatch_size=ubatch_size,
                             convert=ConvertOptions(fuse_qkv=fuse_qkv, fuse_gate_up_exps=fuse_gate_up_exps,
                                                    pre_tokenizer=pre_tokenizer))
    run = compute_imatrix(model, text_file, options, progress=progress_factory(quiet, unit="tokens"))
    with replacing(force):
        write_imatrix(target, run.imatrix, fmt)
    if run.missing:
        _say(f"warning: no module of the HF model fed {len(run.missing)} GGUF weights, e.g. {run.missing[0]}")
    if not quiet:
        im = run.imatrix
        _say(f"wrote {target}: {len(im.entries)} entries, {im.chunk_count} chunks of {im.chunk_size} tokens, "
             f"{run.n_tokens / max(run.seconds, 1e-9):,.0f} tokens/s")


@app.command("eval")
def eval_cmd(
    inputs: List[str] = typer.Argument(..., metavar="BASE CANDIDATE.gguf...", help="the base (HF model directory, "
                                       "hub id or GGUF; left out with --base-file) and the GGUF files to measure"),
    text_file: Path = typer.Option(..., "-f", "--file", help="evaluation text (UTF-8), as llama-perplexity -f"),
    ctx_size: int = typer.Option(512, "-c", "--ctx-size", min=1, help="tokens per chunk (llama-perplexity -c)"),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="use at most this many chunks"),
    batch_size: int = typer.Option(2048, "-b", "--batch-size", min=1, help="llama-perplexity -b (chunks "
                                   "decoded together)"),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, max=MAX_THREADS, help="CPU threads"),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", "-ngl", min=0, help="llama.cpp layers on the GPU"),
    device: str = typer.Option("cpu", "--device", metavar="cpu|cuda|auto", help="HF base: where torch runs it"),
    dtype: str = typer.Option("auto", "--dtype", metavar="auto|float32|bfloat16|float16",
                              help="HF base: what it runs in (auto: float32 on CPU, the checkpoint's type on GPU)"),
    json_out: Optional[str] = typer.Option(None, "--json", metavar="FILE", help="every statistic, per file"),
    markdown: Optional[str] = typer.Option(None, "--markdown", metavar="FILE", help="a table for a model card"),
    plot: Optional[str] = typer.Option(None, "--plot", metavar="FILE.png", help="mean and 99.9% KLD against "
                                       "bits per weight (needs matplotlib)"),
    save_base: Optional[str] = typer.Option(None, "--save-base", metavar="FILE", help="keep the computed base"),
    base_file: Optional[str] = typer.Option(None, "--base-file", metavar="FILE", help="reuse a --save-base file "
                                            "(same text, tokenizer and --ctx-size)"),
    details: bool = typer.Option(False, "--details", help="also print every statistic as llama-perplexity does"),
    force: bool = typer.Option(False, "--force", help="overwrite existing output files"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="tracebacks for internal errors"),
):
    """KL divergence, top-token agreement and perplexity of GGUF files against their base model, with
    llama-perplexity's statistics, in one run."""
    _state["verbose"] = verbose
    base, candidates = (None, inputs) if base_file else (inputs[0], inputs[1:])
    if not candidates:
        raise UserError("give the base and at least one candidate GGUF" if not base_file else
                        "give at least one candidate GGUF")
    outputs = [(flag, v) for flag, v in (("--json", json_out), ("--markdown", markdown), ("--plot", plot),
                                         ("--save-base", save_base)) if v is not None]
    _check_not_empty(*outputs)
    for flag, value in outputs:
        _check_output_arg(value, flag)
        target = Path(value)
        if target.exists() and not force:
            raise UserError(f"{target} already exists", hint="pass --force to overwrite it")
        if not target.absolute().parent.is_dir():
            raise UserError(f"{flag} {value}: directory {target.absolute().parent} does not exist")
    from .eval.report import check_plot_available, details as detail_lines, table, write_reports
    if plot is not None:
        check_plot_available()
    _require("eval", ("llama_cpp",), hint='pip install "gguforge[verify]"')
    from .eval import EvalOptions, evaluate
    from .progress import progress_factory
    options = EvalOptions(ctx_size=ctx_size, chunks=chunks, threads=threads, n_gpu_layers=n_gpu_layers,
                          batch_size=batch_size, device=device.strip().lower(), dtype=dtype.strip().lower(),
                          save_base=save_base, base_file=base_file, force=force)
    result = evaluate(base, candidates, text_file, options, progress=progress_factory(quiet, unit="tokens"))
    write_reports(result, json_out, markdown, plot, force=force)
    _echo(table(result))
    if details:
        _echo(detail_lines(result))


VERIFY_MODULES = ("torch", "transformers", "llama_cpp")


def _verify_inputs(hf_dir: Path, gguf_file: Path) -> Path:
    """Both inputs checked before torch loads: a model directory (or hub id) with config.json, a valid GGUF."""
    from .checkpoint.read import load_config, resolve_model
    from .format.reader import open_reader
    root = resolve_model(str(hf_dir))
    if not root.is_dir():
        raise UserError(f"{hf_dir}: not a model directory", hint="give the Hugging Face model the GGUF came from")
    load_config(root)
    open_reader(gguf_file)
    return root


def _require(command: str, modules: tuple[str, ...], hint: str) -> None:
    """Optional dependencies of a command, imported up front: a missing one is a user error, not a crash
    halfway through."""
    import importlib
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"{command} needs the optional dependencies ({name} is missing)", hint=hint) from None


def main(argv: List[str] | None = None) -> int:
    """Run one command; every termination signal unwinds it (cleanup runs) and exits 128 + signal."""
    from .signals import termination_as_exception
    _reopen_closed_std_streams()
    with termination_as_exception():
        return _run(argv)


def _reopen_closed_std_streams() -> None:
    """Started with stdout or stderr closed (`2>&-`): Python leaves sys.stderr None, which every message
    and progress bar would trip over (exit 70). Point it at /dev/null: the exit code still tells."""
    import os
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))


def _click_classes(name: str) -> tuple[type, ...]:
    """Click's exception class `name` as the installed typer raises it: from click itself (older typer)
    and from the copy of click that newer typer vendors (typer._click), whichever exist."""
    import importlib
    found = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


# OS errors about a named file that the user can fix (a name too long, no permission, a full disk ...).
USER_ERRNOS = {getattr(errno, name) for name in ("ENAMETOOLONG", "EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT",
                                                  "EFBIG", "ENOTDIR", "EISDIR", "ELOOP", "ENOENT", "ETXTBSY")
               if hasattr(errno, name)}


def _run(argv: List[str] | None) -> int:
    from .signals import Terminated, signal_name
    _state["argv"] = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=argv, standalone_mode=False, prog_name="gguforge")
        if result == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt into this exit code, silently
            _say("interrupted")
        return result if isinstance(result, int) else 0
    except UserError as e:
        _say(f"error: {_one_line(e.message)}")
        if e.hint:
            _say(f"hint: {_one_line(e.hint)}")
        return EXIT_BAD_INPUT
    except _click_classes("ClickException") as e:  # usage errors: usage line, "Error: ...", exit 2
        e.show()
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, *_click_classes("Abort")):
        _say("interrupted")
        return EXIT_INTERRUPTED
    except Terminated as e:
        _say(f"interrupted by {signal_name(e.signum)}")
        return 128 + e.signum
    except OSError as e:
        if e.errno not in USER_ERRNOS or e.filename is None:
            return _internal_error(e)
        _say(f"error: cannot use {e.filename}: {e.strerror}")  # about the user's files, not a bug
        return EXIT_BAD_INPUT
    except Exception as e:
        return _internal_error(e)


def _one_line(text: str) -> str:
    """A message as one printable line: the user's text inside it may hold newlines, other control
    characters or unpaired surrogates, shown escaped (as repr() does)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _internal_error(e: Exception) -> int:
    """A bug: say so plainly (the traceback with --verbose)."""
    if _state["verbose"]:
        raise e
    _say(f"internal error: {type(e).__name__}: {e} (run with --verbose for a traceback)")
    return EXIT_INTERNAL


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
