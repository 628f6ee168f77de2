"""Validate step: the config and every tensor's shape, checked before anything is written.

Each architecture declares `expected_shapes()`: {checkpoint name (after rename): Expected}, built
from config values as `Dim`s that remember where they came from, so a mismatch can say why:

    model.layers.3.self_attn.k_proj.weight: shape [128, 64] but config implies [64, 64]
    (num_key_value_heads=2 x head_dim=32)

Tensors the architecture does not know are left to the planner (it reports unmapped names).
"""

from __future__ import annotations

import math
import re
from numbers import Real

from ..errors import UserError
from ..archs.shapes import Expected, as_dim, mismatch_message
from ..checkpoint.read import FLOAT_DTYPES, Checkpoint


# -- config values ------------------------------------------------------------------------------

# Keys whose values must be numbers when present (the architecture decides which are required).
INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_experts", "num_local_experts", "num_experts_per_tok",
            "moe_intermediate_size", "shared_expert_intermediate_size", "max_position_embeddings",
            "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim", "full_attention_interval", "mtp_num_hidden_layers", "decoder_sparse_step")
FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor")
LIST_KEYS = ("layer_types", "mlp_only_layers")
DICT_KEYS = ("rope_parameters", "rope_scaling")
STR_KEYS = ("_name_or_path", "model_type")  # read by gguf-py's naming heuristics
# Upper bounds: far beyond any model, low enough that loops and arrays sized by them stay small.
INT_LIMITS = {"num_hidden_layers": 4096, "mtp_num_hidden_layers": 4096, "num_experts": 1 << 16,
              "num_local_experts": 1 << 16, "num_experts_per_tok": 1 << 16, "vocab_size": 1 << 24}
EXPERT_KEYS = ("num_local_experts", "num_experts")


def check_config_types(hparams: dict) -> None:
    """A present value of the wrong kind is a one-line error naming the key (not a crash later)."""
    for key in INT_KEYS:
        value = hparams.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"config.json: {key} must be a non-negative integer, got {value!r}")
        if value is not None and value > INT_LIMITS.get(key, value):  # others: checked against their GGUF type
            raise UserError(f"config.json: {key} = {value} is larger than any model has (at most {INT_LIMITS[key]})")
    for key in FLOAT_KEYS:
        value = hparams.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)):
            raise UserError(f"config.json: {key} must be a finite number, got {value!r}")
    for key in STR_KEYS:
        value = hparams.get(key)
        if value is not None and not isinstance(value, str):
            raise UserError(f"config.json: {key} must be a string, got {value!r}")
    check_expert_counts(hparams)
    for key in LIST_KEYS:
        value = hparams.get(key)
        if value is not None and not isinstance(value, list):
            raise UserError(f"config.json: {key} must be a list, got {value!r}")
    if not all(isinstance(t, str) for t in hparams.get("layer_types") or []):
        raise UserError("config.json: layer_types must be a list of strings")
    if not all(isinstance(i, int) for i in hparams.get("mlp_only_layers") or []):
        raise UserError("config.json: mlp_only_layers must be a list of layer numbers")
    for key in DICT_KEYS:
        value = hparams.get(key)
        if value is not None and not isinstance(value, dict):
            raise UserError(f"config.json: {key} must be an object, got {value!r}")
        for sub, inner in (value or {}).items():
            if sub in FLOAT_KEYS and inner is not None and (isinstance(inner, bool) or not isinstance(inner, Real)):
                raise UserError(f"config.json: {key}.{sub} must be a number, got {inner!r}")


def check_expert_counts(hparams: dict) -> None:
    """Experts used per token cannot outnumber the experts."""
    experts = next((hparams[k] for k in EXPERT_KEYS if hparams.get(k) is not None), None)
    used = hparams.get("num_experts_per_tok")
    if experts is not None and used is not None and used > experts:
        raise UserError(f"config.json: num_experts_per_tok = {used} is more than the {experts} experts")


# -- tensor shapes --------------------------------------------------------------------------------

NUMBER = re.compile(r"\.\d+\.")


def unknown_dims(renamed: str, shape: tuple[int, ...], want: Expected):
    """(key, size) for each dimension the config does not fix (its value is missing from config.json):
    tensors sharing a key must agree on it. The key is the dimension's config name when it has one, else
    the tensor's name with layer and expert numbers dropped, and the axis."""
    for alternative in want.shapes:
        dims = [as_dim(d) for d in alternative]
        if len(dims) == len(shape) and all(d.matches(n) for d, n in zip(dims, shape)):
            for axis, d in enumerate(dims):
                if d.size is None:
                    yield d.why.strip() or f"{NUMBER.sub('.N.', NUMBER.sub('.N.', renamed))}[{axis}]", shape[axis]
            return


# -- the check ------------------------------------------------------------------------------------


def validate_checkpoint(checkpoint: Checkpoint, arch, check_tensors: bool = True) -> None:
    """Config types, then every expected tensor present with the shape the config implies."""
    check_config_types(checkpoint.hparams)
    if not check_tensors:
        return
    expected = arch.expected_shapes()
    present: set[str] = set()
    bound: dict[str, tuple[int, str]] = {}  # sizes config.json leaves open, as the first tensor showed them
    for name, tensor in checkpoint.tensors.items():
        renamed = arch.rename(name)
        if renamed is None:
            continue
        if tensor.dtype not in FLOAT_DTYPES and not arch.integer_tensor(renamed):
            raise UserError(f"{name}: dtype {tensor.dtype} cannot be converted",
                            hint="only F32, F16 and BF16 weights are supported")
        if 0 in tensor.shape:
            raise UserError(f"{name}: shape {list(tensor.shape)} has a dimension of size 0",
                            hint="the checkpoint is damaged or crafted")
        present.add(renamed)
        want = expected.get(renamed)
        if want is not None and not want.matches(tuple(tensor.shape)):
            raise UserError(mismatch_message(name, tuple(tensor.shape), want),
                            hint="config.json and the weights disagree; they may come from different models")
        if want is not None:
            for key, size in unknown_dims(renamed, tuple(tensor.shape), want):
                if bound.setdefault(key, (size, name))[0] != size:
                    raise UserError(f"{name}: shape {list(tensor.shape)} disagrees with {bound[key][1]} "
                                    f"(a size config.json does not give: {bound[key][0]} there, {size} here)",
                                    hint="tensors of one kind must have one shape; the checkpoint is damaged")
    missing = [n for n, e in expected.items() if not e.optional and n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{', ...' if len(missing) > 4 else ''})"
        raise UserError(f"tensor {missing[0]} is missing from the checkpoint" + (more if len(missing) > 1 else ""),
                        hint="the download is incomplete, or config.json belongs to another model")
