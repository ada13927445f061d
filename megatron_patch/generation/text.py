"""Decoding generated token ids into the text they add to their prompt."""
from __future__ import annotations

from typing import Sequence

CONTEXT_TOKENS = 4  # prompt tokens decoded with a response (decode_response)


def decode_response(tokenizer, prompt: Sequence[int], ids: Sequence[int]) -> str:
    """The text of the response ``ids`` as it reads after its prompt: the last few prompt tokens
    are decoded with it and their own text taken off the front. Decoding the response alone loses
    what a token's text depends on its left neighbour for, e.g. the leading space of a
    SentencePiece / Metaspace word piece ("Hello" + "▁world" reads "Hello world", but
    "▁world" alone decodes to "world"); where the context does not decode to a prefix of the
    whole (an incomplete UTF-8 sequence in it), the response is decoded alone. An empty
    ``prompt`` decodes the response alone (a chat message, which starts its own text)."""
    ctx = list(prompt[-CONTEXT_TOKENS:])
    if not ctx or not ids:
        return tokenizer.detokenize(list(ids))
    head, full = tokenizer.detokenize(ctx), tokenizer.detokenize(ctx + list(ids))
    if head and full.startswith(head) and "\ufffd" not in head:
        return full[len(head):]
    return tokenizer.detokenize(list(ids))
