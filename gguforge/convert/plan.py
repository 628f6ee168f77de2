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

from gguf import GGMLQuantizationType as T, LlamaFileType
from gguf.utility import naming_convention, size_label

from ..archs import lookup
from ..archs.base import DecoderArch, UnmappedTensor
from ..errors import UserError
from ..quantize.encode import encode
from ..quantize.presets import UNSUPPORTED, Preset, parse_preset, preset_names
from ..quantize.imatrix import (NEEDS_IMATRIX_HINT, LoadedImatrix, add_metadata as add_imatrix_metadata,
                                check_required, coverage_for, load_imatrix, mtp_first_block, without_imatrix_refusal)
from ..quantize.rules import TensorIn, model_is_70b, model_n_gqa, plan_quantization, written_shape
from . import fuse as fusion
from .metadata import GeneralInfo, add_general_metadata, apply_overrides, general_info, model_id_for
from ..archs.options import ConvertOptions
from ..checkpoint.read import Checkpoint, read_json_object
from ..archs.vision import VisionTower
from ..checkpoint.lazy import Lazy
from .validate import validate_checkpoint
from .vocab import vocabulary
from ..format.types import FLOAT_TYPES, QUANT_VERSION, block_size
from ..format.writer import Metadata, TensorEntry

# The reference converter's own output types (convert_hf_to_gguf.py --outtype): every tensor the dtype
# policy does not keep in F32 gets this type, quantized from the checkpoint's float32 values.
CONVERTER_OUTTYPES = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}


