"""Falcon layer spec: megatron-core's local GPT layer with the project's ``ParallelResidualLayer``
(parallel attention + MLP; one shared norm unless the new architecture's two), and the scaled ALiBi
core attention for Falcon-RW."""
from __future__ import annotations

from megatron.core.transformer.identity_op import IdentityOp

from megatron_patch.models.common.alibi import ScaledAlibiDotProductAttention
from megatron_patch.models.common.parallel_layer import ParallelResidualLayer
from megatron_patch.models.common.spec import local_layer_spec


def layer_spec(arch, use_te: bool = False, flash: bool = False):
    x = arch.extra
    spec = local_layer_spec(
        core_attention=ScaledAlibiDotProductAttention if x["alibi"] else None,
        flash=flash and not x["alibi"],
        layer_module=ParallelResidualLayer if x["parallel_attn"] else None,
        normalization="LayerNorm")
    if x["parallel_attn"] and not x["two_norms"]:
        spec.submodules.pre_mlp_layernorm = IdentityOp
    return spec
