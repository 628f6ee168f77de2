"""llama-quantize's per-tensor type selection, as a pure function.

Given tensor names, shapes and source types, a preset and a few hparams, decide the ggml type
each tensor is written in, exactly as llama.cpp's src/llama-quant.cpp does.
Upstream: src/llama-quant.cpp — tensor_allows_quantization (never quantized), tensor_get_category
(categories), llama_tensor_get_type_impl (the mixture rules), tensor_type_fallback (shape fallback),
llama_model_quantize_impl (order, counters, what is refused).

Shapes are numpy order throughout (shape[-1] == ggml ne0, the row length that must be a multiple
of the block size).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from gguf import GGMLQuantizationType as T

from gguforge.errors import UserError
from gguforge.format.types import FLOAT_TYPES, block_size as _block_and_bytes, tensor_nbytes
from gguforge.quantize.presets import Preset, parse_preset

NON_QUANTIZED_TYPES = (T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64)

ARCH_FALCON = "falcon"
ARCH_GLM5_NEXT = "glm5-next"
ARCH_BAILINGMOE3 = "bailingmoe3"


def is_quantized(ggml_type: T) -> bool:
    return ggml_type not in NON_QUANTIZED_TYPES


def block_size(ggml_type: T) -> int:
    return _block_and_bytes(ggml_type)[0]


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass
class QuantOptions:
    pure: bool = False
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    leave_output_tensor: bool = False
    # (regex, type); the first pattern that re.search-matches a name wins.
    tensor_type_overrides: Sequence[tuple[str, T]] = ()
    allow_requantize: bool = False
    # Refuse instead of silently falling back to Q5_0/Q5_1/Q8_0/F16 (llama.cpp #26616).
    no_fallback: bool = False
    # --prune-layers: block numbers to drop; the rest are renumbered (see prune_and_renumber).
    prune_layers: Sequence[int] = ()
    # --override-kv: "KEY=TYPE:VALUE" strings or overrides.KvOverride (written after the input's keys; the
    # hyper-parameters the rules read see them too).
    kv_overrides: Sequence = ()
    # --imatrix FILE [--include-weights/--exclude-weights/--imatrix-missing]: a quantize.imatrix.ImatrixOptions
    imatrix: object = None


@dataclass
class TensorIn:
    name: str
    shape: tuple[int, ...]  # numpy order
    type: T                 # source type

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.type = T(self.type)


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    src_type: T
    dst_type: T
    fallback_from: T | None  # type the rules chose before the shape fallback replaced it
    reason: str
    source_name: str = ""    # the input tensor's name when --prune-layers renumbered it ("" = same name)

    @property
    def src_name(self) -> str:
        return self.source_name or self.name

    @property
    def converts(self) -> bool:
        """False means the bytes are copied unchanged (llama.cpp: cur_type == new_type)."""
        return self.src_type != self.dst_type

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def src_nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.src_type)

    @property
    def dst_nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dst_type)


# ---------------------------------------------------------------------------------------------
# Shapes and sizes


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing ne=1 dims (leading in numpy order) do not count; at least 1."""
    ne = list(reversed(shape))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def written_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape llama-quantize writes (gguf.cpp stores ggml_n_dims dimensions): `[1, n]` becomes `[n]`."""
    return tuple(shape[len(shape) - ggml_n_dims(shape):])


@dataclass(frozen=True)
class SizeSummary:
    n_elements: int
    src_bytes: int
    dst_bytes: int

    @property
    def src_bpw(self) -> float:
        return 8.0 * self.src_bytes / self.n_elements if self.n_elements else 0.0

    @property
    def dst_bpw(self) -> float:
        return 8.0 * self.dst_bytes / self.n_elements if self.n_elements else 0.0


def size_summary(plans: Iterable[TensorPlan]) -> SizeSummary:
    """Totals as llama-quantize reports them (tensor data only, no padding or metadata)."""
    plans = list(plans)
    return SizeSummary(
        n_elements=sum(p.n_elements for p in plans),
        src_bytes=sum(p.src_nbytes for p in plans),
        dst_bytes=sum(p.dst_nbytes for p in plans),
    )


def bits_per_weight(plans: Iterable[TensorPlan]) -> float:
    return size_summary(plans).dst_bpw


def fallback_summary(plans: Sequence[TensorPlan]) -> str | None:
    """llama-quantize's closing warning, or None when no tensor needed a fallback."""
    n = sum(p.fallback_from is not None for p in plans)
    if not n:
        return None
    return f"{n} of {len(plans)} tensor(s) required fallback quantization"


