"""Layer-spec builders shared by the families.

``local_layer_spec`` starts from megatron-core's own ``get_gpt_layer_local_spec`` and swaps in what
the family needs (our SP-capable ``Norm``, a different core attention, a different layer class).
``te_layer_spec`` is megatron-core's Transformer Engine spec. ``block_spec`` wraps a layer spec into a
``TransformerBlock`` spec whose final norm is ours too.
"""
from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from megatron_patch.models.common.modules import Norm, SDPAttention, with_bias


def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401

        from megatron.core.models.gpt import gpt_layer_specs

        return bool(gpt_layer_specs.HAVE_TE)
    except Exception:
        return False


def local_layer_spec(num_experts: Optional[int] = None, qk_layernorm: bool = False,
                     flash: bool = False, core_attention=None, layer_module=None,
                     normalization: str = "LayerNorm") -> ModuleSpec:
    """megatron-core's local GPT layer with our norms; optional core attention / layer class."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm,
        normalization=normalization))
    sub = spec.submodules
    sub.input_layernorm = Norm
    sub.pre_mlp_layernorm = Norm
    attn = sub.self_attention.submodules
    if qk_layernorm:
        attn.q_layernorm = Norm
        attn.k_layernorm = Norm
    if core_attention is not None:
        attn.core_attention = core_attention
    elif flash:
        attn.core_attention = SDPAttention
    if layer_module is not None:
        spec.module = layer_module
    return spec


def te_layer_spec(num_experts: Optional[int] = None, qk_layernorm: bool = False) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm)


def add_linear_biases(spec: ModuleSpec, proj: bool = False, mlp: bool = False) -> ModuleSpec:
    """A copy of the layer ``spec`` whose attention output projection (``proj``) and / or MLP
    linears (``mlp``) carry a bias (``modules.with_bias``)."""
    if not (proj or mlp):
        return spec
    spec = copy.deepcopy(spec)
    sub = spec.submodules
    if proj:
        attn = sub.self_attention.submodules
        attn.linear_proj = with_bias(attn.linear_proj)
    if mlp:
        if not isinstance(sub.mlp, ModuleSpec) or not hasattr(sub.mlp.submodules, "linear_fc1"):
            raise ValueError("an MLP bias needs a dense MLP spec")
        m = sub.mlp.submodules
        m.linear_fc1, m.linear_fc2 = with_bias(m.linear_fc1), with_bias(m.linear_fc2)
    return spec


def block_spec(layer_spec: ModuleSpec, config, vp_stage: Optional[int] = None,
               final_norm=Norm) -> ModuleSpec:
    """A TransformerBlock spec with this rank's layers and our final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer_spec] * num_layers, layer_norm=final_norm))
