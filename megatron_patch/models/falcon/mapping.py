"""Falcon HF <-> Megatron weight table. Every Falcon variant stores ``query_key_value`` in Megatron's
per-group order (multi-query: [q_0..q_{n-1}, k, v]; multi-head: [q, k, v] per head; new
architecture: per KV group), so it converts with ``qkv("grouped")``; the norms depend on the variant."""
from megatron_patch.convert.mapping import Mapping, Row
from megatron_patch.convert.rules import COLUMN, REPLICATED, ROW, VOCAB, qkv

T = "transformer."
L = T + "h.{i}."
M = "decoder.layers.{i}."


def rows(arch):
    x = arch.extra
    bias = bool(arch.config.get("add_bias_linear"))
    if x["two_norms"]:
        norms = [("ln_attn", "input_layernorm"), ("ln_mlp", "pre_mlp_layernorm")]
    elif x["parallel_attn"]:
        norms = [("input_layernorm", "input_layernorm")]
    else:
        norms = [("input_layernorm", "input_layernorm"), ("post_attention_layernorm", "pre_mlp_layernorm")]
    out = [Row(f"{T}word_embeddings.weight", "embedding.word_embeddings.weight", VOCAB)]
    for p in ("weight", "bias"):
        out += [Row(f"{L}{h}.{p}", f"{M}{m}.{p}", REPLICATED) for h, m in norms]
        out.append(Row(f"{T}ln_f.{p}", f"decoder.final_layernorm.{p}", REPLICATED))
    out += [
        Row(f"{L}self_attention.query_key_value.weight", f"{M}self_attention.linear_qkv.weight",
            qkv("grouped")),
        Row(f"{L}self_attention.dense.weight", f"{M}self_attention.linear_proj.weight", ROW),
        Row(f"{L}mlp.dense_h_to_4h.weight", f"{M}mlp.linear_fc1.weight", COLUMN),
        Row(f"{L}mlp.dense_4h_to_h.weight", f"{M}mlp.linear_fc2.weight", ROW),
    ]
    if bias:
        out += [
            Row(f"{L}self_attention.query_key_value.bias", f"{M}self_attention.linear_qkv.bias",
                qkv("grouped")),
            Row(f"{L}self_attention.dense.bias", f"{M}self_attention.linear_proj.bias", REPLICATED),
            Row(f"{L}mlp.dense_h_to_4h.bias", f"{M}mlp.linear_fc1.bias", COLUMN),
            Row(f"{L}mlp.dense_4h_to_h.bias", f"{M}mlp.linear_fc2.bias", REPLICATED),
        ]
    if not arch.model.get("share_embeddings_and_output_weights"):
        out.append(Row("lm_head.weight", "output_layer.weight", VOCAB))
    return out


MAPPING = Mapping(rows)