# Types whose quantizers cannot run without importance weights (ggml_quantize_requires_imatrix and
# llama-quant.cpp tensor_requires_imatrix).
_IMATRIX_ALWAYS = (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S)


def tensor_requires_imatrix(name: str, dst_type: T, preset: Preset) -> bool:
    """llama-quant.cpp tensor_requires_imatrix, on a tensor's final type: the lattice types always, Q2_K
    in a Q2_K_S file; token_embd, per_layer_token_embd and output.weight never."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if dst_type in _IMATRIX_ALWAYS:
        return True
    return dst_type == T.Q2_K and preset.name == "Q2_K_S"


def requiring_imatrix(plans: Sequence[TensorPlan], preset: Preset) -> list[TensorPlan]:
    """Quantized tensors whose type needs an importance matrix (llama-quantize: "this quantization
    requires an imatrix!" when none is given)."""
    return [p for p in plans if not p.reason.startswith("never quantized")
            and tensor_requires_imatrix(p.name, p.dst_type, preset)]


# ---------------------------------------------------------------------------------------------
# Order (llama_model_quantize_impl)

_BLOCK_PREFIX = re.compile(r"blk\.\s*([+-]?\d+)")  # what sscanf(name, "blk.%d.") accepts


def block_index(name: str) -> int | None:
    m = _BLOCK_PREFIX.match(name)
    return int(m.group(1)) if m else None


def sort_key(name: str) -> tuple[int, str]:
    """llama.cpp's weights_map order: block number (non-block = -1), then the full name."""
    layer = block_index(name)
    return (-1 if layer is None else layer, name)


def llama_quantize_order(names: Iterable[str]) -> list[str]:
    return sorted(names, key=sort_key)


# ---------------------------------------------------------------------------------------------
# --prune-layers (llama-quant.cpp: remap_layer, and the block_count it sets afterwards)

_BLOCK_ANYWHERE = re.compile(r"blk\.(\d+)\.")  # remap_layer's std::regex_search: anywhere in the name


def prune_and_renumber(names: Sequence[str], prune: Sequence[int]) -> tuple[list[str | None], int]:
    """New names for `names` (llama-quantize's order) with the blocks in `prune` dropped (None) and the
    others renumbered, and the block count llama-quantize then writes.

    As remap_layer does: blocks are numbered in the order they are first met; a block below the smallest
    pruned one keeps its number, every later kept block takes the next free number."""
    prune = sorted(set(prune))
    if not prune:
        return list(names), -1
    mapped: dict[int, int | None] = {}
    next_id = 0
    out: list[str | None] = []
    for name in names:
        m = _BLOCK_ANYWHERE.search(name)
        if m is None:
            out.append(name)
            continue
        blk = int(m.group(1))
        if blk not in mapped:
            if blk in prune:
                mapped[blk] = None
            elif blk < prune[0]:
                mapped[blk], next_id = blk, blk + 1
            else:
                mapped[blk], next_id = next_id, next_id + 1
        new = mapped[blk]
        out.append(None if new is None else name[:m.start(1)] + str(new) + name[m.end(1):])
    return out, next_id


# ---------------------------------------------------------------------------------------------
# Never quantized (tensor_allows_quantization)

# Substrings that keep a tensor in its source type, with a short why.
_KEEP_IF_CONTAINS: tuple[tuple[str, str], ...] = (
    ("_norm.weight", "norm"),
    ("ffn_gate_inp.weight", "MoE router"),
    ("ffn_gate_tid2eid.weight", "MoE routing table"),
    ("altup", "tiny altup"),
    ("laurel", "tiny laurel"),
    ("per_layer_model_proj", "per-layer projection"),
    ("ssm_conv1d", "ssm_conv1d"),
    ("shortconv.conv.weight", "short conv"),
    ("indexer.k_proj.weight", "indexer projection"),
    ("indexer.q_proj.weight", "indexer projection"),
    *((f"time_mix_{w}.weight", "small RWKV weight") for w in (
        "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
        "decay_w1", "decay_w2", "lerp_fused")),
    ("attn_rel_b.weight", "relative position bias"),
    (".position_embd", "multimodal position embedding"),
    ("sam.pos_embd", "multimodal"),
    ("sam.neck.", "multimodal"),
    ("sam.net_", "multimodal"),
    (".rel_pos", "multimodal"),
    (".patch_embd", "multimodal"),
    (".patch_merger", "multimodal"),
    ("a.rvq.codebook", "audio codebook"),
    ("mm.a.code_embd", "audio codebook"),
)

_KEEP_IF_EQUALS = {"position_embd.weight": "position embedding", "token_types.weight": "token types"}

_GLM5_NEXT_KEEP_IF_CONTAINS = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
)


