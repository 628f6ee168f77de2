"""general.* metadata: model card, model id heuristics, --metadata overrides (typed, lists), --model-name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType as V

from gguforge.cli import main
from gguforge.convert.metadata import general_info
from gguforge.archs.options import ConvertOptions
from gguforge.convert.plan import plan_conversion
from gguforge.checkpoint.read import open_checkpoint

from helpers import gguforge, qwen2moe_config, qwen2moe_tensors, write_checkpoint

CARD = """---
license: apache-2.0
base_model:
- Qwen/Qwen3.5-35B-A3B-Base
- https://huggingface.co/Org/Other-7B
tags:
- chat
language: [en, zh]
datasets: org/some-data
pipeline_tag: text-generation
---
# A model
"""
NOWHERE = Path("/nonexistent-model-dir")  # no card, no config: the model id alone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = qwen2moe_config()
    root = tmp_path_factory.mktemp("md") / "my-model"
    write_checkpoint(root, config, qwen2moe_tensors(config))
    (root / "README.md").write_text(CARD)
    (root / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 20}))
    return root


def fields(path) -> dict:
    reader = GGUFReader(str(path))
    return {k: (f.types, f.contents()) for k, f in reader.fields.items()}


def test_model_id_heuristics():
    info = general_info(NOWHERE, {}, "Qwen/Qwen3.5-35B-A3B-Instruct", total_params=35_000_000_000)
    m = info.meta
    assert (m.basename, m.size_label, m.finetune, m.organization) == ("Qwen3.5", "35B-A3B", "Instruct", "Qwen")
    assert m.name == "Qwen3.5 35B A3B Instruct"
    assert info.filename("Q4_K_M") == "Qwen3.5-35B-A3B-Instruct-Q4_K_M.gguf"
    versioned = general_info(NOWHERE, {}, "Mixtral-8x7B-Instruct-v0.1", total_params=46_000_000_000)
    assert versioned.filename("F16") == "Mixtral-8x7B-Instruct-v0.1-F16.gguf"
    assert versioned.filename(None, vocab_only=True) == "Mixtral-Instruct-v0.1-vocab.gguf"


def test_model_card_fills_general_keys(checkpoint):
    plan = plan_conversion(open_checkpoint(checkpoint), ConvertOptions())
    md = plan.metadata
    assert md.get("general.name") == "My Model"
    assert md.get("general.license") == "apache-2.0"
    assert md.get("general.base_model.count") == 2
    assert md.get("general.base_model.0.name") == "Qwen3.5 35B A3B Base"
    assert md.get("general.base_model.0.organization") == "Qwen"
    assert md.get("general.base_model.0.repo_url") == "https://huggingface.co/Qwen/Qwen3.5-35B-A3B-Base"
    assert md.get("general.base_model.1.repo_url") == "https://huggingface.co/Org/Other-7B"
    assert md.get("general.dataset.count") == 1 and md.get("general.dataset.0.name") == "Some Data"
    assert md.get("general.tags") == ["chat", "text-generation"]
    assert md.get("general.languages") == ["en", "zh"]
    assert md.items["general.sampling.top_k"][0] == V.INT32 and md.get("general.sampling.temp") == 0.7
    # not in the name: computed from the tensors (MoE: experts x (shared + one expert))
    assert md.get("general.size_label") == plan.size_label and plan.size_label.startswith("4x")
    assert plan.default_filename() == f"my-model-{plan.size_label}-F16.gguf"
    keys = list(md.items)
    assert keys[:2] == ["general.architecture", "general.type"]
    assert keys.index("general.name") < keys.index("general.license") < keys.index("general.base_model.count")


def test_metadata_overrides_typed_and_lists(checkpoint, tmp_path):
    overrides = {
        "general.name": "Renamed", "general.finetune": "Chat", "general.version": "v2",
        "general.base_models": [{"name": "Base", "organization": "Org", "repo_url": "https://example.org/base"}],
        "general.tags": ["a", "b"],
        "qwen2moe.context_length": 4096,  # existing key: keeps its UINT32 type
        "custom.count": {"type": "uint16", "value": 7},
        "custom.scale": 0.5, "custom.negative": -3, "custom.flag": True,
        "custom.ids": [1, 2, 3], "custom.floats": [0.5, 1], "custom.names": ["x", "y"],
        "custom.u8s": {"type": "uint8", "value": [1, 2]},
    }
    (tmp_path / "over.json").write_text(json.dumps(overrides))
    assert main(["convert-hf", str(checkpoint), "--outfile", str(tmp_path), "--metadata",
                 str(tmp_path / "over.json"), "--quiet"]) == 0
    (out,) = tmp_path.glob("*.gguf")
    assert out.name.startswith("Renamed-4x") and out.name.endswith("-Chat-v2-F16.gguf")
    f = fields(out)
    assert f["general.name"][1] == "Renamed" and f["general.finetune"][1] == "Chat"
    assert f["general.base_model.count"][1] == 1 and f["general.base_model.0.repo_url"][1] == "https://example.org/base"
    assert f["general.tags"][1] == ["a", "b"]
    assert f["qwen2moe.context_length"] == ([V.UINT32], 4096)
    assert f["custom.count"] == ([V.UINT16], 7)
    assert f["custom.scale"] == ([V.FLOAT32], 0.5)
    assert f["custom.negative"] == ([V.INT32], -3)
    assert f["custom.flag"] == ([V.BOOL], True)
    assert f["custom.ids"] == ([V.ARRAY, V.INT32], [1, 2, 3])
    assert f["custom.floats"] == ([V.ARRAY, V.FLOAT32], [0.5, 1.0])
    assert f["custom.names"] == ([V.ARRAY, V.STRING], ["x", "y"])
    assert f["custom.u8s"] == ([V.ARRAY, V.UINT8], [1, 2])


def test_model_name_option_wins(checkpoint, tmp_path):
    (tmp_path / "over.json").write_text(json.dumps({"general.name": "FromFile"}))
    assert main(["convert-hf", str(checkpoint), "--outfile", str(tmp_path), "--quiet", "--model-name", "Cli Name",
                 "--metadata", str(tmp_path / "over.json")]) == 0
    (out,) = tmp_path.glob("Cli-Name-*.gguf")
    assert fields(out)["general.name"][1] == "Cli Name"


@pytest.mark.parametrize("value, message", [
    ({"type": "uint8", "value": 300}, "out of range"),
    ({"type": "complex", "value": 1}, "unknown type"),
    ({"nested": 1}, "unsupported value"),
    ([1, "a"], "only strings"),
])
def test_bad_override_is_one_line_error(checkpoint, tmp_path, value, message):
    (tmp_path / "over.json").write_text(json.dumps({"custom.key": value}))
    r = gguforge("convert-hf", str(checkpoint), "--outfile", str(tmp_path / "x.gguf"),
                 "--metadata", str(tmp_path / "over.json"), "--dry-run")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("values,item_type,message", [
    (["a", "b\ud800c", "d"], "STRING", "unpaired surrogate"),
    (["a", 3, "c"], "STRING", "is not a string"),
    ([1, 2, 2**32], "UINT32", "does not fit"),
    ([1, -1], "UINT32", "does not fit"),
    ("numpy-int64", "INT32", "does not fit"),
    ([0.5, float("nan")], "FLOAT32", "not a finite number"),
    ([0.5, 1e39], "FLOAT32", "does not fit"),
    ("numpy-nan", "FLOAT32", "not a finite number"),
    ([True, 2], "BOOL", "not true or false"),
])
def test_array_values_are_checked_in_bulk_and_one_by_one(values, item_type, message):
    """Large arrays (vocabularies) are checked in bulk; every bad item must still be found and named."""
    import numpy as np
    from gguf import GGUFValueType

    from gguforge.errors import UserError
    from gguforge.format.writer import Metadata
    if values == "numpy-int64":
        values = np.array([1, 2**40], dtype=np.int64)
    elif values == "numpy-nan":
        values = np.array([0.5, np.nan], dtype=np.float32)
    md = Metadata()
    with pytest.raises(UserError, match=message):
        md.set("test.key", values, GGUFValueType.ARRAY, GGUFValueType[item_type])
    assert "test.key" not in md
    md.set("test.ok", np.arange(5, dtype=np.int32), GGUFValueType.ARRAY, GGUFValueType.INT32)
    md.set("test.ok2", ["x"] * 3, GGUFValueType.ARRAY, GGUFValueType.STRING)
    assert "test.ok" in md and "test.ok2" in md
