"""`gguforge eval`: KL divergence, top-token agreement and perplexity of GGUF files against a base.

The base is a Hugging Face checkpoint (run in torch) or a GGUF (run in llama.cpp, as llama-perplexity's
--kl-divergence-base). It is computed once into the compact store (store.py), then each candidate GGUF
is run in llama.cpp, one after another, and compared chunk by chunk with it, with llama-perplexity's
statistics (stats.py). Chunking follows perplexity.cpp: the text (one trailing newline dropped, as its
-f) tokenized once with BOS when the vocabulary adds one, cut into n_ctx-token chunks, the first token
of each replaced by BOS when the vocabulary adds one, only positions n_ctx/2 .. n_ctx-2 scored.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from .stats import MIN_COUNT, KldSums, encode_base, summarize
from .store import StoreHeader, StoreReader, StoreWriter, llama_file_bytes

DEFAULT_CTX = 512
DEFAULT_BATCH = 2048
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass
class EvalOptions:
    ctx_size: int = DEFAULT_CTX
    chunks: int | None = None
    threads: int | None = None
    n_gpu_layers: int = 0
    batch_size: int = DEFAULT_BATCH
    device: str = "cpu"  # HF base: cpu, cuda or auto (as gguforge imatrix)
    dtype: str = "auto"  # HF base: auto, float32, bfloat16, float16 (as gguforge imatrix)
    save_base: str | None = None
    base_file: str | None = None
    force: bool = False  # replace an existing --save-base file


@dataclass
class EvalResult:
    base: str
    n_ctx: int
    n_chunk: int
    n_tokens: int  # scored tokens per candidate
    base_store_bytes: int
    llama_base_bytes: int  # llama-perplexity's --kl-divergence-base file for the same run
    candidates: list[dict] = field(default_factory=list)  # one JSON object per candidate
    details: list[dict] = field(default_factory=list)  # every statistic, per candidate (same order)
    seconds: float = 0.0
    base_seconds: float = 0.0


# -- inputs -------------------------------------------------------------------------------------------------


@dataclass
class GgufInfo:
    path: Path
    arch: str
    n_vocab: int
    vocab_digest: str
    n_ctx_train: int | None
    type: str
    size_bytes: int
    bpw: float


def gguf_info(path: Path) -> GgufInfo:
    """What the report and the checks need from a GGUF's header (open_reader: one line for a bad file)."""
    from gguf import LlamaFileType

    from ..format.reader import open_reader
    r = open_reader(path)

    def value(key):
        f = r.get_field(key)
        return None if f is None else f.contents()

    arch = value("general.architecture")
    tokens = r.get_field("tokenizer.ggml.tokens")
    if arch is None or tokens is None:
        raise UserError(f"{path}: not a model GGUF (no general.architecture or tokenizer.ggml.tokens)")
    digest = hashlib.sha256()
    for i in tokens.data:
        part = tokens.parts[i]
        digest.update(len(part).to_bytes(4, "little") + part.tobytes())
    ft = value("general.file_type")
    try:
        name = LlamaFileType(int(ft)).name if ft is not None else "?"
    except ValueError:
        name = f"ftype {ft}"
    name = name.removeprefix("MOSTLY_").removeprefix("ALL_")
    n_bits = sum(int(t.n_bytes) for t in r.tensors) * 8
    n_elem = sum(int(t.n_elements) for t in r.tensors)
    ctx = value(f"{arch}.context_length")
    return GgufInfo(Path(path), arch, len(tokens.data), digest.hexdigest(), int(ctx) if ctx is not None else None,
                    name, Path(path).stat().st_size, n_bits / max(n_elem, 1))


def read_eval_text(path) -> bytes:
    """The text as llama-perplexity's -f reads it: the bytes, one trailing newline dropped."""
    p = Path(path)
    if not p.is_file():
        from ..errors import not_a_file
        raise not_a_file(p)
    data = p.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return data[:-1] if data.endswith(b"\n") else data


def llama_tokens(path: Path, text: bytes) -> list[int]:
    """llama.cpp's tokenization of `text` with the GGUF's vocabulary (weights not loaded)."""
    import llama_cpp

    from .llama import _silence
    _silence(llama_cpp)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise UserError(f"{path}: llama.cpp cannot load this model")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_max = len(text) + 2
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, n_max, True, False)
        return list(buf[:n])
    finally:
        llama_cpp.llama_model_free(model)


