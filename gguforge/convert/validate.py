"""Validate step: the config and every tensor's shape, checked before anything is written.

Each architecture declares `expected_shapes()`: {checkpoint name (after rename): Expected}, built
from config values as `Dim`s that remember where they came from, so a mismatch can say why:

    model.layers.3.self_attn.k_proj.weight: shape [128, 64] but config implies [64, 64]
    (num_key_value_heads=2 x head_dim=32)

Tensors the architecture does not know are left to the planner (it reports unmapped names).
"""

from __future__ import annotations

from numbers import Real

from ..errors import UserError
from ..archs.shapes import mismatch_message
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


def check_config_types(hparams: dict) -> None:
    """A present value of the wrong kind is a one-line error naming the key (not a crash later)."""
    for key in INT_KEYS:
        value = hparams.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"config.json: {key} must be a non-negative integer, got {value!r}")
    for key in FLOAT_KEYS:
        value = hparams.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
            raise UserError(f"config.json: {key} must be a number, got {value!r}")
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


# -- the check ------------------------------------------------------------------------------------


def validate_checkpoint(checkpoint: Checkpoint, arch, check_tensors: bool = True) -> None:
    """Config types, then every expected tensor present with the shape the config implies."""
    check_config_types(checkpoint.hparams)
    if not check_tensors:
        return
    expected = arch.expected_shapes()
    present: set[str] = set()
    for name, tensor in checkpoint.tensors.items():
        renamed = arch.rename(name)
        if renamed is None:
            continue
        if tensor.dtype not in FLOAT_DTYPES:
            raise UserError(f"{name}: dtype {tensor.dtype} cannot be converted",
                            hint="only F32, F16 and BF16 weights are supported")
        present.add(renamed)
        want = expected.get(renamed)
        if want is not None and not want.matches(tuple(tensor.shape)):
            raise UserError(mismatch_message(name, tuple(tensor.shape), want),
                            hint="config.json and the weights disagree; they may come from different models")
    missing = [n for n, e in expected.items() if not e.optional and n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{', ...' if len(missing) > 4 else ''})"
        raise UserError(f"tensor {missing[0]} is missing from the checkpoint" + (more if len(missing) > 1 else ""),
                        hint="the download is incomplete, or config.json belongs to another model")
