"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): routed experts, a shared expert and its gate.

Routed experts arrive either per expert (mlp.experts.N.{gate,up,down}_proj.weight,
stacked here into one [E, ...] tensor per layer) or packed
(mlp.experts.gate_up_proj [E, 2*Fe, H] split on dim 1, gate first;
mlp.experts.down_proj [E, H, Fe]).
"""

from __future__ import annotations

import re

from ..checkpoint.lazy import Lazy, stack
from .shapes import ANY, Expected
from ..format.writer import Metadata
from ..errors import UserError
from . import register
from .base import DecoderArch, Emitted

PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
PACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up|down)_proj(\.weight)?$")


@register("Qwen2MoeForCausalLM")
class Qwen2Moe(DecoderArch):
    gguf_arch = "qwen2moe"
    fusions = frozenset({"qkv"})  # the qwen2moe loader has no fused gate/up experts path

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._experts: dict[str, dict[tuple[str, int], Lazy]] = {}  # layer prefix -> (proj, expert) -> tensor
        self._has_output = "lm_head.weight" in self.hf_names

    @property
    def n_experts(self) -> int:
        return int(self.hp("num_local_experts", "num_experts", default=0))

    def block_names(self) -> dict[str, str]:
        names = {
            **super().block_names(),
            "mlp.gate.weight": "ffn_gate_inp.weight",
            "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
        }
        for proj in ("gate", "up", "down"):
            names[f"mlp.shared_expert.{proj}_proj.weight"] = f"ffn_{proj}_shexp.weight"
            names[f"mlp.experts.{proj}_proj.weight"] = f"ffn_{proj}_exps.weight"
        names["mlp.experts.gate_up_proj.weight"] = "ffn_gate_up_exps.weight"  # only with --fuse-gate-up-exps
        return names

    def transform(self, name: str, tensor: Lazy) -> Emitted:
        if m := PACKED.match(name):
            yield from self._packed_experts(m.group(1), m.group(2), tensor)
        elif m := PER_EXPERT.match(name):
            yield from self._buffer_expert(m.group(1), m.group(3), int(m.group(2)), tensor)
        else:
            if name == "model.embed_tokens.weight" and not self._has_output:
                # llama.cpp's qwen2moe loader requires output.weight; a tied checkpoint gets a copy.
                yield from super().transform("lm_head.weight", tensor)
            yield from super().transform(name, tensor)

    def _packed_experts(self, prefix: str, kind: str, tensor: Lazy) -> Emitted:
        if kind == "down":
            yield from super().transform(f"{prefix}.down_proj.weight", tensor)
            return
        if tensor.ndim != 3 or tensor.shape[1] % 2:
            raise UserError(f"{prefix}.gate_up_proj has shape {list(tensor.shape)}; expected [experts, 2*ffn, hidden]")
        if self.options.fuse_gate_up_exps and "gate_up_exps" in self.fusions:
            # Already the fused layout [E, gate+up, H]: write it as is, no split and rejoin.
            yield from super().transform(f"{prefix}.gate_up_proj.weight", tensor)
            return
        ff = tensor.shape[1] // 2
        yield from super().transform(f"{prefix}.gate_proj.weight", tensor.slice_axis(1, 0, ff))
        yield from super().transform(f"{prefix}.up_proj.weight", tensor.slice_axis(1, ff, 2 * ff))

    def _buffer_expert(self, prefix: str, proj: str, expert: int, tensor: Lazy) -> Emitted:
        n = self.n_experts
        if not 0 <= expert < n:
            raise UserError(f"{prefix}.{expert}: expert index out of range (config has num_experts={n})")
        layer = self._experts.setdefault(prefix, {})
        layer[(proj, expert)] = tensor
        if len(layer) < 3 * n:
            return
        del self._experts[prefix]
        for p in ("down", "gate", "up"):
            yield from super().transform(f"{prefix}.{p}_proj.weight", stack([layer[(p, e)] for e in range(n)]))

    def finish(self) -> Emitted:
        yield from super().finish()
        if self._experts:
            prefix, got = next(iter(self._experts.items()))
            missing = [f"{prefix}.{e}.{p}_proj.weight" for p in ("gate", "up", "down")
                       for e in range(self.n_experts) if (p, e) not in got]
            raise UserError(f"incomplete experts: {missing[0]} is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def is_moe_layer(self, layer: int) -> bool:
        """As HF's Qwen2-MoE: experts unless listed in mlp_only_layers or off the decoder_sparse_step."""
        step = int(self.hp("decoder_sparse_step", default=1)) or 1
        return (self.n_experts > 0 and layer not in (self.hparams.get("mlp_only_layers") or [])
                and (layer + 1) % step == 0)

    def mlp_shapes(self, layer: int) -> dict[str, Expected]:
        if not self.is_moe_layer(layer):
            return super().mlp_shapes(layer)
        H, E = self.hidden, self.dim("num_local_experts", "num_experts")
        Fe = self.dim("moe_intermediate_size", default=ANY)
        shapes = {"mlp.gate.weight": Expected.of(E, H)}
        if self.hparams.get("shared_expert_intermediate_size"):
            Fs = self.dim("shared_expert_intermediate_size")
            shapes.update({
                "mlp.shared_expert.gate_proj.weight": Expected.of(Fs, H),
                "mlp.shared_expert.up_proj.weight": Expected.of(Fs, H),
                "mlp.shared_expert.down_proj.weight": Expected.of(H, Fs),
                "mlp.shared_expert_gate.weight": Expected.of(1, H),
            })
        # Either layout is accepted: the packed one when the checkpoint holds it, else per expert.
        present = self.present_names()
        packed = f"model.layers.{layer}.mlp.experts."
        if any(f"{packed}{p}{w}" in present for p in ("gate_up_proj", "down_proj") for w in ("", ".weight")):
            for proj, shape in (("gate_up_proj", (E, 2 * Fe, H)), ("down_proj", (E, H, Fe))):
                leaf = f"mlp.experts.{proj}" + (".weight" if f"{packed}{proj}.weight" in present else "")
                shapes[leaf] = Expected.of(*shape)
            return shapes
        for e in range(E.size):
            shapes[f"mlp.experts.{e}.gate_proj.weight"] = Expected.of(Fe, H)
            shapes[f"mlp.experts.{e}.up_proj.weight"] = Expected.of(Fe, H)
            shapes[f"mlp.experts.{e}.down_proj.weight"] = Expected.of(H, Fe)
        return shapes

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
