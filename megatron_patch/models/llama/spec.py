"""LLaMA layer spec: megatron-core's GPT layer with RMSNorm, SwiGLU, RoPE and GQA; with HF's
``attention_bias`` / ``mlp_bias`` the output projection / MLP linears carry a bias
(``common.spec.add_linear_biases``; the Q/K/V bias is megatron-core's ``add_qkv_bias``)."""
from __future__ import annotations

from megatron_patch.models.common.spec import add_linear_biases, local_layer_spec, te_layer_spec


def layer_spec(arch, use_te: bool = False, flash: bool = False):
    spec = te_layer_spec() if use_te else local_layer_spec(flash=flash, normalization="RMSNorm")
    return add_linear_biases(spec, proj=bool(arch.extra.get("proj_bias")),
                             mlp=bool(arch.extra.get("mlp_bias")))
