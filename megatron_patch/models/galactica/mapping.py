"""Galactica / OPT HF <-> Megatron weight table (the position table keeps OPT's 2 offset rows)."""
from megatron_patch.convert.mapping import Mapping, Row
from megatron_patch.convert.rules import COLUMN, REPLICATED, ROW, VOCAB, qkv

D = "model.decoder."
L = D + "layers.{i}."
M = "decoder.layers.{i}."


def rows(arch):
    bias = bool(arch.config.get("add_bias_linear", True))
    out = [
        Row(f"{D}embed_tokens.weight", "embedding.word_embeddings.weight", VOCAB),
        Row(f"{D}embed_positions.weight", "embedding.position_embeddings.weight", REPLICATED),
        Row(f"{D}final_layer_norm.weight", "decoder.final_layernorm.weight", REPLICATED),
        Row(f"{D}final_layer_norm.bias", "decoder.final_layernorm.bias", REPLICATED),
    ]
    for p in ("weight", "bias"):
        out += [
            Row(f"{L}self_attn_layer_norm.{p}", f"{M}input_layernorm.{p}", REPLICATED),
            Row(f"{L}final_layer_norm.{p}", f"{M}pre_mlp_layernorm.{p}", REPLICATED),
        ]
    out += [
        Row((f"{L}self_attn.q_proj.weight", f"{L}self_attn.k_proj.weight", f"{L}self_attn.v_proj.weight"),
            f"{M}self_attention.linear_qkv.weight", qkv()),
        Row(f"{L}self_attn.out_proj.weight", f"{M}self_attention.linear_proj.weight", ROW),
        Row(f"{L}fc1.weight", f"{M}mlp.linear_fc1.weight", COLUMN),
        Row(f"{L}fc2.weight", f"{M}mlp.linear_fc2.weight", ROW),
    ]
    if bias:
        out += [
            Row((f"{L}self_attn.q_proj.bias", f"{L}self_attn.k_proj.bias", f"{L}self_attn.v_proj.bias"),
                f"{M}self_attention.linear_qkv.bias", qkv()),
            Row(f"{L}self_attn.out_proj.bias", f"{M}self_attention.linear_proj.bias", REPLICATED),
            Row(f"{L}fc1.bias", f"{M}mlp.linear_fc1.bias", COLUMN),
            Row(f"{L}fc2.bias", f"{M}mlp.linear_fc2.bias", REPLICATED),
        ]
    if not arch.model.get("share_embeddings_and_output_weights"):
        out.append(Row("lm_head.weight", "output_layer.weight", VOCAB))
    return out


MAPPING = Mapping(rows)
