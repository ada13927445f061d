"""Qwen2: HF ``Qwen2Config`` <-> megatron-core settings (LLaMA's plus QKV bias), and size presets.

Qwen2's optional sliding window (``use_sliding_window``, off in every released model) applies to
the layers from ``max_window_layers`` on (or to those ``layer_types`` names ``sliding_attention``):
megatron-core's ``window_size`` (HF's window W is ``(W - 1, 0)``, as for Mistral) with
``window_attn_skip_freq`` as its per-layer list (1 = windowed layer).
"""
from __future__ import annotations

from megatron_patch.models.common.config import ConfigTable, MegatronArch
from megatron_patch.models.common.llama_like import finish_llama_like, llama_consts, llama_fields


def _finish(hf: dict, arch: MegatronArch) -> None:
    finish_llama_like(hf, arch, "Qwen2")
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if not window:
        return  # transformers: no window on any layer, whatever layer_types says
    layers = arch.config["num_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf["max_window_layers"]) else "full_attention"
        for i in range(layers)]
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"Qwen2 layer_types must name full_attention or sliding_attention for "
                         f"each of the {layers} layers, got {types!r}")
    if "sliding_attention" in types:
        arch.config["window_size"] = (int(window) - 1, 0)
        arch.config["window_attn_skip_freq"] = [int(t == "sliding_attention") for t in types]


TABLE = ConfigTable("qwen2", fields=llama_fields(1000000.0), consts=llama_consts(qkv_bias=True),
                    finish=_finish,
                    # Qwen2Config's own defaults (num_key_value_heads is 32 whatever the heads)
                    class_defaults={"num_key_value_heads": 32, "rms_norm_eps": 1e-6,
                                    "rope_theta": 10000.0, "sliding_window": 4096,
                                    "max_window_layers": 28})


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
