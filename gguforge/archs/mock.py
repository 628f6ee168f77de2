"""What the test mocks need to know about an architecture (scripts/make_mocks.py reads it).

Data only: no torch or transformers import. An architecture joins the mock / parity matrix by giving
its class a `mock = MockSpec(...)` and, where its config differs from its parent's, a `mock_config`
classmethod (see DecoderArch.mock_config).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MockSizes:
    """Dimensions of one mock size ("tiny": fast tests; "q256": rows that fill 256-wide K-quant blocks)."""

    hidden: int
    head_dim: int
    layers: int
    ffn: int
    experts: int
    expert_ffn: int
    shared_ffn: int

    @classmethod
    def of(cls, size: str, experts: int | None = None, layers: int | None = None) -> "MockSizes":
        if size not in ("tiny", "q256"):
            raise ValueError(f"size must be one of ('tiny', 'q256'), got {size!r}")
        q = size == "q256"
        return cls(hidden=256 if q else 64, head_dim=64 if q else 16, layers=layers or (2 if q else 4),
                   ffn=512 if q else 128, experts=experts or 4, expert_ffn=256 if q else 32,
                   shared_ffn=256 if q else 64)


@dataclass(frozen=True)
class MockSpec:
    """transformers classes: (config, CausalLM) and, for a Hub layout, (wrapper config, wrapper model)
    after them; `tokenizer` is the pre-tokenizer the mock tokenizer uses (llama.cpp's name)."""

    classes: tuple[str | None, ...]  # a None CausalLM: the model exists only inside its wrapper
    tokenizer: str = "qwen2"
    hub: bool = False  # a Hub layout exists: bf16 shards, MTP tensors, the vision wrapper if classes has one
    hub_packed_experts: bool = False  # the Hub checkpoint packs the trunk experts
    mtp_depth_in_config: bool = True  # the Hub config names mtp_num_hidden_layers

    @property
    def wrapped(self) -> bool:
        return len(self.classes) == 4

    @property
    def wrapper_only(self) -> bool:
        return self.classes[1] is None
