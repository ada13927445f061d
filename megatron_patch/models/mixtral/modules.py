"""Mixtral router: megatron-core's ``TopKRouter`` with HF Mixtral's jitter rule.

megatron-core's ``TopKRouter.apply_input_jitter`` multiplies the router input by noise
(``moe_input_jitter_eps``) in training *and* evaluation; HF Mixtral applies ``router_jitter_noise``
in training only, so evaluation and generation would be random and differ from ``transformers``.
``TrainingJitterRouter`` jitters only while ``self.training``.
"""
from __future__ import annotations

from megatron.core.transformer.moe.router import TopKRouter


class TrainingJitterRouter(TopKRouter):
    def apply_input_jitter(self, input):
        if not self.training:
            return input
        return super().apply_input_jitter(input)
