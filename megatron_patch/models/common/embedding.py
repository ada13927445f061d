"""Embedding variants megatron-core's ``LanguageModelEmbedding`` lacks, attached by a family's
``post_build`` to the built ``GPTModel`` (only on the stage that has the embedding):

- ``add_embedding_norm``: a LayerNorm right after the word embeddings (Bloom's
  ``word_embeddings_layernorm``); state-dict key ``embedding.word_embeddings_layernorm.*``.
- ``add_position_offset``: learned positions looked up at ``position + offset`` from a table with
  ``offset`` extra leading rows (OPT/Galactica keep 2 unused rows), so the HF table converts as is.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

from megatron_patch.models.common.modules import Norm


class NormedEmbedding(LanguageModelEmbedding):
    """``LanguageModelEmbedding`` followed by a per-token norm (applied after megatron's
    scatter to the sequence-parallel region, which a per-token norm does not mind)."""

    def forward(self, input_ids, position_ids, tokentype_ids=None):
        out = super().forward(input_ids, position_ids, tokentype_ids=tokentype_ids)
        return self.word_embeddings_layernorm(out)


def add_embedding_norm(model, eps: float) -> None:
    emb = getattr(model, "embedding", None)
    if emb is None:
        return
    emb.word_embeddings_layernorm = Norm(model.config, model.config.hidden_size, eps=eps,
                                         normalization="LayerNorm")
    emb.__class__ = NormedEmbedding


class OffsetPositionEmbedding(torch.nn.Embedding):
    """Looks up ``position_ids + offset``; the first ``offset`` rows are never used."""

    def __init__(self, num_positions: int, dim: int, offset: int, dtype=None):
        super().__init__(num_positions + offset, dim, dtype=dtype)
        self.offset = offset

    def forward(self, position_ids):
        return super().forward(position_ids + self.offset)


def add_position_offset(model, offset: int) -> None:
    emb = getattr(model, "embedding", None)
    if emb is None or getattr(emb, "position_embeddings", None) is None:
        return
    old = emb.position_embeddings
    new = OffsetPositionEmbedding(old.num_embeddings, old.embedding_dim, offset,
                                  dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[offset:].copy_(old.weight)  # keep megatron's initialisation for used rows
    emb.position_embeddings = new
