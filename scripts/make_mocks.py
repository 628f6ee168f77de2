#!/usr/bin/env python3
"""Tiny deterministic mock Hugging Face checkpoints for every registered architecture with a mock spec.

Library:  make_mock(arch, out_dir, layout=..., dtype=..., size=..., seed=..., mtp=..., num_experts=...)
CLI:      python scripts/make_mocks.py ARCH OUT [--layout hub] [--dtype bfloat16] [--size q256] [--seed N]
          python scripts/make_mocks.py --embedded     # regenerate gguforge/data/tiny-qwen2moe/

Layouts
  causal  what transformers' save_pretrained writes for the CausalLM class (per-expert tensors,
          one model.safetensors). This is the layout tests load back through transformers.
  hub     what the Hub publishes: bf16, >=2 shards + model.safetensors.index.json, MTP tensors
          (mtp.*), and for qwen35/qwen35moe the ConditionalGeneration wrapper
          (model.language_model.* prefix, nested text_config, model.visual.* vision stub) with
          packed trunk experts (experts.gate_up_proj [E, 2Fe, H], experts.down_proj [E, H, Fe]).
          It is produced by rewriting the causal safetensors, so trunk weights are identical.

All drawn values are rounded to bf16, so float32 and bfloat16 mocks of one seed hold the same
numbers and a bf16 -> f32 conversion is exact; full_precision=True keeps float32 draws instead, to
expose any rounding through a 16-bit type.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path



def arch_classes() -> dict:
    """mock name (the gguf arch unless the spec names one) -> the architecture class, for every registered
    class with a mock spec."""
    from gguforge.archs import registered
    return {mock_name(cls): cls for cls in registered().values() if cls.mock is not None}


def mock_name(cls) -> str:
    """The mock's name: the gguf arch, or the class's mock_name where several classes share one arch."""
    return getattr(cls, "mock_name", None) or cls.gguf_arch


ARCHS = tuple(sorted(arch_classes()))
SIZES = ("tiny", "q256")
REPO = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = REPO / "gguforge" / "data" / "tiny-qwen2moe"

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# Qwen2 pre-tokenizer regex (tokenizer.json of Qwen1.5/2/3/3-Next).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5: \p{M} joins the letter classes (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN35).
QWEN35_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's pre-tokenizer regex (llama.cpp "llama-bpe"): digits in groups of up to three.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
REGEXES = {"qwen2": QWEN2_REGEX, "qwen35": QWEN35_REGEX, "llama-bpe": LLAMA3_REGEX}
TOKENIZER_CLASSES = {"qwen2": "Qwen2Tokenizer", "qwen35": "Qwen3_5Tokenizer", "llama-bpe": "PreTrainedTokenizerFast"}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKENS = ["<think>", "</think>"]  # added but not special (USER_DEFINED in GGUF)
N_TRAINED = 395  # 256 byte symbols + merges; +5 added tokens = 400 tokenizer entries

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'm sure they'll say it's fine, and we've seen "
    "that you'd agree. THE END isn't near; It'S CaSe InSeNsItIvE.",
    "Hello world! Hello again, world. Large language models convert text into tokens.",
    "def main(args):\n    for i in range(10):\n        if i % 2 == 0:\n            print(f\"{i} is even\")\n"
    "    return {'key': [1, 2, 3]}\n\nclass Foo:\n\tpass\n",
    "int main(void) { printf(\"%d\\n\", 42); return 0; } // comment\n#include <stdio.h>\n",
    "我想在apple工作1314151天～ 你好，世界！今天天气很好。我们一起学习机器学习。",
    "Привет, как дела? Всё хорошо, спасибо. Москва — столица России. Български език.",
    "ស្វាគមន៍មកកាន់ប្រទេសកម្ពុជា។ ខ្ញុំចង់រៀនភាសាខ្មែរ ជាមួយមិត្តភក្តិ។",
    "Emoji: 🦙🦙 🚀 ✨ ❤️ 👨‍👩‍👧‍👦 🏳️‍🌈 😀😃😄 👍🏽",
    "   \n\n\n  \t\t  \n \n  spaces    and\ttabs\t\there\r\n\r\nend   ",
    "Numbers: 3 33 333 3333 33333 3.14159 2,718 1e-5 0x1F 2024-06-01 100% $9.99",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nsimple</think>4<|im_end|>",
    "'''quotes''' \"\"\"docstring\"\"\" ``` code ``` ... !!! ??? --- === *** ((()))",
    "Ünïcödé àccents: café, naïve, résumé, Straße, Øresund, Ελληνικά, العربية, עברית, हिन्दी",
]


@functools.lru_cache(maxsize=None)
def tokenizer_json(arch: str) -> str:
    """Train (once per process, deterministically) a small byte-level BPE; return tokenizer.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    regex = REGEXES[spec(arch).tokenizer]
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()  # as in Qwen's tokenizer.json (test texts are NFC already)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=N_TRAINED, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_TOKENS])
    return tok.to_str(pretty=True)