def never_quantized_reason(name: str, shape: Sequence[int], *, arch: str, leave_output_tensor: bool) -> str | None:
    """Why llama.cpp's tensor_allows_quantization() says no, or None if the tensor is eligible."""
    if ggml_n_dims(shape) < 2:
        return "1-D"
    if not name.endswith("weight"):
        return "no 'weight' suffix"
    if leave_output_tensor and name == "output.weight":
        return "--leave-output-tensor"
    if name in _KEEP_IF_EQUALS:
        return _KEEP_IF_EQUALS[name]
    for needle, why in _KEEP_IF_CONTAINS:
        if needle in name:
            return why
    if arch == ARCH_GLM5_NEXT:
        for needle in _GLM5_NEXT_KEEP_IF_CONTAINS:
            if needle in name:
                return "glm5-next keeps " + needle
    return None


# ---------------------------------------------------------------------------------------------
# Categories (tensor_get_category)


class Category(enum.Enum):
    OUTPUT = "output"
    TOKEN_EMBD = "token_embd"
    ATTENTION_QKV = "attn_qkv"
    ATTENTION_KV_B = "attn_kv_b"
    ATTENTION_V = "attn_v"
    ATTENTION_K = "attn_k"
    ATTENTION_Q = "attn_q"
    ATTENTION_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", Category.ATTENTION_QKV),
    ("attn_kv_b.weight", Category.ATTENTION_KV_B),
    ("attn_v.weight", Category.ATTENTION_V),
    ("attn_k.weight", Category.ATTENTION_K),
    ("attn_q.weight", Category.ATTENTION_Q),
    ("attn_output.weight", Category.ATTENTION_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)

ATTN_V_LIKE = (Category.ATTENTION_V, Category.ATTENTION_QKV, Category.ATTENTION_KV_B)


def tensor_category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Category.TOKEN_EMBD
    for needle, category in _CATEGORY_SUBSTRINGS:
        if needle in name:
            return category
    return Category.OTHER


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers the *_M mixtures give extra bits: first and last eighth, and every third in between."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


# ---------------------------------------------------------------------------------------------
# The mixture rules: llama_tensor_get_type_impl, for the presets we support


@dataclass
class _Model:
    arch: str
    n_layer_all: int
    n_expert: int
    is_70b: bool
    n_gqa: int = 0
    has_imatrix: bool = False  # llama-quantize's qs.has_imatrix: an imatrix with entries was given


def layer0_heads(arch: str, get) -> tuple[int, int]:
    """(head_count, head_count_kv) of layer 0, as llama_hparams::n_head(0) / n_head_kv(0) read them: either
    key may be a per-layer array (llama-model.cpp load_hparams, get_key_or_arr), head_count_kv defaults to
    head_count. `get(key)` reads a GGUF metadata value."""
    def first(value):
        if value is None or isinstance(value, (int, float)):
            return value
        values = list(value)
        return values[0] if values else None

    n_head = int(first(get(f"{arch}.attention.head_count")) or 0)
    n_head_kv = first(get(f"{arch}.attention.head_count_kv"))
    return n_head, n_head if n_head_kv is None else int(n_head_kv)


def model_n_gqa(arch: str, get) -> int:
    """llama_hparams::n_gqa(0) (llama-hparams.cpp): head_count / head_count_kv of layer 0, 0 when there are
    no KV heads."""
    n_head, n_head_kv = layer0_heads(arch, get)
    return n_head // n_head_kv if n_head_kv else 0


@dataclass
class _Counters:
    n_attention_wv: int
    has_tied_embeddings: bool
    i_attention_wv: int = 0
    i_ffn: dict[Category, int] = field(default_factory=lambda: {
        Category.FFN_DOWN: 0, Category.FFN_GATE: 0, Category.FFN_UP: 0})


