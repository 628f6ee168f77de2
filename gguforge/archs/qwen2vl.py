"""Qwen2-VL and Qwen2.5-VL: the text model (llama arch `qwen2vl`) and both ViT generations (--mmproj).

The text model is Qwen2 (q/k/v biases) with M-RoPE: rope.dimension_sections is required by llama.cpp's
loader (src/models/qwen2vl.cpp). Accepted layouts (llama.cpp: conversion/qwenvl.py Qwen2VLModel): the
Hub's (model.*, visual.*), transformers 5's (model.language_model.*, model.visual.*), the bare
`Qwen2VLModel` (language_model.* or layers.*, no lm_head) and Qwen2.5-Omni's `thinker.` prefix.

The ViTs (conversion/qwenvl.py Qwen2VLVisionModel) differ from Qwen3-VL's (vision.py): no position
table (2-D RoPE), the fused qkv is split into attn_q/k/v, the merger is ln_q, mlp.0, GELU, mlp.2 and
there are no deepstack mergers. Qwen2-VL: LayerNorm, fc1/GELU/fc2, width embed_dim (its hidden_size is
the merger's output width). Qwen2.5-VL: RMSNorm (no biases), a gated SiLU MLP, window attention except on
fullatt_block_indexes (clip.vision.n_wa_pattern).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from gguf import GGUFValueType

from .api import (Dim, Lazy, Metadata, MockSizes, MockSpec, Qwen3VLVision, Rule, SelectRows, UserError,
                  VisionTower, register)
from .qwen2 import Qwen2

# HF builds every norm of these ViTs with eps 1e-6 (LayerNorm / Qwen2RMSNorm(eps=1e-6)); the reference
# writes top-level rms_norm_eps, absent from transformers 5 configs, so 1e-6 as well.
VIT_NORM_EPS = 1e-6


class Qwen2VLVision(Qwen3VLVision):
    """Qwen2-VL's ViT and patch merger (projector "qwen2vl_merger")."""

    projector = "qwen2vl_merger"
    norm_bias = True  # LayerNorm (Qwen2.5-VL: RMSNorm, weight only)
    mlp = (("fc1", "ffn_up"), ("fc2", "ffn_down"))  # HF leaf -> GGUF, in checkpoint order

    def rename(self, name: str) -> str | None:
        return super().rename(name.removeprefix("thinker."))

    @property
    def hidden(self) -> Dim:
        return self.dim("embed_dim")

    @property
    def ffn(self) -> Dim:
        ratio = self.dim("mlp_ratio", default=Dim(4, "mlp_ratio=4"))
        return self.hidden * ratio

    @property
    def feed_forward_length(self) -> int:
        return self.dim("hidden_size").size  # as the reference writes it (its hidden_size -> intermediate_size)

    @property
    def out_width(self) -> Dim:
        """The merger's output: the text model's width (Qwen2-VL: vision_config.hidden_size)."""
        return self.dim("hidden_size")

    def image_size(self) -> int:
        return self.dim("image_size", default=Dim(560, "image_size=560")).size

    def global_rules(self) -> Iterator[Rule]:
        H, F, O = self.hidden, self.ffn, self.out_width
        p, C = self.dim("patch_size"), self.dim("in_channels", default=3)
        m = self.merge_size
        M = Dim(H.size * m * m, f"{H.why} x spatial_merge_size^2={m * m}")
        yield Rule("visual.patch_embed.proj.weight", None, (H, C, 2, p, p))  # split in transform()
        for i in range(self.block_count):
            hf, gg = f"visual.blocks.{i}.", f"v.blk.{i}."
            yield from self.norm(hf + "norm1", gg + "ln1", H)
            yield from self.norm(hf + "norm2", gg + "ln2", H)
            yield Rule(hf + "attn.qkv.weight", None, (3 * H, H))  # split in transform()
            yield Rule(hf + "attn.qkv.bias", None, (3 * H,))
            yield from self.linear(hf + "attn.proj", gg + "attn_out", (H, H))
            for leaf, name in self.mlp:
                yield from self.linear(hf + "mlp." + leaf, gg + name, (H, F) if name == "ffn_down" else (F, H))
        yield from self.norm("visual.merger.ln_q", "v.post_ln", H)
        yield from self.linear("visual.merger.mlp.0", "mm.0", (M, M))
        yield from self.linear("visual.merger.mlp.2", "mm.2", (O, M))

    def norm(self, hf: str, gguf: str, width: Dim) -> Iterator[Rule]:
        yield Rule(hf + ".weight", gguf + ".weight", (width,))
        if self.norm_bias:
            yield Rule(hf + ".bias", gguf + ".bias", (width,))

    def transform(self, name: str, tensor: Lazy):
        if name.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
            rows = tensor.shape[0] // 3
            block, leaf = name.split(".")[2], name.rsplit(".", 1)[1]
            for k, part in enumerate("qkv"):
                split = SelectRows(np.arange(k * rows, (k + 1) * rows), part)
                yield f"v.blk.{block}.attn_{part}.{leaf}", split(tensor, name)
            return
        yield from super().transform(name, tensor)

    def add_metadata(self, md: Metadata) -> None:
        """clip.* keys in the order of llama.cpp's converter (Qwen2VLVisionModel.set_gguf_parameters)."""
        self.add_encoder_metadata(md)
        self.add_window_metadata(md)
        md.f32("clip.vision.attention.layer_norm_epsilon", VIT_NORM_EPS)

    def add_window_metadata(self, md: Metadata) -> None:
        """Qwen2-VL attends over the whole image in every block."""


