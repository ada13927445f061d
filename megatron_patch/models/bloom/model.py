"""Bloom model fix-up: the LayerNorm after the word embeddings."""
from __future__ import annotations

from megatron_patch.models.common.embedding import add_embedding_norm


def post_build(model, arch) -> None:
    add_embedding_norm(model, eps=arch.extra.get("embedding_norm_eps", 1e-5))
