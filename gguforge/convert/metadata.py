"""general.* metadata: who made the model, what it is called, what it derives from.

The heuristics are gguf-py's own (gguf.Metadata: model card front matter,
config `_name_or_path`, then the model id), so names, size labels and
base-model entries come out as llama.cpp's converter writes them. This module
adds the model id of a hub download, the --metadata overrides with typed
values, and writing the keys into our typed Metadata in the reference order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType as V, Keys
from gguf.metadata import Metadata as CardMetadata
from gguf.utility import naming_convention

from ..errors import UserError
from ..format.writer import INT_RANGES, Metadata

G = Keys.General
# --metadata keys that set a gguf.Metadata field (as gguf.Metadata.load reads its override file).
OVERRIDE_FIELDS = {
    G.SAMPLING_SEQUENCE: "sampling_sequence", G.SAMPLING_TOP_K: "sampling_top_k",
    G.SAMPLING_TOP_P: "sampling_top_p", G.SAMPLING_MIN_P: "sampling_min_p",
    G.SAMPLING_XTC_PROBABILITY: "sampling_xtc_probability", G.SAMPLING_XTC_THRESHOLD: "sampling_xtc_threshold",
    G.SAMPLING_TEMP: "sampling_temp", G.SAMPLING_PENALTY_LAST_N: "sampling_penalty_last_n",
    G.SAMPLING_PENALTY_REPEAT: "sampling_penalty_repeat", G.SAMPLING_MIROSTAT: "sampling_mirostat",
    G.SAMPLING_MIROSTAT_TAU: "sampling_mirostat_tau", G.SAMPLING_MIROSTAT_ETA: "sampling_mirostat_eta",
    G.NAME: "name", G.AUTHOR: "author", G.VERSION: "version", G.ORGANIZATION: "organization",
    G.FINETUNE: "finetune", G.BASENAME: "basename", G.DESCRIPTION: "description",
    G.QUANTIZED_BY: "quantized_by", G.SIZE_LABEL: "size_label", G.LICENSE: "license",
    G.LICENSE_NAME: "license_name", G.LICENSE_LINK: "license_link", G.URL: "url", G.DOI: "doi",
    G.UUID: "uuid", G.REPO_URL: "repo_url", G.SOURCE_URL: "source_url", G.SOURCE_DOI: "source_doi",
    G.SOURCE_UUID: "source_uuid", G.SOURCE_REPO_URL: "source_repo_url",
    "general.base_models": "base_models", "general.datasets": "datasets",
    G.TAGS: "tags", G.LANGUAGES: "languages",
}
# general.sampling.* value types, as gguf-py's writer stores them.
SAMPLING_TYPES = {
    "sampling_sequence": V.STRING, "sampling_top_k": V.INT32, "sampling_top_p": V.FLOAT32,
    "sampling_min_p": V.FLOAT32, "sampling_xtc_probability": V.FLOAT32, "sampling_xtc_threshold": V.FLOAT32,
    "sampling_temp": V.FLOAT32, "sampling_penalty_last_n": V.INT32, "sampling_penalty_repeat": V.FLOAT32,
    "sampling_mirostat": V.INT32, "sampling_mirostat_tau": V.FLOAT32, "sampling_mirostat_eta": V.FLOAT32,
}
# Plain string keys in the order gguf-py writes them, between the name and the base models.
STRING_FIELDS = (
    ("author", G.AUTHOR), ("version", G.VERSION), ("organization", G.ORGANIZATION), ("finetune", G.FINETUNE),
    ("basename", G.BASENAME), ("description", G.DESCRIPTION), ("quantized_by", G.QUANTIZED_BY),
    ("size_label", G.SIZE_LABEL), ("license", G.LICENSE), ("license_name", G.LICENSE_NAME),
    ("license_link", G.LICENSE_LINK), ("url", G.URL), ("doi", G.DOI), ("uuid", G.UUID),
    ("repo_url", G.REPO_URL), ("source_url", G.SOURCE_URL), ("source_doi", G.SOURCE_DOI),
    ("source_uuid", G.SOURCE_UUID), ("source_repo_url", G.SOURCE_REPO_URL),
)
ENTRY_FIELDS = ("name", "author", "version", "organization", "description", "url", "doi", "uuid", "repo_url")


@dataclass
class GeneralInfo:
    meta: CardMetadata
    file_stem: str  # the name part of default file names

    def filename(self, type_label: str | None, vocab_only: bool = False) -> str:
        m = self.meta
        if vocab_only:
            return naming_convention(self.file_stem, None, m.finetune, m.version, None, None, "vocab") + ".gguf"
        return naming_convention(self.file_stem, None, m.finetune, m.version, m.size_label, type_label) + ".gguf"


def model_id_for(root: Path, display_name: str | None) -> str:
    """The id the heuristics parse: a hub id ("Org/Name"), else the directory name."""
    if display_name:
        return display_name
    root = root.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return _text(root.parent.parent.name[len("models--"):].replace("--", "/"))
    return _text(root.name)


def _text(file_name: str) -> str:
    """A file name as valid Unicode: bytes that are not UTF-8 become U+FFFD (metadata must be UTF-8)."""
    import os
    return os.fsencode(file_name).decode("utf-8", "replace")


def load_model_card(root: Path) -> dict:
    """README.md YAML front matter; a card that does not parse is ignored like a missing one."""
    import yaml
    if (root / "README.md").exists() and not (root / "README.md").is_file():
        return {}  # a FIFO or device: reading it would block or never end
    try:
        return CardMetadata.load_model_card(root)
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return {}


def load_generation_config(root: Path) -> dict:
    if not (root / "generation_config.json").is_file():  # absent, or a FIFO or device that would not end
        return {}
    try:
        config = json.loads((root / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def general_info(root: Path, config: dict, model_id: str, *, model_name: str | None = None,
                 overrides: dict | None = None, total_params: int = 0,
                 computed_size_label: str | None = None) -> GeneralInfo:
    """Everything general.* from the card, config, model id and overrides, in llama.cpp's precedence."""
    meta = CardMetadata.apply_metadata_heuristic(CardMetadata(), load_model_card(root), config, None, total_params)
    # The model id is the last resort, as the reference uses the model directory's name.
    full, org, basename, finetune, version, label = CardMetadata.get_model_id_components(model_id, total_params)
    for attr, value in (("name", full and CardMetadata.id_to_title(full)),
                        ("organization", org and CardMetadata.id_to_title(org)), ("basename", basename),
                        ("finetune", finetune), ("version", version), ("size_label", label)):
        if getattr(meta, attr) is None and value is not None:
            setattr(meta, attr, value)
    id_name = meta.name
    generation = load_generation_config(root)
    for key, attr in (("sequence", "sampling_sequence"), ("top_k", "sampling_top_k"), ("top_p", "sampling_top_p"),
                      ("min_p", "sampling_min_p"), ("temperature", "sampling_temp"),
                      ("penalty_last_n", "sampling_penalty_last_n"), ("mirostat", "sampling_mirostat"),
                      ("mirostat_tau", "sampling_mirostat_tau"), ("mirostat_eta", "sampling_mirostat_eta"),
                      ("xtc_probability", "sampling_xtc_probability"), ("xtc_threshold", "sampling_xtc_threshold")):
        if generation.get(key) is not None:
            setattr(meta, attr, generation[key])
    if (repeat := generation.get("penalty_repeat", generation.get("repetition_penalty"))) is not None:
        meta.sampling_penalty_repeat = repeat
    for key, value in (overrides or {}).items():
        if key in OVERRIDE_FIELDS:
            setattr(meta, OVERRIDE_FIELDS[key], value)
    if model_name is not None:
        meta.name = model_name
    if meta.name is None:
        meta.name = full or "ggml-model"
    if meta.size_label is None:
        meta.size_label = computed_size_label
    # File names keep the id's own spelling ("tiny-qwen2moe", not the title form "Tiny Qwen2Moe").
    stem = meta.basename or (full if meta.name == id_name and full else meta.name)
    return GeneralInfo(meta, str(stem))


