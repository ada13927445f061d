"""Mapping rows shared by the LLaMA-shaped families (LLaMA, Qwen2, Mistral, Mixtral, GLM).

These families name their HF weights the same way (``model.layers.{i}.self_attn.q_proj`` ...); each
family's ``mapping.py`` calls ``llama_rows`` with its switches, so the table stays in one place.
"""
from __future__ import annotations

from typing import List

from megatron_patch.convert.mapping import Row
from megatron_patch.convert.rules import GATED, GATED_FUSED, REPLICATED, ROW, VOCAB, qkv


def llama_rows(arch, *, qkv_bias: bool = False, fused_gate_up: bool = False,
               moe: bool = False, prefix: str = "model.", proj_bias: bool = False,
               mlp_bias: bool = False) -> List[Row]:
    L = f"{prefix}layers.{{i}}."
    M = "decoder.layers.{i}."
    rows = [
        Row(f"{prefix}embed_tokens.weight", "embedding.word_embeddings.weight", VOCAB),
        Row(f"{L}input_layernorm.weight", f"{M}input_layernorm.weight", REPLICATED),
        Row((f"{L}self_attn.q_proj.weight", f"{L}self_attn.k_proj.weight",
             f"{L}self_attn.v_proj.weight"), f"{M}self_attention.linear_qkv.weight", qkv()),
        Row(f"{L}self_attn.o_proj.weight", f"{M}self_attention.linear_proj.weight", ROW),
        Row(f"{L}post_attention_layernorm.weight", f"{M}pre_mlp_layernorm.weight", REPLICATED),
    ]
    if qkv_bias:
        rows.append(Row((f"{L}self_attn.q_proj.bias", f"{L}self_attn.k_proj.bias",
                         f"{L}self_attn.v_proj.bias"), f"{M}self_attention.linear_qkv.bias", qkv()))
    if proj_bias:  # a row-parallel bias is added once, after the reduction: every TP rank's copy
        rows.append(Row(f"{L}self_attn.o_proj.bias", f"{M}self_attention.linear_proj.bias",
                        REPLICATED))
    if mlp_bias:
        if moe or fused_gate_up:
            raise ValueError("mlp_bias is mapped for the separate gate/up projections only")
        rows += [
            Row((f"{L}mlp.gate_proj.bias", f"{L}mlp.up_proj.bias"), f"{M}mlp.linear_fc1.bias",
                GATED),
            Row(f"{L}mlp.down_proj.bias", f"{M}mlp.linear_fc2.bias", REPLICATED),
        ]
    if moe:  # Mixtral's on-disk names: block_sparse_moe.gate + experts.{e}.w1 (gate) / w3 (up) / w2
        E = f"{L}block_sparse_moe.experts.{{e}}."
        X = f"{M}mlp.experts.local_experts.{{e}}."
        rows += [
            Row(f"{L}block_sparse_moe.gate.weight", f"{M}mlp.router.weight", REPLICATED),
            Row((f"{E}w1.weight", f"{E}w3.weight"), f"{X}linear_fc1.weight", GATED),
            Row(f"{E}w2.weight", f"{X}linear_fc2.weight", ROW),
        ]
    elif fused_gate_up:
        rows += [
            Row(f"{L}mlp.gate_up_proj.weight", f"{M}mlp.linear_fc1.weight", GATED_FUSED),
            Row(f"{L}mlp.down_proj.weight", f"{M}mlp.linear_fc2.weight", ROW),
        ]
    else:
        rows += [
            Row((f"{L}mlp.gate_proj.weight", f"{L}mlp.up_proj.weight"), f"{M}mlp.linear_fc1.weight",
                GATED),
            Row(f"{L}mlp.down_proj.weight", f"{M}mlp.linear_fc2.weight", ROW),
        ]
    rows.append(Row(f"{prefix}norm.weight", "decoder.final_layernorm.weight", REPLICATED))
    if not arch.model.get("share_embeddings_and_output_weights"):
        rows.append(Row("lm_head.weight", "output_layer.weight", VOCAB))
    return rows


__all__ = ["llama_rows"]
