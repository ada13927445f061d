"""GLM-4 (``GlmForCausalLM``): HF ``GlmConfig`` <-> megatron-core settings, and size presets.

GLM rotates only the first ``partial_rotary_factor`` of each head (megatron ``rotary_percent``) and
pairs neighbouring channels (x0,x1), (x2,x3) ... (megatron ``rotary_interleaved=True``). QKV carries a
bias (``attention_bias``); the MLP is SwiGLU with a fused ``gate_up_proj``; few KV groups (2 in
GLM-4-9B, so TP > 2 replicates them).
"""
from __future__ import annotations

from megatron_patch.models.common.config import Const, ConfigTable, Field, MegatronArch
from megatron_patch.models.common.llama_like import finish_llama_like, llama_consts, llama_fields


def _partial(hf: dict):
    rp = hf.get("rope_parameters") or {}
    return float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))


def _finish(hf: dict, arch: MegatronArch) -> None:
    finish_llama_like(hf, arch, "GLM")
    arch.config["kv_channels"] = hf.get("head_dim") or 128  # GlmConfig's default head_dim


TABLE = ConfigTable(
    "glm",
    fields=llama_fields() + [
        Field("partial_rotary_factor", "rotary_percent", where="model", get=_partial),
        Field("attention_bias", "add_qkv_bias", default=True),
    ],
    consts=[c for c in llama_consts() if c.mg != "add_qkv_bias"] + [Const("rotary_interleaved", True)],
    finish=_finish,
    class_defaults={"num_key_value_heads": 2, "head_dim": 128, "rms_norm_eps": 1.5625e-07,
                    "attention_bias": True, "partial_rotary_factor": 0.5,
                    "rope_theta": 10000.0},  # GlmConfig's
)


def _glm(layers, hidden, ffn, heads, kv, head_dim=128, vocab=151552, max_pos=131072):
    return {
        "architectures": ["GlmForCausalLM"], "model_type": "glm",
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "vocab_size": vocab, "max_position_embeddings": max_pos, "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5, "rms_norm_eps": 1.5625e-07, "attention_bias": True,
        "hidden_act": "silu", "tie_word_embeddings": False, "pad_token_id": 151329,
        "eos_token_id": [151329, 151336, 151338],
    }


PRESETS = {
    "9B": _glm(40, 4096, 13696, 32, 2),  # GLM-4-9B
    "6B": _glm(28, 4096, 13696, 32, 2, vocab=65024, max_pos=32768),  # ChatGLM2/3-6B structure
    "tiny": _glm(2, 64, 176, 4, 2, head_dim=16, vocab=32000, max_pos=512),
}
PRESETS["tiny"]["pad_token_id"] = 0