def _ffn_layer(counters: _Counters, model: _Model, category: Category, name: str) -> int:
    """Layer index of an FFN tensor: parsed from the name for MoE (experts may be stored out of
    order), else the running count of that category."""
    if max(1, model.n_expert) == 1:
        return counters.i_ffn[category]
    layer = block_index(name)
    if layer is None:
        raise UserError(f"failed to determine the layer of tensor {name!r}",
                        hint="MoE FFN tensors must be named blk.N.*")
    if not 0 <= layer < model.n_layer_all:
        raise UserError(f"bad layer {layer} for tensor {name!r}: must be in [0, {model.n_layer_all})",
                        hint="check the block_count metadata")
    return layer


# Presets whose output (and tied token_embd) is Q5_K instead of Q6_K.
_IQ_LOW_OUTPUT_Q5_K = ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
# The 1-2 bit lattice presets, with their own branch of rules.
_IQ2_GROUP = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")


def _iq2_group_type(ftype: str, category: Category, model: _Model, counters: _Counters, d: T) -> tuple[T, str]:
    """llama_tensor_get_type_impl's branch for IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ1_S and IQ1_M: attn_v-like,
    attn_k (8 experts), ffn_down by running count (not by layer number) and attn_output; the rest keep the
    default type, with none of the other presets' 70B, 8-expert or layer lookups."""
    low = T.IQ3_S if ftype in ("IQ2_S", "IQ2_M") else T.Q2_K
    if category in ATTN_V_LIKE:
        i = counters.i_attention_wv
        counters.i_attention_wv += 1
        if model.n_gqa >= 4 or model.n_expert >= 4:
            return T.Q4_K, f"attn_v-like {i}/{counters.n_attention_wv}, n_gqa {model.n_gqa} / n_expert {model.n_expert}"
        return low, f"attn_v-like {i}/{counters.n_attention_wv} ({ftype})"
    if category == Category.ATTENTION_K and model.n_expert == 8:
        return T.Q4_K, "attn_k, 8 experts"
    if category == Category.FFN_DOWN:
        i, n = counters.i_ffn[category], model.n_layer_all
        counters.i_ffn[category] += 1
        if i < n // 8:
            return low, f"ffn_down {i}/{n} < n/8"
        return d, f"ffn_down {i}/{n}"
    if category == Category.ATTENTION_OUTPUT:
        if model.n_expert == 8:
            return T.Q5_K, "attn_output, 8 experts"
        up = {"IQ1_S": T.IQ2_XXS, "IQ1_M": T.IQ2_XXS, "IQ2_S": T.IQ3_S, "IQ2_M": T.IQ3_S}.get(ftype)
        return (up, f"attn_output ({ftype})") if up else (d, "attn_output")
    return d, category.value


