"""GGUF models run in llama.cpp (llama-cpp-python's low-level API), batched as llama-perplexity does.

perplexity.cpp (`perplexity`, `kl_divergence`, `main`) builds its context with n_seq = n_batch / n_ctx
sequences of n_ctx tokens each (n_parallel), decodes that many chunks in one batch with the first
token of each chunk replaced by BOS when the vocabulary adds one, and asks for logits from position
n_ctx/2 on. Doing the same here gives the same logits; the text is tokenized with common_tokenize's
settings (add_special = true, parse_special = false). llama_cpp is imported inside functions only.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..errors import UserError

_SILENCED = []


def _silence(llama_cpp) -> None:
    """llama.cpp logs every tensor on load: silence it once per process."""
    if _SILENCED:
        return

    @llama_cpp.llama_log_callback
    def ignore(level, text, data):
        pass

    llama_cpp.llama_log_set(ignore, ctypes.c_void_p(0))
    _SILENCED.append(ignore)  # keep the callback alive


def _meta(llama_cpp, model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


class LlamaRunner:
    """One GGUF loaded with a context of n_seq sequences of n_ctx tokens (llama-perplexity's)."""

    def __init__(self, path: Path, n_ctx: int, n_batch: int = 2048, threads: int | None = None,
                 n_gpu_layers: int = 0):
        import llama_cpp
        _silence(llama_cpp)
        llama_cpp.llama_backend_init()
        self._lib = llama_cpp
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.n_seq = max(1, n_batch // n_ctx)
        self.n_batch = min(n_batch, self.n_seq * n_ctx)
        if not (self.n_batch < n_ctx or self.n_batch % n_ctx == 0):
            raise UserError(f"batch size {n_batch} must be below --ctx-size {n_ctx} or a multiple of it "
                            "(as llama-perplexity)")
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise UserError(f"{self.path}: llama.cpp cannot load this model")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        self.arch = _meta(llama_cpp, self.model, "general.architecture")
        if llama_cpp.llama_vocab_get_add_eos(self.vocab):
            self.close()
            raise UserError(f"{self.path}: the vocabulary appends EOS, which llama-perplexity refuses")
        if n_ctx > self.n_ctx_train:
            self.close()
            raise UserError(f"--ctx-size {n_ctx} is above the context of {self.path.name} ({self.n_ctx_train})")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = self.n_seq * n_ctx
        cp.n_seq_max = self.n_seq
        cp.n_batch = self.n_batch
        cp.n_ubatch = 512  # common_params' default
        if threads:
            cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        cp.kv_unified = False
        cp.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise UserError(f"{self.path}: llama.cpp cannot create a context of {cp.n_ctx} tokens")
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def tokenize(self, text: bytes) -> list[int]:
        """common_tokenize(ctx, text, add_special=true, parse_special=false)."""
        lib = self._lib
        n_max = len(text) + 2
        buf = (lib.llama_token * n_max)()
        n = lib.llama_tokenize(self.vocab, text, len(text), buf, n_max, True, False)
        if n < 0:
            buf = (lib.llama_token * -n)()
            n = lib.llama_tokenize(self.vocab, text, len(text), buf, -n, True, False)
        return list(buf[:n])

    def chunk_logits(self, tokens: np.ndarray, n_chunk: int):
        """Yield (chunk index, logits [n_ctx - 1 - n_ctx/2, n_vocab] float32) for every chunk, decoded
        n_seq at a time as llama-perplexity does: the logits of positions n_ctx/2 .. n_ctx - 2, which
        predict tokens n_ctx/2 + 1 .. n_ctx - 1 of the chunk (copied out of llama.cpp's buffer one chunk
        at a time)."""
        lib, n_ctx, batch = self._lib, self.n_ctx, self._batch
        first = n_ctx // 2
        n_score = n_ctx - 1 - first
        num_batches = (n_ctx + self.n_batch - 1) // self.n_batch
        for i in range(0, n_chunk, self.n_seq):
            n_seq_batch = min(self.n_seq, n_chunk - i)
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
            kept = [[] for _ in range(n_seq_batch)]
            for j in range(num_batches):
                batch_start = j * self.n_batch
                size = min(n_ctx - batch_start, self.n_batch)
                n = 0
                n_out = 0
                for seq in range(n_seq_batch):
                    base = (i + seq) * n_ctx + batch_start
                    for k in range(size):
                        pos = batch_start + k
                        tok = int(tokens[base + k])
                        if self.add_bos and pos == 0:
                            tok = self.bos
                        batch.token[n] = tok
                        batch.pos[n] = pos
                        batch.n_seq_id[n] = 1
                        batch.seq_id[n][0] = seq
                        want = pos >= first
                        batch.logits[n] = want
                        n_out += want
                        n += 1
                batch.n_tokens = n
                if lib.llama_decode(self.ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed on {self.path.name}")
                if n_out:
                    ptr = lib.llama_get_logits(self.ctx)
                    out = np.ctypeslib.as_array(ptr, shape=(n_out * self.n_vocab,)).reshape(n_out, self.n_vocab)
                    if num_batches == 1:  # one decode per group: views of llama.cpp's buffer
                        kept = [out[seq * (n_ctx - first):(seq + 1) * (n_ctx - first)] for seq in range(n_seq_batch)]
                    else:  # one chunk in several decodes (n_batch < n_ctx): its rows gathered
                        kept[0].append(np.array(out, dtype=np.float32))
            for seq in range(n_seq_batch):
                rows = np.array(kept[seq][:n_score]) if num_batches == 1 else np.concatenate(kept[seq])[:n_score]
                yield i + seq, rows  # one chunk copied at a time

    def close(self) -> None:
        lib = self._lib
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
