"""Everything an architecture module (built-in or plugin) imports, in one place.

    from gguforge.archs.api import DecoderArch, Rule, register, AddOne

Names: the base class and its capabilities, the registry, tensor rules and named ops, vision encoders, lazy tensor
helpers, shape types, the metadata builder, conversion options and the user-facing error.
"""

from __future__ import annotations

from ..checkpoint.lazy import Lazy, concat_axis, concat_rows, stack
from ..errors import UserError
from ..format.writer import Metadata
from . import register
from .base import DecoderArch, Emitted, MtpHead, UnmappedTensor
from .mock import MockSizes, MockSpec
from .options import ConvertOptions
from .rules import AddOne, Chain, NegExp, Op, Rule, SelectRows, Squeeze, TiledVHeads, tiled_v_order
from .shapes import ANY, Dim, Expected
from .vision import Qwen3VLVision, TimeStep, VisionEncoder, VisionTower

__all__ = [
    "ANY", "AddOne", "Chain", "ConvertOptions", "DecoderArch", "Dim", "Emitted", "Expected", "Lazy", "Metadata",
    "MockSizes", "MockSpec", "MtpHead", "NegExp", "Op", "Rule", "SelectRows", "Squeeze", "TiledVHeads", "UnmappedTensor", "UserError",
    "concat_axis", "concat_rows", "register", "stack", "tiled_v_order",
    "Qwen3VLVision", "TimeStep", "VisionEncoder", "VisionTower",
]
