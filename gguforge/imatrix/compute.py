"""`gguforge imatrix`: an importance matrix computed from the Hugging Face checkpoint itself.

It writes what llama-imatrix writes for the *converted* model (llama.cpp tools/imatrix/imatrix.cpp),
without converting first:

- Names and column order come from the conversion itself. The checkpoint is planned with the
  architecture's own rules (convert.plan.map_tensors) over *probe* tensors whose values encode
  (source tensor, element index). Reading row 0 of each planned GGUF weight then says which checkpoint
  tensor feeds it and which input column each GGUF column is (fused q/k/v, split qkvz, gate/up halves of
  packed experts, stacked per-expert tensors, Qwen3.5's TiledVHeads reorder of ssm_out's columns ...),
  with no per-architecture table here.
- What is recorded follows IMatrixCollector::collect_imatrix: every routed-expert matmul (MUL_MAT_ID:
  per expert sums of x^2 and token counts); a dense matmul (MUL_MAT) only for weights named blk.*
  (output.weight with --process-output) and only when its activation has >= 16 rows in ne[1]. That
  depends on how llama.cpp splits each batch into ubatches, which is emulated (ubatch_lengths).
  token_embd (GET_ROWS) and ssm_conv1d (SSM_CONV) are never matmuls; MTP blocks never run.
- Chunking follows compute_imatrix: the whole text tokenized once (BOS first when the vocabulary adds
  one), n_ctx-token chunks, the first token of every chunk replaced by BOS when the vocabulary adds one,
  at least 2 chunks of text required, --chunks caps the count; chunk_count is the largest count over
  chunk_size, as m_last_chunk.

Sums: float32 within one chunk, float64 across chunks (llama-imatrix accumulates everything in float32),
written as float32.
torch / transformers are imported inside functions only.
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Callable

import numpy as np

from ..archs import lookup
from ..archs.options import ConvertOptions
from ..checkpoint.read import Checkpoint, open_checkpoint, resolve_model
from ..convert.plan import map_tensors
from ..convert.validate import validate_checkpoint
from ..convert.vocab import load_vocab_of
from ..errors import UserError
from ..format.imatrix import Imatrix, ImatrixEntry

# llama-imatrix's defaults (common/common.h n_batch, n_ubatch; imatrix.cpp n_ctx 512)
DEFAULT_CHUNK = 512
DEFAULT_BATCH = 2048
DEFAULT_UBATCH = 512
MIN_ROWS = 16  # collect_imatrix: a MUL_MAT with src1->ne[1] < 16 is not collected

# GGUF weights llama.cpp never runs as a matmul (ggml_ssm_conv), whatever the checkpoint module is.
NOT_MATMUL = ("ssm_conv1d.weight",)
# GGUF weights whose activation llama.cpp reshapes to [ne0, n_seq_tokens, n_seqs] before the matmul,
# so the 16-row rule counts tokens per sequence in the ubatch (src/models/qwen35.cpp, qwen3next.cpp:
# ssm_out reads the 3-D final_output).
PER_SEQUENCE_ROWS = ("ssm_out.weight",)

# HF expert modules (transformers' *Experts: packed gate_up_proj [E, 2F, H] and down_proj [E, H, F]) and
# the checkpoint names that feed them: packed, or one tensor per expert.
EXPERT_SOURCE = re.compile(r"^(?P<prefix>.*\.experts)\.(?:\d+\.)?(?P<kind>gate_up|gate|up|down)_proj(?:\.weight)?$")

TAG = 2 ** 36  # probe value = source index * TAG + element index (exact in float64 below 2**53)


@dataclass
class ImatrixOptions:
    chunk_size: int = DEFAULT_CHUNK
    chunks: int | None = None  # None: all whole chunks of the text
    process_output: bool = False
    device: str = "auto"  # cpu, cuda or auto
    threads: int | None = None
    batch_size: int = DEFAULT_BATCH
    ubatch_size: int = DEFAULT_UBATCH
    dataset: str | None = None  # the name stored in imatrix.datasets (default: the text file as given)
    dtype: str = "auto"  # torch dtype the model runs in (pick_dtype); activations are squared in float32
    convert: ConvertOptions = field(default_factory=ConvertOptions)


@dataclass(frozen=True)
class Target:
    """One GGUF weight llama.cpp multiplies with: where its activations come from in the HF model."""

    gguf: str
    key: str  # HF activation key: a linear weight's name, or "<experts prefix>:gate_up" / ":down"
    columns: np.ndarray  # GGUF input column j reads HF input column columns[j]
    n_expert: int  # 0 for a dense weight
    per_sequence: bool  # the 16-row rule counts tokens per sequence (3-D activation)


# -- names and column order, from the conversion rules ------------------------------------------------


class _Probe:
    """A checkpoint tensor stand-in whose values are TAG * index + flat element position."""

    def __init__(self, name: str, shape, index: int):
        self.name, self.shape, self.dtype = name, tuple(int(d) for d in shape), "F64"
        self.compute_dtype = np.dtype(np.float64)
        self._base = float(index) * TAG
        self._row = prod(self.shape[1:])

    def rows(self, start: int, stop: int, buffer=None) -> np.ndarray:
        flat = self._base + np.arange(start * self._row, stop * self._row, dtype=np.float64)
        return flat.reshape((stop - start,) + self.shape[1:])

    raw_rows = rows


def activation_key(name: str) -> str:
    """The HF activation a checkpoint weight multiplies (after the architecture's rename())."""
    if m := EXPERT_SOURCE.match(name):
        return f"{m['prefix']}:{'down' if m['kind'] == 'down' else 'gate_up'}"
    return name


def plan_targets(checkpoint: Checkpoint, convert: ConvertOptions, process_output: bool):
    """(architecture, [Target]) for every GGUF weight of the converted model that llama.cpp runs as a
    matmul llama-imatrix records."""
    arch = lookup(checkpoint.config)(checkpoint.hparams, convert, list(checkpoint.tensors))
    validate_checkpoint(checkpoint, arch)
    names = list(checkpoint.tensors)
    if len(names) >= 2 ** 53 // TAG:
        raise UserError(f"the checkpoint has {len(names)} tensors; gguforge imatrix handles at most {2 ** 53 // TAG}")
    probes = {}
    for i, name in enumerate(names):
        shape = checkpoint.tensors[name].shape
        if prod(shape) >= TAG:
            raise UserError(f"tensor {name} has {prod(shape)} elements; gguforge imatrix handles at most {TAG}")
        probes[name] = _Probe(name, shape, i)
    mapped = map_tensors(Checkpoint(checkpoint.root, checkpoint.config, probes), arch)
    targets = []
    for gguf_name, lazy in mapped:
        if lazy.ndim < 2 or not gguf_name.endswith(".weight") or gguf_name.endswith(NOT_MATMUL):
            continue
        if not (gguf_name.startswith("blk.") or (process_output and gguf_name == "output.weight")):
            continue
        row = np.asarray(lazy.rows(0, 1), dtype=np.float64).reshape(-1, lazy.shape[-1])[0]
        tags = np.floor(row / TAG).astype(np.int64)
        if tags.min() != tags.max():
            raise UserError(f"{gguf_name}: its input columns come from several checkpoint tensors "
                            f"({names[tags.min()]}, {names[tags.max()]}); gguforge imatrix cannot map it")
        source = names[int(tags[0])]
        coords = np.unravel_index((row - tags * float(TAG)).astype(np.int64), probes[source].shape)
        varying = [a for a, c in enumerate(coords) if c.min() != c.max()]
        if len(varying) > 1:
            raise UserError(f"{gguf_name}: its input columns mix axes of {source}; gguforge imatrix cannot map it")
        columns = np.asarray(coords[varying[0] if varying else -1], dtype=np.int64)
        renamed = arch.rename(source) or source
        key = activation_key(renamed)
        if gguf_name == "output.weight" and key.endswith("embed_tokens.weight"):
            key = "lm_head.weight"  # the tied head: HF's lm_head multiplies with the embedding
        targets.append(Target(gguf_name, key, columns, lazy.shape[0] if lazy.ndim == 3 else 0,
                              gguf_name.endswith(PER_SEQUENCE_ROWS)))
    return arch, targets


# -- chunking, as compute_imatrix and llama.cpp's batch splitting do it ------------------------------------


def ubatch_lengths(n_ctx: int, n_seqs: int, n_batch: int, n_ubatch: int) -> np.ndarray:
    """Per position of a chunk: how many tokens of its sequence share its ubatch.

    compute_imatrix decodes n_seqs chunks side by side (one sequence each) when n_ctx <= n_batch, else
    one chunk in n_batch-token batches. llama.cpp then splits each batch into ubatches: split_equal
    (llama-batch.cpp) takes the same number of tokens from every sequence, as many as fit n_ubatch
    (at least one); with one sequence that is split_simple's n_ubatch consecutive tokens."""
    per = np.empty(n_ctx, dtype=np.int64)
    step = n_batch if n_ctx > n_batch else n_ctx
    take = max(1, n_ubatch // n_seqs)
    for b0 in range(0, n_ctx, step):
        b1 = min(n_ctx, b0 + step)
        for u0 in range(b0, b1, take):
            u1 = min(b1, u0 + take)
            per[u0:u1] = u1 - u0
    return per


@dataclass
class Chunking:
    n_ctx: int
    n_chunk: int
    n_seq: int  # chunks decoded together (llama-imatrix: n_parallel)
    n_batch: int
    n_ubatch: int

    @classmethod
    def of(cls, n_tokens: int, o: ImatrixOptions) -> "Chunking":
        n_ctx = o.chunk_size
        if n_tokens < 2 * n_ctx:
            raise UserError(f"the calibration text tokenizes to only {n_tokens} tokens; a context of {n_ctx} "
                            f"tokens needs at least {2 * n_ctx} (as llama-imatrix)",
                            hint="give more text, or a smaller -c")
        n_max = n_tokens // n_ctx
        n_chunk = n_max if o.chunks is None or o.chunks < 0 else min(o.chunks, n_max)
        n_seq = max(1, o.batch_size // n_ctx)
        n_batch = min(o.batch_size, n_seq * n_ctx)
        if not (n_batch < n_ctx or n_batch % n_ctx == 0):
            raise UserError(f"batch size {o.batch_size} must be below -c {n_ctx} or a multiple of it (llama-imatrix)")
        return cls(n_ctx, n_chunk, n_seq, n_batch, o.ubatch_size)

    def groups(self):
        """(first chunk, chunks decoded together)."""
        for i in range(0, self.n_chunk, self.n_seq):
            yield i, min(self.n_seq, self.n_chunk - i)

    def masks(self, n_seqs: int):
        """(dense mask, per-sequence mask): positions whose matmuls llama-imatrix records."""
        per = ubatch_lengths(self.n_ctx, n_seqs, self.n_batch, self.n_ubatch)
        return per * n_seqs >= MIN_ROWS, per >= MIN_ROWS


# -- tokens -------------------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        from ..errors import not_a_file
        raise not_a_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def tokenize(root: Path, hparams: dict, text: str, pre_tokenizer: str | None = None,
             kind: str = "bpe") -> tuple[list[int], int | None]:
    """(tokens, BOS id or None): the text as llama.cpp's common_tokenize(add_special=true,
    parse_special=false) gives it for the converted vocabulary, through the HF tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()  # the whole text is longer than the model's context
    vocab = load_vocab_of(kind, root, hparams, pre_tokenizer)
    add_bos = bool(vocab.add_flags.get("bos", vocab.model == "llama"))  # llama.cpp's default: SPM adds BOS
    bos = vocab.special_ids.get("bos") if add_bos else None
    if add_bos and bos is None:
        raise UserError("the tokenizer adds a BOS token but names none (tokenizer_config.json bos_token)")
    tok = AutoTokenizer.from_pretrained(str(root))
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ([bos] if add_bos else []) + list(ids), bos


# -- collection ---------------------------------------------------------------------------------------------


class Collector:
    """Per HF activation key: float64 sums of x^2 per input column and token counts."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.sums: dict[str, object] = {}
        self.counts: dict[str, object] = {}
        self.mask = None  # per position, set per chunk
        self.seq_mask = None
        self.per_sequence: set[str] = set()
        self._last = None  # (activation tensor, mask, (rows counted, sums)) of the last dense call

    def dense(self, key: str, x) -> None:
        torch = self.torch
        mask = self.seq_mask if key in self.per_sequence else self.mask
        # q/k/v (and gate/up) read the same activation: square and sum it once
        if self._last is not None and self._last[0] is x and self._last[1] is mask:  # held: never a reused buffer
            n, sq = self._last[2]
        else:
            seen = x
            x = x.detach().reshape(-1, x.shape[-1])
            if x.shape[0] != mask.shape[0]:
                raise RuntimeError(f"{key}: {x.shape[0]} activation rows for a {mask.shape[0]}-token chunk")
            n = int(mask.sum())
            x = x[mask] if 0 < n < mask.shape[0] else x
            sq = x.float().square().sum(0) if n else None  # float32 over one chunk, float64 across chunks
            self._last = (seen, mask, (n, sq))
        if n == 0:
            return
        if key not in self.sums:
            self.sums[key] = torch.zeros(sq.shape, dtype=torch.float64, device=sq.device)
            self.counts[key] = 0
        self.sums[key] += sq
        self.counts[key] += n

    def _expert_slots(self, key: str, n_expert: int, width: int, device):
        torch = self.torch
        if key not in self.sums:
            self.sums[key] = torch.zeros(n_expert, width, dtype=torch.float64, device=device)
            self.counts[key] = torch.zeros(n_expert, dtype=torch.float64, device=device)
        return self.sums[key], self.counts[key]

    def routed(self, key: str, routing, x) -> None:
        """routing: [tokens, n_expert] 0/1 (token t went to expert e); x: [tokens, width] the shared input."""
        sums, counts = self._expert_slots(key, routing.shape[1], x.shape[-1], x.device)
        sums += (routing.T @ x.float().square()).to(sums.dtype)
        counts += routing.sum(0).to(counts.dtype)

    def expert(self, key: str, n_expert: int, e: int, rows) -> None:
        """rows: the inputs of expert e (one per routed token)."""
        sums, counts = self._expert_slots(key, n_expert, rows.shape[-1], rows.device)
        sums[e] += rows.float().square().sum(0).to(sums.dtype)
        counts[e] += rows.shape[0]

    def check_finite(self) -> None:
        for key, s in self.sums.items():
            if not bool(self.torch.isfinite(s).all()):
                raise UserError(f"non-finite activations at {key} (as llama-imatrix, the run stops)",
                                hint="the checkpoint or its dtype overflows; try --dtype float32")


def _linear_input(args, kwargs):
    if args:
        return args[0]
    for name in ("input", "hidden_states", "x"):
        if name in kwargs:
            return kwargs[name]
    raise RuntimeError("a hooked module was called without an input tensor")


def _experts_forward(module, key: str, collector: Collector):
    """A forward for transformers' packed experts modules that computes what their eager loop computes
    and records each expert's two matmul inputs (MUL_MAT_ID: every routed token, no 16-row rule)."""
    import torch
    import torch.nn.functional as F

    gate_up, down, act = module.gate_up_proj, module.down_proj, module.act_fn
    n_expert = gate_up.shape[0]

    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        n_tok, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        routing = torch.zeros(n_tok, n_expert, dtype=torch.float32, device=flat.device)
        routing.scatter_(1, top_k_index, 1.0)
        collector.routed(f"{key}:gate_up", routing, hidden_states)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        ends = torch.cumsum(torch.bincount(flat, minlength=n_expert), 0).tolist()
        weight = top_k_weights.reshape(-1)
        start = 0
        for e, end in enumerate(ends):
            if end == start:
                continue
            pick = order[start:end]
            start = end
            tokens = pick // k
            gate, up = F.linear(hidden_states[tokens], gate_up[e]).chunk(2, dim=-1)
            inner = act(gate) * up
            collector.expert(f"{key}:down", n_expert, e, inner)
            y = F.linear(inner, down[e]) * weight[pick, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    return forward


def install_hooks(model, arch, keys: set[str], collector: Collector) -> set[str]:
    """Hooks on every module whose weight is one of `keys`; returns the keys that got one."""
    hooked: set[str] = set()
    for mod_name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if {"gate_up_proj", "down_proj"} <= params.keys() and params["gate_up_proj"].ndim == 3:
            prefix = arch.rename(f"{mod_name}.gate_up_proj") or ""
            key = prefix.removesuffix(".gate_up_proj")
            if {f"{key}:gate_up", f"{key}:down"} & keys:
                if getattr(module, "has_bias", False) or not hasattr(module, "act_fn") or \
                        set(params) != {"gate_up_proj", "down_proj"}:
                    raise UserError(f"{mod_name}: an experts module gguforge imatrix does not know "
                                    f"({type(module).__name__})")
                module.forward = _experts_forward(module, key, collector)
                hooked |= {f"{key}:gate_up", f"{key}:down"}
            continue
        w = params.get("weight")
        if w is None or w.ndim != 2 or type(module).__name__ == "Embedding":
            continue
        key = arch.rename(f"{mod_name}.weight")
        if key is None or key not in keys:
            continue

        def hook(mod, args, kwargs, key=key):
            collector.dense(key, _linear_input(args, kwargs))

        module.register_forward_pre_hook(hook, with_kwargs=True)
        hooked.add(key)
    return hooked


# -- the model ----------------------------------------------------------------------------------------------


def pick_device(device: str):
    import torch
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be cpu, cuda or auto, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to torch", hint="use --device cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_dtype(dtype: str, device, checkpoint: Checkpoint):
    """auto: float32 on the CPU (as llama-imatrix on an f32 GGUF); on a GPU the checkpoint's own 16-bit
    type, so a model that fits in bf16 is not refused for lack of memory at float32."""
    import torch
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        stored = next((t.dtype for t in checkpoint.tensors.values() if len(t.shape) >= 2), "F32")
        return {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)
    return getattr(torch, dtype)


def load_model(root: Path, device, dtype=None):
    """The transformers model (float32 unless told otherwise; the text model of a vision checkpoint),
    in eval mode, on `device`."""
    import torch
    import transformers as T

    T.utils.logging.set_verbosity_error()  # no loading bars or length warnings: the command has its own
    T.utils.logging.disable_progress_bar()
    dtype = dtype or torch.float32
    try:
        model = T.AutoModelForCausalLM.from_pretrained(str(root), dtype=dtype)
    except ValueError:
        model = T.AutoModelForImageTextToText.from_pretrained(str(root), dtype=dtype)
    return model.to(device).eval()


@dataclass
class ImatrixRun:
    imatrix: Imatrix
    targets: list[Target]
    n_tokens: int
    seconds: float
    missing: list[str]  # GGUF weights of the trunk that no hooked module fed (should be empty)


def compute_imatrix(model: str, text_file, options: ImatrixOptions | None = None,
                    progress: Callable | None = None) -> ImatrixRun:
    """Run the checkpoint over the text; the importance matrix llama-imatrix writes for its conversion.

    `progress`, if given, is a context-manager factory (total tokens, description) -> advance(tokens)."""
    o = options or ImatrixOptions()
    if o.chunk_size <= 0:
        raise UserError("-c must be a positive number of tokens")
    if o.batch_size <= 0 or o.ubatch_size <= 0:
        raise UserError("batch sizes must be positive")
    root = resolve_model(model)
    checkpoint = open_checkpoint(root, allow_pickle=o.convert.allow_pickle)
    arch, targets = plan_targets(checkpoint, o.convert, o.process_output)
    text = read_text(Path(text_file))
    try:
        import torch
    except ImportError:
        raise UserError("gguforge imatrix needs torch and transformers",
                        hint='pip install "gguforge[verify]" (install torch==2.13.0 first)') from None
    tokens, bos = tokenize(root, checkpoint.hparams, text, o.convert.pre_tokenizer, arch.vocab)
    chunking = Chunking.of(len(tokens), o)
    if o.threads:
        torch.set_num_threads(o.threads)
    device = pick_device(o.device)
    model_ = load_model(root, device, pick_dtype(o.dtype, device, checkpoint))
    collector = Collector(torch, device)
    keys = {t.key for t in targets}
    collector.per_sequence = {t.key for t in targets if t.per_sequence}
    hooked = install_hooks(model_, arch, keys, collector)
    # Skip the vocabulary projection unless its input is wanted: the decoder's last hidden state suffices.
    run = model_ if o.process_output or not hasattr(model_, "model") else model_.model

    start = time.perf_counter()
    n = chunking.n_ctx
    total = chunking.n_chunk * n
    with (progress(total, "imatrix") if progress else nullcontext(lambda n: None)) as advance:
        for first, n_seqs in chunking.groups():
            dense_mask, seq_mask = chunking.masks(n_seqs)
            # The group's chunks side by side, as llama-imatrix decodes them (n_batch tokens at most);
            # one at a time when the vocabulary projection's [tokens, vocab] logits are computed too.
            step = 1 if o.process_output else n_seqs
            for c0 in range(first, first + n_seqs, step):
                rows = min(step, first + n_seqs - c0)
                ids = torch.tensor(tokens[c0 * n:(c0 + rows) * n], dtype=torch.long).reshape(rows, n)
                if bos is not None:
                    ids[:, 0] = bos
                collector.mask = torch.as_tensor(np.tile(dense_mask, rows), device=device)
                collector.seq_mask = torch.as_tensor(np.tile(seq_mask, rows), device=device)
                collector._last = None
                with torch.no_grad():
                    run(input_ids=ids.to(device), use_cache=False)
                advance(rows * n)
            collector.check_finite()
    seconds = time.perf_counter() - start

    entries: dict[str, ImatrixEntry] = {}
    missing = []
    for t in targets:
        if t.key not in hooked:
            if _block(t.gguf) < arch.n_layers:  # MTP blocks never run, in llama-imatrix either
                missing.append(t.gguf)
            continue
        if t.key not in collector.sums:
            continue  # never called with enough rows: llama-imatrix has no entry either
        sums = collector.sums[t.key].cpu().numpy()
        counts = collector.counts[t.key]
        if t.n_expert:
            if sums.shape[0] != t.n_expert:
                raise UserError(f"{t.gguf}: {t.n_expert} experts in the GGUF, {sums.shape[0]} in the model")
            entries[t.gguf] = ImatrixEntry(sums[:, t.columns].astype(np.float32),
                                           counts.cpu().numpy().astype(np.float32))
        else:
            entries[t.gguf] = ImatrixEntry(sums[t.columns][None, :].astype(np.float32),
                                           np.array([counts], dtype=np.float32))
    if not entries:
        raise UserError("no matmul of the model was recorded", hint="is -c at least 16 tokens?")
    dataset = o.dataset if o.dataset is not None else str(text_file)
    im = Imatrix(entries, [dataset], chunking.n_chunk, n)  # llama-imatrix's m_last_chunk: chunks processed
    return ImatrixRun(im, targets, total, seconds, missing)


def _block(gguf_name: str) -> int:
    parts = gguf_name.split(".")
    return int(parts[1]) if parts[0] == "blk" and parts[1].isascii() and parts[1].isdigit() else -1