def add_general_metadata(md: Metadata, meta: CardMetadata) -> None:
    """The authorship keys in gguf.Metadata.set_gguf_meta_model's order and types."""
    for attr, vtype in SAMPLING_TYPES.items():
        if (value := getattr(meta, attr)) is not None:
            md.set(f"general.{attr.replace('_', '.', 1)}", _scalar(f"general.{attr}", value, vtype), vtype)
    md.str(G.NAME, meta.name)
    for attr, key in STRING_FIELDS:
        value = getattr(meta, attr)
        if value is not None:
            md.str(key, ",".join(map(str, value)) if isinstance(value, list) else value)
    for kind, entries in (("base_model", meta.base_models), ("dataset", meta.datasets)):
        if entries is None:
            continue
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise UserError(f"general.{kind}s must be a list of objects (name, organization, repo_url, ...)")
        md.u32(f"general.{kind}.count", len(entries))
        for i, entry in enumerate(entries):
            for field in ENTRY_FIELDS:
                if entry.get(field) is not None:
                    md.str(f"general.{kind}.{i}.{field}", entry[field])
    for attr, key in (("tags", G.TAGS), ("languages", G.LANGUAGES)):
        if (values := getattr(meta, attr)) is not None:
            values = values if isinstance(values, list) else [values]
            md.array(key, [str(v) for v in values], V.STRING)


# ---------------------------------------------------------------------------------------------
# --metadata overrides of any key

