"""Qwen3-ASR: its language model as a `qwen3vl` text GGUF (llama.cpp: conversion/qwen3vl.py Qwen3ASRTextModel).

As Qwen3-Omni's thinker (qwen3omni.py): no deepstack layers, BOS and EOS set to <|im_end|>, and the
chat template replaced by plain ChatML. Both layouts are read: transformers 5's (model.language_model.*,
text_config) and the original one (thinker.model.*, thinker_config.text_config). The audio encoder
(model.audio_tower.*, the projector) is left to --mmproj, which does not convert it yet.
"""

from __future__ import annotations

from gguf import GGUFValueType

from .api import Metadata, MockSpec, register
from .qwen3omni import CHATML, ImEndTokens, mock_audio, set_in_place
from .qwen3vl import Qwen3VL


@register("Qwen3ASRForConditionalGeneration")
class Qwen3ASR(ImEndTokens, Qwen3VL):
    mock_name = "qwen3asr"
    mock = MockSpec(("Qwen3Config", None, "Qwen3ASRConfig", "Qwen3ASRForConditionalGeneration"))

    def __init__(self, hparams: dict, options=None, tensor_names=()):
        thinker = hparams.get("thinker_config")
        if isinstance(thinker, dict) and isinstance(thinker.get("text_config"), dict):
            hparams = {**hparams, **thinker["text_config"]}
        super().__init__(hparams, options, tensor_names)

    def rename(self, name: str) -> str | None:
        return super().rename(name.removeprefix("thinker."))

    def vocab_config(self, config: dict) -> dict:
        return {**config, "vocab_size": self.hparams.get("vocab_size")}

    def after_vocab(self, md: Metadata) -> None:
        set_in_place(md, "tokenizer.chat_template", CHATML, GGUFValueType.STRING)  # before BOS/EOS, as the reference
        super().after_vocab(md)

    @classmethod
    def mock_wrapper_config(cls, text: dict, vision: dict) -> dict:
        return dict(text_config=dict(text, model_type="qwen3"), audio_config=mock_audio(text))
