"""Bloom: HF ``BloomConfig`` <-> megatron-core settings, and size presets.

No position embedding (ALiBi in the core attention), LayerNorm after the word embeddings, biases
everywhere, tanh-approximated GeLU, tied embeddings, MLP width 4 x hidden.
"""
from __future__ import annotations

import torch

from megatron_patch.models.common.config import Const, ConfigTable, Field, MegatronArch


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """GeLU, tanh approximation, with Bloom's constant sqrt(2/pi) ~ 0.79788456."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _finish(hf: dict, arch: MegatronArch) -> None:
    c = arch.config
    c["ffn_hidden_size"] = 4 * c["hidden_size"]
    c["num_query_groups"] = c["num_attention_heads"]
    c["kv_channels"] = c["hidden_size"] // c["num_attention_heads"]
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError("Bloom with apply_residual_connection_post_layernorm is not supported")
    arch.extra["embedding_norm_eps"] = c["layernorm_epsilon"]


TABLE = ConfigTable(
    "bloom",
    fields=[
        Field("n_layer", "num_layers", get=lambda hf: hf.get("n_layer", hf.get("num_hidden_layers"))),
        Field("hidden_size", "hidden_size", get=lambda hf: hf.get("hidden_size", hf.get("n_embed"))),
        Field("n_head", "num_attention_heads",
              get=lambda hf: hf.get("n_head", hf.get("num_attention_heads"))),
        Field("layer_norm_epsilon", "layernorm_epsilon", default=1e-5),
        Field("vocab_size", "vocab_size", where="model"),
        Field("seq_length", "max_sequence_length", where="model", default=2048),
        Field("tie_word_embeddings", "share_embeddings_and_output_weights", where="model",
              default=True),
    ],
    consts=[
        Const("normalization", "LayerNorm"),
        Const("gated_linear_unit", False),
        Const("activation_func", bloom_gelu),
        Const("add_bias_linear", True),
        Const("add_qkv_bias", True),
        Const("position_embedding_type", "none", where="model"),
    ],
    finish=_finish,
)


def _bloom(layers, hidden, heads, vocab=250880):
    return {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom", "n_layer": layers,
        "hidden_size": hidden, "n_head": heads, "vocab_size": vocab, "layer_norm_epsilon": 1e-5,
        "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
    }


PRESETS = {
    "560M": _bloom(24, 1024, 16),
    "1.1B": _bloom(24, 1536, 16),
    "1.7B": _bloom(24, 2048, 16),
    "3B": _bloom(30, 2560, 32),
    "7.1B": _bloom(30, 4096, 32),
    "tiny": _bloom(2, 64, 4, vocab=32000),
}
