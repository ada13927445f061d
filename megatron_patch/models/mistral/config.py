"""Mistral: HF ``MistralConfig`` <-> megatron-core settings, and size presets.

Sliding-window attention: HF lets token i attend keys j with ``i - j < sliding_window``; megatron-core's
``window_size=(left, right)`` attends ``i - left <= j <= i + right``, so ``left = sliding_window - 1``
and ``right = 0``. The local ``DotProductAttention`` applies it through its softmax mask.
"""
from __future__ import annotations

from megatron_patch.models.common.config import ConfigTable, Field, MegatronArch
from megatron_patch.models.common.llama_like import finish_llama_like, llama_consts, llama_fields


def _window_get(hf: dict):
    w = hf.get("sliding_window")
    return (int(w) - 1, 0) if w else None


def _window_put(hf: dict, value) -> None:
    hf["sliding_window"] = None if not value else int(value[0]) + 1


def _finish(hf: dict, arch: MegatronArch) -> None:
    finish_llama_like(hf, arch, "Mistral")
    if arch.config.get("window_size") is None:
        arch.config.pop("window_size", None)


TABLE = ConfigTable(
    "mistral",
    fields=llama_fields() + [Field("sliding_window", "window_size", get=_window_get, put=_window_put)],
    consts=llama_consts(),
    finish=_finish,
    class_defaults={"num_key_value_heads": 8, "sliding_window": 4096, "rms_norm_eps": 1e-6,
                    "rope_theta": 10000.0},  # MistralConfig's
)


def _mistral(layers, hidden, ffn, heads, kv, vocab=32000, max_pos=32768, window=4096,
             theta=10000.0):
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "rope_theta": theta, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": window,
        "bos_token_id": 1, "eos_token_id": 2,
    }


PRESETS = {
    "7B": _mistral(32, 4096, 14336, 32, 8),  # Mistral-7B-v0.1 (4096-token sliding window)
    "7B-v0.2": _mistral(32, 4096, 14336, 32, 8, window=None, theta=1000000.0),
    "tiny": _mistral(2, 64, 176, 4, 2, max_pos=512, window=64),
}
