"""The generic decoder-only transformer every architecture builds on.

It knows the tensors almost every HF decoder has (embedding, output head, final
norm, attention q/k/v/o with biases and q/k norms, dense FFN, layer norms) and
the GGUF metadata keys llama.cpp reads for all of them. Subclasses add only what
differs and chain to this class with super().
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Iterator

from gguf import GGUFValueType

from .options import ConvertOptions
from ..checkpoint.lazy import Lazy
from .mock import MockSizes, MockSpec
from .rules import Rule
from .shapes import Dim, Expected
from ..format.writer import Metadata
from ..errors import UserError

Emitted = Iterator[tuple[str, Lazy]]

LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Tensors of multimodal towers and old RoPE buffers that a text GGUF never carries.
DROPPED_PARTS = ("visual.", "vision_tower.", "vision_model.", "audio_tower.", "multi_modal_projector.",
                 "mm_projector.", "merger.", ".rotary_emb.inv_freq", ".attention.masked_bias")


class UnmappedTensor(Exception):
    """Raised by transform() for a tensor no rule consumed; the planner collects and reports them all."""


class MtpHead:
    """Capability: the architecture has multi-token-prediction blocks (--mtp writes only them,
    --no-mtp drops them). Mixed into the classes that have one."""


class DecoderArch:
    gguf_arch: str = ""
    gguf_type = "model"  # general.type ("mmproj" for a vision encoder written alone)
    hf_architectures: tuple[str, ...] = ()
    config_prefix = ""  # where this class's hparams sit in config.json, for messages ("vision_config.")
    file_type: int | None = None  # general.file_type, set by the planner before add_metadata()
    output_required = False  # the loader needs output.weight even when the checkpoint ties it
    zero_centred_norms = False  # HF computes x*(1+w) for its RMS norms (the converter adds 1)
    mock: MockSpec | None = None  # how scripts/make_mocks.py builds a tiny checkpoint of this arch
    vocab = "bpe"  # the vocabulary kind (convert/vocab.py register_vocab) of this family's tokenizers

    def __init__(self, hparams: dict, options: ConvertOptions | None = None, tensor_names=()):
        self.hparams = hparams
        self.options = options or ConvertOptions()
        self.hf_names = list(tensor_names)
        if (self.options.mtp_only or self.options.no_mtp) and not isinstance(self, MtpHead):
            flag = "--mtp" if self.options.mtp_only else "--no-mtp"
            raise UserError(f"{flag}: {self.gguf_arch} models have no multi-token-prediction head")

    # -- config access ------------------------------------------------------
    def hp(self, *keys: str, default=...):
        """First of `keys` present in the config; without a default a missing key is a user error."""
        for key in keys:
            if self.hparams.get(key) is not None:
                return self.hparams[key]
        if default is ...:
            raise UserError(f"config.json has no {' / '.join(keys)} (needed for {self.gguf_arch})")
        return default

    @property
    def n_layers(self) -> int:
        """Trunk layers in the checkpoint."""
        return int(self.hp("num_hidden_layers", "n_layers", "n_layer", "num_layers"))

    @property
    def block_count(self) -> int:
        """Blocks in the GGUF (subclasses add extra blocks such as MTP heads)."""
        return self.n_layers

    @property
    def rope_parameters(self) -> dict:
        """rope_parameters (or rope_scaling; its full_attention part), with top-level values it lacks."""
        params = self.hparams.get("rope_parameters") or self.hparams.get("rope_scaling") or {}
        if not isinstance(params, dict) or not isinstance(params.get("full_attention", {}), dict):
            raise UserError(f"config.json: rope_parameters must be an object, got {params!r}")
        params = dict(params.get("full_attention", params))
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params["type"]
        for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
            if key not in params and self.hparams.get(key) is not None:
                params[key] = self.hparams[key]
        return params

    # -- tensor rules ----------------------------------------------------------
    def rename(self, name: str) -> str | None:
        """Normalise a checkpoint name, or None to skip the tensor (multimodal towers, buffers)."""
        if any(part in name for part in DROPPED_PARTS):
            return None
        return name.replace("language_model.", "")

    def global_rules(self) -> Iterator[Rule]:
        """Rules for the tensors outside the decoder layers (whole names)."""
        V, H = self.dim("vocab_size", "n_vocab"), self.hidden
        yield Rule("model.embed_tokens.weight", "token_embd.weight", (V, H))
        yield Rule("lm_head.weight", "output.weight", (V, H), optional=self.tied_embeddings)
        yield Rule("model.norm.weight", "output_norm.weight", (H,))

    def layer_rules(self, layer: int) -> Iterator[Rule]:
        """Rules for decoder layer `layer`: leaf names after 'model.layers.N.' and 'blk.N.'."""
        H = self.hidden
        yield Rule("input_layernorm.weight", "attn_norm.weight", (H,))
        yield Rule("post_attention_layernorm.weight", "ffn_norm.weight", (H,))
        yield from self.attention_rules(layer)
        yield from self.mlp_rules(layer)

    def attention_rules(self, layer: int) -> Iterator[Rule]:
        H, hd = self.hidden, self.head_dim()
        nH = self.dim("num_attention_heads", "n_head", "n_heads")
        nKV = self.dim("num_key_value_heads", "n_kv_heads", default=nH)
        q, kv = nH * hd, nKV * hd
        for x, rows in (("q", q), ("k", kv), ("v", kv)):
            yield Rule(f"self_attn.{x}_proj.weight", f"attn_{x}.weight", (rows, H))
            yield Rule(f"self_attn.{x}_proj.bias", f"attn_{x}.bias", (rows,), optional=not self.has_qkv_bias)
        yield Rule("self_attn.o_proj.weight", "attn_output.weight", (H, q))
        yield Rule("self_attn.q_norm.weight", "attn_q_norm.weight", (hd,), optional=True)
        yield Rule("self_attn.k_norm.weight", "attn_k_norm.weight", (hd,), optional=True)

    def mlp_rules(self, layer: int) -> Iterator[Rule]:
        H, F = self.hidden, self.dim("intermediate_size", "n_inner", "hidden_dim")
        yield Rule("mlp.gate_proj.weight", "ffn_gate.weight", (F, H))
        yield Rule("mlp.up_proj.weight", "ffn_up.weight", (F, H))
        yield Rule("mlp.down_proj.weight", "ffn_down.weight", (H, F))

    @property
    def has_qkv_bias(self) -> bool:
        """Whether q/k/v projections must have biases (they are accepted either way)."""
        return bool(self.hparams.get("qkv_bias") or self.hparams.get("attention_bias"))

    @property
    def tied_embeddings(self) -> bool:
        return self.hparams.get("tie_word_embeddings") is not False  # HF's default is tied

    def rules(self) -> dict[str, Rule]:
        """{checkpoint name after rename(): Rule with whole names}, built once."""
        if getattr(self, "_rules", None) is None:
            table = {r.hf: r for r in self.global_rules()}
            for layer in range(self.block_count):
                hf, gg = f"model.layers.{layer}.", f"blk.{layer}."
                for r in self.layer_rules(layer):
                    table[hf + r.hf] = replace(r, hf=hf + r.hf, gguf=None if r.gguf is None else gg + r.gguf)
            self._rules = table
        return self._rules

    def expected_shapes(self) -> dict[str, Expected]:
        """{checkpoint name after rename(): Expected} for every tensor this architecture knows."""
        return {name: r.expected for name, r in self.rules().items()}

    # -- the transform generator ---------------------------------------------
    def transform(self, name: str, tensor: Lazy) -> Emitted:
        """(checkpoint name, tensor) in, zero or more (GGUF name, tensor) out. The base applies the
        tensor's rule; subclasses intercept the dynamic cases (rules with gguf=None) before it."""
        rule = self.rules().get(name)
        if rule is None or rule.gguf is None:
            raise UnmappedTensor(name)
        yield rule.gguf, rule.apply(tensor, name)

    def integer_tensor(self, name: str) -> bool:
        """Whether `name` is an integer tensor the architecture reads exactly itself (e.g. hash constants that
        become metadata); every other tensor must be F32, F16 or BF16."""
        return False

    def finish(self) -> Emitted:
        """Called after the last tensor: emit or complain about anything still buffered."""
        return iter(())

    def notes(self) -> list[str]:
        """Lines the CLI prints with the conversion (e.g. parts of the checkpoint left out on purpose)."""
        return []

    def vocab_config(self, config: dict) -> dict:
        """The config the vocabulary is read with (vocab_size pads it; *_token_id fill special tokens)."""
        return config

    def after_vocab(self, md: Metadata) -> None:
        """Called after the tokenizer.* keys are written: changes an architecture's converter makes to them."""

    def extra_tensors(self) -> Emitted:
        """Tensors computed from the config rather than read (e.g. rope_freqs); written first, as
        llama.cpp's converter writes generate_extra_tensors() before the model's own."""
        return iter(())

    # -- expected shapes (checked by convert/validate.py before anything is written) ---------
    def dim(self, *keys: str, default=...) -> Dim:
        """A positive integer config value as a Dim naming its key; a missing key is a user error."""
        for key in keys:
            value = self.hparams.get(key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise UserError(f"config.json: {self.config_prefix}{key} must be a positive integer, "
                                    f"got {value!r}")
                return Dim(value, f"{self.config_prefix}{key}={value}")
        if default is ...:
            self.hp(*keys)  # raises the missing-key error
        return default

    @property
    def hidden(self) -> Dim:
        return self.dim("hidden_size", "n_embd", "dim")

    def head_dim(self) -> Dim:
        if self.hparams.get("head_dim") is not None:
            return self.dim("head_dim")
        H, nH = self.hidden, self.dim("num_attention_heads", "n_head", "n_heads")
        if H.size % nH.size:
            raise UserError(f"config.json: {H.why} is not a multiple of {nH.why} (and there is no head_dim)")
        return Dim(H.size // nH.size, f"hidden_size/num_attention_heads={H.size // nH.size}")

    def present_names(self) -> set[str]:
        """Checkpoint tensor names after rename(), for choosing between accepted layouts (computed once)."""
        if getattr(self, "_present_names", None) is None:
            self._present_names = {r for n in self.hf_names if (r := self.rename(n)) is not None}
        return self._present_names

    # -- dtype policy -----------------------------------------------------------
    def keep_f32(self, gguf_name: str) -> bool:
        """Tensors llama.cpp wants in F32 whatever the output type (beyond 1-D tensors and norms)."""
        return gguf_name.endswith(".bias") or not gguf_name.endswith(".weight")

    def forced_type(self, gguf_name: str, outtype):
        """A GGML type this tensor must have for `outtype` whatever else the policy says, or None."""
        return None

    # -- test mocks --------------------------------------------------------------
    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        """Config kwargs of a tiny checkpoint of this architecture (its transformers config class)."""
        return dict(vocab_size=512, hidden_size=s.hidden, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    hidden_act="silu", num_hidden_layers=s.layers, intermediate_size=s.ffn)

    # -- metadata ----------------------------------------------------------------
    def add_metadata(self, md: Metadata) -> None:
        """Architecture hyper-parameters, in the order llama.cpp's converter writes them."""
        a = self.gguf_arch
        md.u32(f"{a}.block_count", self.block_count)
        if (n_ctx := self.hp("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                             "max_sequence_length", "model_max_length", default=None)) is not None:
            md.u32(f"{a}.context_length", n_ctx)
        md.u32(f"{a}.embedding_length", self.hp("hidden_size", "n_embd", "dim"))
        if (n_ff := self.hp("intermediate_size", "n_inner", "hidden_dim", default=None)) is not None:
            md.u32(f"{a}.feed_forward_length", n_ff)
        md.u32(f"{a}.attention.head_count", self.hp("num_attention_heads", "n_head", "n_heads"))
        if (n_kv := self.hp("num_key_value_heads", "n_kv_heads", default=None)) is not None:
            md.u32(f"{a}.attention.head_count_kv", n_kv)
        if self.hparams.get("is_causal") is False:
            md.bool(f"{a}.attention.causal", False)
        self.add_rope_metadata(md)
        md.f32(f"{a}.attention.layer_norm_rms_epsilon", self.hp("rms_norm_eps", "norm_eps"))
        if (n_exp := self.hp("num_local_experts", "num_experts", "n_routed_experts", default=None)):
            md.u32(f"{a}.expert_count", n_exp)
        if (n_used := self.hp("num_experts_per_tok", "num_experts_per_token", "top_k_experts", default=None)):
            md.u32(f"{a}.expert_used_count", n_used)
        if self.hparams.get("head_dim") is not None:
            md.u32(f"{a}.attention.key_length", self.hparams["head_dim"])
            md.u32(f"{a}.attention.value_length", self.hparams["head_dim"])
        if self.file_type is not None:  # where llama.cpp's converter writes it: after the common keys
            md.u32("general.file_type", self.file_type)

    # rope_type -> what llama.cpp reads for it; these are the types its loader implements for every arch
    # here (llama-model.cpp: LLAMA_ROPE_SCALING_TYPE_*). "mrope" is Qwen2-VL's name for sectioned rope.
    ROPE_TYPES = ("default", "linear", "yarn", "mrope")

    def rope_number(self, rope: dict, key: str, *, positive: bool = True):
        value = rope.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            raise UserError(f"config.json: rope_parameters.{key} must be a {'positive ' if positive else ''}"
                            f"finite number, got {value!r}")
        return value

    def add_rope_metadata(self, md: Metadata) -> None:
        """rope.scaling.* as llama.cpp's converter writes them (TextModel.set_gguf_parameters); a type
        llama.cpp does not implement is refused rather than dropped (it would be wrong at long context)."""
        a, rope = self.gguf_arch, self.rope_parameters
        kind = rope.get("rope_type")
        if kind is not None and kind not in self.ROPE_TYPES:
            raise UserError(f"config.json: rope type {kind!r} is not supported for {a}",
                            hint="supported: " + ", ".join(self.ROPE_TYPES))
        if kind == "linear":
            md.str(f"{a}.rope.scaling.type", "linear")
            md.f32(f"{a}.rope.scaling.factor", self.rope_number(rope, "factor"))
        elif kind == "yarn":
            md.str(f"{a}.rope.scaling.type", "yarn")
            md.f32(f"{a}.rope.scaling.factor", self.rope_number(rope, "factor"))
            original = rope.get("original_max_position_embeddings")
            if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
                raise UserError("config.json: yarn rope scaling needs original_max_position_embeddings "
                                f"(a positive integer), got {original!r}")
            md.u32(f"{a}.rope.scaling.original_context_length", original)
            for hf_keys, key in ((("extrapolation_factor",), "yarn_ext_factor"),
                                 (("attention_factor", "attn_factor"), "yarn_attn_factor"),
                                 (("beta_fast",), "yarn_beta_fast"), (("beta_slow",), "yarn_beta_slow")):
                present = [k for k in hf_keys if rope.get(k) is not None]
                if present:
                    md.f32(f"{a}.rope.scaling.{key}", self.rope_number(rope, present[0], positive=False))
        if "mrope_section" in rope:
            sections = rope["mrope_section"]
            if not isinstance(sections, list) or len(sections) > 4 or \
                    not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sections):
                raise UserError(f"config.json: mrope_section must be a list of at most 4 non-negative integers, "
                                f"got {sections!r}")
            md.array(f"{a}.rope.dimension_sections", (list(sections) + [0, 0, 0, 0])[:4], GGUFValueType.INT32)
        if rope.get("rope_theta") is not None:
            md.f32(f"{a}.rope.freq_base", self.rope_number(rope, "rope_theta"))