def write_tokenizer(arch: str, out: Path) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json; return {token: id} for the added tokens."""
    text = tokenizer_json(arch)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    added = {t["content"]: t for t in json.loads(text)["added_tokens"]}
    decoder = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in added.values()
    }
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        # transformers rebuilds the pipeline from this class; its regex equals ours.
        "tokenizer_class": TOKENIZER_CLASSES[spec(arch).tokenizer],
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {c: t["id"] for c, t in added.items()}


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

def spec(arch: str):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return arch_classes()[arch].mock


def text_config_kwargs(arch: str, size: str = "tiny", num_experts: int | None = None) -> dict:
    """Config kwargs for the CausalLM class of `arch`: the architecture's own mock_config()."""
    from gguforge.archs.api import MockSizes
    spec(arch)
    return arch_classes()[arch].mock_config(MockSizes.of(size, num_experts))


def _classes(arch: str):
    """(config, CausalLM, wrapper config or None, wrapper model or None) transformers classes."""
    import transformers
    names = spec(arch).classes
    return tuple(None if n is None else getattr(transformers, n) for n in names) + (None,) * (4 - len(names))


# A small vision tower: dropped from the text GGUF, converted by --mmproj. Its FFN width (72) is not a
# multiple of 32, like the real 4304, so a q8_0 mmproj exercises the F16 fallback of ffn_down.
VISION_STUB = dict(depth=2, hidden_size=32, intermediate_size=72, num_heads=2, patch_size=4,
                   spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
# preprocessor_config.json of the vision mocks (CLIP's mean/std: distinct per channel, unlike Qwen's 0.5s)
PREPROCESSOR = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                    image_processor_type="Qwen2VLImageProcessorFast", merge_size=2, patch_size=4,
                    temporal_patch_size=2)

# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _draw(name: str, shape, zero_centred: bool, g, bf16_exact: bool = True):
    """One parameter's values. Every rule makes the tensor matter (no ones/zeros left)."""
    import torch

    randn = lambda: torch.randn(shape, generator=g)  # noqa: E731
    leaf = name.rsplit(".", 1)[-1]
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    if name.endswith("linear_attn.norm.weight"):  # gated RMSNorm: plain w, ones-centred
        x = 1 + 0.1 * randn()
    elif stem.endswith("norm") or "_norm_" in stem or stem.endswith("layernorm"):
        if "visual" in name:
            x = 1 + 0.1 * randn()
        else:
            x = (0 if zero_centred else 1) + 0.1 * randn()  # Qwen3-Next/3.5 compute x*(1+w)
    elif leaf == "A_log":
        x = torch.log(torch.empty(shape).uniform_(1.0, 8.0, generator=g))
    elif leaf == "dt_bias":
        x = 0.5 * randn()
    elif leaf == "bias":
        x = 0.1 * randn()
    elif len(shape) == 1:
        x = 0.1 * randn()
    elif "conv1d" in name:  # [C, 1, K]: depthwise, K taps
        x = randn() / math.sqrt(shape[-1])
    elif "embed_tokens" in name:
        x = randn()
    elif name.endswith("mlp.gate.weight") or name == "lm_head.weight":
        x = 2 * randn() / math.sqrt(shape[-1])  # decisive routing / peaked but finite logits
    else:
        fan_in = math.prod(shape[1:]) if len(shape) > 2 and "experts" not in name else shape[-1]
        x = randn() / math.sqrt(fan_in)
    if not bf16_exact:
        return x  # full-precision float32: what a float32 fine-tune holds (not representable in bf16/f16)
    return x.to(torch.bfloat16).to(torch.float32)  # bf16-exact values, see module doc


