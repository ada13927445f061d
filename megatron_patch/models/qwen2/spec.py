"""Qwen2 layer spec: megatron-core's GPT layer with RMSNorm, SwiGLU, RoPE, GQA (bias via config).

With a sliding window (``use_sliding_window``) the layers keep megatron-core's
``DotProductAttention``, which applies ``config.window_size`` on the layers that
``window_attn_skip_freq`` marks (the SDPA core attention has no window), as Mistral's do.
"""
from __future__ import annotations

from megatron_patch.models.common.spec import local_layer_spec, te_layer_spec


def layer_spec(arch, use_te: bool = False, flash: bool = False):
    if use_te:
        return te_layer_spec()
    return local_layer_spec(flash=flash and not arch.config.get("window_size"),
                            normalization="RMSNorm")
