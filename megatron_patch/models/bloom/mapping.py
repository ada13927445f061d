"""Bloom HF <-> Megatron weight table. HF Bloom's fused ``query_key_value`` is laid out per head as
[q, k, v], which is Megatron's per-group order with one group per head (``qkv("grouped")``)."""
from megatron_patch.convert.mapping import Mapping, Row
from megatron_patch.convert.rules import COLUMN, REPLICATED, ROW, VOCAB, qkv

T = "transformer."
L = T + "h.{i}."
M = "decoder.layers.{i}."


def rows(arch):
    out = [Row(f"{T}word_embeddings.weight", "embedding.word_embeddings.weight", VOCAB)]
    for p in ("weight", "bias"):
        out += [
            Row(f"{T}word_embeddings_layernorm.{p}", f"embedding.word_embeddings_layernorm.{p}",
                REPLICATED),
            Row(f"{L}input_layernorm.{p}", f"{M}input_layernorm.{p}", REPLICATED),
            Row(f"{L}self_attention.query_key_value.{p}", f"{M}self_attention.linear_qkv.{p}",
                qkv("grouped")),
            Row(f"{L}post_attention_layernorm.{p}", f"{M}pre_mlp_layernorm.{p}", REPLICATED),
            Row(f"{L}mlp.dense_h_to_4h.{p}", f"{M}mlp.linear_fc1.{p}", COLUMN),
            Row(f"{T}ln_f.{p}", f"decoder.final_layernorm.{p}", REPLICATED),
        ]
    out += [
        Row(f"{L}self_attention.dense.weight", f"{M}self_attention.linear_proj.weight", ROW),
        Row(f"{L}self_attention.dense.bias", f"{M}self_attention.linear_proj.bias", REPLICATED),
        Row(f"{L}mlp.dense_4h_to_h.weight", f"{M}mlp.linear_fc2.weight", ROW),
        Row(f"{L}mlp.dense_4h_to_h.bias", f"{M}mlp.linear_fc2.bias", REPLICATED),
    ]
    if not arch.model.get("share_embeddings_and_output_weights"):
        out.append(Row("lm_head.weight", "output_layer.weight", VOCAB))
    return out


MAPPING = Mapping(rows)
