"""llama-quantize's layer-position rules against llama.cpp itself, on deep mocks.

The byte-identity tests in test_quantize_vs_llama.py use mocks of 2-4 layers, where n/8 == 0 and
the position rules (use_more_bits: the first and last eighth and every third layer between; Q4_K_S:
the first eighth of ffn_down and the first four attn_v; Q3_K_M: the first sixteenth) barely fire. Here the mocks have 18 and 20
layers: n/8, 7n/8 and n - n/8 all differ, and the hybrid's attn_v (full-attention layers only) count
differs from its layer count. Dense (qwen35: attn_v and ffn_down by counters) and MoE (qwen2moe with
4 experts: ffn_down by layer number, attn_v not masked by the 8-expert rule). Hidden size 256, the
smallest that keeps K-quant rows, keeps them fast.
"""

from __future__ import annotations

import gguf
import pytest
from gguf import GGMLQuantizationType as T

from gguforge.cli import main
from gguforge.quantize.presets import parse_preset

from helpers import llama_quantize

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("torch")  # the mocks are built with transformers

PRESETS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0")
# Ladder presets with position rules: Q3_K_M (ffn_down: first sixteenth; attn_v: first two),
# IQ4_NL (ffn_down: first eighth without an imatrix; IQ4_XS shares the rule and is slower to quantize).
# Tested where gguforge writes them.
LADDER = ("Q3_K_M", "IQ4_NL")
# preset -> tensor roles whose type the position rules vary (checked on llama-quantize's output)
POSITION_RULES = {"Q4_K_M": ("attn_v.weight", "ffn_down"), "Q4_K_S": ("attn_v.weight", "ffn_down"),
                  "Q5_K_M": ("attn_v.weight", "ffn_down"), "Q3_K_M": ("attn_v.weight", "ffn_down"),
                  "IQ4_NL": ("ffn_down",)}
# (arch, layers, routed experts): 18 layers -> 9 attn_v in the hybrid; n - n/8 != 7n/8 for 9, 18, 20
DEEP = [("qwen35", 18, None), ("qwen2moe", 20, 4),
        ("llama", 18, None)]  # the arch llama-quantize's rules were written for: GQA 8:1 (n_gqa rules), rope_freqs


@pytest.fixture(scope="module", autouse=True)
def _quiet(quiet_llama):
    yield


@pytest.fixture(scope="module", params=DEEP, ids=[f"{a}-{n}layers" for a, n, _ in DEEP])
def deep_bf16(request, mock_model, tmp_path_factory):
    arch, layers, experts = request.param
    kw = {"num_experts": experts} if experts else {}
    src = mock_model(arch, dtype="bfloat16", size="q256", num_hidden_layers=layers, **kw)
    out = tmp_path_factory.mktemp(f"deep-{arch}") / "model-bf16.gguf"
    assert main(["convert-hf", str(src), "--outfile", str(out), "--outtype", "bf16", "-q"]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.get_field(f"{arch}.block_count").contents() == layers
    return src, out


@pytest.fixture(scope="module")
def by_llama(deep_bf16, tmp_path_factory):
    """preset -> llama-quantize's output for the bf16 file (made once per preset and mock)."""
    made: dict[str, object] = {}

    def get(preset: str):
        if preset not in made:
            made[preset] = tmp_path_factory.mktemp("llama") / f"{preset}.gguf"
            llama_quantize(deep_bf16[1], made[preset], preset)
        return made[preset]

    return get



def types(path) -> dict[str, T]:
    return {t.name: T(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


def supported(preset: str) -> None:
    from gguforge.errors import UserError
    from gguforge.quantize.encode import native_supports
    try:
        default = parse_preset(preset).default_type
    except UserError as e:
        pytest.skip(str(e))
    if not native_supports(default):
        pytest.skip(f"the native quantizer does not write {default.name} yet")


@pytest.mark.parametrize("preset", PRESETS + LADDER)
def test_layer_position_rules_match_llama_quantize(deep_bf16, by_llama, preset, tmp_path):
    supported(preset)
    ours, theirs = tmp_path / "ours.gguf", by_llama(preset)
    assert main(["quantize", str(deep_bf16[1]), str(ours), preset, "-q", "--threads", "2"]) == 0
    a, b = types(ours), types(theirs)
    assert list(a) == list(b)
    wrong = {name: (a[name].name, b[name].name) for name in b if a[name] != b[name]}
    assert not wrong, f"tensor types differ from llama-quantize's (ours, theirs): {wrong}"
    for role in POSITION_RULES.get(preset, ()):  # the position rules did fire on these mocks
        assert len({t for name, t in b.items() if role in name}) > 1, (role, preset)
    same = ours.read_bytes() == theirs.read_bytes()  # a bool: pytest would diff megabytes
    assert same, "tensor types agree, yet the files differ"


@pytest.mark.parametrize("preset", ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M"))  # IQ4_NL: same code, slow
def test_one_pass_convert_applies_the_position_rules(deep_bf16, by_llama, preset, tmp_path):
    """convert-hf --outtype PRESET writes the converter's tensor order but must count layers in
    llama-quantize's order: same types and bytes as llama-quantize of the bf16 file."""
    supported(preset)
    ours = tmp_path / "one-pass.gguf"
    assert main(["convert-hf", str(deep_bf16[0]), "--outfile", str(ours), "--outtype", preset.lower(), "-q"]) == 0
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(by_llama(preset)).tensors}
    assert sorted(a) == sorted(b)
    wrong = {n: (T(a[n].tensor_type).name, T(b[n].tensor_type).name) for n in b if a[n].tensor_type != b[n].tensor_type}
    assert not wrong, f"tensor types differ from llama-quantize's (ours, theirs): {wrong}"
    differ = [n for n in b if a[n].data.tobytes() != b[n].data.tobytes()]
    assert not differ, f"bytes differ: {differ}"
