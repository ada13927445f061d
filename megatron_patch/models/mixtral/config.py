"""Mixtral: HF ``MixtralConfig`` <-> megatron-core MoE settings, and size presets.

Routing: HF takes the softmax over all experts, keeps the top k and renormalises them; megatron-core's
default router (``moe_router_pre_softmax=False``) takes the top k logits and a softmax over them,
which is the same distribution. One expert per token (``num_experts_per_tok=1``) is refused: HF
renormalises its weight to 1, megatron-core requires the pre-softmax router then, which weighs it by
its probability. ``router_jitter_noise`` applies in training only (``modules.TrainingJitterRouter``);
note that HF jitters the MoE block's input (router and experts), megatron-core the router's input.
Dropless (no capacity factor). On CPU the builder picks the
``allgather`` token dispatcher (gloo cannot gather uneven sizes).
"""
from __future__ import annotations

from megatron_patch.models.common.config import Const, ConfigTable, Field, MegatronArch
from megatron_patch.models.common.llama_like import finish_llama_like, llama_consts, llama_fields


def _finish(hf: dict, arch: MegatronArch) -> None:
    finish_llama_like(hf, arch, "Mixtral")
    arch.config["moe_ffn_hidden_size"] = arch.config["ffn_hidden_size"]
    if int(arch.config["moe_router_topk"]) < 2:
        raise ValueError(f"Mixtral num_experts_per_tok={arch.config['moe_router_topk']} is not "
                         "supported (at least 2: megatron-core's top-1 router does not renormalise "
                         "the expert weight to 1 as transformers does)")
    if hf.get("sliding_window"):
        arch.config["window_size"] = (int(hf["sliding_window"]) - 1, 0)
    if hf.get("router_jitter_noise"):
        arch.config["moe_input_jitter_eps"] = float(hf["router_jitter_noise"])


TABLE = ConfigTable(
    "mixtral",
    fields=llama_fields(1000000.0) + [
        Field("num_local_experts", "num_moe_experts"),
        Field("num_experts_per_tok", "moe_router_topk"),
        Field("router_aux_loss_coef", "moe_aux_loss_coeff", default=0.02),
    ],
    consts=llama_consts() + [
        Const("moe_router_load_balancing_type", "aux_loss"),
        Const("moe_router_pre_softmax", False),
    ],
    finish=_finish,
    class_defaults={"num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                    "num_local_experts": 8, "num_experts_per_tok": 2,
                    "router_aux_loss_coef": 0.001},  # MixtralConfig's
)


def _mixtral(layers, hidden, ffn, heads, kv, experts=8, topk=2, vocab=32000, max_pos=32768):
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None,
        "num_local_experts": experts, "num_experts_per_tok": topk, "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    }


PRESETS = {
    "8x7B": _mixtral(32, 4096, 14336, 32, 8),
    "8x22B": _mixtral(56, 6144, 16384, 48, 8, vocab=32768, max_pos=65536),
    "tiny": _mixtral(2, 64, 96, 4, 2, experts=4, vocab=32000, max_pos=512),
}