def _check_same_model(base: GgufInfo | None, hf_arch: str | None, hf_vocab: int | None,
                      candidates: list[GgufInfo]) -> None:
    ref = candidates[0] if base is None else base
    for c in candidates:
        arch = hf_arch if base is None and hf_arch else ref.arch
        if c.arch != arch:
            raise UserError(f"{c.path}: architecture {c.arch}, the base is {arch}")
        if hf_vocab is not None and c.n_vocab != hf_vocab:
            raise UserError(f"{c.path}: {c.n_vocab} tokens in its vocabulary, the base has {hf_vocab}")
        if c.n_vocab != ref.n_vocab or c.vocab_digest != ref.vocab_digest:
            raise UserError(f"{c.path}: another vocabulary than {ref.path.name}")


def _chunking(n_tokens: int, n_ctx: int, chunks: int | None) -> int:
    if n_tokens < 2 * n_ctx:
        raise UserError(f"the text tokenizes to only {n_tokens} tokens; a context of {n_ctx} needs at least "
                        f"{2 * n_ctx} (as llama-perplexity)", hint="give more text, or a smaller --ctx-size")
    n_max = n_tokens // n_ctx
    n_chunk = n_max if chunks is None or chunks < 0 else min(chunks, n_max)
    if n_chunk * (n_ctx - 1 - n_ctx // 2) < MIN_COUNT:
        raise UserError(f"{n_chunk} chunks of {n_ctx} tokens score only {n_chunk * (n_ctx - 1 - n_ctx // 2)} "
                        f"tokens; llama-perplexity gives no statistics below {MIN_COUNT}",
                        hint="give more text or more --chunks")
    return n_chunk


# -- the base ------------------------------------------------------------------------------------------------


def _targets(tokens: np.ndarray, c: int, n_ctx: int) -> np.ndarray:
    first = n_ctx // 2
    return tokens[c * n_ctx + first + 1:(c + 1) * n_ctx].astype(np.int64)


def _gguf_base(runner, tokens, n_chunk, writer, advance) -> None:
    for c, logits in runner.chunk_logits(tokens, n_chunk):
        writer.add(encode_base(logits, _targets(tokens, c, runner.n_ctx)))
        advance(runner.n_ctx)


def _hf_base(model, device, tokens, n_chunk, n_ctx, bos, writer, advance) -> None:
    import torch
    first = n_ctx // 2
    for c in range(n_chunk):
        ids = torch.tensor(tokens[c * n_ctx:(c + 1) * n_ctx], dtype=torch.long)[None]
        if bos is not None:
            ids[0, 0] = bos
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), use_cache=False).logits[0, first:n_ctx - 1]
        writer.add(encode_base(logits.float().cpu().numpy(), _targets(tokens, c, n_ctx)))
        advance(n_ctx)


