"""Config-table pieces shared by the LLaMA-shaped families (Qwen2, Mistral, Mixtral, GLM).

``llama_fields()`` is the LLaMA field list (layers, sizes, heads, KV groups, eps, vocab, positions,
rope theta, tied head); ``finish_llama_like`` derives ``kv_channels``, takes linear RoPE scaling
(``linear_rope_factor``; ``scale_rope_linear`` applies it to the built model) and YaRN
(``take_yarn``: megatron-core's ``YarnRotaryEmbedding``), and refuses the rope scalings it cannot
express (dynamic NTK, longrope, ...); ``check_hidden_act`` refuses an MLP activation other than SiLU (the
consts build SwiGLU, whatever ``hidden_act`` says). Each family builds its own ``ConfigTable`` from
these plus its consts.
"""
from __future__ import annotations

import torch.nn.functional as F

from megatron_patch.models.common.config import (
    Const, Field, MegatronArch, rope_scaling_of, rope_theta_get, rope_theta_put)


def llama_fields(theta_default: float = 10000.0):
    return [
        Field("num_hidden_layers", "num_layers"),
        Field("hidden_size", "hidden_size"),
        Field("intermediate_size", "ffn_hidden_size"),
        Field("num_attention_heads", "num_attention_heads"),
        Field("num_key_value_heads", "num_query_groups",
              get=lambda hf: hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        Field("rms_norm_eps", "layernorm_epsilon", default=1e-6),
        Field("vocab_size", "vocab_size", where="model"),
        Field("max_position_embeddings", "max_sequence_length", where="model", default=2048),
        Field("rope_theta", "rotary_base", where="model",
              get=lambda hf: rope_theta_get(hf, theta_default), put=rope_theta_put),
        Field("tie_word_embeddings", "share_embeddings_and_output_weights", where="model",
              default=False),
    ]


def llama_consts(qkv_bias: bool = False):
    return [
        Const("normalization", "RMSNorm"),
        Const("gated_linear_unit", True),
        Const("activation_func", F.silu),
        Const("add_bias_linear", False),
        Const("add_qkv_bias", qkv_bias),
        Const("position_embedding_type", "rope", where="model"),
    ]


# HF spellings of SiLU (ACT2FN): the only activation the SwiGLU consts express
SILU_ACTS = ("silu", "swish")


def check_hidden_act(hf: dict, family: str) -> None:
    """Refuse ``hidden_act`` other than SiLU: the model would convert into a different one."""
    act = hf.get("hidden_act") or hf.get("hidden_activation") or "silu"
    if act not in SILU_ACTS:
        raise ValueError(f"{family} hidden_act {act!r} is not supported (only silu)")


def finish_llama_like(hf: dict, arch: MegatronArch, family: str) -> None:
    check_hidden_act(hf, family)
    heads = arch.config["num_attention_heads"]
    arch.config["kv_channels"] = hf.get("head_dim") or arch.config["hidden_size"] // heads
    rs = rope_scaling_of(hf)
    if rs is None:
        return
    if rs.get("rope_type", rs.get("type")) == "yarn" and not arch.config.get("rotary_interleaved"):
        take_yarn(hf, rs, arch, family)
    else:
        arch.extra["rope_linear_factor"] = linear_rope_factor(rs, family, also=" and yarn")


def take_yarn(hf: dict, rs: dict, arch: MegatronArch, family: str) -> None:
    """``{"rope_type": "yarn", ...}`` (e.g. the setting Qwen2.5 suggests beyond 32K tokens) as
    megatron-core's ``YarnRotaryEmbedding`` (``position_embedding_type="yarn"``), which computes the
    inverse frequencies, the correction range and the attention factor with transformers'
    ``_compute_yarn_parameters`` formulas. Its settings are ``TransformerConfig`` attributes that the
    base class does not declare: ``arch.extra["yarn"]``, set on the config by the builder."""
    if rs.get("attention_factor") is not None:
        raise ValueError(f"{family} yarn rope scaling with an explicit attention_factor is not "
                         "supported (megatron-core derives it from factor and mscale)")
    orig = rs.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    try:  # transformers requires the factor too
        orig, factor = int(orig), float(rs["factor"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{family} yarn rope scaling needs a number 'factor' and "
                         f"'original_max_position_embeddings', got {rs!r}") from None
    if not factor > 0 or orig < 1:
        raise ValueError(f"{family} yarn rope scaling: factor must be > 0 and "
                         f"original_max_position_embeddings >= 1, got {rs!r}")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    both = bool(mscale and mscale_all_dim)  # transformers uses the two only together
    arch.model["position_embedding_type"] = "yarn"
    arch.extra["yarn"] = {
        "yarn_rotary_scaling_factor": factor,
        "yarn_original_max_position_embeddings": orig,
        "yarn_beta_fast": float(rs.get("beta_fast") or 32),
        "yarn_beta_slow": float(rs.get("beta_slow") or 1),
        "yarn_mscale": float(mscale) if both else None,
        "yarn_mscale_all_dim": float(mscale_all_dim) if both else None,
        "yarn_correction_range_round_to_int": bool(rs.get("truncate", True)),
    }


def linear_rope_factor(rs: dict, family: str, also: str = "") -> float:
    """The factor of a ``{"rope_type": "linear", "factor": f}`` scaling (positions divided by f, as
    in transformers' ``_compute_linear_scaling_rope_parameters``); any other kind is refused."""
    kind = rs.get("rope_type", rs.get("type"))
    if kind != "linear":
        raise ValueError(f"{family} rope scaling {rs!r} is not supported (only linear{also})")
    try:
        factor = float(rs["factor"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{family} linear rope scaling needs a number 'factor', got {rs!r}") from None
    if not factor > 0:
        raise ValueError(f"{family} linear rope scaling factor must be > 0, got {factor}")
    return factor


def scale_rope_linear(model, factor: float) -> None:
    """Divide the built model's RoPE inverse frequencies by ``factor``: transformers' arithmetic
    (``inv_freq / factor``, then position x inv_freq), so the angles are bitwise its angles.
    megatron-core's ``seq_len_interpolation_factor`` scales the positions instead, which rounds
    differently for factors that are not powers of two."""
    emb = getattr(model, "rotary_pos_emb", None)
    if emb is not None:
        emb.inv_freq = emb.inv_freq / factor
