"""Tensor data and metadata identical to llama.cpp's own convert_hf_to_gguf.py, for every arch and layout."""

from __future__ import annotations

import pytest

from gguforge.cli import main

from helpers import read_gguf, run_reference_converter

# Every metadata key, its GGUF type, its value and the key order must match llama.cpp's converter,
# except these known, deliberate differences: key -> (ours, llama.cpp's, reason); None = key absent.
# (Not a difference: tokenizer.ggml.pre. llama.cpp names pre-tokenizers by hashing the tokenizer's
# output against a table of released models and refuses the mock tokenizers; the runner hands it the
# name gguforge must derive, so a wrong name from gguforge still fails here.)
# key -> (ours, llama.cpp's, why): none left (a TemplateProcessing post-processor ending with the sequence
# now leaves add_eos_token out, as gguf-py's SpecialVocab does)
KNOWN_METADATA_DIFFERENCES: dict = {}


def metadata(path) -> dict:
    from gguf import GGUFReader
    fields = GGUFReader(str(path)).fields
    return {k: ([t.name for t in f.types], f.contents()) for k, f in fields.items() if not k.startswith("GGUF.")}


def assert_same_metadata(ours, ref, context) -> list[str]:
    """Compare all metadata; return the keys that differed in a known, allowed way."""
    a, b = metadata(ours), metadata(ref)
    allowed = []
    for key in a.keys() | b.keys():
        if a.get(key) != b.get(key):
            ours_value, ref_value = (a[key][1] if key in a else None), (b[key][1] if key in b else None)
            known = KNOWN_METADATA_DIFFERENCES.get(key, (object(), object()))[:2]
            assert (ours_value, ref_value) == known, (context, key, str(a.get(key))[:300], str(b.get(key))[:300])
            allowed.append(key)
    common = [k for k in a if k in b]
    assert common == [k for k in b if k in a], (context, "the key order differs")
    return allowed


pytest.importorskip("torch")

CASES = [  # (arch, layout, outtypes): causal mocks are f32, hub mocks bf16 with MTP
    ("qwen2moe", "causal", ("f32", "f16", "q8_0")),
    ("qwen3next", "causal", ("f32", "bf16")),
    ("qwen35", "causal", ("f32", "q8_0")),
    ("qwen35moe", "causal", ("f16", "q8_0")),
    ("qwen3next", "hub", ("bf16", "q8_0")),
    ("qwen35", "hub", ("bf16", "f16")),
    ("qwen35moe", "hub", ("bf16", "q8_0")),
]



@pytest.mark.parametrize("arch,layout,outtypes", CASES, ids=[f"{a}-{b}" for a, b, _ in CASES])
def test_same_tensors_as_llama_cpp_converter(tree, mock_model, tmp_path, arch, layout, outtypes):
    model = mock_model(arch, layout=layout)
    pre = "qwen35" if arch.startswith("qwen35") else "qwen2"
    # The reference dies with a bare AssertionError on checkpoints without MTP unless told --no-mtp.
    extra = ["--no-mtp"] if arch != "qwen2moe" and layout == "causal" else []
    for outtype in outtypes:
        ours, ref = tmp_path / f"ours-{outtype}.gguf", tmp_path / f"ref-{outtype}.gguf"
        assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", outtype, "--quiet"]) == 0
        r = run_reference_converter(tree, model, ref, outtype, pre, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        a, b = read_gguf(ours), read_gguf(ref)
        assert a.keys() == b.keys(), (outtype, sorted(a.keys() ^ b.keys()))
        for name in b:
            assert a[name].tensor_type == b[name].tensor_type, (outtype, name)
            assert list(a[name].shape) == list(b[name].shape), (outtype, name)
            assert a[name].data.tobytes() == b[name].data.tobytes(), (outtype, name)
        assert assert_same_metadata(ours, ref, outtype) == []  # no known difference applies to the mocks


def template_processing(tokenizer: dict) -> None:
    """A BOS-adding TemplateProcessing post-processor ("<|endoftext|> $A"), as Llama-3-style tokenizers have."""
    bos = "<|endoftext|>"
    ids = [t["id"] for t in tokenizer["added_tokens"] if t["content"] == bos]
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": ids, "tokens": [bos]}},
    }


# Tokenizer setups the mocks do not have: (tokenizer.json edit, tokenizer_config.json edit, chat
# template moved to chat_template.jinja, keys allowed to differ as listed above)
TOKENIZER_VARIANTS = {
    # no post-processor: add_bos/add_eos come from tokenizer_config, BOS from its bos_token
    "config-flags": (lambda t: t.update(post_processor=None),
                     lambda c: c.update(add_bos_token=True, add_eos_token=True, bos_token="<|im_start|>"),
                     True, []),
    "template-processing": (template_processing, lambda c: c.update(bos_token="<|endoftext|>"), False, []),
}


@pytest.mark.parametrize("variant", list(TOKENIZER_VARIANTS))
def test_tokenizer_metadata_as_llama_cpp_converter(tree, mock_model, tmp_path, variant):
    import json
    import shutil

    edit_tokenizer, edit_config, jinja, allowed = TOKENIZER_VARIANTS[variant]
    model = tmp_path / "model"
    shutil.copytree(mock_model("qwen2moe"), model)
    tokenizer = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    edit_tokenizer(tokenizer)
    (model / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    config = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
    edit_config(config)
    if jinja:
        (model / "chat_template.jinja").write_text(config.pop("chat_template") + "{# from the .jinja file #}",
                                                   encoding="utf-8")
    (model / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(ours), "--outtype", "f16", "--quiet"]) == 0
    r = run_reference_converter(tree, model, ref, "f16", "qwen2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(assert_same_metadata(ours, ref, variant)) == allowed
