"""Plan step: every output tensor (name, shape, type) and all metadata, from headers alone.

Runs the architecture's transform generator over the checkpoint's tensors as
lazy expressions, applies the dtype policy, and builds the GGUF metadata. No
tensor data is read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType
from gguf.utility import naming_convention, size_label

from ..archs import lookup
from ..archs.base import DecoderArch, UnmappedTensor
from ..errors import UserError
from ..quantize.encode import encode
from ..quantize.presets import Preset, parse_preset
from ..quantize.rules import TensorIn, plan_quantization
from . import fuse as fusion
from .metadata import GeneralInfo, add_general_metadata, apply_overrides, general_info, model_id_for
from .options import ConvertOptions
from .read import Checkpoint
from .transform import Lazy
from .validate import validate_checkpoint
from .vocab import add_vocab_metadata, load_vocab
from .write import Metadata, TensorEntry

FLOAT_OUTTYPES = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
}
# Quantized outtypes run llama-quantize's rules during conversion (one pass, no intermediate file).
PRESET_OUTTYPES = ("q8_0", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q4_k", "q5_k")
QUANT_VERSION = 2


@dataclass
class PlannedTensor(TensorEntry):
    tensor: Lazy = field(default=None, repr=False)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.tensor.sources


@dataclass
class Plan:
    arch: DecoderArch
    metadata: Metadata
    tensors: list[PlannedTensor]
    file_type: LlamaFileType
    type_label: str  # upper-case output type for file names: F16, BF16, Q8_0, Q4_K_M ...
    name: str
    size_label: str
    general: GeneralInfo | None = None
    vocab_only: bool = False

    @property
    def n_params(self) -> int:
        return sum(prod(t.shape) for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def default_filename(self) -> str:
        if self.arch.options.mtp_only and self.general is not None:
            # llama.cpp names draft heads mtp-<name>-<TYPE>.gguf: no size label
            m = self.general.meta
            return "mtp-" + naming_convention(self.general.file_stem, None, m.finetune, m.version, None,
                                              self.type_label) + ".gguf"
        if self.general is not None:
            return self.general.filename(self.type_label, self.vocab_only)
        return naming_convention(self.name, None, None, None, self.size_label, self.type_label) + ".gguf"


def map_tensors(checkpoint: Checkpoint, arch: DecoderArch) -> list[tuple[str, Lazy]]:
    """Run the architecture's transform generator, then the fusion stage, over every tensor in file order."""
    outputs: dict[str, Lazy] = {}
    unmapped: list[str] = []

    def transformed():
        for name, source in checkpoint.tensors.items():
            renamed = arch.rename(name)
            if renamed is None:
                continue
            try:
                yield from arch.transform(renamed, Lazy.from_source(source))
            except UnmappedTensor as e:
                unmapped.append(name if str(e) == renamed else str(e))
        yield from arch.finish()

    fusion.check_supported(arch, arch.options)
    fused: dict[str, int] = {}
    for gguf_name, tensor in fusion.fuse(transformed(), arch.options, fused):
        if gguf_name in outputs:
            raise UserError(f"two checkpoint tensors map to {gguf_name}")
        outputs[gguf_name] = tensor
    if unmapped:
        more = f" (and {len(unmapped) - 1} more: {', '.join(unmapped[1:4])}{', ...' if len(unmapped) > 4 else ''})"
        raise UserError(f"no {arch.gguf_arch} rule for tensor {unmapped[0]}" + (more if len(unmapped) > 1 else ""),
                        hint="the checkpoint does not match its config.json architecture, or holds extra tensors")
    fusion.check_something_fused(arch, arch.options, fused)
    return list(outputs.items())


def resolve_outtype(outtype: str, checkpoint: Checkpoint) -> str:
    """'auto' follows the checkpoint: bf16 for bf16 weights, else f16 (as llama.cpp's converter)."""
    if outtype != "auto":
        return outtype
    for t in checkpoint.tensors.values():
        if len(t.shape) >= 2:
            return "bf16" if t.dtype == "BF16" else "f16"
    return "f16"


def float_type(gguf_name: str, tensor: Lazy, outtype: T, arch: DecoderArch) -> T:
    """Dtype policy: 1-D tensors, norms and a few arch-specific tensors stay F32."""
    if tensor.ndim <= 1 or gguf_name.endswith("_norm.weight") or arch.keep_f32(gguf_name):
        return T.F32
    if outtype in (T.F32, T.F16, T.BF16):
        return outtype
    block, _ = GGML_QUANT_SIZES[outtype]
    if tensor.shape[-1] % block:
        return T.F16  # as llama.cpp's converter: rows that do not fill whole blocks stay F16
    return outtype


