"""Reward (and value) models: megatron-core's ``GPTModel`` whose last stage ends in a scalar head.

The head ``rm_head`` ([1, hidden], optional bias) replaces the LM head and reads the final
hidden states (after the final norm). It is replicated on every tensor-parallel rank: its input is
the full hidden state (gathered first under sequence parallelism), so every rank computes the same
value and gets the same gradient. The checkpoint name ``rm_head.*`` is the one the conversion
engine maps to ``score.weight`` of HF ``*ForSequenceClassification``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


class GPTRewardModel(GPTModel):
    """``forward(tokens, position_ids, attention_mask)`` returns per-position scalars [b, s] on the
    last pipeline stage (hidden states elsewhere, as ``GPTModel``)."""

    def __init__(self, *args, head_bias: bool = False, **kwargs):
        kwargs["share_embeddings_and_output_weights"] = False
        super().__init__(*args, **kwargs)
        if self.post_process:
            self.output_layer = None  # no LM head
            cfg = self.config
            self.rm_head = torch.nn.Linear(cfg.hidden_size, 1, bias=head_bias,
                                           dtype=cfg.params_dtype)
            with torch.no_grad():
                cfg.init_method(self.rm_head.weight)  # the default generator: same on TP ranks
                if head_bias:
                    self.rm_head.bias.zero_()
            for p in self.rm_head.parameters():
                p.tensor_model_parallel = False
                p.partition_dim = -1
                p.partition_stride = 1

    def _postprocess(self, hidden_states, **kwargs):
        if not self.post_process:
            return hidden_states
        if self.config.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]
            hidden_states = gather_from_sequence_parallel_region(hidden_states)
        values = self.rm_head(hidden_states).squeeze(-1)  # [s, b]
        return values.transpose(0, 1).contiguous().float()  # [b, s]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[Dict] = None):
        # LanguageModule's LM-head bookkeeping expects output_layer on the last stage; the value
        # head is an ordinary replicated module, so collect the state as a middle stage would.
        post = self.post_process
        self.post_process = False
        try:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self.post_process = post
