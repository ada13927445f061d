"""LLaMA-1/2/3: HF ``LlamaConfig`` <-> megatron-core settings, and the size presets."""
from __future__ import annotations

import torch.nn.functional as F

from megatron_patch.models.common.config import (
    Const, ConfigTable, Field, MegatronArch, rope_scaling_of, rope_theta_get, rope_theta_put)
from megatron_patch.models.common.llama_like import check_hidden_act, linear_rope_factor, take_yarn


def _finish(hf: dict, arch: MegatronArch) -> None:
    check_hidden_act(hf, "LLaMA")
    heads = arch.config["num_attention_heads"]
    head_dim = hf.get("head_dim") or arch.config["hidden_size"] // heads
    arch.config["kv_channels"] = head_dim
    rs = rope_scaling_of(hf)
    kind = rs.get("rope_type", rs.get("type")) if rs is not None else None
    if kind == "yarn":
        take_yarn(hf, rs, arch, "LLaMA")
    elif rs is not None and kind != "llama3":
        arch.extra["rope_linear_factor"] = linear_rope_factor(rs, "LLaMA", also=", yarn and llama3")
    elif rs is not None:
        arch.model["rope_scaling"] = True
        arch.model["rope_scaling_factor"] = float(rs["factor"])
        arch.extra["llama3_rope"] = {
            "factor": float(rs["factor"]),
            "low_freq_factor": float(rs.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(rs.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(rs.get("original_max_position_embeddings", 8192)),
        }
    if hf.get("attention_bias"):  # Q/K/V and o_proj (the spec biases linear_proj)
        arch.config["add_qkv_bias"] = True
        arch.extra["proj_bias"] = True
    if hf.get("mlp_bias"):  # gate/up/down (the spec biases linear_fc1 and linear_fc2)
        arch.extra["mlp_bias"] = True


TABLE = ConfigTable(
    "llama",
    fields=[
        Field("num_hidden_layers", "num_layers"),
        Field("hidden_size", "hidden_size"),
        Field("intermediate_size", "ffn_hidden_size"),
        Field("num_attention_heads", "num_attention_heads"),
        Field("num_key_value_heads", "num_query_groups",
              get=lambda hf: hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        Field("rms_norm_eps", "layernorm_epsilon", default=1e-6),
        Field("vocab_size", "vocab_size", where="model"),
        Field("max_position_embeddings", "max_sequence_length", where="model", default=2048),
        Field("rope_theta", "rotary_base", where="model", get=rope_theta_get, put=rope_theta_put),
        Field("tie_word_embeddings", "share_embeddings_and_output_weights", where="model",
              default=False),
    ],
    consts=[
        Const("normalization", "RMSNorm"),
        Const("gated_linear_unit", True),
        Const("activation_func", F.silu),
        Const("add_bias_linear", False),
        Const("add_qkv_bias", False),
        Const("position_embedding_type", "rope", where="model"),
    ],
    finish=_finish,
)


def _llama(layers, hidden, ffn, heads, kv=None, vocab=32000, max_pos=4096, theta=10000.0,
           eps=1e-5, rope_scaling=None, tie=False, bos=1, eos=2):
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv or heads, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "rope_theta": theta, "rms_norm_eps": eps,
        "hidden_act": "silu", "tie_word_embeddings": tie, "bos_token_id": bos,
        "eos_token_id": eos, "attention_bias": False, "mlp_bias": False,
    }
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    return cfg


_L3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS = {
    "7B": _llama(32, 4096, 11008, 32, max_pos=4096),  # LLaMA-2 7B (LLaMA-1 7B: max_pos 2048)
    "13B": _llama(40, 5120, 13824, 40, max_pos=4096),
    "70B": _llama(80, 8192, 28672, 64, kv=8, max_pos=4096),
    "llama3-8B": _llama(32, 4096, 14336, 32, kv=8, vocab=128256, max_pos=8192, theta=500000.0,
                        bos=128000, eos=128001),
    "llama3-70B": _llama(80, 8192, 28672, 64, kv=8, vocab=128256, max_pos=8192, theta=500000.0,
                         bos=128000, eos=128001),
    "llama3.1-8B": _llama(32, 4096, 14336, 32, kv=8, vocab=128256, max_pos=131072,
                          theta=500000.0, rope_scaling=_L3_SCALING, bos=128000, eos=128001),
    "1B": _llama(16, 2048, 5632, 16, kv=16, max_pos=4096),  # ~1.1B, for GPU benchmarks
    # tiny: well under 1M parameters, for CPU tests and the quickstart (vocab set by the tokenizer)
    "tiny": _llama(2, 64, 176, 4, kv=2, vocab=32000, max_pos=512, eps=1e-6),
}
