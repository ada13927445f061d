"""Qwen2: HF ``Qwen2Config`` <-> megatron-core settings (LLaMA's plus QKV bias), and size presets.

Qwen2's optional sliding window (``use_sliding_window``, off in every released model) is refused:
it applies only above ``max_window_layers``, which megatron-core's per-layer window switch cannot
express from a config field.
"""
from __future__ import annotations

from megatron_patch.models.common.config import ConfigTable, MegatronArch
from megatron_patch.models.common.llama_like import finish_llama_like, llama_consts, llama_fields


def _finish(hf: dict, arch: MegatronArch) -> None:
    finish_llama_like(hf, arch, "Qwen2")
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported")


TABLE = ConfigTable("qwen2", fields=llama_fields(1000000.0), consts=llama_consts(qkv_bias=True),
                    finish=_finish,
                    # Qwen2Config's own defaults (num_key_value_heads is 32 whatever the heads)
                    class_defaults={"num_key_value_heads": 32, "rms_norm_eps": 1e-6,
                                    "rope_theta": 10000.0})


def _qwen2(layers, hidden, ffn, heads, kv, vocab=151936, tie=False, max_pos=32768):
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": tie, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151643,
    }


PRESETS = {
    "0.5B": _qwen2(24, 896, 4864, 14, 2, tie=True),
    "1.5B": _qwen2(28, 1536, 8960, 12, 2, tie=True),
    "7B": _qwen2(28, 3584, 18944, 28, 4, vocab=152064, max_pos=131072),
    "tiny": _qwen2(2, 64, 176, 4, 2, vocab=32000, max_pos=512),
}