class Qwen25VLVision(Qwen2VLVision):
    """Qwen2.5-VL's ViT (projector "qwen2.5vl_merger"): RMSNorm, gated SiLU MLP, window attention."""

    projector = "qwen2.5vl_merger"
    norm_bias = False
    mlp = (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down"))

    @property
    def hidden(self) -> Dim:
        return self.dim("hidden_size")

    @property
    def ffn(self) -> Dim:
        return self.dim("intermediate_size")

    @property
    def feed_forward_length(self) -> int:
        return self.ffn.size

    @property
    def out_width(self) -> Dim:
        return self.dim("out_hidden_size")

    def add_window_metadata(self, md: Metadata) -> None:
        """use_silu, and n_wa_pattern: clip makes block i full-attention when (i + 1) % n == 0, so
        fullatt_block_indexes must be exactly those blocks (the reference checks only the spacing)."""
        md.bool("clip.use_silu", True)
        full = self.hparams.get("fullatt_block_indexes")
        depth = self.block_count
        if not isinstance(full, list) or not full or not all(isinstance(i, int) and not isinstance(i, bool)
                                                             for i in full) or full[0] < 0:
            raise UserError("config.json: vision_config.fullatt_block_indexes must be a list of block numbers "
                            f"(Qwen2.5-VL's full-attention blocks), got {full!r}")
        n = full[0] + 1
        if full != [i for i in range(depth) if (i + 1) % n == 0]:
            raise UserError(f"config.json: vision_config.fullatt_block_indexes = {full} is not every {n}th of the "
                            f"depth={depth} blocks, the only pattern llama.cpp's clip runs (n_wa_pattern)")
        md.u32("clip.vision.n_wa_pattern", n)


@register("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
class Qwen2VL(VisionTower, Qwen2):
    gguf_arch = "qwen2vl"
    deepstack = False  # the qwen2vl loader reads no deepstack count
    mock = MockSpec(("Qwen2VLTextConfig", None, "Qwen2VLConfig", "Qwen2VLForConditionalGeneration"), hub=True)
    # depth 3: the reference maps merger.mlp.{0,2} through its per-block table, which needs >= 3 blocks
    mock_vision = dict(depth=3, embed_dim=32, mlp_ratio=3, num_heads=2, patch_size=4, spatial_merge_size=2,
                       temporal_patch_size=2)

    def rename(self, name: str) -> str | None:
        name = super().rename(name.removeprefix("thinker."))
        if name is not None and name.startswith(("layers.", "embed_tokens.", "norm.")):  # bare Qwen2VLModel
            name = "model." + name
        return name

    @property
    def tied_embeddings(self) -> bool:
        # a bare Qwen2VLModel has no lm_head: llama.cpp then reads token_embd (as the reference writes it)
        return super().tied_embeddings or "Qwen2VLModel" in (self.hparams.get("architectures") or ())

    @property
    def vision_encoder(self):
        """By the tower's config, as the reference reads it: Qwen2-VL's names embed_dim (a bare
        Qwen2VLModel may hold either generation)."""
        vision = self.hparams.get("vision_config")
        return Qwen2VLVision if not isinstance(vision, dict) or "embed_dim" in vision else Qwen25VLVision

    def add_metadata(self, md: Metadata) -> None:
        if "mrope_section" not in self.rope_parameters:
            raise UserError(f"config.json: {self.gguf_arch} needs rope mrope_section "
                            "(llama.cpp's loader requires rope.dimension_sections)")
        super().add_metadata(md)

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        cfg = super().mock_config(s)
        half = (s.hidden // cfg["num_attention_heads"]) // 2  # sections sum to head_dim / 2, t < h = w as released
        hw = (half - half // 4) // 2
        cfg["rope_parameters"] = dict(cfg["rope_parameters"], mrope_section=[half - 2 * hw, hw, hw])
        cfg["rms_norm_eps"] = 1e-5  # not the ViT's 1e-6: tells which one the mmproj writes
        return cfg

    @classmethod
    def mock_vision_config(cls, text_hidden: int) -> dict:
        return dict(cls.mock_vision, hidden_size=text_hidden)


@register("Qwen2_5_VLForConditionalGeneration")
class Qwen25VL(Qwen2VL):
    vision_encoder = Qwen25VLVision
    mock_name = "qwen25vl"
    mock = MockSpec(("Qwen2_5_VLTextConfig", None, "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
                    hub=True)
    # patch 14 and the default 112-pixel windows (mtmd's, as the file carries no window size): a 6 x 4
    # merged-token image spans two windows; blocks 1 and 3 attend globally
    mock_vision = dict(depth=4, hidden_size=32, intermediate_size=72, num_heads=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3])

    @classmethod
    def mock_vision_config(cls, text_hidden: int) -> dict:
        return dict(cls.mock_vision, out_hidden_size=text_hidden)
