"""Logits at selected positions only: ``logits_at(model, rows, cols)``.

A loss over some tokens of a batch (an RL response, an SFT answer) needs the output layer, the
vocabulary softmax and their gradients at those positions only, but megatron-core's
``GPTModel.forward`` runs the output layer over every position of ``[s, b, h]``. On a small model
that layer is the largest GEMM and the softmax over the vocabulary the largest elementwise pass
(an 8 x 48-token PPO batch with 16-token responses: 3x the work that the loss reads).

Within ``with logits_at(model, rows, cols) as on:`` a forward hook on the model's decoder (the
``TransformerBlock``, whose output already went through the final norm) passes on only the hidden
states at ``(rows[i], cols[i])``, as a sequence of ``N`` positions of one sample ``[N, 1, h]``;
``GPTModel._postprocess`` then runs the output layer on them unchanged and returns logits
``[1, N, v]`` (``[1, N, v/tp]`` at tensor parallel > 1, the same vocabulary shard). ``on`` is False
(and nothing changes) where the selection would be wrong: a stage without the output layer,
sequence parallelism or context parallelism (the decoder's output is a shard of the sequence), or
multi-token prediction (which reads every position). Each selected logit is the same dot products
as the full output layer's (the row of a GEMM); a different GEMM shape can round differently in the
last bit, so callers compare the two with a float tolerance.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from megatron.core.utils import unwrap_model

_ATTR = "_mp_logit_positions"


def supported(model) -> bool:
    """Whether ``logits_at`` can select on this model (stage)."""
    m = unwrap_model(model)
    cfg = getattr(m, "config", None)
    out = getattr(m, "output_layer", None)
    return (getattr(m, "post_process", False) and out is not None and cfg is not None
            and hasattr(m, "decoder") and not getattr(out, "sequence_parallel", False)
            and getattr(cfg, "context_parallel_size", 1) == 1
            and getattr(cfg, "mtp_num_layers", None) is None)


def _select(decoder, args, output):
    sel = getattr(decoder, _ATTR, None)
    if sel is None:
        return output
    rows, cols = sel
    return output[cols, rows].unsqueeze(1)  # [s, b, h] -> [N, 1, h]


@contextmanager
def logits_at(model, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[bool]:
    """Forwards of ``model`` inside the block return logits ``[1, N, v]`` at the positions
    ``(rows[i], cols[i])`` (sample, position) only; yields whether the selection is on (see the
    module docstring for when it is not: then forwards return ``[b, s, v]`` as usual)."""
    if not supported(model):
        yield False
        return
    decoder = unwrap_model(model).decoder
    if not hasattr(decoder, "_mp_logit_hook"):
        decoder._mp_logit_hook = decoder.register_forward_hook(_select)
    setattr(decoder, _ATTR, (rows.to(torch.long), cols.to(torch.long)))
    try:
        yield True
    finally:
        setattr(decoder, _ATTR, None)
