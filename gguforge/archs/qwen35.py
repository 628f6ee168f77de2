"""Qwen3.5 dense and MoE: Qwen3-Next's hybrid layers with split projections and tiled V heads.

Differences from Qwen3-Next:
- the Gated DeltaNet input projections come split (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a);
- every tensor indexed by V head is reordered from HF's grouped order to tiled order (TiledVHeads),
  before the Qwen3-Next ops;
- M-RoPE: rope.dimension_sections is required by llama.cpp (mrope_interleaved is implied by the arch).
The dense model inherits the MoE code of the chain; with no expert tensors it never runs.
Checkpoints wrapped for vision (model.language_model.*, model.visual.*) are unwrapped by rename();
`--mmproj` writes their vision tower (vision.py).
"""

from __future__ import annotations

from typing import Iterator

from gguf import GGUFValueType

from .api import Metadata, MockSizes, MockSpec, Qwen3VLVision, Rule, TiledVHeads, VisionTower, register
from .qwen3next import Qwen3Next

DEFAULT_MROPE_SECTIONS = [11, 11, 10, 0]


@register("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
class Qwen35(VisionTower, Qwen3Next):
    gguf_arch = "qwen35"
    vision_encoder = Qwen3VLVision  # the Qwen3-VL ViT and merger (--mmproj)
    deepstack = False  # the qwen35 loaders read no deepstack count: its mmproj must feed none
    mock = MockSpec(("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", "Qwen3_5Config", "Qwen3_5ForConditionalGeneration"),
                    tokenizer="qwen35", hub=True)

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        cfg = super().mock_config(s)
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                    "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
            del cfg[key]
        half_rot = int(s.head_dim * cfg["rope_parameters"]["partial_rotary_factor"]) // 2  # sections sum to it
        a = half_rot - 2 * (half_rot // 3)
        cfg["rope_parameters"] = dict(cfg["rope_parameters"], mrope_section=[a, half_rot // 3, half_rot // 3],
                                      mrope_interleaved=True)
        return cfg

    def linear_projection_rules(self) -> Iterator[Rule]:
        """Qwen3.5 stores the Gated DeltaNet input projections split: qkv, z, b, a."""
        H = self.hidden
        nk, dk = self.dim("linear_num_key_heads"), self.dim("linear_key_head_dim")
        nv, dv = self.dim("linear_num_value_heads"), self.dim("linear_value_head_dim")
        yield Rule("linear_attn.in_proj_qkv.weight", "attn_qkv.weight", (2 * nk * dk + nv * dv, H))
        yield Rule("linear_attn.in_proj_z.weight", "attn_gate.weight", (nv * dv, H))
        yield Rule("linear_attn.in_proj_b.weight", "ssm_beta.weight", (nv, H))
        yield Rule("linear_attn.in_proj_a.weight", "ssm_alpha.weight", (nv, H))

    def linear_attention_rules(self) -> Iterator[Rule]:
        nk, dk, nv, dv = self.linear_dims()
        qk = 2 * nk * dk  # leading Q and K rows/channels stay in place
        tiled = {  # leaf -> the V-head reorder of its values (linear_attn.norm is shared by all heads)
            "in_proj_qkv.weight": TiledVHeads(nk, nv, dv, keep=qk),
            "conv1d.weight": TiledVHeads(nk, nv, dv, keep=qk),
            "in_proj_z.weight": TiledVHeads(nk, nv, dv),
            "in_proj_b.weight": TiledVHeads(nk, nv, 1),
            "in_proj_a.weight": TiledVHeads(nk, nv, 1),
            "A_log": TiledVHeads(nk, nv, 1),
            "dt_bias": TiledVHeads(nk, nv, 1),
            "out_proj.weight": TiledVHeads(nk, nv, dv, axis=1),
        }
        for rule in super().linear_attention_rules():
            op = tiled.get(rule.hf.removeprefix("linear_attn."))
            yield rule if op is None or nk == nv else rule.first(op)

    def add_metadata(self, md: Metadata) -> None:
        super().add_metadata(md)  # writes rope.dimension_sections when the config has mrope_section
        if "mrope_section" not in self.rope_parameters:
            md.array(f"{self.gguf_arch}.rope.dimension_sections", DEFAULT_MROPE_SECTIONS, GGUFValueType.INT32)


@register("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
class Qwen35Moe(Qwen35):
    gguf_arch = "qwen35moe"
    mock = MockSpec(("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", "Qwen3_5MoeConfig",
                     "Qwen3_5MoeForConditionalGeneration"), tokenizer="qwen35", hub=True, hub_packed_experts=True)

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        cfg = dict(super().mock_config(s), **cls.mock_experts(s))
        del cfg["intermediate_size"]  # like the released configs
        return cfg
