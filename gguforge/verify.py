"""Check a converted GGUF against its Hugging Face source: logits and tokenizer parity.

The HF side runs with transformers in float32, the GGUF side with llama-cpp-python, on the same
token ids. torch / transformers / llama_cpp are imported inside functions only, so importing this
module stays cheap and torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

# Text whose token ids drive the logits comparison: multilingual, emoji, code, whitespace runs and
# chat special tokens, so embeddings of many kinds of tokens are exercised.
DEFAULT_TEXT = (
    "<|im_start|>user\nHello world! I'm testing the converter, aren't I? "
    "我想在apple工作1314151天～ Привет, как дела? ស្វាគមន៍មកកាន់ប្រទេសកម្ពុជា 🦙🚀 👨‍👩‍👧‍👦\n"
    "def main(args):\n    for i in range(10):\n\t\tprint(i * 3.14)   \n\n\n"
    "Numbers: 3 33 333 3333 2024-06-01 0x1F<|im_end|>\n<|im_start|>assistant\n<think>\nok</think>"
)

# Texts whose tokenization must match exactly. All are NFC already: Qwen's HF tokenizer
# normalizes to NFC, llama.cpp does not, so non-NFC input would differ for reasons outside the GGUF.
PARITY_TEXTS = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine; we've SEEN you'D agree. DON'T panic.",
    "我想在apple工作1314151天～ 你好，世界！",
    "Привет, как дела? Всё хорошо. Български език.",
    "ស្វាគមន៍មកកាន់ប្រទេសកម្ពុជា។ ខ្ញុំចង់រៀនភាសាខ្មែរ",  # combining marks: qwen2 vs qwen35 regex
    "café naïve résumé Straße हिन्दी العربية",
    "emoji 🦙🦙 🚀✨ ❤️ 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽",  # incl. ZWJ sequences and variation selectors
    "def f(x):\n    return {'a': [1, 2, 3]}\n\tpass\n",
    "   \n\n\n  \t\t  \n \n  spaces    and\ttabs\t\there\r\n\r\nend   ",
    "3 33 333 3333 33333 3.14159 3..3 3...3 1e-5 0x1F $9.99",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nsimple</think>4<|im_end|>",
    "<|endoftext|>text after eot",
    "",
)


@dataclass
class TokenMismatch:
    text: str
    hf: list[int]
    gguf: list[int]

    @property
    def first_diff(self) -> int:
        n = min(len(self.hf), len(self.gguf))
        return next((i for i in range(n) if self.hf[i] != self.gguf[i]), n)


@dataclass
class VerifyReport:
    hf_dir: str
    gguf_path: str
    n_tokens: int = 0
    n_vocab: int = 0  # columns compared
    hf_vocab: int = 0
    gguf_vocab: int = 0
    nmse: float = float("nan")
    nmse_db: float = float("nan")
    top1_agreement: float = float("nan")
    max_abs_diff: float = float("nan")
    texts_checked: int = 0
    token_mismatches: list[TokenMismatch] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def tokenizer_ok(self) -> bool:
        return not self.token_mismatches

    def ok(self, max_nmse: float = 1e-4) -> bool:
        """NMSE within bound and identical tokenization (the usual pass criterion)."""
        return self.nmse <= max_nmse and self.tokenizer_ok

    def format(self) -> str:
        lines = [
            f"verify {self.gguf_path}",
            f"  against {self.hf_dir}",
            f"  logits   : {self.n_tokens} tokens x {self.n_vocab} vocab"
            + (f" (HF {self.hf_vocab}, GGUF {self.gguf_vocab})" if self.hf_vocab != self.gguf_vocab else ""),
            f"  NMSE     : {self.nmse:.3e} ({self.nmse_db:.1f} dB)",
            f"  top-1    : {100 * self.top1_agreement:.1f}% agreement",
            f"  max |Δ|  : {self.max_abs_diff:.3e}",
            f"  tokenizer: {self.texts_checked - len(self.token_mismatches)}/{self.texts_checked} texts identical",
        ]
        for m in self.token_mismatches:
            i = m.first_diff
            lines.append(f"    MISMATCH {m.text[:40]!r}: at #{i} HF {m.hf[i:i + 6]} vs GGUF {m.gguf[i:i + 6]}"
                         f" (lengths {len(m.hf)}/{len(m.gguf)})")
        lines += [f"  warning  : {w}" for w in self.warnings]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Pure pieces (numpy only)
# ------------------------------------------------------------------------------------------------


def compare_logits(gguf, hf) -> dict:
    """Metrics of `gguf` against the reference `hf` ([tokens, vocab] arrays, same vocab width).

    NMSE = Σ(a−b)² / Σb² with b the reference; dB = 10·log10(NMSE).
    """
    import numpy as np

    a = np.asarray(gguf, dtype=np.float64)
    b = np.asarray(hf, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
    err = float(np.sum((a - b) ** 2))
    ref = float(np.sum(b ** 2))
    nmse = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
    return {
        "nmse": nmse,
        "nmse_db": 10 * math.log10(nmse) if nmse > 0 else -math.inf,
        "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))) if a.size else float("nan"),
        "max_abs_diff": float(np.max(np.abs(a - b))) if a.size else 0.0,
    }


def compare_tokenizations(texts: Sequence[str], hf_encode: Callable[[str], list[int]],
                          gguf_encode: Callable[[str], list[int]]) -> list[TokenMismatch]:
    """Texts whose two tokenizations differ."""
    out = []
    for t in texts:
        h, g = list(hf_encode(t)), list(gguf_encode(t))
        if h != g:
            out.append(TokenMismatch(t, h, g))
    return out


# ------------------------------------------------------------------------------------------------
# Model runners
# ------------------------------------------------------------------------------------------------


def load_hf(hf_dir):
    """(model, tokenizer, warnings): transformers model in float32, the text model for VL checkpoints."""
    import torch
    import transformers as T

    warnings = []
    try:  # for Qwen3.5 ConditionalGeneration configs this maps to the text-only CausalLM class
        model, info = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    except ValueError:
        try:
            model, info = T.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32,
                                                                        output_loading_info=True)
        except ValueError:  # Qwen3-Omni, Qwen3-ASR: the text model is the thinker / language model
            model, info = T.AutoModelForMultimodalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                                     output_loading_info=True)
            model = getattr(model, "thinker", model)
    missing = [k for k in info.get("missing_keys", ()) if "visual" not in k and "audio" not in k]
    if missing:
        warnings.append(f"HF model initialised {len(missing)} missing tensors at random, e.g. {missing[:3]}")
    model.eval()
    tok = T.AutoTokenizer.from_pretrained(hf_dir)
    return model, tok, warnings


def hf_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long))
    return out.logits[0].float().numpy()


def load_gguf(gguf_path, n_ctx: int):
    from llama_cpp import GGML_TYPE_F32, Llama

    # F32 KV cache: llama.cpp's default F16 cache alone costs ~1e-8 NMSE and would mask small errors.
    return Llama(model_path=str(gguf_path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)


def gguf_logits(llm, ids: list[int]):
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def verify(hf_dir, gguf_path, *, texts: Sequence[str] | None = None, max_tokens: int = 64) -> VerifyReport:
    """Compare logits of the HF model and the GGUF on the same ids, and tokenizer parity on `texts`."""
    report = VerifyReport(str(hf_dir), str(gguf_path))
    if not Path(gguf_path).is_file():
        raise FileNotFoundError(gguf_path)
    model, tok, report.warnings = load_hf(hf_dir)
    ids = tok.encode(DEFAULT_TEXT, add_special_tokens=False)[:max_tokens]
    llm = load_gguf(gguf_path, n_ctx=max(64, len(ids) + 16))

    texts = PARITY_TEXTS if texts is None else tuple(texts)
    report.texts_checked = len(texts)
    report.token_mismatches = compare_tokenizations(
        texts,
        lambda t: tok.encode(t, add_special_tokens=False),
        lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) if t else [],
    )

    a, b = gguf_logits(llm, ids), hf_logits(model, ids)
    report.hf_vocab, report.gguf_vocab = b.shape[-1], a.shape[-1]
    if report.hf_vocab != report.gguf_vocab:
        report.warnings.append(f"vocab widths differ (HF {report.hf_vocab}, GGUF {report.gguf_vocab}); "
                               "comparing the common prefix")
    n = min(report.hf_vocab, report.gguf_vocab)
    report.n_tokens, report.n_vocab = len(ids), n
    for k, v in compare_logits(a[:, :n], b[:, :n]).items():
        setattr(report, k, v)
    llm.close() if hasattr(llm, "close") else None
    return report
