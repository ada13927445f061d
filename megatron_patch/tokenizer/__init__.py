"""Tokenizers for megatron-core: ``build_tokenizer(kind, path, extra_vocab_size, ...)`` returns a
``PatchTokenizer`` (a megatron-core ``MegatronTokenizerBase``) for an HF ``tokenizer.json`` folder,
a SentencePiece ``.model``, GPT-2 ``vocab.json``/``merges.txt`` or a Qwen ``.tiktoken`` file, with
the vocabulary padded to a multiple of ``make_vocab_size_divisible_by x TP``.

``kind`` is ``auto`` (detected from the path), ``hf``, ``sentencepiece``, ``gpt2bpe``, ``tiktoken``,
or one of Megatron-LM's names (``HuggingFaceTokenizer``, ``GPTSentencePieceTokenizer``,
``Llama2Tokenizer``, ``GPT2BPETokenizer``, ...). ``path`` may be a key (``llamabpe``, ``qwenbpe``,
...) resolved through ``$TOKENIZER_PATH`` (see ``resolve``).
"""
from __future__ import annotations

import os
from typing import Optional

from megatron_patch.tokenizer.base import PatchTokenizer, render_default_chat
from megatron_patch.tokenizer.resolve import TOKENIZER_KEYS, resolve_tokenizer_path
from megatron_patch.tokenizer.vocab import padded_vocab_size

KIND_ALIASES = {
    "auto": "auto",
    "hf": "hf", "huggingface": "hf", "huggingfacetokenizer": "hf", "autotokenizer": "hf",
    "sentencepiece": "sentencepiece", "spm": "sentencepiece",
    "gptsentencepiecetokenizer": "sentencepiece", "llama2tokenizer": "sentencepiece",
    "llamatokenizer": "sentencepiece", "sentencepiecetokenizer": "sentencepiece",
    "gpt2bpe": "gpt2bpe", "gpt2bpetokenizer": "gpt2bpe", "gpt2": "gpt2bpe",
    "tiktoken": "tiktoken", "tiktokentokenizer": "tiktoken", "qwentokenizer": "tiktoken",
}


def normalize_kind(kind: Optional[str]) -> str:
    key = (kind or "auto").replace("-", "").replace("_", "").lower()
    if key not in KIND_ALIASES:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use one of auto, hf, sentencepiece, "
                         "gpt2bpe, tiktoken (or Megatron-LM's HuggingFaceTokenizer, "
                         "GPTSentencePieceTokenizer, Llama2Tokenizer, GPT2BPETokenizer)")
    return KIND_ALIASES[key]


def detect_kind(path: str) -> str:
    """Guess the tokenizer family from a file or folder."""
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name.endswith(".model") or ".model." in name:
            return "sentencepiece"
        if name.endswith(".tiktoken"):
            return "tiktoken"
        if name.endswith(".json"):
            return "gpt2bpe" if name == "vocab.json" else "hf"
        raise ValueError(f"cannot tell the tokenizer kind of file {path}")
    if os.path.isdir(path):
        files = set(os.listdir(path))
        if "tokenizer.json" in files:
            return "hf"
        if any(f.endswith(".tiktoken") for f in files):
            return "tiktoken"
        if "tokenizer.model" in files:
            return "sentencepiece"
        if {"vocab.json", "merges.txt"} <= files:
            return "gpt2bpe"
        raise ValueError(f"no tokenizer files in {path} (expected tokenizer.json, tokenizer.model, "
                         "*.tiktoken or vocab.json + merges.txt)")
    raise FileNotFoundError(f"tokenizer path {path} does not exist")


def build_tokenizer(kind: Optional[str], path: Optional[str], extra_vocab_size: int = 0,
                    make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1,
                    vocab_file: Optional[str] = None, merge_file: Optional[str] = None
                    ) -> PatchTokenizer:
    """Build the tokenizer ``kind`` from ``path`` (a file, folder or ``TOKENIZER_PATH`` key)."""
    kind = normalize_kind(kind)
    if path is None and vocab_file is not None:
        path = vocab_file
    if path is None:
        raise ValueError("build_tokenizer: no tokenizer path given")
    path = resolve_tokenizer_path(path)
    if kind == "auto":
        kind = detect_kind(path)
    kw = dict(extra_vocab_size=extra_vocab_size,
              make_vocab_size_divisible_by=make_vocab_size_divisible_by,
              tensor_model_parallel_size=tensor_model_parallel_size)
    from megatron_patch.tokenizer import backends

    if kind == "hf":
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            # an HF folder of the slow kind: route to the matching family
            return build_tokenizer(detect_kind(path), path, extra_vocab_size,
                                   make_vocab_size_divisible_by, tensor_model_parallel_size)
        return backends.HFTokenizer(path, **kw)
    if kind == "sentencepiece":
        return backends.SentencePieceTokenizer(path, **kw)
    if kind == "gpt2bpe":
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "vocab.json")) \
                and os.path.isfile(os.path.join(path, "tokenizer.json")) and vocab_file is None:
            return backends.HFTokenizer(path, **kw)
        return backends.GPT2BPETokenizer(path, vocab_file=vocab_file, merge_file=merge_file, **kw)
    if kind == "tiktoken":
        return backends.TiktokenTokenizer(path, **kw)
    raise AssertionError(kind)


__all__ = ["build_tokenizer", "resolve_tokenizer_path", "padded_vocab_size", "PatchTokenizer",
           "TOKENIZER_KEYS", "detect_kind", "normalize_kind", "render_default_chat"]
