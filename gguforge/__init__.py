"""gguforge: Hugging Face checkpoints to GGUF, streaming and torch-free.

The library API mirrors the two main commands; both are importable without torch:

    import gguforge
    gguf_path = gguforge.convert_hf("Qwen/Qwen3.5-4B", "qwen.gguf", outtype="bf16")
    gguforge.quantize(gguf_path, "qwen-Q4_K_M.gguf", "Q4_K_M")

Bad input raises gguforge.UserError (the CLI prints it as one line and exits 2).
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__", "compute_imatrix", "convert_hf", "evaluate", "quantize"]  # quantize: see __getattr__


def convert_hf(model: str | Path, outfile: str | Path | None = None, *, outtype: str = "auto", force: bool = False,
               split_max_size: int = 0, split_max_tensors: int = 0, **options) -> Path:
    """Convert a Hugging Face checkpoint (local directory or hub id) to GGUF; returns the path written
    (the first shard of a split output).

    outtype: f32, f16, bf16, q8_0, auto, or a quantize preset (Q4_K_M, ...) written in one pass; a
    comma-separated list ("Q4_K_M,Q8_0") writes each from one read of the checkpoint and returns the
    list of paths.
    outfile: a file, a directory, or a template with {ftype}; None: llama.cpp's file naming in the
    current directory. Other keyword arguments are `ConvertOptions` fields (threads, model_name,
    no_mtp, mtp_only, fuse_qkv, fuse_gate_up_exps, pre_tokenizer, metadata_overrides, vocab_only,
    allow_nonfinite, allow_pickle, mmproj: write the vision encoder as an mmproj file); imatrix: an
    importance-matrix file for a quantize preset (with include_weights, exclude_weights, imatrix_missing).
    revision: of a hub id; remote=True (or a gguforge.checkpoint.remote.RemoteOptions): read the hub id
    over HTTP range requests without a local copy (docs/remote.md).
    """
    from .archs.options import ConvertOptions
    from .convert.pipeline import convert_hf as run
    from .format.split import SplitOptions

    from .quantize.imatrix import imatrix_option
    imatrix = imatrix_option(options.pop("imatrix", None), options.pop("include_weights", ()),
                             options.pop("exclude_weights", ()), options.pop("imatrix_missing", "static"))
    if imatrix is not None:
        options["imatrix"] = imatrix
    hub = {"revision": options.pop("revision", None), "remote": options.pop("remote", None) or None}
    if hub["remote"] is True:
        from .checkpoint.remote import RemoteOptions
        hub["remote"] = RemoteOptions(revision=hub["revision"])
    opts = ConvertOptions(outtype=outtype, **options)
    split = SplitOptions(split_max_size, split_max_tensors)
    if "," in outtype:  # several types in one pass: the list of paths
        from .convert.pipeline import convert_hf_many
        outputs = convert_hf_many(str(model), None if outfile is None else str(outfile), opts, force=force, split=split,
                                  **hub)
        return [plan.shards[0].path for plan, _ in outputs]
    plan, target = run(str(model), None if outfile is None else str(outfile), opts, force=force, split=split, **hub)
    return plan.shards[0].path


def compute_imatrix(model: str | Path, text_file: str | Path, outfile: str | Path | None = "imatrix.gguf", *,
                    chunk_size: int = 512, chunks: int | None = None, output_format: str = "gguf",
                    device: str = "auto", process_output: bool = False, threads: int | None = None,
                    force: bool = False, **convert_options):
    """Run a Hugging Face checkpoint (torch, transformers) over calibration text and write the importance
    matrix llama-imatrix writes for its GGUF conversion; returns the path, or with outfile=None the
    format.imatrix.Imatrix (for `convert_hf(..., imatrix=ImatrixOptions(name, computed=it))`).
    `convert_options` are ConvertOptions fields that change GGUF names (fuse_qkv, fuse_gate_up_exps)."""
    from .archs.options import ConvertOptions
    from .format.atomic import replacing
    from .format.imatrix import write_imatrix
    from .imatrix.compute import ImatrixOptions, compute_imatrix as run

    result = run(str(model), text_file, ImatrixOptions(chunk_size=chunk_size, chunks=chunks, device=device,
                                                       process_output=process_output, threads=threads,
                                                       convert=ConvertOptions(**convert_options))).imatrix
    if outfile is None:
        return result
    with replacing(force):
        write_imatrix(outfile, result, output_format)
    return Path(outfile)


def evaluate(base: str | Path | None, candidates, text_file: str | Path, **options):
    """KL divergence, top-token agreement and perplexity of GGUF candidates against `base` (a Hugging Face
    checkpoint run in torch, or a GGUF run in llama.cpp; None with base_file=...), with llama-perplexity's
    statistics; returns gguforge.eval.EvalResult (`.candidates`: one dict per file, the JSON report's
    fields). Options are gguforge.eval.EvalOptions fields: ctx_size, chunks, threads, n_gpu_layers,
    batch_size, device, dtype, save_base, base_file, force."""
    from .eval import evaluate as run
    return run(None if base is None else str(base), [str(c) for c in candidates], text_file, **options)


def __getattr__(name: str):
    # gguforge.quantize is both the subpackage and the library function: the subpackage is callable
    # (gguforge/quantize/__init__.py), so importing it keeps gguforge.quantize(...) working.
    if name == "quantize":
        import importlib
        return importlib.import_module(".quantize", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