def init_weights(module, arch: str, seed: int, prefix: str = "", bf16_exact: bool = True) -> None:
    """Deterministically overwrite every parameter of `module` (named_parameters order)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    zero_centred = arch_classes()[arch].zero_centred_norms
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(_draw(prefix + name, tuple(p.shape), zero_centred, g, bf16_exact))


def _unpack_experts(sd: dict) -> dict:
    """In-memory packed experts -> per-expert checkpoint names (what save_pretrained writes)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj"):
            base, fe = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :fe].contiguous()
                out[f"{base}{e}.up_proj.weight"] = v[e, fe:].contiguous()
        elif k.endswith("experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out


def pack_experts(sd: dict, prefix: str) -> dict:
    """Per-expert names under `prefix` -> packed gate_up_proj [E,2Fe,H] = cat(gate, up) and down_proj."""
    import re

    import torch

    groups: dict[str, dict[int, dict[str, object]]] = {}
    out = {}
    pat = re.compile(r"^(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    for k, v in sd.items():
        m = pat.match(k)
        if m and k.startswith(prefix):
            groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = v
        else:
            out[k] = v
    for base, experts in groups.items():
        es = [experts[e] for e in range(len(experts))]
        out[base + "gate_up_proj"] = torch.stack([torch.cat([x["gate_proj"], x["up_proj"]], 0) for x in es])
        out[base + "down_proj"] = torch.stack([x["down_proj"] for x in es])
    return out


def mtp_tensors(model, arch: str, seed: int) -> dict:
    """A Qwen MTP head: fc, three norms and one full-attention decoder block (per-expert MLP)."""
    import torch

    cfg = model.config
    full = next(i for i, t in enumerate(cfg.layer_types) if t in ("full_attention", "indexed_attention"))
    layer_cls = type(model.model.layers[full])
    layer = layer_cls(cfg, full)  # same class/config as a trunk full-attention block
    H = cfg.hidden_size
    head = torch.nn.Module()
    head.fc = torch.nn.Linear(2 * H, H, bias=False)
    head.pre_fc_norm_embedding = torch.nn.Module()
    head.pre_fc_norm_embedding.weight = torch.nn.Parameter(torch.empty(H))
    head.pre_fc_norm_hidden = torch.nn.Module()
    head.pre_fc_norm_hidden.weight = torch.nn.Parameter(torch.empty(H))
    head.norm = torch.nn.Module()
    head.norm.weight = torch.nn.Parameter(torch.empty(H))
    head.layers = torch.nn.ModuleList([layer])
    init_weights(head, arch, seed + 7919, prefix="mtp.")
    return _unpack_experts({"mtp." + k: v.detach().clone() for k, v in head.state_dict().items()})


def vision_tensors(arch: str, text_cfg, seed: int) -> tuple[dict, dict]:
    """(model.visual.* tensors, full ConditionalGeneration config dict)."""
    import torch

    _, _, cg_cfg_cls, cg_cls = _classes(arch)
    cfg = cg_cfg_cls(text_config=text_cfg.to_dict(),
                     vision_config=dict(VISION_STUB, out_hidden_size=text_cfg.hidden_size),
                     tie_word_embeddings=False)
    with torch.device("meta"):
        shell = cg_cls(cfg)
    visual = type(shell.model.visual)(cfg.vision_config)
    init_weights(visual, arch, seed + 104729, prefix="model.visual.")
    sd = {"model.visual." + k: v.detach().clone() for k, v in visual.state_dict().items()}
    return sd, json.loads(cfg.to_json_string())  # diff form, as save_pretrained writes it


def _initialise_and_save(model, arch: str, seed: int, full_precision: bool, tdtype, dtype: str,
                         out: Path) -> tuple[dict, dict]:
    """Draw the weights, save as transformers does; (state dict as saved, config.json). The generation
    config goes to `out` as it is."""
    from safetensors.torch import load_file

    init_weights(model, arch, seed, bf16_exact=not full_precision)
    model.to(tdtype)
    model.config.dtype = dtype
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        sd = load_file(str(Path(tmp) / "model.safetensors"))  # the names transformers writes (per expert...)
        config = json.loads((Path(tmp) / "config.json").read_text())
        gen = Path(tmp) / "generation_config.json"
        if gen.exists():
            shutil.copy(gen, out / "generation_config.json")
    return sd, config


def _wrapper_only_mock(arch: str, out: Path, kw: dict, layout: str, tdtype, dtype: str, seed: int,
                       full_precision: bool) -> Path:
    """A model that exists only inside its ConditionalGeneration wrapper (Qwen3-VL): built and saved as
    transformers does ("causal"), or as published ("hub": bf16 shards, packed experts transposed)."""
    import torch
    from safetensors.torch import save_file

    _, _, cg_cfg_cls, cg_cls = _classes(arch)
    cls = arch_classes()[arch]
    vision = (cls.mock_vision_config(kw["hidden_size"]) if hasattr(cls, "mock_vision_config")
              else dict(VISION_STUB, out_hidden_size=kw["hidden_size"], deepstack_visual_indexes=[1]))
    wrapper = (cls.mock_wrapper_config(kw, vision) if hasattr(cls, "mock_wrapper_config")
               else dict(text_config=kw, vision_config=vision))
    cfg = cg_cfg_cls(**wrapper, tie_word_embeddings=kw["tie_word_embeddings"])
    torch.manual_seed(seed)
    model = cg_cls(cfg)
    sd, config = _initialise_and_save(model, arch, seed, full_precision, tdtype, dtype, out)
    if hasattr(cls, "mock_extra_tensors"):  # parts transformers does not build at mock size (e.g. Omni's talker)
        sd.update(cls.mock_extra_tensors(sd))
    if layout == "causal":
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:  # the published layout: experts [E, H, 2F] and [E, F, H]
        sd = {k: (v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v)
              for k, v in sd.items()}
        config["transformers_version"] = "4.57.0"
        _save_shards(sd, out, n_shards=2)
    _dump_json(out / "config.json", config)
    _dump_json(out / "preprocessor_config.json", dict(PREPROCESSOR, patch_size=vision["patch_size"]))
    return out


def _save_shards(sd: dict, out: Path, n_shards: int) -> None:
    """Write `sd` as n_shards safetensors files + model.safetensors.index.json (Hub style)."""
    from safetensors.torch import save_file

    names = sorted(sd)
    total = sum(sd[n].numel() * sd[n].element_size() for n in names)
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    acc = 0
    for n in names:  # fill shards by cumulative bytes so each gets a fair share
        i = min(n_shards - 1, acc * n_shards // total)
        shards[i].append(n)
        acc += sd[n].numel() * sd[n].element_size()
    shards = [s for s in shards if s]
    weight_map = {}
    for i, s in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: sd[n].contiguous() for n in s}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in s})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _dump_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def make_mock(arch: str, out_dir, *, layout: str = "causal", dtype: str | None = None, size: str = "tiny",
              seed: int = 0, mtp: bool | None = None, num_experts: int | None = None,
              num_hidden_layers: int | None = None, full_precision: bool = False, tied: bool = False,
              rope_scaling: dict | None = None, config: dict | None = None) -> Path:
    """Build a mock checkpoint into out_dir (created/emptied) and return it.

    dtype: "float32" | "bfloat16" | "float16"; default float32 for causal, bfloat16 for hub.
    full_precision: draw float32 values that bf16/f16 cannot represent (default: bf16-exact values).
    tied: tie the output head to the embedding (no lm_head.weight in the checkpoint).
    rope_scaling: extra rope_parameters entries, e.g. {"rope_type": "yarn", "factor": 4.0, ...}.
    config: text-config values that replace the mock's own (e.g. {"head_dim": 128}), applied last.
    mtp:   add mtp.* tensors; default: for the hub layout of an architecture with an MTP head.
    num_experts: routed experts for MoE archs (default 4; 8 triggers llama-quantize's 8-expert rules).
    num_hidden_layers: decoder layers (default 2 or 4 by size; even for the hybrids, which alternate
           linear and full attention); >= 16 makes llama-quantize's layer-position rules fire.
    """
    mock = spec(arch)
    if layout not in ("causal", "hub"):
        raise ValueError(f"layout must be 'causal' or 'hub', got {layout!r}")
    if layout == "hub" and not mock.hub:
        raise ValueError(f"the hub layout exists for {', '.join(a for a in ARCHS if spec(a).hub)} only")
    import torch
    from safetensors.torch import save_file

    dtype = dtype or ("bfloat16" if layout == "hub" else "float32")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    from gguforge.archs.api import MtpHead
    mtp = (layout == "hub" and issubclass(arch_classes()[arch], MtpHead)) if mtp is None else mtp
    if mtp and not issubclass(arch_classes()[arch], MtpHead):
        raise ValueError(f"{arch} has no MTP head")

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    ids = write_tokenizer(arch, out)
    cfg_cls, lm_cls, _, _ = _classes(arch)
    kw = text_config_kwargs(arch, size, num_experts)
    if tied:
        kw["tie_word_embeddings"] = True
    if rope_scaling:
        kw["rope_parameters"] = dict(kw.get("rope_parameters") or {}, **rope_scaling)
    if num_hidden_layers is not None:
        if num_hidden_layers < 1 or ("layer_types" in kw and num_hidden_layers % 2):
            raise ValueError(f"bad num_hidden_layers {num_hidden_layers} for {arch}")
        kw["num_hidden_layers"] = num_hidden_layers
        if "layer_types" in kw:
            kw["layer_types"] = kw["layer_types"][:2] * (num_hidden_layers // 2)
    kw.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=None)
    kw.update(config or {})
    if mock.wrapper_only:
        return _wrapper_only_mock(arch, out, kw, layout, tdtype, dtype, seed, full_precision)
    cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = lm_cls(cfg)
    sd, config = _initialise_and_save(model, arch, seed, full_precision, tdtype, dtype, out)
    if hasattr(arch_classes()[arch], "mock_saved"):  # what the released checkpoints hold beyond save_pretrained
        sd, config = arch_classes()[arch].mock_saved(model, sd, config)

    if "layer_types" in config:  # Hub configs carry the interval too (transformers pops it)
        config["full_attention_interval"] = 2
    if mtp:
        sd.update({k: v.to(tdtype) for k, v in mtp_tensors(model, arch, seed).items()})
        if mock.mtp_depth_in_config:  # (Qwen3-Next configs never name the MTP depth)
            config["mtp_num_hidden_layers"] = 1
            config["mtp_use_dedicated_embeddings"] = False

    if layout == "causal":
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        _dump_json(out / "config.json", config)
        return out

    if mock.wrapped:
        sd = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
              for k, v in sd.items()}
        if mock.hub_packed_experts:  # e.g. Qwen3.5-MoE Hub: packed trunk experts, per-expert MTP experts
            sd = pack_experts(sd, "model.language_model.")
        vis, full_cfg = vision_tensors(arch, cfg, seed)
        sd.update({k: v.to(tdtype) for k, v in vis.items()})
        # No text_config.architectures: it would switch converters to the CausalLM class.
        full_cfg["text_config"] = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
        full_cfg["architectures"] = [_classes(arch)[3].__name__]
        full_cfg["dtype"] = dtype
        full_cfg["tie_word_embeddings"] = False
        full_cfg["transformers_version"] = config.get("transformers_version")
        config = full_cfg
        _dump_json(out / "preprocessor_config.json", PREPROCESSOR)
    _save_shards(sd, out, n_shards=2)
    _dump_json(out / "config.json", config)
    return out


