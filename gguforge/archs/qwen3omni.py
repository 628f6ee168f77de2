"""Qwen3-Omni-MoE (and what Qwen3-ASR shares with it): the thinker as the text GGUF.

llama.cpp's converter (conversion/qwen3vl.py Qwen3OmniMoeTextModel, Qwen3ASRTextModel) writes the
thinker as `qwen3vlmoe` (Omni) or `qwen3vl` (ASR) with no deepstack layers, and BOS and EOS set to
<|im_end|> (replacing the tokenizer's, in place); for ASR also a plain ChatML chat template. Omni's
configs nest the thinker (thinker_config.text_config); its checkpoints keep it under `thinker.`, next
to the speech-output model (`talker.*`, `code2wav.*`), which llama.cpp does not run: those are left out
with a note. The vision and audio towers (`--mmproj`, projector qwen3a) are not converted yet.
"""

from __future__ import annotations

from gguf import GGUFValueType

from .api import Metadata, MockSizes, MockSpec, UserError, register
from .qwen3vl import Qwen3VL, Qwen3VLMoe

SPEECH_OUTPUT = ("talker.", "code2wav.")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class ImEndTokens:
    """BOS and EOS are <|im_end|> (its id in tokenizer_config.json's added_tokens_decoder); no deepstack."""

    deepstack = False

    def add_metadata(self, md: Metadata) -> None:
        super().add_metadata(md)
        md.u32(f"{self.gguf_arch}.n_deepstack_layers", 0)  # (the thinker's deepstack is not used)

    def after_vocab(self, md: Metadata) -> None:
        super().after_vocab(md)
        tokens = md.get("tokenizer.ggml.tokens") or []
        if "<|im_end|>" not in tokens:
            return
        im_end = tokens.index("<|im_end|>")
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            set_in_place(md, key, im_end, GGUFValueType.UINT32)


    def vision(self, processor: dict):
        raise UserError(f"--mmproj: {type(self).__name__} checkpoints carry an audio encoder (projector qwen3a), "
                        "which gguforge does not convert yet", hint="convert the text model without --mmproj")


def mock_audio(text: dict) -> dict:
    """A tiny audio encoder config (Qwen3-Omni's and Qwen3-ASR's), projecting to the text width."""
    return dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=72, d_model=32,
                output_dim=text["hidden_size"], downsample_hidden_size=8, n_window=4, n_window_infer=8)


def set_in_place(md: Metadata, key: str, value, vtype: GGUFValueType) -> None:
    """Set `key` keeping its position when present (as gguf-py's writer does on a second add)."""
    if key in md:
        md.items[key] = (vtype, value, None)
    else:
        md.set(key, value, vtype)


@register("Qwen3OmniMoeForConditionalGeneration")
class Qwen3OmniMoe(ImEndTokens, Qwen3VLMoe):
    mock_name = "qwen3omni"
    mock = MockSpec(("Qwen3OmniMoeTextConfig", None, "Qwen3OmniMoeConfig", "Qwen3OmniMoeForConditionalGeneration"),
                    hub=True)

    def __init__(self, hparams: dict, options=None, tensor_names=()):
        thinker = hparams.get("thinker_config")
        names = list(tensor_names)
        if not isinstance(thinker, dict) or not isinstance(thinker.get("text_config"), dict) \
                or not any(n.startswith("thinker.") for n in names):
            raise UserError("this Qwen3-Omni checkpoint has no thinker (thinker_config.text_config and thinker.* "
                            "tensors): it is the model llama.cpp runs",
                            hint="convert the full Qwen3-Omni checkpoint, not its talker or code2wav part")
        merged = {**hparams, **thinker["text_config"], "vision_config": thinker.get("vision_config")}
        super().__init__(merged, options, names)
        self.speech_output = sum(n.startswith(SPEECH_OUTPUT) for n in names)

    def vocab_config(self, config: dict) -> dict:
        """The thinker's vocab_size pads the vocabulary; special ids come from the top level only (llama.cpp's
        converter looks no deeper than text_config for them)."""
        return {**config, "vocab_size": self.hparams.get("vocab_size")}

    def rename(self, name: str) -> str | None:
        if name.startswith(SPEECH_OUTPUT):
            return None
        return super().rename(name.removeprefix("thinker."))

    def notes(self) -> list[str]:
        if not self.speech_output:
            return []
        return [f"{self.speech_output} speech-output tensors (talker.*, code2wav.*) left out: llama.cpp runs the "
                "thinker only"]

    @classmethod
    def mock_wrapper_config(cls, text: dict, vision: dict) -> dict:
        return dict(thinker_config=dict(text_config=text, vision_config=vision, audio_config=mock_audio(text)),
                    enable_audio_output=False)

    @classmethod
    def mock_extra_tensors(cls, sd: dict) -> dict:
        """Stand-ins for the speech-output model (transformers builds it only at full size)."""
        import torch
        g = torch.Generator().manual_seed(5)
        return {name: torch.randn(shape, generator=g) for name, shape in (
            ("talker.model.layers.0.self_attn.q_proj.weight", (16, 16)), ("code2wav.decoder.0.conv.weight", (8, 8, 3)))}
