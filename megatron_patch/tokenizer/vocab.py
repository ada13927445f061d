"""Vocabulary padding: the embedding table is sized to a multiple of
``make_vocab_size_divisible_by x tensor_model_parallel_size`` so that every tensor-parallel rank
holds an equal, aligned slice (Megatron's ``_vocab_size_with_padding``), after appending
``extra_vocab_size`` new rows (PAI's ``EXTRA_VOCAB_SIZE``, e.g. for added special tokens).
"""
from __future__ import annotations


def padded_vocab_size(original: int, extra: int = 0, divisible_by: int = 128,
                      tensor_model_parallel_size: int = 1) -> int:
    """``original + extra`` rounded up to a multiple of ``divisible_by * tensor_model_parallel_size``.

    >>> padded_vocab_size(32000, 0, 128, 2)
    32000
    >>> padded_vocab_size(50257)
    50304
    """
    if original <= 0 or extra < 0:
        raise ValueError(f"bad vocabulary sizes: original={original}, extra={extra}")
    if divisible_by <= 0 or tensor_model_parallel_size <= 0:
        raise ValueError(f"divisible_by ({divisible_by}) and tensor_model_parallel_size "
                         f"({tensor_model_parallel_size}) must be positive")
    multiple = divisible_by * tensor_model_parallel_size
    size = original + extra
    return ((size + multiple - 1) // multiple) * multiple
