"""GLM layer spec: megatron-core's GPT layer (partial, interleaved RoPE and QKV bias come from config)."""
from __future__ import annotations

from megatron_patch.models.common.spec import local_layer_spec, te_layer_spec


def layer_spec(arch, use_te: bool = False, flash: bool = False):
    if use_te:
        return te_layer_spec()
    return local_layer_spec(flash=flash, normalization="RMSNorm")
