"""Resolve a tokenizer key (``llamabpe``, ``qwenbpe``, ...) or a path to a tokenizer location.

Keys follow PAI-Megatron-Patch's ``TOKENIZER`` argument. A key ``K`` names the folder
``$TOKENIZER_PATH/K``; the expected layout is::

    $TOKENIZER_PATH/
      llamabpe/   tokenizer.model (LLaMA SentencePiece) and/or an HF tokenizer folder
      bloombpe/   tokenizer.json + tokenizer_config.json (HF)
      qwenbpe/    qwen.tiktoken (or an HF tokenizer folder)
      gpt2bpe/    vocab.json + merges.txt (or tokenizer.json)
      glmbpe/     tokenizer.json (HF) or tokenizer.model
      falconbpe/  tokenizer.json (HF)

Anything that is not a known key is taken as a path (file or folder).
"""
from __future__ import annotations

import os

TOKENIZER_KEYS = ("llamabpe", "bloombpe", "qwenbpe", "gpt2bpe", "glmbpe", "falconbpe")


def resolve_tokenizer_path(key_or_path: str, tokenizer_root: str | None = None) -> str:
    """Return an existing file or folder for ``key_or_path``.

    ``tokenizer_root`` defaults to the ``TOKENIZER_PATH`` environment variable. Raises
    ``FileNotFoundError`` naming the key and the place looked in when nothing is found.
    """
    if not key_or_path:
        raise ValueError("empty tokenizer key or path")
    expanded = os.path.expanduser(key_or_path)
    if os.path.exists(expanded):
        return expanded
    if key_or_path in TOKENIZER_KEYS:
        root = tokenizer_root if tokenizer_root is not None else os.environ.get("TOKENIZER_PATH")
        if not root:
            raise FileNotFoundError(
                f"tokenizer key {key_or_path!r}: set TOKENIZER_PATH to the folder holding "
                f"{key_or_path}/ (known keys: {', '.join(TOKENIZER_KEYS)}), or pass a path")
        candidate = os.path.join(os.path.expanduser(root), key_or_path)
        if os.path.exists(candidate):
            return candidate
        raise FileNotFoundError(f"tokenizer key {key_or_path!r}: {candidate} does not exist "
                                f"(TOKENIZER_PATH={root})")
    raise FileNotFoundError(f"tokenizer {key_or_path!r} is neither an existing path nor a known key "
                            f"({', '.join(TOKENIZER_KEYS)})")
