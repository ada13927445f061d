"""Galactica / OPT: HF ``OPTConfig`` <-> megatron-core settings, and size presets.

OPT looks learned positions up at ``position + 2`` (its table has 2 unused leading rows); the family's
``post_build`` gives megatron the same table and offset, so the weights convert unchanged. Pre-norm
only (``do_layer_norm_before``), and no ``project_in/out`` (``word_embed_proj_dim == hidden_size``,
true for Galactica and OPT >= 1.3B).
"""
from __future__ import annotations

import torch.nn.functional as F

from megatron_patch.models.common.config import Const, ConfigTable, Field, MegatronArch

POSITION_OFFSET = 2
_ACTS = {"gelu": F.gelu, "relu": F.relu}


def _act(hf: dict):
    name = hf.get("activation_function", "relu")
    if name not in _ACTS:
        raise ValueError(f"OPT activation {name!r} is not supported (gelu, relu)")
    return _ACTS[name]


def _finish(hf: dict, arch: MegatronArch) -> None:
    c = arch.config
    c["kv_channels"] = c["hidden_size"] // c["num_attention_heads"]
    c["add_qkv_bias"] = c["add_bias_linear"]
    if not hf.get("do_layer_norm_before", True) or hf.get("_remove_final_layer_norm"):
        raise ValueError("OPT with post-layer-norm (do_layer_norm_before=false, OPT-350m) is not "
                         "supported")
    if hf.get("word_embed_proj_dim", c["hidden_size"]) != c["hidden_size"]:
        raise ValueError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not "
                         "supported")
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ValueError("OPT without layer-norm affine parameters is not supported")
    arch.extra["position_offset"] = POSITION_OFFSET


TABLE = ConfigTable(
    "galactica",
    fields=[
        Field("num_hidden_layers", "num_layers"),
        Field("hidden_size", "hidden_size"),
        Field("ffn_dim", "ffn_hidden_size"),
        Field("num_attention_heads", "num_attention_heads"),
        Field("num_attention_heads", "num_query_groups"),
        Field("enable_bias", "add_bias_linear", default=True),
        Field("activation_function", "activation_func", get=_act, put=lambda hf, v: None),
        Field("vocab_size", "vocab_size", where="model"),
        Field("max_position_embeddings", "max_sequence_length", where="model", default=2048),
        Field("tie_word_embeddings", "share_embeddings_and_output_weights", where="model",
              default=True),
    ],
    consts=[
        Const("normalization", "LayerNorm"),
        Const("layernorm_epsilon", 1e-5),
        Const("gated_linear_unit", False),
        Const("position_embedding_type", "learned_absolute", where="model"),
    ],
    finish=_finish,
)


def _opt(layers, hidden, heads, vocab=50000, act="gelu", max_pos=2048, tie=True):
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "num_hidden_layers": layers,
        "hidden_size": hidden, "ffn_dim": 4 * hidden, "num_attention_heads": heads,
        "word_embed_proj_dim": hidden, "vocab_size": vocab, "max_position_embeddings": max_pos,
        "activation_function": act, "do_layer_norm_before": True, "enable_bias": True,
        "layer_norm_elementwise_affine": True, "tie_word_embeddings": tie,
        "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    }


PRESETS = {
    "125M": _opt(12, 768, 12),
    "1.3B": _opt(24, 2048, 32),
    "6.7B": _opt(32, 4096, 32),
    "30B": _opt(48, 7168, 56),
    "tiny": _opt(2, 64, 4, vocab=32000, max_pos=512),
}
