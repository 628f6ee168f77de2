"""Optional fusion, a generator stage after the architecture's transform.

--fuse-qkv: blk.N.attn_{q,k,v} -> blk.N.attn_qkv (rows Q, K, V; weights and biases separately).
--fuse-gate-up-exps: blk.N.ffn_{gate,up}_exps -> blk.N.ffn_gate_up_exps (gate then up along the
expert FFN axis, i.e. the layout of HF's packed gate_up_proj).

Parts are buffered as lazy expressions until their partners arrive, so nothing
is materialised; a block whose parts never complete (say, biases only on Q) is
passed through unfused. Each architecture declares which fusions its llama.cpp
loader accepts, and a request it cannot honour is refused before any output.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from ..errors import UserError
from ..checkpoint.lazy import Lazy, concat_axis, concat_rows

QKV = re.compile(r"^blk\.(\d+)\.attn_([qkv])\.(weight|bias)$")
GATE_UP = re.compile(r"^blk\.(\d+)\.ffn_(gate|up)_exps\.weight$")


def requested(options) -> list[str]:
    return [name for name, on in (("qkv", options.fuse_qkv), ("gate_up_exps", options.fuse_gate_up_exps)) if on]


FLAGS = {"qkv": "--fuse-qkv", "gate_up_exps": "--fuse-gate-up-exps"}
WHY_NOT = {
    "gate_up_exps": "its llama.cpp loader only reads separate ffn_gate_exps/ffn_up_exps",
    "qkv": "its llama.cpp loader only reads separate attn_q/attn_k/attn_v",
}


def supported(arch) -> frozenset[str]:
    """The fusions an architecture declares (a capability: `fusions` only on classes whose loader has them)."""
    return getattr(arch, "fusions", frozenset())


def check_supported(arch, options) -> None:
    """Refuse a fusion the architecture's llama.cpp loader cannot use (before anything is written)."""
    for fusion in requested(options):
        if fusion not in supported(arch):
            raise UserError(f"{FLAGS[fusion]} is not supported for {arch.gguf_arch}: {WHY_NOT[fusion]}")


def fuse(stream: Iterable[tuple[str, Lazy]], options, fused: dict[str, int]) -> Iterator[tuple[str, Lazy]]:
    """The fusion stage; counts what it fused per kind in `fused`."""
    fusions = requested(options)
    if not fusions:
        yield from stream
        return
    pending: dict[tuple, dict[str, tuple[str, Lazy]]] = {}
    for name, tensor in stream:
        if "qkv" in fusions and (m := QKV.match(name)):
            key, part, parts = ("qkv", m.group(1), m.group(3)), m.group(2), "qkv"
        elif "gate_up_exps" in fusions and (m := GATE_UP.match(name)):
            key, part, parts = ("gate_up_exps", m.group(1)), m.group(2), ("gate", "up")
        else:
            if name.endswith(".ffn_gate_up_exps.weight"):  # packed checkpoints arrive already fused
                fused["gate_up_exps"] = fused.get("gate_up_exps", 0) + 1
            yield name, tensor
            continue
        group = pending.setdefault(key, {})
        group[part] = (name, tensor)
        if all(p in group for p in parts):
            del pending[key]
            fused[key[0]] = fused.get(key[0], 0) + 1
            yield _fused(key, [group[p][1] for p in parts])
    for group in pending.values():  # incomplete groups stay as they were
        yield from group.values()


def _fused(key: tuple, parts: list[Lazy]) -> tuple[str, Lazy]:
    if key[0] == "qkv":
        _, block, suffix = key
        return f"blk.{block}.attn_qkv.{suffix}", concat_rows(parts)
    return f"blk.{key[1]}.ffn_gate_up_exps.weight", concat_axis(parts, axis=1)


def check_something_fused(arch, options, fused: dict[str, int]) -> None:
    """A fusion flag that found nothing to fuse is reported, not silently ignored."""
    for fusion in requested(options):
        if not fused.get(fusion):
            what = "routed experts" if fusion == "gate_up_exps" else "separate Q/K/V attention tensors"
            raise UserError(f"{FLAGS[fusion]}: this {arch.gguf_arch} model has no {what} to fuse",
                            hint=f"drop {FLAGS[fusion]}")