def make_embedded(out: Path = EMBEDDED_DIR) -> Path:
    """The built-in default model of `gguforge convert-hf`: tiny qwen2moe, bf16, seed 0."""
    path = make_mock("qwen2moe", out, layout="causal", dtype="bfloat16", size="tiny", seed=0)
    gen = path / "generation_config.json"
    if gen.exists():
        gen.unlink()  # keep the package data minimal
    (path / "README.md").write_text(
        "# tiny-qwen2moe\n\nA tiny random Qwen2-MoE checkpoint (bf16, seed 0) generated by "
        "`python scripts/make_mocks.py --embedded`. It is the default model of `gguforge convert-hf` "
        "and carries no trained knowledge.\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("arch", nargs="?", choices=ARCHS)
    ap.add_argument("out", nargs="?")
    ap.add_argument("--layout", choices=("causal", "hub"), default="causal")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-experts", type=int)
    mtp = ap.add_mutually_exclusive_group()
    mtp.add_argument("--mtp", dest="mtp", action="store_true", default=None)
    mtp.add_argument("--no-mtp", dest="mtp", action="store_false")
    ap.add_argument("--embedded", action="store_true", help=f"regenerate {EMBEDDED_DIR.relative_to(REPO)}")
    a = ap.parse_args(argv)
    if a.embedded:
        print(make_embedded())
        return 0
    if not a.arch or not a.out:
        ap.error("ARCH and OUT are required (or --embedded)")
    print(make_mock(a.arch, a.out, layout=a.layout, dtype=a.dtype, size=a.size, seed=a.seed, mtp=a.mtp,
                    num_experts=a.num_experts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
