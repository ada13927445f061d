"""Bloom layer spec: megatron-core's local GPT layer with LayerNorm and the ALiBi core attention."""
from __future__ import annotations

from megatron_patch.models.common.alibi import AlibiDotProductAttention
from megatron_patch.models.common.spec import local_layer_spec


def layer_spec(arch, use_te: bool = False, flash: bool = False):
    return local_layer_spec(core_attention=AlibiDotProductAttention, normalization="LayerNorm")