def evaluate(base: str, candidates: Sequence, text_file=None, options: EvalOptions | None = None,
             progress: Callable | None = None, **kw) -> EvalResult:
    """KL divergence, top-token agreement and perplexity of each candidate GGUF against `base` (a HF
    checkpoint folder or hub id, or a GGUF; None with options.base_file), with llama-perplexity's
    statistics. Keyword arguments set EvalOptions fields. `progress`: a context-manager factory
    (total, description) -> advance(n), as gguforge.progress.progress_factory gives."""
    o = options or EvalOptions()
    for k, v in kw.items():
        if not hasattr(o, k):
            raise TypeError(f"evaluate() got an unexpected keyword argument {k!r}")
        setattr(o, k, v)
    if not candidates:
        raise UserError("give at least one candidate GGUF")
    if o.ctx_size < 4:
        raise UserError("--ctx-size must be at least 4 tokens")
    if o.base_file and o.save_base:
        raise UserError("--base-file and --save-base cannot be combined")
    if text_file is None:
        raise UserError("give the evaluation text with -f")
    t_start = time.perf_counter()
    infos = [gguf_info(Path(c)) for c in candidates]
    text = read_eval_text(text_file)
    text_sha = hashlib.sha256(text).hexdigest()
    n_ctx = o.ctx_size
    bar = progress or (lambda total, desc: nullcontext(lambda n: None))
    ref = infos[0]

    with ExitStack() as stack:
        base_desc: str
        if o.base_file:
            store_path = Path(o.base_file)
            reader = StoreReader(store_path)
            stack.callback(reader.close)
            h = reader.header
            _check_same_model(None, None, None, infos)
            if h.text_sha256 != text_sha:
                raise UserError(f"{store_path} was computed on another text")
            if h.n_ctx != n_ctx:
                raise UserError(f"{store_path} was computed with --ctx-size {h.n_ctx}, not {n_ctx}")
            if h.n_vocab != ref.n_vocab or h.tokenizer != ref.vocab_digest:
                raise UserError(f"{store_path} was computed with another tokenizer than {ref.path.name}")
            tokens = np.asarray(llama_tokens(ref.path, text), dtype=np.int64)
            n_chunk = _chunking(len(tokens), n_ctx, o.chunks)
            if n_chunk != h.n_chunk or not np.array_equal(tokens[:n_chunk * n_ctx], reader.tokens):
                raise UserError(f"{store_path} holds {h.n_chunk} chunks of other tokens than this text and "
                                f"--chunks give ({n_chunk})")
            base_desc = h.base
            base_seconds = 0.0
        else:
            base_path = Path(base)
            gguf_base = base_path.suffix.lower() == ".gguf" or _starts_with_gguf(base_path)
            if gguf_base:
                binfo = gguf_info(base_path)
                _check_same_model(binfo, None, None, infos)
                if n_ctx > (binfo.n_ctx_train or n_ctx):
                    raise UserError(f"--ctx-size {n_ctx} is above the context of {base_path.name} "
                                    f"({binfo.n_ctx_train})")
                base_desc = f"{base_path.name} ({binfo.type}, llama.cpp)"
            else:
                model, device, tokens, bos, base_desc = _open_hf(base, o, text, infos)
            for c in infos:
                if c.n_ctx_train and n_ctx > c.n_ctx_train:
                    raise UserError(f"--ctx-size {n_ctx} is above the context of {c.path.name} ({c.n_ctx_train})")
            if o.save_base:
                from ..format.atomic import replacing
                from ..format.writer import atomic_outputs
                target = Path(o.save_base)
                if target.exists() and not o.force:
                    raise UserError(f"{target} already exists", hint="pass --force to overwrite it")
                store_path = target
            else:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gguforge-eval-"))
                store_path = Path(tmp) / "base.bin"
            t0 = time.perf_counter()
            if gguf_base:
                runner = stack.enter_context(_runner(base_path, o))
                tokens = np.asarray(runner.tokenize(text), dtype=np.int64)
                n_chunk = _chunking(len(tokens), n_ctx, o.chunks)
            else:
                n_chunk = _chunking(len(tokens), n_ctx, o.chunks)
            header = StoreHeader(text_sha, ref.vocab_digest, n_ctx, n_chunk, ref.n_vocab, base_desc)
            if gguf_base:
                def fill(writer, advance):
                    _gguf_base(runner, tokens, n_chunk, writer, advance)
            else:
                def fill(writer, advance):
                    _hf_base(model, device, tokens, n_chunk, n_ctx, bos, writer, advance)
            if o.save_base:
                with replacing(o.force), atomic_outputs([store_path]) as (f,):
                    _write_base(f, header, tokens, fill, bar)
            else:
                with open(store_path, "wb") as f:
                    _write_base(f, header, tokens, fill, bar)
            if gguf_base:
                runner.close()
            else:
                del model, fill  # one model in memory at a time
            base_seconds = time.perf_counter() - t0
            reader = StoreReader(store_path)
            stack.callback(reader.close)

        # the candidates' own tokenization must give the tokens the base was computed on
        tokens = reader.tokens
        cand_tokens = np.asarray(llama_tokens(ref.path, text), dtype=np.int64)
        if not np.array_equal(cand_tokens[:len(tokens)], tokens):
            first = int(np.flatnonzero(cand_tokens[:len(tokens)] != tokens[:len(cand_tokens)])[:1].sum())
            raise UserError(f"llama.cpp tokenizes the text differently from the base's tokenizer "
                            f"(first difference at token {first})")
        result = EvalResult(base_desc, n_ctx, reader.header.n_chunk, 0, store_path.stat().st_size,
                            llama_file_bytes(ref.n_vocab, n_ctx, reader.header.n_chunk), base_seconds=base_seconds)
        for info in infos:
            sums = KldSums()
            with _runner(info.path, o) as runner, bar(reader.header.n_chunk * n_ctx, f"KLD {info.path.name}") as adv:
                blocks = reader.chunks()
                for c, logits in runner.chunk_logits(tokens, reader.header.n_chunk):
                    sums.add_chunk(logits, _targets(tokens, c, n_ctx), next(blocks))
                    adv(n_ctx)
            stats = summarize(sums)
            result.n_tokens = stats["n_tokens"]
            result.details.append(stats)
            result.candidates.append(candidate_json(info, stats))
    result.seconds = time.perf_counter() - t_start
    return result


