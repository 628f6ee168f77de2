"""Llama (Llama 2/3.x, SmolLM, DeepSeek-R1-Distill-Llama, CodeLlama), Mistral and Mixtral in the HF layout.

All are llama.cpp's `llama` architecture (conversion/llama.py `LlamaModel`):
- q/k rows are permuted from HF's rotate-half layout to llama.cpp's interleaved rope pairs, per head
  (k with the KV head count): `RopePairs`;
- `llama3` rope scaling is not metadata but a `rope_freqs` tensor of per-frequency factors;
- `rope.dimension_count` and `vocab_size` follow the common keys; head_dim may differ from hidden/heads;
- Mixtral's per-expert w1/w2/w3 are stacked into ffn_gate/down/up_exps (in that order), its router F32
  (read under transformers' in-memory names, mlp.experts.N.{gate,down,up}_proj, so imatrix finds them);
- the vocabulary is the family's: tokenizer.model, a byte-fallback tokenizer.json or a byte-level one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .api import (ANY, DecoderArch, Emitted, Lazy, Metadata, MockSizes, MockSpec, Rule, SelectRows, UserError,
                  register, stack)

EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|down|up)_proj\.weight$")
EXPERT_OUT = {"gate": "ffn_gate_exps", "down": "ffn_down_exps", "up": "ffn_up_exps"}  # w1, w2, w3: this order
# Mixtral's checkpoint names -> the names transformers gives the modules in memory (the names importance
# matrices are collected under): block_sparse_moe.{gate, experts.N.w1/w2/w3} -> mlp.{gate, experts.N.*_proj}
MIXTRAL_NAME = re.compile(r"\.block_sparse_moe\.(?:experts\.(\d+)\.(w[123])|gate)\.weight$")
MIXTRAL_PROJ = {"w1": "gate", "w2": "down", "w3": "up"}


@dataclass(frozen=True, eq=False)
class RopePairs(SelectRows):
    """Rows of each head from HF's rotate-half order (first halves, then second halves) to the adjacent
    pairs llama.cpp's rope rotates (LlamaModel.permute). Example (1 head of 4 rows): [0, 2, 1, 3]."""

    @classmethod
    def of(cls, heads: int, rows: int, what: str) -> "RopePairs":
        half = rows // heads // 2
        order = np.arange(rows).reshape(heads, 2, half).transpose(0, 2, 1).reshape(-1)
        return cls(order, f"{what}: {heads} heads")

    def __str__(self) -> str:
        return f"RopePairs({self.label})"


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling (LlamaModel.generate_extra_tensors), in float32 as there."""
    f32 = np.float32
    base = rope.get("rope_theta", 10000.0)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    freqs = f32(1.0) / np.power(f32(base), np.arange(0, dim, 2, dtype=f32) / f32(dim))
    out = []
    for freq in freqs:
        wavelen = f32(2 * math.pi) / freq
        if wavelen < f32(old / high):
            out.append(f32(1))
        elif wavelen > f32(old / low):
            out.append(f32(factor))
        else:
            smooth = (f32(old) / wavelen - f32(low)) / f32(high - low)
            out.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=f32)


@register("LlamaForCausalLM")
class Llama(DecoderArch):
    gguf_arch = "llama"
    vocab = "llama"
    fusions = frozenset({"qkv"})  # create_tensor_qkv; the llama loader has no fused gate/up experts
    ROPE_TYPES = DecoderArch.ROPE_TYPES + ("llama3",)  # llama3: no metadata, a rope_freqs tensor
    mock = MockSpec(("LlamaConfig", "LlamaForCausalLM"), tokenizer="llama-bpe")

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        # GQA 8:1 and a head_dim other than hidden/heads; llama3 rope scaling (rope_freqs)
        return dict(super().mock_config(s), num_attention_heads=8, num_key_value_heads=1, head_dim=s.head_dim,
                    attention_bias=False, mlp_bias=False,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._experts: dict[int, dict[tuple[str, int], Lazy]] = {}

    @property
    def n_experts(self) -> int:
        return int(self.hp("num_local_experts", default=0))

    # -- rules ------------------------------------------------------------------------------------
    def rename(self, name: str) -> str | None:
        name = super().rename(name)
        if name is None or (m := MIXTRAL_NAME.search(name)) is None:
            return name
        leaf = f"experts.{m.group(1)}.{MIXTRAL_PROJ[m.group(2)]}_proj.weight" if m.group(1) else "gate.weight"
        return name[:m.start()] + ".mlp." + leaf

    def attention_rules(self, layer: int) -> Iterator[Rule]:
        nH = self.dim("num_attention_heads", "n_heads").size
        nKV = self.dim("num_key_value_heads", "n_kv_heads", default=None)
        nKV, hd = nH if nKV is None else nKV.size, self.head_dim().size
        for rule in super().attention_rules(layer):
            if rule.hf.startswith("self_attn.q_proj."):
                rule = rule.then(RopePairs.of(nH, nH * hd, "q"))
            elif rule.hf.startswith("self_attn.k_proj."):
                rule = rule.then(RopePairs.of(nKV, nKV * hd, "k"))
            yield rule

    def mlp_rules(self, layer: int) -> Iterator[Rule]:
        if not self.n_experts:
            yield from super().mlp_rules(layer)
            return
        H, E = self.hidden, self.dim("num_local_experts")
        F = self.dim("intermediate_size", default=ANY)
        yield Rule("mlp.gate.weight", "ffn_gate_inp.weight", (E, H))
        for e in range(E.size):
            for proj, shape in (("gate", (F, H)), ("down", (H, F)), ("up", (F, H))):
                yield Rule(f"mlp.experts.{e}.{proj}_proj.weight", None, shape)

    # -- Mixtral's experts ----------------------------------------------------------------------------
    def transform(self, name: str, tensor: Lazy) -> Emitted:
        m = EXPERT.match(name)
        if not m:
            yield from super().transform(name, tensor)
            return
        layer, expert, w = int(m.group(1)), int(m.group(2)), m.group(3)
        got = self._experts.setdefault(layer, {})
        got[(w, expert)] = tensor
        if len(got) < 3 * self.n_experts:
            return
        del self._experts[layer]
        for w, out in EXPERT_OUT.items():
            parts = [got[(w, e)] for e in range(self.n_experts)]
            yield f"blk.{layer}.{out}.weight", stack(parts).noted(f"stack {self.n_experts} experts")

    def finish(self) -> Emitted:
        yield from super().finish()
        if self._experts:
            layer, got = next(iter(self._experts.items()))
            missing = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for w, p in MIXTRAL_PROJ.items()
                       for e in range(self.n_experts) if (p, e) not in got]
            raise UserError(f"incomplete experts: {missing[0]} is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def keep_f32(self, gguf_name: str) -> bool:
        return super().keep_f32(gguf_name) or gguf_name.endswith("ffn_gate_inp.weight")

    # -- rope_freqs and metadata ----------------------------------------------------------------------
    def extra_tensors(self) -> Emitted:
        rope = self.rope_parameters
        if str(rope.get("rope_type", "")).lower() == "llama3":
            for key in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"):
                if key in rope:
                    self.rope_number(rope, key)
            if rope.get("low_freq_factor", 1.0) == rope.get("high_freq_factor", 4.0):
                raise UserError("config.json: llama3 rope scaling needs low_freq_factor != high_freq_factor")
            factors = llama3_rope_factors(rope, self.head_dim().size)
            yield "rope_freqs.weight", Lazy.from_array(factors, "llama3 rope factors").noted("llama3 rope factors")

    def add_metadata(self, md: Metadata) -> None:
        super().add_metadata(md)
        a = self.gguf_arch
        md.u32(f"{a}.vocab_size", self.hp("vocab_size"))
        md.u32(f"{a}.rope.dimension_count", self.head_dim().size)



@register("MistralForCausalLM")
class Mistral(Llama):
    """Mistral 7B in the HF layout: Llama's tensors (its sliding window is not read, as by llama.cpp's converter)."""

    mock_name = "mistral"  # several classes write the llama arch: each has its own mock
    mock = MockSpec(("MistralConfig", "MistralForCausalLM"), tokenizer="llama-bpe")

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        return dict(super().mock_config(s), num_key_value_heads=2, sliding_window=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})


@register("MixtralForCausalLM")
class Mixtral(Llama):
    """Mixtral: Llama with per-expert w1/w2/w3 (block_sparse_moe) stacked into ffn_*_exps."""

    mock_name = "mixtral"
    mock = MockSpec(("MixtralConfig", "MixtralForCausalLM"), tokenizer="llama-bpe")

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        return dict(super().mock_config(s), num_local_experts=s.experts, num_experts_per_tok=2,
                    intermediate_size=s.expert_ffn, router_jitter_noise=0.0,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
