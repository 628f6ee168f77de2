"""Qwen2 / Qwen2.5 dense decoders (also Qwen2.5-Coder, QwQ): q/k/v biases, nothing else new.

Everything else (names, shapes, tied embeddings, rope scaling incl. yarn, metadata) is the generic
decoder's; the loader falls back to token_embd when a tied checkpoint has no lm_head.
"""

from __future__ import annotations

from .api import DecoderArch, MockSizes, MockSpec, register


@register("Qwen2ForCausalLM")
class Qwen2(DecoderArch):
    gguf_arch = "qwen2"
    fusions = frozenset({"qkv"})  # create_tensor_qkv: the loader reads attn_qkv or attn_q/k/v
    mock = MockSpec(("Qwen2Config", "Qwen2ForCausalLM"))

    @property
    def has_qkv_bias(self) -> bool:
        return True  # Qwen2 always has q/k/v biases (its config has no switch for them)

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        return dict(super().mock_config(s), num_hidden_layers=2, use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
