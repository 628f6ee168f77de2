"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B): Qwen2-MoE's routed experts
(per expert or packed) without a shared expert, on Qwen3's attention (required q/k norms, own head_dim).

llama.cpp's qwen3moe loader has experts in every layer, so a config with dense layers
(mlp_only_layers, decoder_sparse_step > 1) is refused rather than written unloadable.
"""

from __future__ import annotations

from typing import Iterator

from .api import MockSizes, MockSpec, Rule, UserError, register
from .qwen2moe import Qwen2Moe
from .qwen3 import Qwen3


@register("Qwen3MoeForCausalLM")
class Qwen3Moe(Qwen2Moe, Qwen3):
    gguf_arch = "qwen3moe"
    output_required = False  # the loader falls back to token_embd for a tied checkpoint
    mock = MockSpec(("Qwen3MoeConfig", "Qwen3MoeForCausalLM"))

    def mlp_rules(self, layer: int) -> Iterator[Rule]:
        if not self.is_moe_layer(layer):
            raise UserError(f"config.json: layer {layer} is a dense MLP layer (mlp_only_layers / "
                            "decoder_sparse_step), which llama.cpp's qwen3moe loader cannot load")
        yield from super().mlp_rules(layer)

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        cfg = dict(super().mock_config(s), norm_topk_prob=True, num_hidden_layers=2)
        for key in ("qkv_bias", "use_sliding_window", "shared_expert_intermediate_size", "intermediate_size"):
            cfg.pop(key, None)
        return cfg