def _mixture_type(name: str, shape: tuple[int, ...], category: Category, preset: Preset, model: _Model,
                  counters: _Counters, output_tensor_type: T | None) -> tuple[T, str]:
    d = preset.default_type
    ftype = preset.name
    falcon = model.arch == ARCH_FALCON
    ne0 = shape[-1]

    if model.arch == ARCH_GLM5_NEXT and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        return T.Q8_0, "glm5-next keeps this >= Q8_0"

    if category == Category.OUTPUT or (category == Category.TOKEN_EMBD and counters.has_tied_embeddings):
        what = "output" if category == Category.OUTPUT else "tied token_embd (as output)"
        if output_tensor_type is not None:
            return output_tensor_type, f"{what}: --output-tensor-type"
        if ftype == "MXFP4_MOE":
            return T.Q8_0, f"{what}: MXFP4_MOE"
        if falcon:
            return T.Q8_0, f"{what}: falcon"
        if ne0 % block_size(d) != 0:
            return T.Q8_0, f"{what}: ne0 % {block_size(d)} != 0"
        if ftype in _IQ_LOW_OUTPUT_Q5_K:
            return T.Q5_K, f"{what} ({ftype})"
        return (T.Q6_K if d != T.Q8_0 else T.Q8_0), what

    if ftype == "MXFP4_MOE":
        # experts (3-D; for bailingmoe3 only its FFN experts) MXFP4, everything else Q8_0
        experts = len(shape) >= 3 and shape[-3] > 1 and (
            model.arch != ARCH_BAILINGMOE3 or category in (Category.FFN_UP, Category.FFN_GATE, Category.FFN_DOWN))
        return (T.MXFP4, "experts (MXFP4_MOE)") if experts else (T.Q8_0, "not experts (MXFP4_MOE)")

    if category == Category.TOKEN_EMBD:
        if ftype in _IQ2_GROUP:
            low = T.IQ3_S if ftype in ("IQ2_S", "IQ2_M") else T.Q2_K
            return low, f"token_embd (untied, {ftype})"
        if ftype == "IQ3_XXS":
            return T.IQ3_S, "token_embd (untied, IQ3_XXS)"
        if ftype in ("TQ1_0", "TQ2_0", "Q2_0"):
            return T.Q4_K, f"token_embd (untied, {ftype})"
        return d, "token_embd (untied)"

    if ftype in _IQ2_GROUP:
        return _iq2_group_type(ftype, category, model, counters, d)

    if category in ATTN_V_LIKE:
        i, n = counters.i_attention_wv, counters.n_attention_wv
        counters.i_attention_wv += 1
        new_type, why = d, f"attn_v-like {i}/{n}"
        gqa = model.n_gqa
        if ftype == "Q2_K":
            new_type = T.Q4_K if gqa >= 4 else T.Q3_K
            why = f"attn_v-like, n_gqa {gqa} {'>=' if gqa >= 4 else '<'} 4"
        elif ftype == "Q2_K_S" and gqa >= 4:
            new_type, why = T.Q4_K, f"attn_v-like, n_gqa {gqa} >= 4"
        elif ftype == "IQ3_XXS":
            new_type = T.Q4_K if gqa >= 4 else T.IQ3_XXS if model.has_imatrix else T.IQ3_S
            why = f"attn_v-like, n_gqa {gqa}" + (" >= 4" if gqa >= 4 else ", imatrix" if model.has_imatrix else
                                                  ", no imatrix")
        elif ftype in ("IQ3_XS", "IQ3_S") and gqa >= 4:
            new_type, why = T.Q4_K, f"attn_v-like, n_gqa {gqa} >= 4"
        elif ftype == "IQ3_M":
            new_type, why = T.Q4_K, f"attn_v-like {i}/{n} (IQ3_M)"
        elif ftype == "Q3_K_M":
            new_type = T.Q5_K if i < 2 else T.Q4_K
            why = f"attn_v-like {i}/{n} {'first 2' if i < 2 else 'after 2'}"
        elif ftype == "Q3_K_L":
            new_type, why = T.Q5_K, f"attn_v-like {i}/{n}"
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            new_type, why = T.Q5_K, f"attn_v-like, n_gqa {gqa} >= 4"
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new_type, why = T.Q6_K, f"attn_v-like {i}/{n} use_more_bits"
        elif ftype == "Q4_K_S" and i < 4:
            new_type, why = T.Q5_K, f"attn_v-like {i}/{n} first 4"
        if model.is_70b and new_type in (T.Q3_K, T.Q4_K):
            new_type, why = T.Q5_K, why + ", 70B"
        if model.n_expert == 8:
            new_type, why = T.Q8_0, why + ", 8 experts"
        return new_type, why

    if category == Category.ATTENTION_K and model.n_expert == 8:
        return T.Q8_0, "attn_k, 8 experts"
    if category in (Category.ATTENTION_K, Category.ATTENTION_Q):
        lower = {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}.get(ftype)
        return (lower, f"{category.value} ({ftype})") if lower else (d, category.value)

    if category == Category.FFN_DOWN:
        i = _ffn_layer(counters, model, category, name)
        n = model.n_layer_all
        counters.i_ffn[category] += 1
        if ftype == "Q2_K":
            return T.Q3_K, f"ffn_down layer {i}/{n}"
        if ftype == "Q2_K_S":
            if i < n // 8:
                return T.Q4_K, f"ffn_down layer {i}/{n} < n/8"
            return d, f"ffn_down layer {i}/{n}"
        if ftype == "IQ3_XXS" and not model.has_imatrix:
            return (T.Q4_K if i < n // 8 else T.Q3_K), f"ffn_down layer {i}/{n}{' < n/8' if i < n // 8 else ''}, no imatrix"
        if ftype == "IQ3_M" and (i < n // 8 or (model.n_expert == 8 and use_more_bits(i, n))):
            return T.Q4_K, f"ffn_down layer {i}/{n} " + ("< n/8" if i < n // 8 else "use_more_bits, 8 experts")
        if ftype == "Q3_K_M":
            if i < n // 16:
                return T.Q5_K, f"ffn_down layer {i}/{n} < n/16"
            if not falcon or use_more_bits(i, n):
                return T.Q4_K, f"ffn_down layer {i}/{n}" + (" use_more_bits (falcon)" if falcon else "")
            return d, f"ffn_down layer {i}/{n} (falcon)"
        if ftype == "Q3_K_L":
            return (T.Q4_K, f"ffn_down layer {i}/{n} (falcon)") if falcon else (T.Q5_K, f"ffn_down layer {i}/{n}")
        if ftype == "Q4_K_M" and falcon:
            if i < n // 16:
                return T.Q6_K, f"ffn_down layer {i}/{n} < n/16 (falcon)"
            if use_more_bits(i, n):
                return T.Q5_K, f"ffn_down layer {i}/{n} use_more_bits (falcon)"
            return T.Q4_K, f"ffn_down layer {i}/{n} (falcon)"
        if ftype == "Q4_K_M" and use_more_bits(i, n):
            return T.Q6_K, f"ffn_down layer {i}/{n} use_more_bits"
        if ftype == "Q4_K_M":
            return d, f"ffn_down layer {i}/{n}"
        if ftype in ("IQ4_NL", "IQ4_XS") and i < n // 8 and not model.has_imatrix:
            return T.Q5_K, f"ffn_down layer {i}/{n} < n/8, no imatrix"
        if ftype == "Q5_K_M" and use_more_bits(i, n):
            return T.Q6_K, f"ffn_down layer {i}/{n} use_more_bits"
        if ftype == "Q4_K_S" and not falcon and i < n // 8:
            return T.Q5_K, f"ffn_down layer {i}/{n} < n/8"
        if ftype in ("Q4_0", "Q5_0") and model.has_imatrix and i < n // 8:
            return (T.Q4_1 if ftype == "Q4_0" else T.Q5_1), f"ffn_down layer {i}/{n} < n/8, imatrix"
        return d, f"ffn_down layer {i}/{n}"

    if category == Category.ATTENTION_OUTPUT:
        if falcon:
            return (T.Q4_K, "attn_output (falcon)") if ftype == "Q3_K_L" else (d, "attn_output")
        if model.n_expert == 8:
            if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                         "IQ3_M", "IQ4_XS"):
                return T.Q5_K, "attn_output, 8 experts"
            return d, "attn_output"
        bumped = {"Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K, "IQ3_M": T.Q4_K}.get(ftype)
        return (bumped, f"attn_output ({ftype})") if bumped else (d, "attn_output")

    if category in (Category.FFN_GATE, Category.FFN_UP):
        # The layer lookup runs (and can fail) and counts for every preset; only IQ3_XS has a rule.
        i = _ffn_layer(counters, model, category, name)
        counters.i_ffn[category] += 1
        n = model.n_layer_all
        if ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            return T.IQ3_XXS, f"{category.value} layer {i}/{n} in the middle (IQ3_XS)"
        return d, f"{category.value} layer {i}/{model.n_layer_all}"

    return d, "other"


# ---------------------------------------------------------------------------------------------
# Shape fallback (tensor_type_fallback)

_FALLBACKS = {
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.TQ1_0: T.Q4_0,
    T.TQ2_0: T.Q4_0,
    **({T.Q2_0: T.Q4_0} if hasattr(T, "Q2_0") else {}),
    **{t: T.IQ4_NL for t in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS)},
}


def _explicit_type(name: str, ne0: int, ggml_type: T, option: str) -> T:
    """--output-tensor-type / --token-embedding-type skip tensor_type_fallback in llama-quantize
    (llama_tensor_get_type returns them as given), which then aborts in ggml_row_size on a row its block
    does not divide: refused here before anything is written."""
    if ggml_type not in NON_QUANTIZED_TYPES and ne0 % block_size(ggml_type) != 0:
        fits = [t.name.lower() for t in (T.Q8_0, T.Q5_0, T.F16) if ne0 % block_size(t) == 0]
        raise UserError(f"{option} {ggml_type.name.lower()}: the rows of {name} ({ne0} values) are not a multiple of "
                        f"its block of {block_size(ggml_type)} (llama-quantize aborts on this)",
                        hint=f"choose a type whose block divides {ne0}, e.g. {fits[0]}")
    return ggml_type


def shape_fallback(ne0: int, target: T) -> T:
    """tensor_type_fallback: a type whose block size divides the row length ne0."""
    if ne0 % block_size(target) == 0:
        return target
    if target in _FALLBACKS:
        new_type = _FALLBACKS[target]
    elif block_size(target) <= 32:
        new_type = target  # already a 32-block type: nothing smaller to demote to
    else:
        raise UserError(f"no tensor type fallback is defined for type {target.name}")
    if ne0 % block_size(new_type) != 0:
        new_type = T.F16  # even the 32-block type does not fit: unusual shape
    return new_type


# ---------------------------------------------------------------------------------------------
# The plan


def _compile_overrides(overrides: Sequence[tuple[str, T]]) -> list[tuple[re.Pattern[str], T]]:
    compiled = []
    for pattern, ggml_type in overrides:
        try:
            compiled.append((re.compile(pattern), T(ggml_type)))
        except re.error as e:
            raise UserError(f"invalid --tensor-type pattern {pattern!r}: {e}") from None
    return compiled


def _first_override(name: str, overrides: list[tuple[re.Pattern[str], T]]) -> tuple[str, T] | None:
    for pattern, ggml_type in overrides:
        if pattern.search(name):
            return pattern.pattern, ggml_type
    return None


def _check_conversion(plan: TensorPlan, allow_requantize: bool) -> None:
    """What llama-quantize refuses when a tensor's bytes must actually be converted (llama_model_quantize_impl)."""
    if not plan.converts:
        return
    if is_quantized(plan.src_type):
        if not allow_requantize:
            raise UserError(
                f"requantizing from type {plan.src_type.name} is disabled (tensor {plan.name!r})",
                hint="pass --allow-requantize to dequantize and quantize again (loses quality)",
            )
    elif plan.src_type not in FLOAT_TYPES:
        raise UserError(f"cannot convert tensor {plan.name!r} of type {plan.src_type.name} "
                        f"to {plan.dst_type.name}")


def _fallback_error(fallbacks: list[TensorPlan]) -> UserError:
    shown = [f"{p.name} (ne0={p.shape[-1]}: {p.fallback_from.name}->{p.dst_type.name})" for p in fallbacks[:8]]
    more = f", and {len(fallbacks) - 8} more" if len(fallbacks) > 8 else ""
    return UserError(
        f"{len(fallbacks)} tensor(s) have rows not divisible by their block size and would fall back "
        f"to another type: " + ", ".join(shown) + more,
        hint="drop --no-fallback to accept the fallback types, or pick types with --tensor-type",
    )


# llama.cpp's LLM_TYPE_70B, the one model size llama-quantize's rules look at (more bits for attn_v),
# as each architecture's load_hparams sets it (src/models/<arch>.cpp; llama.cpp's
# llama_quant_model_from_metadata keeps only the llama rule). arch -> (block count, needs GQA).
LLM_TYPE_70B = {"llama": (80, True), "qwen2": (80, False), "deci": (80, False), "olmo": (80, False),
                "jais2": (68, False)}


def model_is_70b(arch: str, get) -> bool:
    """Whether llama.cpp loads this model as LLM_TYPE_70B; `get(key)` reads a GGUF metadata value."""
    rule = LLM_TYPE_70B.get(arch)
    if rule is None or get(f"{arch}.block_count") != rule[0]:
        return False
    if not rule[1]:
        return True
    n_head, n_head_kv = layer0_heads(arch, get)
    return n_head != n_head_kv  # the 65B has as many KV heads as heads


def plan_quantization(
    tensors: Sequence[TensorIn],
    preset: str | Preset,
    *,
    arch: str,
    n_layer_all: int,
    n_expert: int = 0,
    options: QuantOptions | None = None,
    model_is_70b: bool = False,
    n_gqa: int = 0,
    has_imatrix: bool = False,
) -> list[TensorPlan]:
    """Decide every tensor's output type like llama-quantize; plans come back in its output order.

    arch is general.architecture, n_layer_all is {arch}.block_count (MTP layers included), n_expert is
    {arch}.expert_count (0 if absent). model_is_70b stands for llama.cpp's LLM_TYPE_70B; n_gqa is
    llama.cpp's n_gqa() (see model_n_gqa), which the Q2_K and IQ4_NL/IQ4_XS attn_v rules test.
    has_imatrix: an importance matrix with entries is applied (the Q4_0/Q5_0 and IQ4_NL/IQ4_XS ffn_down rules).
    """
    preset = parse_preset(preset)
    options = options or QuantOptions()
    model = _Model(arch=arch, n_layer_all=n_layer_all, n_expert=n_expert, is_70b=model_is_70b, n_gqa=n_gqa,
                   has_imatrix=has_imatrix)
    overrides = _compile_overrides(options.tensor_type_overrides)

    ordered = sorted(tensors, key=lambda t: sort_key(t.name))
    for a, b in zip(ordered, ordered[1:]):
        if a.name == b.name:
            raise UserError(f"duplicate tensor name {a.name!r}")
    source_names: dict[str, str] = {}
    if options.prune_layers:
        ordered, source_names = _pruned(ordered, options.prune_layers)

    # Counted over every tensor in the file, eligible or not.
    categories = [tensor_category(t.name) for t in ordered]
    counters = _Counters(
        n_attention_wv=sum(c in ATTN_V_LIKE for c in categories),
        has_tied_embeddings=Category.OUTPUT not in categories,
    )

    plans = []
    for tensor, category in zip(ordered, categories):
        plan = _plan_one(tensor, category, preset, model, counters, options, overrides)
        if tensor.name in source_names:
            plan.source_name = source_names[tensor.name]
        _check_conversion(plan, options.allow_requantize)
        plans.append(plan)

    if options.no_fallback:
        fallbacks = [p for p in plans if p.fallback_from is not None]
        if fallbacks:
            raise _fallback_error(fallbacks)
    return plans


def _pruned(ordered: list[TensorIn], prune: Sequence[int]) -> tuple[list[TensorIn], dict[str, str]]:
    """The tensors left by --prune-layers, renamed, in the input's order; new name -> input name."""
    new_names, _ = prune_and_renumber([t.name for t in ordered], prune)
    kept, source_names, seen = [], {}, set()
    for tensor, new in zip(ordered, new_names):
        if new is None:
            continue
        if new in seen:
            raise UserError(f"--prune-layers renumbers two tensors to {new!r}",
                            hint="llama-quantize would write a broken file; this model's block names cannot be pruned")
        seen.add(new)
        kept.append(TensorIn(new, tensor.shape, tensor.type))
        if new != tensor.name:
            source_names[new] = tensor.name
    if not kept:
        raise UserError("--prune-layers removes every tensor")
    return kept, source_names


def _plan_one(tensor: TensorIn, category: Category, preset: Preset, model: _Model, counters: _Counters,
              options: QuantOptions, overrides: list[tuple[re.Pattern[str], T]]) -> TensorPlan:
    def planned(dst: T, reason: str, fallback_from: T | None = None) -> TensorPlan:
        return TensorPlan(tensor.name, tensor.shape, tensor.type, dst, fallback_from, reason)

    name = tensor.name
    if preset.only_copy:
        return planned(tensor.type, "never quantized (COPY)")
    keep = never_quantized_reason(name, tensor.shape, arch=model.arch,
                                  leave_output_tensor=options.leave_output_tensor)
    if keep is not None:
        return planned(tensor.type, f"never quantized ({keep})")
    ne0 = tensor.shape[-1]

    # These two early returns skip the shape fallback. A --tensor-type pattern may still claim
    # per_layer_token_embd, which is a big separate table.
    if options.token_embedding_type is not None and category == Category.TOKEN_EMBD:
        if not (name == "per_layer_token_embd.weight" and _first_override(name, overrides)):
            return planned(_explicit_type(name, ne0, options.token_embedding_type, "--token-embedding-type"),
                           "--token-embedding-type")
    if options.output_tensor_type is not None and category == Category.OUTPUT:
        return planned(_explicit_type(name, ne0, options.output_tensor_type, "--output-tensor-type"),
                       "--output-tensor-type")

    if preset.is_float:
        # llama.cpp runs no rules, overrides or fallback when the default type is not quantized.
        return planned(preset.default_type, f"{preset.name} preset")

    override = _first_override(name, overrides)
    if override is not None:
        new_type, reason = override[1], f"--tensor-type {override[0]}"
    elif options.pure:
        new_type, reason = preset.default_type, "--pure"
    else:
        new_type, reason = _mixture_type(name, tensor.shape, category, preset, model, counters,
                                         options.output_tensor_type)

    final = shape_fallback(ne0, new_type)
    if ne0 % block_size(new_type) != 0:
        return planned(final, f"{reason}; fallback {new_type.name}->{final.name} (ne0={ne0})", new_type)
    return planned(final, reason)
