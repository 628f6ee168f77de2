"""Vision towers: what `convert-hf --mmproj` writes as a `clip` GGUF (llama.cpp's mtmd reads it).

A text architecture whose checkpoints can carry a vision encoder mixes in `VisionTower` and names
the encoder's class; `Qwen3VLVision` is the Qwen3-VL ViT with its patch merger, shared by Qwen3-VL,
Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE (llama.cpp: conversion/qwen3vl.py `Qwen3VLVisionModel`,
projector type "qwen3vl_merger"). The encoder is planned and streamed like a text model: a class
with `Rule`s and named ops, whose `gguf_arch` is "clip".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from gguf import GGMLQuantizationType as T, GGUFValueType

from ..checkpoint.lazy import Lazy
from ..errors import UserError
from ..format.writer import Metadata
from .base import DecoderArch, Emitted
from .options import ConvertOptions
from .rules import Op, Rule
from .shapes import Dim

# Where checkpoints keep the tower, outermost first; all are normalised to "visual.". Wrappers saved
# with the language model outside (model.visual.*) and inside (model.language_model.visual.*) exist;
# llama.cpp's converter drops the latter (its issue #22656).
VISUAL_PREFIXES = ("model.language_model.visual.", "model.visual.", "visual.")
MAX_DEPTH = 4096  # far beyond any ViT; keeps loops sized by the config small


class VisionTower:
    """Capability: checkpoints of this architecture may carry a vision encoder, which
    `convert-hf --mmproj` converts with `vision_encoder` (a `VisionEncoder` subclass)."""

    vision_encoder: type["VisionEncoder"]
    deepstack = True  # the text loader reads a deepstack count, so the encoder may feed deepstack layers

    def vision(self, processor: dict) -> "VisionEncoder":
        """The encoder of this checkpoint; `processor` is its merged preprocessor/processor config."""
        return self.vision_encoder(self.hparams, self.options, self.hf_names, processor=processor,
                                   deepstack=self.deepstack)


@dataclass(frozen=True, eq=False)
class TimeStep(Op):
    """One time step of a Conv3d kernel [C_out, C_in, kt, p, p]: the Conv2d kernel [C_out, C_in, p, p]
    llama.cpp applies to frame `t` (clip reads v.patch_embd.weight for t=0, .weight.1 for t=1).

    Example: kernel[:, :, 1] of a [32, 3, 2, 4, 4] kernel is TimeStep(1), shape [32, 3, 4, 4].
    """

    t: int

    def apply(self, x: Lazy) -> Lazy:
        picked = x.slice_axis(2, self.t, self.t + 1)
        return picked.reshape_rest(picked.shape[1:2] + picked.shape[3:])

    def __str__(self) -> str:
        return f"TimeStep({self.t})"


class VisionEncoder(DecoderArch):
    """A vision encoder written alone as a `clip` GGUF: its config is `vision_config`, its tensors are
    under one of VISUAL_PREFIXES, the text config gives only the projection width."""

    gguf_arch = "clip"
    gguf_type = "mmproj"  # general.type
    config_prefix = "vision_config."  # its hparams are config.json's vision_config
    vocab = None  # an mmproj carries no vocabulary

    def __init__(self, hparams: dict, options: ConvertOptions | None = None, tensor_names=(), *,
                 processor: dict | None = None, deepstack: bool = True):
        vision = hparams.get("vision_config")
        if not isinstance(vision, dict):
            raise UserError("--mmproj: config.json has no vision_config: this checkpoint has no vision tower")
        super().__init__(dict(vision), options, tensor_names)
        self.text = hparams  # the text config (merged over the top level), for the projection width
        self.processor = processor or {}
        self.allow_deepstack = deepstack
        if not self.present_names():
            raise UserError("--mmproj: the checkpoint has no vision tower tensors (model.visual.*)",
                            hint="convert the text model without --mmproj")

    def hp(self, *keys: str, default=...):
        try:
            return super().hp(*keys, default=default)
        except UserError:
            raise UserError(f"config.json: vision_config has no {' / '.join(keys)} (needed for --mmproj)") from None

    def rename(self, name: str) -> str | None:
        """visual.* under any accepted prefix; everything else (the text model, MTP) is not ours."""
        for prefix in VISUAL_PREFIXES:
            if name.startswith(prefix):
                return "visual." + name[len(prefix):]
        return None

    def rules(self) -> dict[str, Rule]:
        if getattr(self, "_rules", None) is None:
            self._rules = {r.hf: r for r in self.global_rules()}
        return self._rules

    @property
    def block_count(self) -> int:
        depth = self.dim("depth", "num_hidden_layers").size
        if depth > MAX_DEPTH:
            raise UserError(f"config.json: vision_config.depth = {depth} is larger than any model has")
        return depth

    def keep_f32(self, gguf_name: str) -> bool:
        return super().keep_f32(gguf_name) or gguf_name.startswith("v.position_embd.")

    def forced_type(self, gguf_name: str, outtype: T) -> T | None:
        """The patch kernels are F16 in an f16 file and F32 otherwise (llama.cpp's converter:
        MmprojModel.tensor_force_quant)."""
        if gguf_name.startswith("v.patch_embd.weight"):
            return T.F16 if outtype == T.F16 else T.F32
        return None


class Qwen3VLVision(VisionEncoder):
    """The Qwen3-VL ViT (Conv3d patch embedding, learned position embeddings, pre-norm blocks with a
    fused qkv) and its 2x2 patch merger, plus the deepstack mergers of Qwen3-VL."""

    projector = "qwen3vl_merger"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kt = self.hp("temporal_patch_size", default=2)
        if kt != 2:
            raise UserError(f"config.json: vision_config.temporal_patch_size = {kt!r}; llama.cpp's clip reads "
                            "exactly two patch kernels (temporal_patch_size 2)")

    @property
    def deepstack_indexes(self) -> list[int]:
        """ViT layers whose features feed deepstack mergers (vision_config.deepstack_visual_indexes)."""
        if not self.allow_deepstack:
            return []  # the text loader reads no deepstack count (Qwen3.5): an extra output would break it
        indexes = self.hparams.get("deepstack_visual_indexes") or []
        depth = self.block_count
        if not isinstance(indexes, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                    and 0 <= i < depth for i in indexes) \
                or len(set(indexes)) != len(indexes):
            raise UserError("config.json: vision_config.deepstack_visual_indexes must be distinct layer numbers "
                            f"below depth={depth}, got {indexes!r}")
        return indexes

    def global_rules(self) -> Iterator[Rule]:
        H, F = self.hidden, self.dim("intermediate_size")
        p, C = self.dim("patch_size"), self.dim("in_channels", default=3)
        N = self.dim("num_position_embeddings")
        m = self.merge_size
        M = Dim(H.size * m * m, f"{H.why} x spatial_merge_size^2={m * m}")
        O = self.dim("out_hidden_size", default=None) or Dim(self.text_hidden, f"hidden_size={self.text_hidden}")
        yield Rule("visual.patch_embed.proj.weight", None, (H, C, 2, p, p))  # split in transform()
        yield Rule("visual.patch_embed.proj.bias", "v.patch_embd.bias", (H,))
        yield Rule("visual.pos_embed.weight", "v.position_embd.weight", (N, H))
        for i in range(self.block_count):
            hf, gg = f"visual.blocks.{i}.", f"v.blk.{i}."
            for src, dst, shape in (("norm1", "ln1", (H,)), ("norm2", "ln2", (H,)), ("attn.qkv", "attn_qkv", (3 * H, H)),
                                    ("attn.proj", "attn_out", (H, H)), ("mlp.linear_fc1", "ffn_up", (F, H)),
                                    ("mlp.linear_fc2", "ffn_down", (H, F))):
                yield from self.linear(hf + src, gg + dst, shape)
        yield from self.merger("visual.merger.", {"norm": "v.post_ln", "linear_fc1": "mm.0", "linear_fc2": "mm.2"},
                               H, M, O)
        for k, layer in enumerate(self.deepstack_indexes):
            yield from self.merger(f"visual.deepstack_merger_list.{k}.", {
                "norm": f"v.deepstack.{layer}.norm", "linear_fc1": f"v.deepstack.{layer}.fc1",
                "linear_fc2": f"v.deepstack.{layer}.fc2"}, M, M, O)

    @staticmethod
    def linear(hf: str, gguf: str, shape: tuple) -> Iterator[Rule]:
        """A weight and its bias (every layer of this ViT has one)."""
        yield Rule(hf + ".weight", gguf + ".weight", shape)
        yield Rule(hf + ".bias", gguf + ".bias", shape[:1])

    def merger(self, hf: str, names: dict, norm_width: Dim, M: Dim, O: Dim) -> Iterator[Rule]:
        """A patch merger: LayerNorm (before the 2x2 merge, or after it for deepstack), fc1, GELU, fc2."""
        yield from self.linear(hf + "norm", names["norm"], (norm_width,))
        yield from self.linear(hf + "linear_fc1", names["linear_fc1"], (M, M))
        yield from self.linear(hf + "linear_fc2", names["linear_fc2"], (O, M))

    def transform(self, name: str, tensor: Lazy) -> Emitted:
        if name == "visual.patch_embed.proj.weight":
            yield "v.patch_embd.weight", TimeStep(0)(tensor, name)
            yield "v.patch_embd.weight.1", TimeStep(1)(tensor, name)
            return
        yield from super().transform(name, tensor)

    def add_encoder_metadata(self, md: Metadata) -> None:
        """The clip.* keys every vision encoder has, in the order of llama.cpp's converter
        (MmprojModel.set_gguf_parameters), and the projector type."""
        md.u32("general.file_type", self.file_type)
        md.bool("clip.has_vision_encoder", True)
        md.u32("clip.vision.projection_dim", self.text_hidden)
        md.u32("clip.vision.image_size", self.image_size())
        md.u32("clip.vision.patch_size", self.dim("patch_size").size)
        md.u32("clip.vision.embedding_length", self.hidden.size)
        md.u32("clip.vision.feed_forward_length", self.feed_forward_length)
        md.u32("clip.vision.block_count", self.block_count)
        md.u32("clip.vision.attention.head_count", self.dim("num_heads", "num_attention_heads").size)
        for key in ("image_mean", "image_std"):
            md.array(f"clip.vision.{key}", self.normalisation(key), GGUFValueType.FLOAT32)
        md.str("clip.projector_type", self.projector)

    @property
    def feed_forward_length(self) -> int:
        """clip.vision.feed_forward_length (the MLP width: vision_config.intermediate_size)."""
        return self.dim("intermediate_size").size

    def add_metadata(self, md: Metadata) -> None:
        """clip.* keys in the order of llama.cpp's converter (MmprojModel.set_gguf_parameters, then
        Qwen3VLVisionModel.set_gguf_parameters)."""
        self.add_encoder_metadata(md)
        md.bool("clip.use_gelu", True)
        md.u32("clip.vision.spatial_merge_size", self.merge_size)
        # The converter takes the text model's RMS epsilon for the ViT's LayerNorms (both are 1e-6).
        text = self.text.get("text_config") if isinstance(self.text.get("text_config"), dict) else self.text
        eps = text.get("rms_norm_eps", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise UserError(f"config.json: rms_norm_eps must be a positive number, got {eps!r}")
        md.f32("clip.vision.attention.layer_norm_epsilon", eps)
        deepstack = set(self.deepstack_indexes)
        md.array("clip.vision.is_deepstack_layers", [i in deepstack for i in range(self.block_count)],
                 GGUFValueType.BOOL)

    @property
    def text_hidden(self) -> int:
        """The text model's width: what the merger projects to (clip.vision.projection_dim)."""
        value = self.text.get("hidden_size")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"config.json: the text model's hidden_size must be a positive integer, got {value!r}")
        return value

    @property
    def merge_size(self) -> int:
        """Side of the square of patches the merger joins (vision_config.spatial_merge_size, default 2)."""
        return self.dim("spatial_merge_size", default=Dim(2, "spatial_merge_size=2")).size

    def image_size(self) -> int:
        """vision_config.image_size, else the side the position grid covers: sqrt(positions) x patch."""
        if self.hparams.get("image_size") is not None:
            return self.dim("image_size").size
        return int(math.sqrt(self.dim("num_position_embeddings").size) * self.dim("patch_size").size)

    def normalisation(self, key: str) -> list[float]:
        values = self.processor.get(key)
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise UserError(f"--mmproj: preprocessor_config.json has no usable {key} (a list of numbers), "
                            f"got {values!r}", hint="copy preprocessor_config.json from the original model")
        return [float(v) for v in values]