TYPE_NAMES = {t.name.lower(): t for t in V if t != V.ARRAY}


def apply_overrides(md: Metadata, overrides: dict) -> None:
    """Set every override that is not an authorship field (those went through general_info).

    A value may be plain JSON (an existing key keeps its type; new keys get a type from the value)
    or {"type": "uint16", "value": 3}; a list becomes an array (of "type" items when given).
    """
    for key, value in overrides.items():
        if key in OVERRIDE_FIELDS:
            continue
        if isinstance(value, dict) and "type" in value and "value" in value:
            vtype = TYPE_NAMES.get(str(value["type"]).lower())
            if vtype is None:
                raise UserError(f"metadata {key!r}: unknown type {value['type']!r}",
                                hint="types: " + ", ".join(TYPE_NAMES))
            value = value["value"]
            _check_keeps_type(md, key, vtype, isinstance(value, list))
        else:
            vtype = _existing_type(md, key, value)
        if isinstance(value, list):
            item = vtype if vtype is not None else _infer_item_type(key, value)  # UINT8 is 0
            md.array(key, [_scalar(key, v, item) for v in value], item)
        else:
            vtype = vtype if vtype is not None else _infer_type(key, value)
            md.set(key, _scalar(key, value, vtype), vtype)


def _type_text(vtype: V, item_type: V | None) -> str:
    return f"an array of {item_type.name.lower()}" if vtype == V.ARRAY else vtype.name.lower()


def _check_keeps_type(md: Metadata, key: str, vtype: V, is_list: bool) -> None:
    """A key the conversion wrote keeps its type: llama.cpp reads each key as one type (a tokenizer's
    token list given as a number would make the file unloadable)."""
    if key not in md:
        return
    have, _, have_item = md.items[key]
    if (have == V.ARRAY) != is_list or (have_item if have == V.ARRAY else have) != vtype:
        wanted = _type_text(V.ARRAY, vtype) if is_list else _type_text(vtype, None)
        raise UserError(f"metadata {key!r}: the conversion writes {_type_text(have, have_item)}; an override "
                        f"must keep that type (got {wanted})")


def _existing_type(md: Metadata, key: str, value) -> V | None:
    """The type a key already has (so overriding a u32 keeps it u32); a value of another kind is refused."""
    if key not in md:
        return None
    vtype, _, item_type = md.items[key]
    if (vtype == V.ARRAY) != isinstance(value, list):
        raise UserError(f"metadata {key!r}: the conversion writes {_type_text(vtype, item_type)}; an override "
                        f"must keep that type (got {json.dumps(value)[:60]})")
    return item_type if vtype == V.ARRAY else vtype


def _infer_type(key: str, value) -> V:
    if isinstance(value, bool):
        return V.BOOL
    if isinstance(value, int):
        for vtype in (V.UINT32, V.INT32, V.UINT64, V.INT64):
            lo, hi = INT_RANGES[vtype]
            if lo <= value <= hi:
                return vtype
        raise UserError(f"metadata {key!r}: {value} does not fit in 64 bits")
    if isinstance(value, float):
        return V.FLOAT32
    if isinstance(value, str):
        return V.STRING
    raise UserError(f"metadata {key!r}: unsupported value {value!r}",
                    hint='use a number, string, boolean, list, or {"type": "uint16", "value": 3}')


def _infer_item_type(key: str, values: list) -> V:
    """As gguf-py types arrays: strings, booleans, INT32 for whole numbers, else FLOAT32."""
    if not values or all(isinstance(v, str) for v in values):
        return V.STRING
    if all(isinstance(v, bool) for v in values):
        return V.BOOL
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return V.INT32 if all(-2**31 <= v < 2**31 for v in values) else V.INT64
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return V.FLOAT32
    raise UserError(f"metadata {key!r}: a list must hold only strings, only booleans or only numbers")


def _scalar(key: str, value: Any, vtype: V):
    """Check and convert one value to what `vtype` stores."""
    if vtype == V.STRING:
        if not isinstance(value, str):
            raise UserError(f"metadata {key!r}: {value!r} is not a string")
        return value
    if vtype == V.BOOL:
        if not isinstance(value, bool):
            raise UserError(f"metadata {key!r}: {value!r} is not true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"metadata {key!r}: {value!r} is not a number")
    if vtype in (V.FLOAT32, V.FLOAT64):
        return float(value)
    if isinstance(value, float) and not value.is_integer():
        raise UserError(f"metadata {key!r}: {value} is not a whole number ({vtype.name.lower()})")
    lo, hi = INT_RANGES[vtype]
    if not lo <= int(value) <= hi:
        raise UserError(f"metadata {key!r}: {int(value)} is out of range for {vtype.name.lower()}")
    return int(value)
