"""Qwen3-VL and Qwen3-VL-MoE, the text model (the vision tower goes to an mmproj file: vision.py).

On top of Qwen3 / Qwen3-MoE: the checkpoint is wrapped (model.language_model.*, model.visual.*
dropped); {arch}.n_deepstack_layers counts the vision layers whose features are added to the first
text layers (vision_config.deepstack_visual_indexes); M-RoPE sections are required by the loader.
Qwen3-VL-MoE's packed experts were published transposed ([E, H, 2F] and [E, F, H]); checkpoints saved
by transformers 5 hold the usual [E, 2F, H] / [E, H, F]. Both are accepted, told apart by shape.
"""

from __future__ import annotations

import re
from typing import Iterator

from .api import (Emitted, Expected, Lazy, Metadata, MockSizes, MockSpec, Qwen3VLVision, Rule, UserError,
                  VisionTower, register)
from .qwen3 import Qwen3
from .qwen3moe import Qwen3Moe

VL_CLASSES = ("Qwen3VLTextConfig", None, "Qwen3VLConfig", "Qwen3VLForConditionalGeneration")
VL_MOE_CLASSES = ("Qwen3VLMoeTextConfig", None, "Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration")


class Deepstack(VisionTower):
    """What the two Qwen3-VL text models add to their Qwen3 parents (mixed in before them); their vision
    tower (--mmproj) feeds the deepstack layers."""

    vision_encoder = Qwen3VLVision

    def add_metadata(self, md: Metadata) -> None:
        if "mrope_section" not in self.rope_parameters:
            raise UserError(f"config.json: {self.gguf_arch} needs rope mrope_section "
                            "(llama.cpp's loader requires rope.dimension_sections)")
        super().add_metadata(md)
        vision = self.hparams.get("vision_config") or {}
        indexes = vision.get("deepstack_visual_indexes") or [] if isinstance(vision, dict) else []
        if not isinstance(indexes, list):
            raise UserError(f"config.json: vision_config.deepstack_visual_indexes must be a list, got {indexes!r}")
        md.u32(f"{self.gguf_arch}.n_deepstack_layers", len(indexes))

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        cfg = super().mock_config(s)
        half_rot = s.head_dim // 2  # sections sum to head_dim / 2 (full rotary)
        cfg["rope_parameters"] = dict(cfg["rope_parameters"], rope_theta=5e6, mrope_interleaved=True,
                                      mrope_section=[half_rot - 2 * (half_rot // 4), half_rot // 4, half_rot // 4])
        return cfg


@register("Qwen3VLForConditionalGeneration")
class Qwen3VL(Deepstack, Qwen3):
    gguf_arch = "qwen3vl"
    mock = MockSpec(VL_CLASSES, hub=True)


PACKED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj(\.weight)?$")


@register("Qwen3VLMoeForConditionalGeneration")
class Qwen3VLMoe(Deepstack, Qwen3Moe):
    gguf_arch = "qwen3vlmoe"
    mock = MockSpec(VL_MOE_CLASSES, hub=True)

    def expert_rules(self, layer: int, E, Fe, H) -> Iterator[Rule]:
        for rule in super().expert_rules(layer, E, Fe, H):
            if rule.hf.startswith("mlp.experts.gate_up_proj"):  # usual, or as published (transposed)
                rule = Rule(rule.hf, None, Expected(((E, 2 * Fe, H), (E, H, 2 * Fe))))
            elif rule.hf.startswith("mlp.experts.down_proj"):
                rule = Rule(rule.hf, None, Expected(((E, H, Fe), (E, Fe, H))))
            yield rule

    def transform(self, name: str, tensor: Lazy) -> Emitted:
        if (m := PACKED.match(name)) and self.transposed(m.group(2), tensor):
            tensor = tensor.swap_last_axes().noted("transposed experts (as published)")
        yield from super().transform(name, tensor)

    def transposed(self, kind: str, tensor: Lazy) -> bool:
        """Whether a packed expert tensor is in the published [E, H, 2F] / [E, F, H] layout."""
        H = int(self.hp("hidden_size"))
        rows = tensor.shape[1] if tensor.ndim == 3 else None
        if kind == "gate_up":
            if tensor.shape[-1] % 2 == 0 and rows == H and tensor.shape[2] != H:
                return True
            if rows == H and tensor.shape[2] == H:  # H == 2F: the shape cannot tell
                return self.saved_before_transformers_5()
            return False
        if rows == H and tensor.shape[2] != H:
            return False
        if tensor.shape[2] == H and rows != H:
            return True
        return self.saved_before_transformers_5()  # H == F

    def saved_before_transformers_5(self) -> bool:
        version = str(self.hparams.get("transformers_version") or "")
        major = version.split(".")[0]
        return not (major.isascii() and major.isdigit()) or int(major) < 5
