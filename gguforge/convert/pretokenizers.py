r"""llama.cpp's BPE pre-tokenizer names, recognised from the tokenizer's own definition.

llama.cpp's converter hashes the token ids of a test string against a table of known models
(convert_hf_to_gguf.py get_vocab_base_pre); llama.cpp's loader then maps the name to a pre-split
regex list (src/llama-vocab.cpp, llm_tokenizer_bpe). Here the name is read off what the tokenizer.json
defines instead: its pre-tokenizer steps (Split regexes, Digits, Punctuation, ByteLevel settings) and,
where it matters, its normalizer. A fine-tune that keeps a known tokenizer converts without a table
update, and a new definition is a clear error instead of a silently wrong split.

Several llama.cpp names share one definition (they differ in the model they came from, not in how
they split text): the table gives the name llama.cpp writes for a family, picked by config.json's
model_type, and a default. DeepSeek-R1-Distill-Qwen keeps Qwen2's definition with DeepSeek's special
tokens: its BOS `<｜begin▁of▁sentence｜>` picks `deepseek-r1-qwen`, as llama.cpp's hash does.

Each regex is the one the tokenizer.json writes: where llama.cpp's llm_tokenizer_bpe runs an adapted copy
(std::regex lacks \p classes and (?i:)), the original it notes beside it. For gpt-4o / llama4 / minimax-m2,
tekken and tiny_aya llama.cpp rewrites the case classes ([\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]...) as ASCII
lookaheads over its collapsed category text; its runtime still tokenizes all of its test inputs as the
tokenizers library does with the original, except tiny_aya's digit groups next to a non-ASCII letter
(std::regex's \b is ASCII) (tests/test_pretokenizers.py). deepseek-llm's Splits are
the ones llama.cpp runs, then one digit a piece: llama.cpp's \p{N}+ gives the same ids, its vocabulary has
no multi-digit token (tests/test_vocab_files.py rebuilds ggml-vocab-deepseek-llm with it).

Not here, an error naming --pre-tokenizer (the pinned tree records no tokenizer.json definition for them, or
they have none): kimi-k2 (a tiktoken model with no tokenizer.json; llama.cpp splits it with a hand-written
matcher in unicode.cpp), superbpe (llama.cpp's zero-width digit-group split has no recorded original),
afmoe (llama.cpp's \p{AFMoE_digits} is a hand-written matcher), youtu and spark2_5 (only adapted regexes
recorded), laguna (an extra line split before Qwen2's), bloom / poro-chat / gpt3-finnish / viking and
chameleon (llama.cpp's regexes are hand-simplified, the tokenizer.json ones are not recorded), gemma4 /
sarvam-moe (SentencePiece-style BPE with no pre-tokenizer: not a byte-level vocabulary), and the names that
share a definition with a recognised one under a model_type the tree does not record (falcon3, pixtral,
midm-2.0, smaug-bpe, kanana2, talkie, grok-2, kormo, f2llmv2, llada-moe, gigachat, a.x-4.0,
mellum, mellum2, minerva-7b, megrez, trillion, granite-docling, joyai-llm, glm5, the jina/roberta
embedding names ...): their tokenizers convert under the shared name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# -- the regexes as tokenizer.json writes them (llama-vocab.cpp keeps the originals in comments) -----------

GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5 adds combining marks (\p{M}) to the letter classes.
QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
JAIS2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)"
               r"|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}")
BAILINGMOE_REGEX = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"
                    r"|\s*[\r\n]|\s+(?!\S)|\s+")
# (Seed-Coder's tokenizer.json has real CR/LF characters in three places, not the \r\n escapes)
SEED_CODER_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\r\n]+"
                    "|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")
EXAONE_MOE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+")
MINICPM5_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
UFAKZEKA_REGEX = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# GPT-4o's o200k split (Xenova/gpt-4o, Llama 4, MiniMax-M2): case-aware words with the contraction attached
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
GPT4O_REGEX = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral's tekken: the same words without contractions, single digits
TEKKEN_REGEX = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Cohere's Tiny Aya: digits in groups of three from the right, then GPT-4o's split
TINY_AYA_DIGITS = r"\d{1,3}(?=(?:\d{3})*\b)"
DEEPSEEK_CJK = "[一-龥ࠀ-一가-퟿]+"
# DeepSeek LLM's cased-letter class (Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee, Glagolitic, Coptic,
# fullwidth, Deseret, Osage, Old Hungarian, Warang Citi, Adlam ranges) and its ASCII/fullwidth punctuation
DEEPSEEK_LLM_LETTERS = r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
DEEPSEEK_LLM_PUNCT = r"\s?[!-/:-~！-／：-～‘-‟　-。]+"
DEEPSEEK3_WORDS = ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                   "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")


# -- definitions: tuples of canonical steps (see canonical()) ----------------------------------------------

def split(regex: str) -> tuple:
    return ("Split", regex)


BYTES = ("ByteLevel", False)       # byte-level mapping only: the splitting is done by the steps before it
BYTES_GPT2 = ("ByteLevel", True)   # byte-level mapping with GPT-2's own split regex
ANY = None                         # the normalizer does not matter for this entry


@dataclass(frozen=True)
class PreTokenizer:
    """One definition and the llama.cpp names written for it: `name` by default, `families` by model_type."""

    name: str
    steps: tuple
    families: dict = field(default_factory=dict)
    normalizer: str | None = ANY  # a normalizer type the definition needs (tried before a wildcard entry)


TABLE: tuple[PreTokenizer, ...] = (
    PreTokenizer("gpt-2", (BYTES_GPT2,), normalizer="NFC",  # GPT-NeoX's tokenizer (MPT, OLMo) normalizes to NFC
                 families={"mpt": "mpt", "gpt_neox": "mpt", "olmo": "olmo"}),
    PreTokenizer("gpt-2", (BYTES_GPT2,), families={"phi": "phi-2", "jais": "jais", "exaone4": "exaone4",
                                                   "mpt": "mpt", "olmo": "olmo"}),
    PreTokenizer("starcoder", (("Digits", True), BYTES_GPT2),
                 families={"gpt_refact": "refact", "cohere": "command-r", "cohere2": "command-r", "llama": "smollm",
                           "codeshell": "codeshell", "exaone": "exaone"}),
    PreTokenizer("falcon", (("Punctuation", "Contiguous"), BYTES_GPT2, ("Digits", False),
                            split("[0-9][0-9][0-9]"))),
    PreTokenizer("llama-bpe", (split(LLAMA3_REGEX), BYTES),
                 families={"dbrx": "dbrx", "falcon_h1": "falcon-h1", "lfm2": "lfm2", "glm4": "glm4",
                           "glm4_moe": "glm4", "chatglm": "chatglm-bpe"}),
    PreTokenizer("qwen2", (split(QWEN2_REGEX), BYTES),
                 families={"stablelm": "stablelm2", "hunyuan_v1_moe": "hunyuan", "solar_open": "solar-open"}),
    PreTokenizer("qwen35", (split(QWEN35_REGEX), BYTES)),
    PreTokenizer("deepseek-coder", (split("[\r\n]"), split("\\s?\\p{L}+"), split("\\s?\\p{P}+"),
                                    split(DEEPSEEK_CJK), ("Digits", True), BYTES)),
    PreTokenizer("deepseek-llm", (split("[\r\n]"), split(DEEPSEEK_LLM_LETTERS), split(DEEPSEEK_LLM_PUNCT),
                                  split("\\s+$"), split(DEEPSEEK_CJK), ("Digits", True), BYTES)),
    PreTokenizer("deepseek-v3", (split("\\p{N}{1,3}"), split("[一-龥぀-ゟ゠-ヿ]+"), split(DEEPSEEK3_WORDS), BYTES),
                 families={"hunyuan_v1_dense": "hunyuan-dense", "hy_v4": "hy_v4"}),
    PreTokenizer("jais-2", (split(JAIS2_REGEX), BYTES)),
    PreTokenizer("bailingmoe", (split(BAILINGMOE_REGEX), BYTES), families={"bailing_moe_v2": "bailingmoe2"}),
    PreTokenizer("seed-coder", (split(SEED_CODER_REGEX), BYTES)),
    PreTokenizer("exaone-moe", (split(EXAONE_MOE_REGEX), BYTES)),
    PreTokenizer("minicpm5", (split("\\p{N}{1,3}"), split(MINICPM5_REGEX), BYTES)),
    PreTokenizer("ufakzeka", (split(UFAKZEKA_REGEX), BYTES)),
    PreTokenizer("gpt-4o", (split(GPT4O_REGEX), BYTES), families={"llama4": "llama4", "minimax_m2": "minimax-m2"}),
    PreTokenizer("tekken", (split(TEKKEN_REGEX), BYTES)),
    PreTokenizer("tiny_aya", (split(TINY_AYA_DIGITS), split(GPT4O_REGEX), BYTES),
                 families={"cohere2_moe": "cohere2moe"}),
)

# tokenizer_config.json bos_token -> the name llama.cpp writes for a definition's family with that BOS
BOS_FAMILIES = {("qwen2", "<｜begin▁of▁sentence｜>"): "deepseek-r1-qwen"}

def all_names() -> list[str]:
    """Every name this table can write."""
    names = {e.name for e in TABLE} | {n for e in TABLE for n in e.families.values()} | set(BOS_FAMILIES.values())
    return sorted(names)


# -- reading a definition --------------------------------------------------------------------------------

def _flatten(node) -> list:
    if not node:
        return []
    if isinstance(node, dict) and node.get("type") == "Sequence":
        return [s for sub in node.get("pretokenizers", []) if isinstance(sub, dict) for s in _flatten(sub)]
    return [node]


def canonical(step: dict) -> tuple:
    """A pre-tokenizer step as the table writes it; settings that change the split are kept, so a
    definition that differs anywhere that matters never matches."""
    kind = step.get("type")
    if kind == "Split":
        pattern = step.get("pattern") if isinstance(step.get("pattern"), dict) else {}
        if step.get("behavior") == "Isolated" and not step.get("invert") and isinstance(pattern.get("Regex"), str):
            return ("Split", pattern["Regex"])
    elif kind == "ByteLevel":
        if not step.get("add_prefix_space"):
            return ("ByteLevel", bool(step.get("use_regex", True)))
    elif kind == "Digits":
        return ("Digits", bool(step.get("individual_digits", False)))
    elif kind == "Punctuation":
        return ("Punctuation", step.get("behavior", "Isolated"))
    return ("unknown", json.dumps(step, sort_keys=True, ensure_ascii=False))


def _normalizer_types(node) -> set:
    if not isinstance(node, dict):
        return set()
    if node.get("type") == "Sequence":
        return {t for sub in node.get("normalizers", []) for t in _normalizer_types(sub)}
    return {node.get("type")}


def recognise(tokenizer: dict, model_type: str | None = None, bos_token: str | None = None) -> str | None:
    """The llama.cpp name for this tokenizer.json's pre-tokenization, or None if no entry matches."""
    steps = tuple(canonical(s) for s in _flatten(tokenizer.get("pre_tokenizer")))
    normalizers = _normalizer_types(tokenizer.get("normalizer"))
    matches = [e for e in TABLE if e.steps == steps and (e.normalizer is ANY or e.normalizer in normalizers)]
    if not matches:
        return None
    entry = min(matches, key=lambda e: e.normalizer is ANY)  # a normalizer-specific entry first
    if (entry.name, bos_token) in BOS_FAMILIES:
        return BOS_FAMILIES[(entry.name, bos_token)]
    return entry.families.get(model_type, entry.name)
