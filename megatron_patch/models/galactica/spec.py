"""Galactica / OPT layer spec: megatron-core's local GPT layer with LayerNorm and biases."""
from __future__ import annotations

from megatron_patch.models.common.spec import local_layer_spec


def layer_spec(arch, use_te: bool = False, flash: bool = False):
    return local_layer_spec(flash=flash, normalization="LayerNorm")
