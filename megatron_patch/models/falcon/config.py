"""Falcon: HF ``FalconConfig`` <-> megatron-core settings, and size presets.

KV groups: the new decoder architecture (40B/180B) has ``num_kv_heads`` groups; the old one is
multi-query (one group, 7B) or multi-head (``multi_query=false``). ``parallel_attn`` selects the
project's ``ParallelResidualLayer``; with the new architecture it has two norms (``ln_attn``,
``ln_mlp``), otherwise one shared ``input_layernorm``. ``alibi=true`` (Falcon-RW) replaces RoPE by
ALiBi added before the softmax scaling. Linear and YaRN rope scaling as for the LLaMA-shaped families
(``common.llama_like``).
"""
from __future__ import annotations

import torch.nn.functional as F

from megatron_patch.models.common.config import (
    Const, ConfigTable, Field, MegatronArch, rope_scaling_of, rope_theta_get, rope_theta_put)

from megatron_patch.models.common.llama_like import linear_rope_factor, take_yarn  # noqa: E402

_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def groups_of(hf: dict) -> int:
    heads = hf["num_attention_heads"]
    if hf.get("new_decoder_architecture"):
        return hf.get("num_kv_heads") or heads
    return 1 if hf.get("multi_query", True) else heads


def _finish(hf: dict, arch: MegatronArch) -> None:
    c, m = arch.config, arch.model
    c["num_query_groups"] = groups_of(hf)
    c["kv_channels"] = c["hidden_size"] // c["num_attention_heads"]
    c["ffn_hidden_size"] = hf.get("ffn_hidden_size") or 4 * c["hidden_size"]
    c["add_qkv_bias"] = c["add_bias_linear"]
    act = hf.get("activation", "gelu")
    if act not in _ACTS:
        raise ValueError(f"Falcon activation {act!r} is not supported")
    c["activation_func"] = _ACTS[act]
    alibi = bool(hf.get("alibi"))
    m["position_embedding_type"] = "none" if alibi else "rope"
    rs = rope_scaling_of(hf)
    if rs is not None and not alibi:  # (with ALiBi transformers builds the rotary and never uses it)
        if rs.get("rope_type", rs.get("type")) == "yarn":
            take_yarn(hf, rs, arch, "Falcon")
        else:
            arch.extra["rope_linear_factor"] = linear_rope_factor(rs, "Falcon", also=" and yarn")
    parallel = bool(hf.get("parallel_attn", True))
    new = bool(hf.get("new_decoder_architecture"))
    n_ln = hf.get("num_ln_in_parallel_attn") or (2 if new else 1)
    arch.extra.update(alibi=alibi, parallel_attn=parallel,
                      two_norms=parallel and new and n_ln == 2, new_arch=new)
    if not parallel and new:
        raise ValueError("Falcon new_decoder_architecture without parallel_attn is not supported")


TABLE = ConfigTable(
    "falcon",
    fields=[
        Field("num_hidden_layers", "num_layers"),
        Field("hidden_size", "hidden_size"),
        Field("num_attention_heads", "num_attention_heads"),
        Field("layer_norm_epsilon", "layernorm_epsilon", default=1e-5),
        Field("bias", "add_bias_linear", default=False),
        Field("vocab_size", "vocab_size", where="model"),
        Field("max_position_embeddings", "max_sequence_length", where="model", default=2048),
        Field("rope_theta", "rotary_base", where="model", get=rope_theta_get, put=rope_theta_put),
        Field("tie_word_embeddings", "share_embeddings_and_output_weights", where="model",
              default=True),
    ],
    consts=[
        Const("normalization", "LayerNorm"),
        Const("gated_linear_unit", False),
    ],
    finish=_finish,
)


def _falcon(layers, hidden, heads, kv=None, new=False, multi_query=True, parallel=True,
            alibi=False, bias=False, vocab=65024):
    cfg = {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
        "new_decoder_architecture": new, "multi_query": multi_query, "parallel_attn": parallel,
        "alibi": alibi, "bias": bias, "vocab_size": vocab, "layer_norm_epsilon": 1e-5,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "activation": "gelu",
        "tie_word_embeddings": True, "bos_token_id": 11, "eos_token_id": 11,
    }
    if kv:
        cfg["num_kv_heads"] = kv
    return cfg


PRESETS = {
    "7B": _falcon(32, 4544, 71),
    "40B": _falcon(60, 8192, 128, kv=8, new=True),
    "180B": _falcon(80, 14848, 232, kv=8, new=True),
    "rw-1B": _falcon(24, 2048, 32, multi_query=False, parallel=False, alibi=True, bias=True,
                     vocab=50304),
    "tiny": _falcon(2, 64, 4, vocab=32000),
    "tiny-40B": _falcon(2, 64, 4, kv=2, new=True, vocab=32000),
}
