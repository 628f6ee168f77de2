"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): routed experts, a shared expert and its gate.

Routed experts arrive either per expert (mlp.experts.N.{gate,up,down}_proj.weight,
stacked here into one [E, ...] tensor per layer) or packed
(mlp.experts.gate_up_proj [E, 2*Fe, H] split on dim 1, gate first;
mlp.experts.down_proj [E, H, Fe]). Both are generator rules (gguf=None): their shapes are
declared here, their outputs are built by transform().
"""

from __future__ import annotations

import re
from typing import Iterator

from .api import ANY, DecoderArch, Emitted, Lazy, Metadata, MockSizes, MockSpec, Rule, UserError, register, stack

PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
PACKED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj(\.weight)?$")


@register("Qwen2MoeForCausalLM")
class Qwen2Moe(DecoderArch):
    gguf_arch = "qwen2moe"
    fusions = frozenset({"qkv"})  # the qwen2moe loader has no fused gate/up experts path
    # llama.cpp's qwen2moe loader requires output.weight: a tied checkpoint gets a copy of the embedding.
    output_required = True

    mock = MockSpec(("Qwen2MoeConfig", "Qwen2MoeForCausalLM"))

    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        # head_dim is implicit: H / nH (llama.cpp's qwen2moe assumes nH*hd == H)
        return dict(super().mock_config(s), **cls.mock_experts(s), num_hidden_layers=2, qkv_bias=True,
                    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})

    @staticmethod
    def mock_experts(s: MockSizes) -> dict:
        return dict(num_experts=s.experts, num_experts_per_tok=2, moe_intermediate_size=s.expert_ffn,
                    shared_expert_intermediate_size=s.shared_ffn)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._experts: dict[int, dict[tuple[str, int], Lazy]] = {}  # layer -> (proj, expert) -> tensor

    @property
    def n_experts(self) -> int:
        return int(self.hp("num_local_experts", "num_experts", default=0))

    def is_moe_layer(self, layer: int) -> bool:
        """As HF's Qwen2-MoE: experts unless listed in mlp_only_layers or off the decoder_sparse_step."""
        step = int(self.hp("decoder_sparse_step", default=1)) or 1
        return (self.n_experts > 0 and layer not in (self.hparams.get("mlp_only_layers") or [])
                and (layer + 1) % step == 0)

    # -- rules --------------------------------------------------------------------------
    def mlp_rules(self, layer: int) -> Iterator[Rule]:
        if not self.is_moe_layer(layer):
            yield from super().mlp_rules(layer)
            return
        H, E = self.hidden, self.dim("num_local_experts", "num_experts")
        Fe = self.dim("moe_intermediate_size", default=ANY)
        yield Rule("mlp.gate.weight", "ffn_gate_inp.weight", (E, H))
        if self.hparams.get("shared_expert_intermediate_size"):
            Fs = self.dim("shared_expert_intermediate_size")
            for proj, shape in (("gate", (Fs, H)), ("up", (Fs, H)), ("down", (H, Fs))):
                yield Rule(f"mlp.shared_expert.{proj}_proj.weight", f"ffn_{proj}_shexp.weight", shape)
            yield Rule("mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight", (1, H))
        yield from self.expert_rules(layer, E, Fe, H)

    def expert_rules(self, layer: int, E, Fe, H) -> Iterator[Rule]:
        """Routed experts in whichever layout the checkpoint holds: packed, else per expert."""
        present, packed = self.present_names(), f"model.layers.{layer}.mlp.experts."
        if any(f"{packed}{p}{w}" in present for p in ("gate_up_proj", "down_proj") for w in ("", ".weight")):
            for proj, shape in (("gate_up_proj", (E, 2 * Fe, H)), ("down_proj", (E, H, Fe))):
                leaf = f"mlp.experts.{proj}" + (".weight" if f"{packed}{proj}.weight" in present else "")
                yield Rule(leaf, None, shape)
            return
        for e in range(E.size):
            for proj, shape in (("gate", (Fe, H)), ("up", (Fe, H)), ("down", (H, Fe))):
                yield Rule(f"mlp.experts.{e}.{proj}_proj.weight", None, shape)

    # -- the dynamic part -------------------------------------------------------------------
    def transform(self, name: str, tensor: Lazy) -> Emitted:
        if m := PACKED.match(name):
            yield from self._packed_experts(int(m.group(1)), m.group(2), tensor)
        elif m := PER_EXPERT.match(name):
            yield from self._buffer_expert(int(m.group(1)), m.group(3), int(m.group(2)), tensor)
        else:
            if name == "model.embed_tokens.weight" and self.output_required and \
                    "lm_head.weight" not in self.present_names():
                yield from super().transform("lm_head.weight", tensor.noted("copy of the tied embedding"))
            yield from super().transform(name, tensor)

    def _packed_experts(self, layer: int, kind: str, tensor: Lazy) -> Emitted:
        blk = f"blk.{layer}."
        if kind == "down":
            yield blk + "ffn_down_exps.weight", tensor
            return
        if tensor.ndim != 3 or tensor.shape[1] % 2:
            raise UserError(f"model.layers.{layer}.mlp.experts.gate_up_proj has shape {list(tensor.shape)}; "
                            "expected [experts, 2*ffn, hidden]")
        if self.options.fuse_gate_up_exps and "gate_up_exps" in getattr(self, "fusions", ()):
            # Already the fused layout [E, gate+up, H]: write it as is, no split and rejoin.
            yield blk + "ffn_gate_up_exps.weight", tensor
            return
        ff = tensor.shape[1] // 2
        yield blk + "ffn_gate_exps.weight", tensor.slice_axis(1, 0, ff).noted("gate half of gate_up_proj")
        yield blk + "ffn_up_exps.weight", tensor.slice_axis(1, ff, 2 * ff).noted("up half of gate_up_proj")

    def _buffer_expert(self, layer: int, proj: str, expert: int, tensor: Lazy) -> Emitted:
        n = self.n_experts
        if not 0 <= expert < n:
            raise UserError(f"model.layers.{layer}.mlp.experts.{expert}: expert index out of range "
                            f"(config has num_experts={n})")
        got = self._experts.setdefault(layer, {})
        got[(proj, expert)] = tensor
        if len(got) < 3 * n:
            return
        del self._experts[layer]
        for p in ("down", "gate", "up"):
            yield f"blk.{layer}.ffn_{p}_exps.weight", stack([got[(p, e)] for e in range(n)]).noted(f"stack {n} experts")

    def finish(self) -> Emitted:
        yield from super().finish()
        if self._experts:
            layer, got = next(iter(self._experts.items()))
            missing = [f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down")
                       for e in range(self.n_experts) if (p, e) not in got]
            raise UserError(f"incomplete experts: {missing[0]} is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    # -- dtype and metadata ---------------------------------------------------------------------
    def keep_f32(self, gguf_name: str) -> bool:
        # The router and the shared-expert gate stay F32 (llama.cpp computes them in full precision).
        return super().keep_f32(gguf_name) or gguf_name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"))

    def add_metadata(self, md: Metadata) -> None:
        super().add_metadata(md)
        a = self.gguf_arch
        if (ff := self.hp("moe_intermediate_size", default=None)) is not None:
            md.u32(f"{a}.expert_feed_forward_length", ff)
        if (ff := self.hp("shared_expert_intermediate_size", default=None)) is not None:
            md.u32(f"{a}.expert_shared_feed_forward_length", ff)
