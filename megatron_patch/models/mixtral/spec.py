"""Mixtral layer spec: megatron-core's local GPT layer with a MoE MLP (``SequentialMLP`` experts) and
the router that jitters its input in training only (``modules.TrainingJitterRouter``).

The SDPA core attention (``flash=True`` without Transformer Engine) has no sliding window, so a
windowed model keeps megatron-core's ``DotProductAttention``.
"""
from __future__ import annotations

import copy

from megatron_patch.models.common.spec import local_layer_spec, te_layer_spec
from megatron_patch.models.mixtral.modules import TrainingJitterRouter


def layer_spec(arch, use_te: bool = False, flash: bool = False):
    experts = arch.config["num_moe_experts"]
    if use_te:
        spec = copy.deepcopy(te_layer_spec(num_experts=experts))
    else:
        spec = local_layer_spec(num_experts=experts,
                                flash=flash and not arch.config.get("window_size"),
                                normalization="RMSNorm")
    spec.submodules.mlp.submodules.router = TrainingJitterRouter
    return spec
