"""Qwen3.8-Flash-Next (llama.cpp arch `qwen4exp`): Qwen3.5-MoE plus hyper-connections, QSA indexed
attention and per-layer n-gram hash embeddings (PLE), converted as llama.cpp's converter does
(conversion/qwen4exp.py, Qwen4ExpTextModel).

Differences from Qwen3.5-MoE:
- hyper-connections replace every layer norm: per layer attn_/mlp_hyper_connection.{hc_norm,
  input_mix_weight_down, input_mix_weight_up, block_inject_weight} -> hc_attn_* / hc_ffn_*, and the final
  hyper_connection_mixer -> output_hc_* (no output_norm); hc_norm is zero-centred (AddOne);
- full-attention layers carry a QSA indexer: index_qk_proj is split into indexer.q_proj (the first
  indexer_n_heads * indexer_head_dim rows) and indexer.k_proj (the one key head); its q/k layernorms AddOne;
- the PLE layer (ple_layer_ids, 1-based in the config) has key/value projections, three zero-centred norms,
  a depthwise conv1d (squeezed), int64 hash constants written as exact UINT64 metadata (never as tensors),
  and its n-gram table stored as split_ngram_parts shards, streamed into one per_layer_token_embd tensor
  in shard-index order (concat_rows: one block of rows resident at a time);
- there is no MTP export (the reference sets no_mtp);
- `--mmproj` writes the Qwen3-VL ViT of the ConditionalGeneration checkpoints (inherited from Qwen3.5).
gguf-py 0.19 knows none of these names: they are defined here (NAMES), as llama.cpp's
gguf-py/gguf/constants.py spells them (tests/test_qwen4exp.py checks them against the pinned tree).
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np
from gguf import GGUFValueType

from .api import ANY, AddOne, Emitted, Expected, Lazy, Metadata, MockSizes, MockSpec, Rule, Squeeze, UserError, concat_rows, \
    register
from .qwen35 import Qwen35Moe

ARCH = "qwen4exp"
# constants.py names gguf 0.19 lacks: MODEL_TENSOR member -> TENSOR_NAMES entry ...
NAMES = {
    "HC_HEAD_NORM": "output_hc_norm", "HC_HEAD_DOWN": "output_hc_down", "HC_HEAD_UP": "output_hc_up",
    "HC_ATTN_NORM": "blk.{bid}.hc_attn_norm", "HC_ATTN_DOWN": "blk.{bid}.hc_attn_down",
    "HC_ATTN_UP": "blk.{bid}.hc_attn_up", "HC_ATTN_INJECT": "blk.{bid}.hc_attn_inject",
    "HC_FFN_NORM": "blk.{bid}.hc_ffn_norm", "HC_FFN_DOWN": "blk.{bid}.hc_ffn_down",
    "HC_FFN_UP": "blk.{bid}.hc_ffn_up", "HC_FFN_INJECT": "blk.{bid}.hc_ffn_inject",
    "INDEXER_Q_PROJ": "blk.{bid}.indexer.q_proj", "INDEXER_K_PROJ": "blk.{bid}.indexer.k_proj",
    "INDEXER_Q_NORM": "blk.{bid}.indexer.q_norm", "INDEXER_K_NORM": "blk.{bid}.indexer.k_norm",
    "PER_LAYER_TOKEN_EMBD": "per_layer_token_embd",
    "PLE_KEY": "blk.{bid}.ple_key", "PLE_VALUE": "blk.{bid}.ple_value", "PLE_NORM_KEY": "blk.{bid}.ple_norm_key",
    "PLE_NORM_QUERY": "blk.{bid}.ple_norm_query", "PLE_NORM_CONV": "blk.{bid}.ple_norm_conv",
    "PLE_CONV1D": "blk.{bid}.ple_conv1d",
}
# ... and Keys (class path -> format string)
KEYS = {
    "HyperConnection.COUNT": "{arch}.hyper_connection.count",
    "HyperConnection.LOW_RANK": "{arch}.hyper_connection.low_rank",
    "Attention.Indexer.HEAD_COUNT": "{arch}.attention.indexer.head_count",
    "Attention.Indexer.KEY_LENGTH": "{arch}.attention.indexer.key_length",
    "Attention.Indexer.TOP_K": "{arch}.attention.indexer.top_k",
    "Attention.COMPRESS_RATIOS": "{arch}.attention.compress_ratios",
    "PerLayerEmbedding.LAYERS": "{arch}.ple.layers",
    "PerLayerEmbedding.NGRAM_SIZE": "{arch}.ple.ngram_size",
    "PerLayerEmbedding.HEADS_PER_NGRAM": "{arch}.ple.heads_per_ngram",
    "PerLayerEmbedding.CONV_KERNEL": "{arch}.ple.conv_kernel",
    "PerLayerEmbedding.EOS_TOKEN_ID": "{arch}.ple.eos_token_id",
    "PerLayerEmbedding.IMAGE_TOKEN_ID": "{arch}.ple.image_token_id",
    "LLM.EMBD_LENGTH_PER_LAYER_INP": "{arch}.embedding_length_per_layer_input",
    "PerLayerEmbedding.LAYER_MULTIPLIERS": "{arch}.ple.layer_multipliers",
    "PerLayerEmbedding.HEAD_OFFSETS": "{arch}.ple.head_offsets",
    "PerLayerEmbedding.HEAD_VOCAB_SIZES": "{arch}.ple.head_vocab_sizes",
}


def name(member: str, bid: int | None = None) -> str:
    return NAMES[member].format(bid=bid) + ".weight"


def leaf(member: str) -> str:
    """The name after 'blk.N.' (layer rules name leaves)."""
    return NAMES[member].removeprefix("blk.{bid}.") + ".weight"


def key(path: str) -> str:
    return KEYS[path].format(arch=ARCH)


PLE = "ple.ple_embedding."
SHARD = re.compile(r"^model\.layers\.(\d+)\.ple\.ple_embedding\.ngram_embedding\.shard_(\d+)\.weight$")
# hash constant leaf -> metadata key (written in this order, as the reference does)
HASH_CONSTANTS = {"layer_multipliers": "PerLayerEmbedding.LAYER_MULTIPLIERS",
                  "ngram_heads_offsets": "PerLayerEmbedding.HEAD_OFFSETS",
                  "ngram_heads_vocab_sizes": "PerLayerEmbedding.HEAD_VOCAB_SIZES"}


@register("Qwen4ExpForConditionalGeneration", "Qwen4ExpForCausalLM")
class Qwen4Exp(Qwen35Moe):
    gguf_arch = ARCH
    defines_gguf_arch = True  # gguf-py 0.19 lacks the arch: its names are NAMES / KEYS above
    mock = MockSpec(("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", "Qwen4ExpConfig", "Qwen4ExpForConditionalGeneration"),
                    tokenizer="qwen35", hub=True, hub_packed_experts=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shards: dict[int, Lazy] = {}
        self._hash: dict[str, list[int]] = {}

    # -- config ---------------------------------------------------------------------------------
    def _count_mtp_layers(self) -> int:
        return 0  # the reference exports no MTP head (no_mtp): mtp.* tensors are dropped

    def ple_layers(self) -> list[int]:
        """0-based PLE layers; the reference writes one n-gram table, so at most one layer."""
        ids = self.hp("ple_layer_ids", default=[])
        n = self.n_layers
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UserError(f"config.json: ple_layer_ids must be a list of integers, got {ids!r}")
        if bad := [i for i in ids if not 1 <= i <= n]:
            raise UserError(f"config.json: ple_layer_ids {bad} out of range: they are 1-based layer ids in [1, {n}]")
        if attn := [i for i in ids if not self.recurrent_layers()[i - 1]]:
            raise UserError(f"config.json: ple_layer_ids {attn} name attention layers; PLE runs on linear-attention "
                            "layers only")
        if len(ids) > 1:
            raise UserError(f"config.json: ple_layer_ids {ids}: llama.cpp's qwen4exp holds one n-gram table, "
                            "so one PLE layer")
        return [i - 1 for i in ids]

    def linear_dims(self) -> tuple[int, int, int, int]:
        gate = self.hparams.get("output_gate_type") or self.hparams.get("hidden_act")
        if gate != "sigmoid":  # llama.cpp's qwen4exp graph gates the Gated DeltaNet output with a sigmoid
            raise UserError(f"config.json: output_gate_type {gate!r}: llama.cpp's qwen4exp implements 'sigmoid' only")
        return super().linear_dims()

    def ngram_heads(self) -> int:
        return (int(self.hp("ngram_size")) - 1) * int(self.hp("heads_per_ngram"))

    def ple_row(self):
        """The row width of the n-gram table: ple_embed_dim split over the n-gram heads."""
        P, nh = self.dim("ple_embed_dim", "hidden_size"), self.ngram_heads()
        if P.size != self.hidden.size:  # llama.cpp's loader reads ple_key / ple_value as [hidden_size, ...]
            raise UserError(f"config.json: {P.why} differs from {self.hidden.why}; llama.cpp's qwen4exp "
                            "needs them equal")
        if nh <= 0 or P.size % nh:
            raise UserError(f"config.json: {P.why} is not a multiple of (ngram_size-1)*heads_per_ngram={nh}")
        return P.size // nh

    def n_shards(self) -> int:
        return int(self.dim("split_ngram_parts").size)

    # -- rules ------------------------------------------------------------------------------------
    def global_rules(self) -> Iterator[Rule]:
        HC, r = self.hc_width(), self.dim("hc_lowrank")
        for rule in super().global_rules():
            if rule.hf != "model.norm.weight":  # the hyper-connection mixer replaces the final norm
                yield rule
        mix = "model.hyper_connection_mixer."
        yield Rule(mix + "hc_norm.weight", name("HC_HEAD_NORM"), (HC,), op=AddOne())
        yield Rule(mix + "input_mix_weight_down.weight", name("HC_HEAD_DOWN"), (r, HC))
        yield Rule(mix + "input_mix_weight_up.weight", name("HC_HEAD_UP"), (HC, r))

    def hc_width(self):
        H, n = self.hidden, self.dim("hc_count")
        return H * n.size

    def layer_rules(self, layer: int) -> Iterator[Rule]:
        for rule in super().layer_rules(layer):
            if rule.hf not in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                yield rule
        HC, r, n = self.hc_width(), self.dim("hc_lowrank"), self.dim("hc_count")
        for hf, gg in (("attn", "ATTN"), ("mlp", "FFN")):
            p = f"{hf}_hyper_connection."
            yield Rule(p + "hc_norm.weight", leaf(f"HC_{gg}_NORM"), (HC,), op=AddOne())
            yield Rule(p + "input_mix_weight_down.weight", leaf(f"HC_{gg}_DOWN"), (r, HC))
            yield Rule(p + "input_mix_weight_up.weight", leaf(f"HC_{gg}_UP"), (HC, r))
            yield Rule(p + "block_inject_weight.weight", leaf(f"HC_{gg}_INJECT"), (n, HC))
        if layer in self.ple_layers():
            yield from self.ple_rules(layer)

    def attention_rules(self, layer: int) -> Iterator[Rule]:
        yield from super().attention_rules(layer)
        if self.recurrent_layers()[layer]:
            return
        H, nI, dI = self.hidden, self.dim("indexer_n_heads"), self.dim("indexer_head_dim")
        ix = "self_attn.indexer."
        yield Rule(ix + "index_qk_proj.weight", None, ((nI.size + 1) * dI.size, H))  # split in transform
        # zero-centred: Qwen3Next.layer_rules adds the AddOne of every *norm.weight to these
        yield Rule(ix + "q_layernorm.weight", leaf("INDEXER_Q_NORM"), (dI,))
        yield Rule(ix + "k_layernorm.weight", leaf("INDEXER_K_NORM"), (dI,))

    def ple_rules(self, layer: int) -> Iterator[Rule]:
        H, HC, P = self.hidden, self.hc_width(), self.dim("ple_embed_dim", "hidden_size")
        K = self.dim("ple_conv_kernel_size")
        yield Rule("ple.key_proj.weight", leaf("PLE_KEY"), (HC, P))
        yield Rule("ple.value_proj.weight", leaf("PLE_VALUE"), (H, P))
        for norm in ("KEY", "QUERY", "CONV"):
            yield Rule(f"ple.norm_{norm.lower()}.weight", leaf(f"PLE_NORM_{norm}"), (HC,), op=AddOne())
        yield Rule("ple.conv1d.weight", leaf("PLE_CONV1D"), Expected(((HC, 1, K), (HC, K))), op=Squeeze())
        lengths = {"layer_multipliers": int(self.hp("ngram_size")), "ngram_heads_offsets": self.ngram_heads(),
                   "ngram_heads_vocab_sizes": self.ngram_heads()}
        for const, n in lengths.items():
            yield Rule(PLE + const, None, (n,))  # read exactly in transform, written as metadata
        for i in range(self.n_shards()):
            yield Rule(f"{PLE}ngram_embedding.shard_{i}.weight", None, (ANY, self.ple_row()))

    # -- the dynamic part -------------------------------------------------------------------------
    def transform(self, name_: str, tensor: Lazy) -> Emitted:
        if ".self_attn.indexer.index_qk_proj.weight" in name_:
            layer = self._layer_number(name_)
            nq = int(self.hp("indexer_n_heads")) * int(self.hp("indexer_head_dim"))
            yield name("INDEXER_Q_PROJ", layer), tensor.slice_axis(0, 0, nq).noted("query rows of index_qk_proj")
            yield name("INDEXER_K_PROJ", layer), tensor.slice_axis(0, nq, tensor.shape[0]).noted(
                "key rows of index_qk_proj")
            return
        if self.integer_tensor(name_):
            self._hash[name_.rpartition(".")[2]] = self._exact_ints(name_, tensor)
            return
        if m := SHARD.match(name_):
            if self.rules().get(name_) is None:
                return (yield from super().transform(name_, tensor))  # not the PLE layer: unmapped
            self._shards[int(m.group(2))] = tensor
            if len(self._shards) == self.n_shards():
                parts = [self._shards[i] for i in range(self.n_shards())]  # rows in shard-index order
                yield name("PER_LAYER_TOKEN_EMBD"), concat_rows(parts).noted(f"{len(parts)} shards in index order")
            return
        yield from super().transform(name_, tensor)

    def integer_tensor(self, name_: str) -> bool:
        return name_.rpartition(".")[2] in HASH_CONSTANTS and self.rules().get(name_) is not None

    @staticmethod
    def _exact_ints(name_: str, tensor: Lazy) -> list[int]:
        """An int64 hash constant, read as stored (a float round trip would round the 45-bit multipliers)."""
        kind = tensor.stored[0] if tensor.stored is not None else None
        if kind != "I64" or tensor.ndim != 1:
            raise UserError(f"{name_} must be a 1-D int64 tensor (hash constants are kept exact), "
                            f"got {kind or tensor.dtype} of shape {list(tensor.shape)}")
        values = np.asarray(tensor.stored_rows(0, tensor.shape[0])).view(np.int64)
        if (values < 0).any():
            raise UserError(f"{name_} has negative values; hash constants are unsigned")
        return [int(v) for v in values]

    def finish(self) -> Emitted:
        yield from super().finish()
        if self._shards and len(self._shards) != self.n_shards():  # (validate.py reports a missing shard first)
            raise UserError(f"got {len(self._shards)} PLE n-gram shards, config.json has split_ngram_parts="
                            f"{self.n_shards()}")

    # -- metadata ---------------------------------------------------------------------------------
    def add_metadata(self, md: Metadata) -> None:
        super().add_metadata(md)
        md.u32(key("HyperConnection.COUNT"), self.hp("hc_count"))
        md.u32(key("HyperConnection.LOW_RANK"), self.hp("hc_lowrank"))
        md.u32(key("Attention.Indexer.HEAD_COUNT"), self.hp("indexer_n_heads"))
        md.u32(key("Attention.Indexer.KEY_LENGTH"), self.hp("indexer_head_dim"))
        md.u32(key("Attention.Indexer.TOP_K"), self.hp("indexer_budget"))
        ratio = int(self.hp("indexer_compress_ratio"))
        # The ratio on every attention layer (released configs say "full_attention", transformers' own
        # "indexed_attention"). The reference compares with "full_attention" only, after transformers' config
        # class has renamed them: with transformers >= 5.23 it writes all zeros, which turns QSA off in llama.cpp.
        md.array(key("Attention.COMPRESS_RATIOS"), [0 if rec else ratio for rec in self.recurrent_layers()],
                 GGUFValueType.INT32)
        ple = self.ple_layers()
        if not ple:
            return
        md.array(key("PerLayerEmbedding.LAYERS"), ple, GGUFValueType.INT32)
        md.u32(key("PerLayerEmbedding.NGRAM_SIZE"), self.hp("ngram_size"))
        md.u32(key("PerLayerEmbedding.HEADS_PER_NGRAM"), self.hp("heads_per_ngram"))
        md.u32(key("PerLayerEmbedding.CONV_KERNEL"), self.hp("ple_conv_kernel_size"))
        eos = self.hp("eos_token_id")  # the n-gram hash restarts after it; the reference takes the last of a list
        md.u32(key("PerLayerEmbedding.EOS_TOKEN_ID"), eos[-1] if isinstance(eos, list) else eos)
        if (img := self.hparams.get("image_token_id")) is not None:
            md.u32(key("PerLayerEmbedding.IMAGE_TOKEN_ID"), img)
        if self._shards:
            md.u32(key("LLM.EMBD_LENGTH_PER_LAYER_INP"), self.ple_row())
        for const, path in HASH_CONSTANTS.items():
            if const not in self._hash:
                raise UserError(f"the checkpoint has no model.layers.{ple[0]}.{PLE}{const} (a PLE hash constant)")
            md.array(key(path), self._hash[const], GGUFValueType.UINT64)

    # -- test mocks --------------------------------------------------------------------------------
    @classmethod
    def mock_config(cls, s: MockSizes) -> dict:
        """Hyper-connection and indexer sizes that are not powers of two (the QSA budget, 96 tokens, covers the
        64-token verify text: llama.cpp's block selection differs from transformers'); the PLE table in 12 shards (names
        that sort out of index order: shard_10 before shard_2) of rows 32 wide (q8_0 blocks: the hidden
        size over 2 n-gram heads)."""
        cfg = dict(super().mock_config(s), hc_count=3, hc_lowrank=12, indexer_n_heads=3, indexer_kv_heads=1,
                   indexer_head_dim=24, indexer_budget=96, indexer_compress_ratio=3,
                   ple_layer_ids=[s.layers - 1], ngram_size=3, heads_per_ngram=1, ngram_vocab_size_base=40,
                   make_ngram_vocab_size_divisible_by=24, split_ngram_parts=12, output_gate_type="sigmoid")
        cfg.pop("full_attention_interval", None)
        return cfg

    @classmethod
    def mock_saved(cls, model, sd: dict, config: dict) -> tuple[dict, dict]:
        """What the released checkpoints hold beyond save_pretrained: the int64 hash buffers, and
        "full_attention" in layer_types (transformers renames it to "indexed_attention" when loading)."""
        for k, v in model.state_dict().items():
            if any(k.endswith(PLE + const) for const in HASH_CONSTANTS):
                sd[k] = v.detach().clone()
        config["layer_types"] = ["full_attention" if t == "indexed_attention" else t for t in config["layer_types"]]
        return sd, config

