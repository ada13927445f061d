"""Parallel attention + MLP residual layer (GPT-J / Falcon), which megatron-core lacks: its
``TransformerLayer.forward`` is sequential only.

``ParallelResidualLayer`` computes ``out = (mlp(ln_mlp(x)) + attn(ln_attn(x))) + x``, in the order
Falcon sums it. ``input_layernorm`` is ``ln_attn``; ``pre_mlp_layernorm`` is ``ln_mlp``, or an
``IdentityOp`` for one shared norm (Falcon-7B), in which case the MLP reads the attention's norm
output. Set it through ``spec.module``; all submodules are the usual megatron-core ones.
"""
from __future__ import annotations

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


class ParallelResidualLayer(TransformerLayer):
    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                attention_bias=None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        inference_context = inference_context or kwargs.pop("inference_params", None)
        residual = hidden_states
        ln_attn = self.input_layernorm(hidden_states)
        shared = isinstance(self.pre_mlp_layernorm, IdentityOp)
        ln_mlp = ln_attn if shared else self.pre_mlp_layernorm(hidden_states)
        attn_out, attn_bias = self.self_attention(
            ln_attn, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset)
        mlp_out, mlp_bias = self.mlp(ln_mlp)
        if attn_bias is not None:
            attn_out = attn_out + attn_bias
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        drop = self.hidden_dropout if self.training else 0.0
        if drop:
            attn_out = torch_dropout(attn_out, drop)
            mlp_out = torch_dropout(mlp_out, drop)
        out = (mlp_out + attn_out) + residual  # [s, b, h]
        out = make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True)
        return out, context


def torch_dropout(x, p):
    import torch.nn.functional as F

    return F.dropout(x, p=p, training=True)