@dataclass
class PlannedTensor(TensorEntry):
    tensor: Lazy = field(default=None, repr=False)
    imatrix: np.ndarray | None = field(default=None, repr=False)  # importance weights (n_expert, ne0)

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
    shards: list = field(default_factory=list)  # format.split.Shard per output file, once planned
    coverage: object = None  # --imatrix: quantize.imatrix.Coverage
    imatrix: LoadedImatrix | None = field(default=None, repr=False)  # --imatrix, as loaded
    warnings: list = field(default_factory=list)  # one line each, for the CLI to print
    refusal: str | None = None  # why this plan cannot be written (a dry run shows it as a warning)
    mapped: list = field(default_factory=list, repr=False)  # map_tensors' (name, Lazy) list, for plan_conversion
    source: object = None  # a quantized checkpoint's checkpoint.dequant.QuantSource (--dry-run shows it)

    @property
    def n_params(self) -> int:
        return sum(prod(t.shape) for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def default_filename(self) -> str:
        if self.arch.options.mmproj and self.general is not None:
            # llama.cpp names vision encoders mmproj-<name>-<TYPE>.gguf: no size label
            m = self.general.meta
            return "mmproj-" + naming_convention(self.general.file_stem, None, m.finetune, m.version, None,
                                                 self.type_label) + ".gguf"
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
        yield from arch.extra_tensors()
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
    return [(name, dequant_noted(t, checkpoint)) for name, t in outputs.items()]


def dequant_noted(tensor: Lazy, checkpoint: Checkpoint) -> Lazy:
    """`tensor` with the dequantization steps of its sources first among its notes (for --dry-run; a
    stack or split of dequantized weights does not carry them)."""
    if checkpoint.quantization is None:
        return tensor
    parts = [checkpoint.tensors.get(s) for s in tensor.sources]
    steps = dict.fromkeys(t.note for t in parts if getattr(t, "computed", False))
    missing = tuple(n for n in steps if n not in tensor.notes)
    if not missing:
        return tensor
    out = tensor.noted()
    out.notes = missing + tensor.notes
    return out


def checkpoint_float_type(checkpoint: Checkpoint) -> str | None:
    """The stored type of the first tensor with two or more dimensions ('F32', 'F16', 'BF16'), as
    llama.cpp's converter picks it for 'auto' (of a quantized checkpoint: the first BF16 or F16 one among
    the stored tensors, which it looks at before dequantizing)."""
    if checkpoint.quantization is not None:
        return checkpoint.quantization.auto_type
    for t in checkpoint.tensors.values():
        if len(t.shape) >= 2:
            return t.dtype
    return None


def resolve_outtype(outtype: str, checkpoint: Checkpoint) -> str:
    """'auto' follows the checkpoint: bf16 for bf16 weights, else f16 (as llama.cpp's converter)."""
    if outtype != "auto":
        return outtype
    return "bf16" if checkpoint_float_type(checkpoint) == "BF16" else "f16"


def preset_base(checkpoint: Checkpoint) -> T:
    """The float GGUF a one-pass preset equals llama-quantize of: the checkpoint's own float type, so
    values are quantized as stored (float32 stays float32; bf16/f16 are widened exactly). Dequantized
    weights are float32 values: the F32 file, so that nothing is rounded before the preset."""
    if checkpoint.quantization is not None:
        return T.F32
    return {"BF16": T.BF16, "F16": T.F16}.get(checkpoint_float_type(checkpoint) or "", T.F32)


def float_type(gguf_name: str, tensor: Lazy, outtype: T, arch: DecoderArch) -> T:
    """Dtype policy: 1-D tensors, norms and a few arch-specific tensors stay F32."""
    if tensor.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return T.F32
    if (forced := arch.forced_type(gguf_name, outtype)) is not None:
        return forced
    if arch.keep_f32(gguf_name):
        return T.F32
    if outtype in FLOAT_TYPES:
        return outtype
    block, _ = block_size(outtype)
    if tensor.shape[-1] % block:
        return T.F16  # as llama.cpp's converter: rows that do not fill whole blocks stay F16
    return outtype


def fp8_as_q8(checkpoint: Checkpoint, options: ConvertOptions, preset, warnings: list):
    """--fp8-as-q8 (llama.cpp's converter: tensor_force_quant): a tensor whose source (the last of them in
    file order, the one the converter is handling when it writes the tensor) was dequantized from FP8 is
    written as Q8_0 whatever the outtype, unless it is 1-D or a norm; rows that do not fill Q8_0 blocks
    fall back to F16 as the converter's quantizer does. Returns name, tensor -> forced type or None."""
    if not options.fp8_as_q8:
        return lambda name, t: None
    if preset is not None:
        raise UserError("--fp8-as-q8 applies to the converter's own types (f32, f16, bf16, q8_0), not to a "
                        f"quantize preset ({options.outtype})", hint="a preset already chooses every tensor's type")
    q = checkpoint.quantization
    fp8 = q.fp8 if q is not None else frozenset()
    if not fp8:
        warnings.append("--fp8-as-q8: the checkpoint has no FP8 weights; nothing is kept as Q8_0")
    order = {name: i for i, name in enumerate(checkpoint.tensors)}

    def forced(name: str, t: Lazy) -> T | None:
        last = max(t.sources, key=lambda s: order.get(s, -1), default=None)
        if last not in fp8 or t.ndim < 2 or name.endswith("_norm.weight"):
            return None
        return T.F16 if t.shape[-1] % block_size(T.Q8_0)[0] else T.Q8_0
    return forced


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


def plan_conversion(checkpoint: Checkpoint, options: ConvertOptions, display_name: str | None = None,
                    mapped: list[tuple[str, Lazy]] | None = None, loaded: LoadedImatrix | None = None) -> Plan:
    """`mapped`: the tensors as map_tensors gave them for an earlier plan of the same checkpoint and options
    but another outtype (convert-hf --outtype A,B shares them, so each is read once for all outputs);
    `loaded`: that plan's importance matrix (read and normalised once for all outputs)."""
    hparams = checkpoint.hparams
    arch = lookup(checkpoint.config)(hparams, options, list(checkpoint.tensors))
    if options.mmproj:
        arch = vision_encoder(arch, checkpoint, options)
    validate_checkpoint(checkpoint, arch, check_tensors=not options.vocab_only)
    write_vocab = (vocabulary(arch.vocab)(checkpoint.root, arch.vocab_config(hparams), options.pre_tokenizer)
                   if arch.vocab else None)
    outtype = resolve_outtype(options.outtype.lower(), checkpoint)
    preset = None
    if outtype in CONVERTER_OUTTYPES:
        ggml_out, file_type = CONVERTER_OUTTYPES[outtype]
    elif options.mmproj:
        raise UserError(f"--mmproj writes f32, f16, bf16 or q8_0, not {options.outtype!r}",
                        hint="convert to f16 or bf16, then run `gguforge quantize` on the mmproj file")
    else:
        preset = parse_outtype_preset(options.outtype)
        # Plan as the float file llama-quantize would be given: the checkpoint's own float type.
        ggml_out, file_type, outtype = preset_base(checkpoint), preset.file_type, preset.name

    if mapped is None:
        mapped = [] if options.vocab_only else map_tensors(checkpoint, arch)
    plan_warnings: list[str] = []
    q8 = fp8_as_q8(checkpoint, options, preset, plan_warnings)
    tensors = [PlannedTensor(name, t.shape, forced if (forced := q8(name, t)) is not None
                             else float_type(name, t, ggml_out, arch), t) for name, t in mapped]

    counts = count_params(tensors)
    general = general_info(checkpoint.root, checkpoint.config, model_id_for(checkpoint.root, display_name),
                           model_name=options.model_name, overrides=options.metadata_overrides,
                           total_params=counts[0], computed_size_label=size_label(*counts) if tensors else None)
    name, label = general.meta.name, general.meta.size_label
    md = Metadata()
    md.str("general.architecture", arch.gguf_arch)
    md.str("general.type", arch.gguf_type)
    add_general_metadata(md, general.meta)
    arch.file_type = int(file_type)
    arch.add_metadata(md)
    if "general.file_type" not in md:
        md.u32("general.file_type", int(file_type))
    md.u32("general.quantization_version", QUANT_VERSION)
    if write_vocab is not None:
        write_vocab(md)
        arch.after_vocab(md)
    apply_overrides(md, options.metadata_overrides)
    if options.imatrix is not None and preset is None:
        raise UserError("--imatrix needs a quantize preset as --outtype (Q4_K_M, IQ4_XS, Q2_K_S, ...)",
                        hint="f16/bf16/q8_0 do not use an importance matrix")
    im = loaded or (load_imatrix(options.imatrix) if options.imatrix is not None else None)
    plan = Plan(arch, md, tensors, file_type, outtype.upper(), name, label, general, options.vocab_only)
    plan.warnings.extend(plan_warnings)
    plan.source = checkpoint.quantization
    plan.imatrix = im
    plan.warnings.extend(arch.notes())
    if preset is not None:
        plan.tensors = apply_preset(tensors, preset, md, ggml_out, im, plan)
        if options.imatrix is not None and im is None:
            plan.warnings.insert(0, f"no entries of {options.imatrix.path} are left after --include-weights/"
                                    "--exclude-weights: quantizing without an importance matrix")
    plan.mapped = mapped
    return plan


def vision_encoder(arch: DecoderArch, checkpoint: Checkpoint, options: ConvertOptions) -> DecoderArch:
    """--mmproj: the checkpoint's vision encoder, planned in place of its text model."""
    for flag, given in (("--vocab-only", options.vocab_only), ("--mtp", options.mtp_only), ("--no-mtp", options.no_mtp)):
        if given:
            raise UserError(f"--mmproj cannot be combined with {flag}: an mmproj file holds the vision encoder only")
    if not isinstance(arch, VisionTower):
        raise UserError(f"--mmproj: {arch.gguf_arch} models have no vision tower", hint="convert without --mmproj")
    return arch.vision(processor_config(checkpoint.root))


def processor_config(root: Path) -> dict:
    """preprocessor_config.json, then processor_config.json's image_processor over it (as llama.cpp's
    converter merges them: MmprojModel.__init__); a missing file contributes nothing."""
    merged: dict = {}
    for filename, nested in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        path = root / filename
        if path.is_file():
            cfg = read_json_object(path, filename)
            inner = cfg.get(nested)
            merged.update(cfg, **(inner if isinstance(inner, dict) else {}))
    return merged


def parse_outtype_preset(outtype: str) -> Preset:
    """A llama-quantize preset given as --outtype (any case); the converter's own types come first."""
    try:
        preset = parse_preset(outtype)
    except UserError:
        if outtype.strip().upper() in UNSUPPORTED:
            raise  # a known llama-quantize preset gguforge cannot write yet: say why
        preset = None
    if preset is None or preset.is_float or outtype.strip().isdigit():
        raise UserError(f"unknown output type {outtype!r}",
                        hint="choose one of: " + ", ".join([*CONVERTER_OUTTYPES, "auto"]) + ", or a quantize preset: "
                        + ", ".join(n for n in preset_names() if not parse_preset(n).is_float))
    return preset


def apply_preset(tensors: list[PlannedTensor], preset: Preset, md: Metadata, base: T,
                 imatrix: LoadedImatrix | None = None, report=None) -> list[PlannedTensor]:
    """Give each tensor the type llama-quantize would choose from the `base` float file; the converter's
    tensor order is kept (llama-quantize's order only decides its counters).

    Tensors that are not the checkpoint's stored values (a transform computed them in float32) are
    rounded through a 16-bit `base` first, so the bytes equal llama-quantize run on that float GGUF;
    from a float32 checkpoint nothing is rounded.

    With an importance matrix (`imatrix`), each quantized tensor gets its weights as llama-quantize
    --imatrix looks them up, the four quantize.imatrix.* keys go last, and the coverage report and
    warnings are set on `report` (the Plan).
    """
    arch = md.get("general.architecture")
    plans = plan_quantization([TensorIn(t.name, t.shape, t.ggml_type) for t in tensors], preset, arch=arch,
                              n_layer_all=int(md.get(f"{arch}.block_count", 0)),
                              n_expert=int(md.get(f"{arch}.expert_count", 0) or 0),
                              model_is_70b=model_is_70b(arch, md.get), n_gqa=model_n_gqa(arch, md.get),
                              has_imatrix=imatrix is not None)
    chosen = {p.name: p for p in plans}
    weights = imatrix_weights(plans, preset, imatrix, mtp_first_block(arch, md.get), report)
    add_imatrix_metadata(md, imatrix)
    out = []
    for t in tensors:
        p = chosen[t.name]
        lazy = t.tensor
        # stored values, at most moved around: already exactly representable in `base`
        exact = lazy.stored is not None and lazy.stored[0] == base.name
        if p.dst_type != t.ggml_type and base in (T.F16, T.BF16) and not exact:
            lazy = lazy.per_rows(_round_through(base), dtype=np.float32)
        # llama-quantize's shapes too: `[1, n]` (Qwen3.5-MoE's ffn_gate_inp_shexp) is written `[n]`
        out.append(PlannedTensor(t.name, written_shape(t.shape), p.dst_type, lazy, weights.get(t.name)))
    return out


def imatrix_weights(plans, preset: Preset, imatrix: LoadedImatrix | None, mtp_first: int | None, report) -> dict:
    """Tensor name -> importance weights, with quantize's checks: a preset whose types need an imatrix
    refuses to run without one, and --imatrix-missing error refuses tensors without data."""
    if imatrix is None:
        line = without_imatrix_refusal(plans, preset)
        if line:
            if report is None:
                raise UserError(line, hint=NEEDS_IMATRIX_HINT)
            report.refusal = line  # convert_hf raises it unless this is a dry run (llama-quantize only warns)
            report.warnings.append(line + "; the dry run completed, but writing it needs --imatrix")
        return {}
    coverage, found = coverage_for(imatrix, [(p.name, p.name, p.shape, p.dst_type, p.converts) for p in plans],
                                   mtp_first)
    weights = {name: t.weights for name, t in found.items() if t.weights is not None}
    check_required(plans, preset, weights)
    coverage.enforce(imatrix.missing)
    if report is not None:
        report.coverage = coverage
        if (line := coverage.summary()) is not None:
            report.warnings.append(line)
    return weights


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
