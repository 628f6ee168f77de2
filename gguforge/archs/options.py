"""Options that steer a conversion (filled from the CLI, or by tests directly)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConvertOptions:
    outtype: str = "auto"  # f32, f16, bf16, q8_0, auto, or a quantize preset such as Q4_K_M
    no_mtp: bool = False  # drop multi-token-prediction tensors
    mtp_only: bool = False  # write only the draft (MTP) head
    fuse_gate_up_exps: bool = False
    fuse_qkv: bool = False
    pre_tokenizer: str | None = None  # name the pre-tokenizer by hand
    model_name: str | None = None
    metadata_overrides: dict = field(default_factory=dict)
    allow_nonfinite: bool = False
    threads: int | None = None
    vocab_only: bool = False
    allow_pickle: bool = False  # load pytorch_model*.bin with torch (weights only)
    mmproj: bool = False  # write the vision encoder (a clip GGUF), not the text model
    fp8_as_q8: bool = False  # weights dequantized from FP8 are written as Q8_0 (llama.cpp's --fp8-as-q8)
    # --imatrix FILE with a quantize preset as --outtype: a quantize.imatrix.ImatrixOptions
    imatrix: object = None
