"""Mistral layer spec: megatron-core's GPT layer (the sliding window comes from config.window_size).

The SDPA core attention (``flash=True`` without Transformer Engine) has no sliding window, so a
windowed model keeps megatron-core's ``DotProductAttention``.
"""
from __future__ import annotations

from megatron_patch.models.common.spec import local_layer_spec, te_layer_spec


def layer_spec(arch, use_te: bool = False, flash: bool = False):
    if use_te:
        return te_layer_spec()
    return local_layer_spec(flash=flash and not arch.config.get("window_size"),
                            normalization="RMSNorm")
