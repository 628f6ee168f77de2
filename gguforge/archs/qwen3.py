"""Qwen3 dense decoders: q/k RMS norms per head and a head_dim that need not be hidden/heads."""

from __future__ import annotations

from typing import Iterator

from .api import MockSizes, MockSpec, Rule, register
from .qwen2 import Qwen2


@register("Qwen3ForCausalLM")
class Qwen3(Qwen2):
    gguf_arch = "qwen3"
    mock = MockSpec(("Qwen3Config", "Qwen3ForCausalLM"))

    @property
    def has_qkv_bias(self) -> bool:
        return bool(self.hparams.get("attention_bias"))

    def attention_rules(self, layer: int) -> Iterator[Rule]:
        for rule in super().attention_rules(layer):
            if rule.hf in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
                rule = Rule(rule.hf, rule.gguf, rule.shape)  # required (optional in the generic decoder)
            yield rule

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        # head_dim 2x hidden/heads, as Qwen3's own configs (e.g. 0.6B: 1024 hidden, 16 heads, head_dim 128)
        return dict(super().mock_config(s), head_dim=2 * s.hidden // 4, attention_bias=False)
