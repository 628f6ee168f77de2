"""Qwen3.5 dense and MoE: Qwen3-Next's hybrid layers with split projections and tiled V heads.

Differences from Qwen3-Next:
- the Gated DeltaNet input projections come split (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a);
- V heads are reordered from HF's grouped order to tiled order (below), before the Qwen3-Next rules;
- M-RoPE: rope.dimension_sections is required by llama.cpp (mrope_interleaved is implied by the arch).
The dense model inherits the MoE code of the chain; with no expert tensors it never runs.
Checkpoints wrapped for vision (model.language_model.*, model.visual.*) are unwrapped by rename().
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFValueType

from ..checkpoint.lazy import Lazy
from .shapes import Expected
from ..format.writer import Metadata
from ..errors import UserError
from . import register
from .base import Emitted
from .qwen3next import Qwen3Next

DEFAULT_MROPE_SECTIONS = [11, 11, 10, 0]


def tiled_v_order(nk: int, nv: int, block: int) -> np.ndarray:
    """Indices taking nv blocks of `block` elements from grouped to tiled V-head order.

    HF's V head g*r+j (r = nv/nk) reads K head g; ggml broadcasts K heads by tiling, so V head p
    reads K head p % nk. New position j*nk+g therefore takes old head g*r+j.
    """
    heads = np.arange(nv).reshape(nk, nv // nk).T.reshape(-1)
    return (heads[:, None] * block + np.arange(block)).reshape(-1)


@register("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
class Qwen35(Qwen3Next):
    gguf_arch = "qwen35"

    def block_names(self) -> dict[str, str]:
        return {
            **super().block_names(),
            "linear_attn.in_proj_b.weight": "ssm_beta.weight",
            "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
        }

    def linear_attention_shapes(self) -> dict[str, Expected]:
        """Qwen3.5 stores the Gated DeltaNet input projections split: qkv, z, b, a."""
        shapes = super().linear_attention_shapes()
        del shapes["linear_attn.in_proj_qkvz.weight"], shapes["linear_attn.in_proj_ba.weight"]
        H = self.hidden
        nk, dk = self.dim("linear_num_key_heads"), self.dim("linear_key_head_dim")
        nv, dv = self.dim("linear_num_value_heads"), self.dim("linear_value_head_dim")
        return {
            **shapes,
            "linear_attn.in_proj_qkv.weight": Expected.of(2 * nk * dk + nv * dv, H),
            "linear_attn.in_proj_z.weight": Expected.of(nv * dv, H),
            "linear_attn.in_proj_b.weight": Expected.of(nv, H),
            "linear_attn.in_proj_a.weight": Expected.of(nv, H),
        }

    def transform(self, name: str, tensor: Lazy) -> Emitted:
        if ".linear_attn." in name:
            tensor = self.tile_v_heads(name, tensor)
        yield from super().transform(name, tensor)

    def tile_v_heads(self, name: str, tensor: Lazy) -> Lazy:
        """Apply the grouped -> tiled V-head permutation to every tensor indexed by V head."""
        nk, dk, nv, dv = self.linear_dims()
        if nk == nv:
            return tensor
        leaf = name.rsplit("linear_attn.", 1)[1]
        qk = 2 * nk * dk  # leading Q and K rows/channels stay in place
        rules = {  # leaf -> (axis, untouched leading entries, block size)
            "in_proj_qkv.weight": (0, qk, dv),
            "conv1d.weight": (0, qk, dv),
            "in_proj_z.weight": (0, 0, dv),
            "in_proj_b.weight": (0, 0, 1),
            "in_proj_a.weight": (0, 0, 1),
            "A_log": (0, 0, 1),
            "dt_bias": (0, 0, 1),
            "out_proj.weight": (1, 0, dv),
        }
        if leaf not in rules:
            return tensor  # linear_attn.norm is shared by all heads
        axis, keep, block = rules[leaf]
        if tensor.ndim <= axis or tensor.shape[axis] != keep + nv * block:
            raise UserError(f"{name} has shape {list(tensor.shape)}; expected {keep + nv * block} on axis {axis} "
                            f"(linear_num_value_heads={nv})")
        order = np.concatenate([np.arange(keep), keep + tiled_v_order(nk, nv, block)])
        return tensor.take_rows(order) if axis == 0 else tensor.take_axis(axis, order)

    def add_metadata(self, md: Metadata) -> None:
        super().add_metadata(md)  # writes rope.dimension_sections when the config has mrope_section
        if "mrope_section" not in self.rope_parameters:
            md.array(f"{self.gguf_arch}.rope.dimension_sections", DEFAULT_MROPE_SECTIONS, GGUFValueType.INT32)


@register("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
class Qwen35Moe(Qwen35):
    gguf_arch = "qwen35moe"