def _starts_with_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _write_base(f, header, tokens, fill, bar) -> None:
    writer = StoreWriter(f, header, tokens)
    with bar(header.n_chunk * header.n_ctx, "base") as advance:
        fill(writer, advance)


def _runner(path: Path, o: EvalOptions):
    from .llama import LlamaRunner
    return LlamaRunner(path, o.ctx_size, o.batch_size, o.threads, o.n_gpu_layers)


def _open_hf(base: str, o: EvalOptions, text: bytes, infos: list[GgufInfo]):
    """The HF base: checks, tokens (the checkpoint's tokenizer), the torch model (float32 on the CPU; device
    and dtype chosen as gguforge imatrix does)."""
    from ..archs import lookup
    from ..checkpoint.read import open_checkpoint, resolve_model
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("an HF base needs torch and transformers",
                        hint='pip install "gguforge[verify]" (install torch==2.13.0 first)') from None
    from ..imatrix.compute import load_model, pick_device, pick_dtype, tokenize
    root = resolve_model(base)
    checkpoint = open_checkpoint(root)
    arch_cls = lookup(checkpoint.config)
    hf_vocab = checkpoint.hparams.get("vocab_size")
    _check_same_model(None, arch_cls.gguf_arch, hf_vocab, infos)
    ctx_hf = checkpoint.hparams.get("max_position_embeddings")
    if ctx_hf and o.ctx_size > ctx_hf:
        raise UserError(f"--ctx-size {o.ctx_size} is above the model's context ({ctx_hf})")
    ids, bos = tokenize(root, checkpoint.hparams, text.decode("utf-8"))
    theirs = llama_tokens(infos[0].path, text)
    if list(ids) != list(theirs):
        n = min(len(ids), len(theirs))
        at = next((i for i in range(n) if ids[i] != theirs[i]), n)
        raise UserError(f"the checkpoint's tokenizer and llama.cpp's ({infos[0].path.name}) tokenize the text "
                        f"differently (first difference at token {at})")
    _chunking(len(ids), o.ctx_size, o.chunks)  # enough text, before the model loads
    if o.threads:
        torch.set_num_threads(o.threads)
    device = pick_device(o.device)
    dtype = pick_dtype(o.dtype, device, checkpoint)
    model = load_model(root, device, dtype)
    desc = f"{Path(str(base)).name} (HF, torch {str(dtype).removeprefix('torch.')} on {device.type})"
    return model, device, np.asarray(ids, dtype=np.int64), bos, desc


JSON_FIELDS = ("ppl_q", "ppl_base", "kld_mean", "kld_max", "kld_p99_9", "kld_p99", "kld_p95", "kld_p90",
               "kld_median", "kld_p10", "kld_p5", "kld_p1", "kld_min", "dp_mean", "dp_rms", "same_top_p")


def candidate_json(info: GgufInfo, stats: dict) -> dict:
    """One candidate's JSON object: the issue's field names, ± values as *_err where llama-perplexity
    prints one."""
    out = {"file": str(info.path), "type": info.type, "size_bytes": info.size_bytes, "bpw": info.bpw}
    for k in JSON_FIELDS:
        out[k] = stats.get(k)
        if k + "_err" in stats:
            out[k + "_err"] = stats[k + "_err"]
    return out
