"""Qwen3-Next: hybrid Gated-DeltaNet / full-attention layers, MoE MLP, optional MTP draft head.

On top of Qwen2-MoE:
- norms are stored zero-centred (HF computes x*(1+w)); llama.cpp multiplies by w, so every
  *norm.weight gets AddOne, except the gated linear_attn.norm, which HF already applies as plain w;
- GDN tensors: ssm_a = NegExp(A_log), dt_bias -> ssm_dt.bias, conv1d [C,1,K] Squeezed to [C,K],
  in_proj_qkvz regrouped from per-K-head groups into all-Q | all-K | all-V rows plus a z gate;
- full-attention q_proj holds query and output gate per head and is kept whole;
- mtp.* (multi-token prediction) becomes extra blocks L..L+M-1 after the trunk (see rename()).
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np
from gguf import GGUFValueType

from .api import AddOne, Emitted, Expected, Lazy, Metadata, MockSizes, MockSpec, MtpHead, NegExp, Rule, SelectRows, \
    Squeeze, UserError, register
from .qwen2moe import Qwen2Moe

MTP_NAME = re.compile(r"^(?:model\.)?mtp\.(.+)$")
MTP_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# MTP tensors outside its decoder layers, all attached to the first MTP block (as llama.cpp expects).
MTP_HEAD = {
    "fc.weight": "eh_proj.weight",
    "pre_fc_norm_embedding.weight": "enorm.weight",
    "pre_fc_norm_hidden.weight": "hnorm.weight",
    "norm.weight": "shared_head.norm.weight",
}
# Trunk tensors a draft-head-only (--mtp) file still needs: the head shares them.
DRAFT_SHARED = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def qkvz_rows(nk: int, dk: int, nv: int, dv: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of in_proj_qkvz that form attn_qkv (all Q, all K, all V heads) and attn_gate (z).

    HF groups rows per K head g: [q_g (dk), k_g (dk), v_g (r*dv), z_g (r*dv)], r = nv / nk.
    """
    r_dv = nv // nk * dv
    group = 2 * dk + 2 * r_dv
    starts = np.arange(nk)[:, None] * group
    part = lambda offset, size: (starts + offset + np.arange(size)).reshape(-1)  # noqa: E731
    q, k, v, z = part(0, dk), part(dk, dk), part(2 * dk, r_dv), part(2 * dk + r_dv, r_dv)
    return np.concatenate([q, k, v]), z


def zero_centred(rule: Rule) -> bool:
    """Norms HF applies as x*(1+w) (zero_centred_norms): every norm but the gated linear-attention one."""
    return rule.hf.endswith("norm.weight") and not rule.hf.endswith("linear_attn.norm.weight")