def count_params(tensors: list[PlannedTensor]) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, expert count) as GGUF size labels are computed."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for t in tensors:
        size = prod(t.shape)
        total += size
        if "_exps." in t.name and len(t.shape) >= 3:
            count = t.shape[-2] if ".bias" in t.name else t.shape[0]
            expert += size // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += size
    return total, shared, expert, (expert_sum // n_expert_tensors if n_expert_tensors else 0)


def plan_conversion(checkpoint: Checkpoint, options: ConvertOptions, display_name: str | None = None) -> Plan:
    hparams = checkpoint.hparams
    arch = lookup(checkpoint.config)(hparams, options, list(checkpoint.tensors))
    validate_checkpoint(checkpoint, arch, check_tensors=not options.vocab_only)
    outtype = resolve_outtype(options.outtype.lower(), checkpoint)
    preset = parse_preset(outtype) if outtype in PRESET_OUTTYPES else None
    if preset is not None:
        # Plan as the float file llama-quantize would be given ('auto': bf16 for a bf16 checkpoint).
        base = resolve_outtype("auto", checkpoint)
        ggml_out, file_type, outtype = FLOAT_OUTTYPES[base][0], preset.file_type, preset.name
    elif outtype in FLOAT_OUTTYPES:
        ggml_out, file_type = FLOAT_OUTTYPES[outtype]
    else:
        raise UserError(f"unknown output type {options.outtype!r}",
                        hint="choose one of: " + ", ".join([*FLOAT_OUTTYPES, "auto", *PRESET_OUTTYPES[:-2]]))

    mapped = [] if options.vocab_only else map_tensors(checkpoint, arch)
    tensors = [PlannedTensor(name, t.shape, float_type(name, t, ggml_out, arch), t) for name, t in mapped]

    counts = count_params(tensors)
    general = general_info(checkpoint.root, checkpoint.config, model_id_for(checkpoint.root, display_name),
                           model_name=options.model_name, overrides=options.metadata_overrides,
                           total_params=counts[0], computed_size_label=size_label(*counts) if tensors else None)
    name, label = general.meta.name, general.meta.size_label
    md = Metadata()
    md.str("general.architecture", arch.gguf_arch)
    md.str("general.type", "model")
    add_general_metadata(md, general.meta)
    arch.add_metadata(md)
    md.u32("general.file_type", int(file_type))
    md.u32("general.quantization_version", QUANT_VERSION)
    add_vocab_metadata(md, load_vocab(checkpoint.root, hparams, options.pre_tokenizer))
    apply_overrides(md, options.metadata_overrides)
    if preset is not None:
        tensors = apply_preset(tensors, preset, md, ggml_out)
    return Plan(arch, md, tensors, file_type, outtype.upper(), name, label, general, options.vocab_only)


def apply_preset(tensors: list[PlannedTensor], preset: Preset, md: Metadata, base: T) -> list[PlannedTensor]:
    """Give each tensor the type llama-quantize would choose from the `base` float file, in its order.

    Quantized tensors are rounded through `base` first, so the bytes equal llama-quantize run on the
    float GGUF even where a transform computed values in float32.
    """
    arch = md.get("general.architecture")
    plans = plan_quantization([TensorIn(t.name, t.shape, t.ggml_type) for t in tensors], preset, arch=arch,
                              n_layer_all=int(md.get(f"{arch}.block_count", 0)),
                              n_expert=int(md.get(f"{arch}.expert_count", 0) or 0))
    by_name = {t.name: t for t in tensors}
    out = []
    for p in plans:
        t = by_name[p.name]
        lazy = t.tensor
        exact = lazy.source is not None and lazy.source.dtype == base.name  # untouched bf16/f16 weights
        if p.dst_type != t.ggml_type and base in (T.F16, T.BF16) and not exact:
            lazy = lazy.per_rows(_round_through(base), dtype=np.float32)
        out.append(PlannedTensor(t.name, t.shape, p.dst_type, lazy))
    return out


def _round_through(base: T):
    def round_rows(a: np.ndarray) -> np.ndarray:
        if base == T.F16:
            return np.asarray(a, dtype=np.float16).astype(np.float32)
        bits = encode(a, T.BF16)  # round to nearest even, as the bf16 file stores it
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return round_rows


def output_path(plan: Plan, outfile: str | None) -> Path:
    """--outfile may be a directory, a file name, or a template with {ftype}/{outtype}/{FTYPE}/{OUTTYPE}."""
    if not outfile:
        return Path(plan.default_filename())
    path = Path(outfile)
    if path.is_dir():
        return path / plan.default_filename()
    lower, upper = plan.type_label.lower(), plan.type_label
    text = str(outfile)
    for key, value in (("{ftype}", lower), ("{outtype}", lower), ("{FTYPE}", upper), ("{OUTTYPE}", upper),
                       ("{}", lower)):
        text = text.replace(key, value)
    return Path(text)