@register("Qwen3NextForCausalLM")
class Qwen3Next(MtpHead, Qwen2Moe):
    gguf_arch = "qwen3next"
    fusions = frozenset({"qkv", "gate_up_exps"})  # the loader accepts fused QKV and gate/up experts
    output_required = False  # tied checkpoints need no output.weight copy: the loader falls back to token_embd
    zero_centred_norms = True
    mock = MockSpec(("Qwen3NextConfig", "Qwen3NextForCausalLM"), hub=True, mtp_depth_in_config=False)

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        cfg = dict(super().mock_config(s), norm_topk_prob=True, num_hidden_layers=s.layers,
                   layer_types=["linear_attention", "full_attention"] * (s.layers // 2), head_dim=s.head_dim,
                   attention_bias=False, linear_num_key_heads=2,
                   linear_num_value_heads=4,  # != key heads, so the Qwen3.5 V-head reorder matters
                   linear_key_head_dim=s.head_dim, linear_value_head_dim=s.head_dim,  # llama.cpp: dk == dv
                   linear_conv_kernel_dim=4,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5})
        del cfg["qkv_bias"], cfg["use_sliding_window"]
        return cfg

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.options.no_mtp and self.options.mtp_only:
            raise UserError("--mtp and --no-mtp cannot be combined")
        self.mtp_in_checkpoint = self._count_mtp_layers()
        if self.options.mtp_only and not self.mtp_in_checkpoint:
            raise UserError("--mtp: the checkpoint has no MTP (mtp.*) tensors")
        self.n_mtp = 0 if self.options.no_mtp else self.mtp_in_checkpoint

    def _count_mtp_layers(self) -> int:
        """MTP blocks the checkpoint really holds (a config may name a depth whose tensors were stripped)."""
        base_rename = super().rename  # the trunk rules only (language_model. prefix, dropped towers)
        rests = [m.group(1) for n in self.hf_names
                 if (r := base_rename(n)) is not None and (m := MTP_NAME.match(r))]
        if not rests:
            return 0
        layers = [int(m.group(1)) + 1 for r in rests if (m := MTP_LAYER.match(r))]
        return max(layers, default=0) or int(self.hp("mtp_num_hidden_layers", default=1))

    @property
    def block_count(self) -> int:
        return self.n_layers + self.n_mtp

    # -- layer kinds ----------------------------------------------------------------
    @property
    def full_attention_interval(self) -> int:
        return int(self.hp("full_attention_interval", default=4))

    def recurrent_layers(self) -> list[bool]:
        """Per trunk layer: True for linear attention (Gated DeltaNet), False for full attention."""
        types = self.hparams.get("layer_types")
        if types is not None:
            if len(types) != self.n_layers:
                raise UserError(f"config.json layer_types has {len(types)} entries for {self.n_layers} layers")
            return [t == "linear_attention" for t in types]
        return [(i + 1) % self.full_attention_interval != 0 for i in range(self.n_layers)]

    # -- names ------------------------------------------------------------------------
    def rename(self, name: str) -> str | None:
        name = super().rename(name)
        if name is None:
            return None
        if m := MTP_NAME.match(name):
            return self._mtp_name(m.group(1)) if self.n_mtp else None
        if self.options.mtp_only and name not in DRAFT_SHARED:
            return None
        return name

    def _mtp_name(self, rest: str) -> str:
        L = self.n_layers
        if m := MTP_LAYER.match(rest):
            return f"model.layers.{L + int(m.group(1))}.{m.group(2)}"
        if rest in MTP_HEAD:
            return f"model.layers.{L}.{MTP_HEAD[rest]}"
        return f"mtp.{rest}"  # unknown: left unmapped so the planner reports it

    # -- rules ------------------------------------------------------------------------------
    def global_rules(self) -> Iterator[Rule]:
        for rule in super().global_rules():
            yield rule.then(AddOne()) if zero_centred(rule) else rule

    def layer_rules(self, layer: int) -> Iterator[Rule]:
        H = self.hidden
        for rule in super().layer_rules(layer):
            if rule.hf == "post_attention_layernorm.weight":  # ffn_norm in Qwen2-MoE
                rule = Rule(rule.hf, "post_attention_norm.weight", rule.shape)
            yield rule.then(AddOne()) if zero_centred(rule) else rule
        if layer == self.n_layers and self.n_mtp:  # the MTP head's own tensors, on its first block
            yield Rule("eh_proj.weight", "nextn.eh_proj.weight", (H, 2 * H), optional=True)
            for norm in ("enorm", "hnorm"):
                yield Rule(f"{norm}.weight", f"nextn.{norm}.weight", (H,), op=AddOne(), optional=True)
            yield Rule("shared_head.norm.weight", "nextn.shared_head_norm.weight", (H,), op=AddOne(), optional=True)

    def attention_rules(self, layer: int) -> Iterator[Rule]:
        if layer < self.n_layers and self.recurrent_layers()[layer]:
            yield from self.linear_attention_rules()
            return
        H, hd, nH = self.hidden, self.head_dim(), self.dim("num_attention_heads")
        q = 2 * nH * hd  # query and output gate per head
        for rule in super().attention_rules(layer):
            if rule.hf.startswith("self_attn.q_proj."):
                rule = Rule(rule.hf, rule.gguf, (q, H) if rule.hf.endswith("weight") else (q,), optional=rule.optional)
            elif rule.hf in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
                rule = Rule(rule.hf, rule.gguf, rule.shape)  # required here
            yield rule

    def linear_attention_rules(self) -> Iterator[Rule]:
        """Gated DeltaNet layer tensors (Qwen3-Next's fused in_proj_qkvz and in_proj_ba)."""
        H = self.hidden
        nk, dk = self.dim("linear_num_key_heads"), self.dim("linear_key_head_dim")
        nv, dv = self.dim("linear_num_value_heads"), self.dim("linear_value_head_dim")
        K = self.dim("linear_conv_kernel_dim")
        C = 2 * nk * dk + nv * dv  # conv channels: Q, K and V
        la = "linear_attn."
        yield from self.linear_projection_rules()
        # depthwise [C, 1, K], or already squeezed
        yield Rule(la + "conv1d.weight", "ssm_conv1d.weight", Expected(((C, 1, K), (C, K))), op=Squeeze())
        yield Rule(la + "A_log", "ssm_a", (nv,), op=NegExp())
        yield Rule(la + "dt_bias", "ssm_dt.bias", (nv,))
        yield Rule(la + "norm.weight", "ssm_norm.weight", (dv,))
        yield Rule(la + "out_proj.weight", "ssm_out.weight", (H, nv * dv))

    def linear_projection_rules(self) -> Iterator[Rule]:
        H = self.hidden
        nk, dk = self.dim("linear_num_key_heads"), self.dim("linear_key_head_dim")
        nv, dv = self.dim("linear_num_value_heads"), self.dim("linear_value_head_dim")
        yield Rule("linear_attn.in_proj_qkvz.weight", None, (2 * nk * dk + 2 * nv * dv, H))  # split in transform
        yield Rule("linear_attn.in_proj_ba.weight", "ssm_ba.weight", (2 * nv, H))

    def expected_shapes(self) -> dict[str, Expected]:
        shapes = super().expected_shapes()
        for name, e in list(shapes.items()):
            layer = self._layer_number(name)
            if layer is not None and layer >= self.n_layers:
                shapes[name] = Expected(e.shapes, optional=True)  # MTP blocks are optional
            elif self.options.mtp_only and name not in DRAFT_SHARED:
                del shapes[name]  # a draft-head-only file reads no trunk layers
        return shapes

    @staticmethod
    def _layer_number(name: str) -> int | None:
        parts = name.split(".")
        layer = parts[2] if name.startswith("model.layers.") else ""
        return int(layer) if layer.isascii() and layer.isdigit() else None

    # -- the dynamic part ---------------------------------------------------------------------
    def transform(self, name: str, tensor: Lazy) -> Emitted:
        if name.endswith("linear_attn.in_proj_qkvz.weight"):
            qkv, z = qkvz_rows(*self.linear_dims())
            blk = f"blk.{self._layer_number(name)}."
            yield blk + "attn_qkv.weight", SelectRows(qkv, "q, k, v of each K-head group")(tensor)
            yield blk + "attn_gate.weight", SelectRows(z, "z of each K-head group")(tensor)
            return
        yield from super().transform(name, tensor)

    def linear_dims(self) -> tuple[int, int, int, int]:
        """(K heads, K head dim, V heads, V head dim) of the Gated DeltaNet layers."""
        nk, nv = int(self.hp("linear_num_key_heads")), int(self.hp("linear_num_value_heads"))
        dk, dv = int(self.hp("linear_key_head_dim")), int(self.hp("linear_value_head_dim"))
        if nv % nk:
            raise UserError(f"linear_num_value_heads ({nv}) is not a multiple of linear_num_key_heads ({nk})")
        return nk, dk, nv, dv

    def keep_f32(self, gguf_name: str) -> bool:
        return super().keep_f32(gguf_name) or gguf_name.endswith("ssm_conv1d.weight")

    # -- metadata ----------------------------------------------------------------------
    def add_metadata(self, md: Metadata) -> None:
        super().add_metadata(md)
        a = self.gguf_arch
        if self.n_mtp:
            md.u32(f"{a}.nextn_predict_layers", self.n_mtp)
        nk, dk, nv, dv = self.linear_dims()
        md.u32(f"{a}.ssm.conv_kernel", self.hp("linear_conv_kernel_dim"))
        md.u32(f"{a}.ssm.state_size", dk)
        md.u32(f"{a}.ssm.group_count", nk)
        md.u32(f"{a}.ssm.time_step_rank", nv)
        md.u32(f"{a}.ssm.inner_size", nv * dv)
        if self.hparams.get("layer_types") is not None:
            # One entry per GGUF block; MTP blocks are full attention.
            md.array(f"{a}.attention.recurrent_layers", self.recurrent_layers() + [False] * self.n_mtp,
                     GGUFValueType.BOOL)
        md.u32(f"{a}.full_attention_interval", self.full_attention_interval)
        head_dim = self.hp("head_dim", default=None) or self.hp("hidden_size") // self.hp("num_attention_heads")
        rotary = self.rope_parameters.get("partial_rotary_factor", 0.25)
        md.u32(f"{a}.rope.dimension_count", int(head_dim * rotary))
