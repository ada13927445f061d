"""Batch encoders for bulk preprocessing: flat numpy ids + offsets per batch of documents.

``make_batch_encoder(tokenizer, backend="auto")`` returns the fastest encoder that is *provably*
identical to the tokenizer's own ``tokenize`` on the texts it was checked on:

* ``gigatoken`` (optional package): a Rust re-implementation of byte-level BPE / SentencePiece BPE /
  tiktoken pre-tokenisation; built from the same files; about 5-20x faster per CPU second;
* ``reference``: the tokenizer's own batch call (``tokenizers``/``sentencepiece``/``tiktoken``).

``auto`` builds gigatoken when it is importable and supports the family, then compares its ids
with the reference on a built-in multilingual probe plus the caller's sample texts (``verify``),
and falls back to ``reference`` (saying why in ``fallback_reason``) on any difference.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import numpy as np

PROBE_TEXTS = [
    "Hello world",
    " Hello  world!\n\nThis is a test.  Tabs\there, numbers 12345 and 3.14159, e-mail-like a@b.c",
    "中共中央总书记、国家主席江泽民发表1998年新年讲话《迈向充满希望的新世纪》。",
    "混合 English 和中文，全角：１２３ＡＢＣ，标点“引号”……",
    "Ünïcödé façade naïve — em-dash – en-dash … ellipsis; emoji 😀🎉 and 한국어 日本語のテキスト",
    "def f(x):\n    return x ** 2  # code\n\n\n\tindent\r\nwindows line",
    "   leading spaces and trailing   ",
    "I'm you're they'll we've she'd IT'S DON'T",
    "<|endoftext|> <s> </s> special-looking strings",
    "",
    "a",
    "\n",
    "数字１２３４５６７８９０和ｆｕｌｌｗｉｄｔｈ",
    "Русский текст, ελληνικά, العربية, עברית, हिन्दी",
]


class BatchEncoder:
    """Reference encoder: the tokenizer's own batch encode."""

    name = "reference"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.fallback_reason: Optional[str] = None

    def encode_lists(self, texts: Sequence[str]) -> List[List[int]]:
        return self.tokenizer.encode_batch(texts)

    def encode_flat(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(ids uint32 [n_tokens], offsets int64 [n_docs + 1])."""
        lists = self.encode_lists(texts)
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.uint32,
                           count=int(offsets[-1]))
        return flat, offsets


class GigatokenEncoder(BatchEncoder):
    """gigatoken built from the same files as the tokenizer; sequential (one thread) per process."""

    name = "gigatoken"

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        import gigatoken as gt

        family = getattr(tokenizer, "family", None)
        if family == "sentencepiece":
            self.gt = gt.Tokenizer.from_json(_sentencepiece_json(tokenizer.model_file))
        elif family == "tiktoken":
            # no special tokens: ordinary encoding, like TiktokenTokenizer.tokenize
            self.gt = gt.Tokenizer.from_tiktoken(tokenizer.model_file, pretokenizer="qwen2",
                                                 special_tokens=None)
        elif family in ("hf", "gpt2bpe"):
            self.gt = gt.Tokenizer.from_json(tokenizer.backend_json())
        else:
            raise ValueError(f"gigatoken: unsupported tokenizer family {family!r}")

    def encode_flat(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        arr = self.gt.encode_batch(list(texts), parallel=False)
        layout = arr.layout
        offsets = np.asarray(layout.offsets, dtype=np.int64)
        flat = np.asarray(layout.content.data)
        if offsets[0] != 0:  # a sliced view: make it start at zero
            flat = flat[offsets[0]:offsets[-1]]
            offsets = offsets - offsets[0]
        else:
            flat = flat[:offsets[-1]]
        return flat, offsets

    def encode_lists(self, texts: Sequence[str]) -> List[List[int]]:
        return self.gt.encode_batch_list(list(texts), parallel=False)


def _sentencepiece_json(model_file: str) -> str:
    """gigatoken's tokenizer.json for a SentencePiece model, without added-token matching
    (sentencepiece never matches "<s>"/"</s>" written in text; the identity check proves the
    result). The conversion costs ~1 CPU-second, so it is cached under
    ``$MEGATRON_PATCH_CACHE`` (default ``~/.cache/megatron_patch``), keyed by the model's hash."""
    import hashlib
    import json
    import os

    with open(model_file, "rb") as f:
        data = f.read()
    from importlib.metadata import version

    key = hashlib.sha256(data + version("gigatoken").encode()).hexdigest()[:24]
    cache_dir = os.path.join(os.environ.get("MEGATRON_PATCH_CACHE") or
                             os.path.join(os.path.expanduser("~"), ".cache", "megatron_patch"),
                             "gigatoken")
    cached = os.path.join(cache_dir, f"spm_{key}.json")
    try:
        with open(cached, encoding="utf-8") as f:
            return f.read()
    except OSError:
        pass
    from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json

    spec = json.loads(sentencepiece_to_tokenizer_json(data))
    spec["added_tokens"] = []
    text = json.dumps(spec)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, cached)
    except OSError:
        pass
    return text


def first_mismatch(a: BatchEncoder, b: BatchEncoder, texts: Sequence[str]) -> Optional[int]:
    """Index of the first text on which the two encoders differ, or None."""
    fa, oa = a.encode_flat(texts)
    fb, ob = b.encode_flat(texts)
    if np.array_equal(oa, ob) and np.array_equal(fa, fb):
        return None
    for i in range(len(texts)):
        if not np.array_equal(fa[oa[i]:oa[i + 1]], fb[ob[i]:ob[i + 1]]):
            return i
    return 0


def gigatoken_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gigatoken") is not None


def make_batch_encoder(tokenizer, backend: str = "auto", verify: Sequence[str] = (),
                       check: bool = True) -> BatchEncoder:
    """The encoder named by ``backend`` (``auto``, ``gigatoken``, ``reference``).

    With ``check`` the fast encoder must reproduce the reference ids on ``PROBE_TEXTS + verify``;
    for ``auto`` a failure falls back to the reference (``fallback_reason`` says why), for an
    explicit ``gigatoken`` it raises."""
    ref = BatchEncoder(tokenizer)
    if backend == "reference":
        return ref
    if backend not in ("auto", "gigatoken"):
        raise ValueError(f"unknown encoder backend {backend!r} (auto, gigatoken, reference)")
    try:
        fast = GigatokenEncoder(tokenizer)
    except Exception as e:  # not installed / unsupported family
        if backend == "gigatoken":
            raise
        ref.fallback_reason = f"gigatoken unusable: {type(e).__name__}: {e}"
        return ref
    if check:
        texts = list(PROBE_TEXTS) + list(verify)
        bad = first_mismatch(ref, fast, texts)
        if bad is not None:
            msg = f"gigatoken ids differ from the reference on text {texts[bad][:80]!r}"
            if backend == "gigatoken":
                raise ValueError(msg)
            ref.fallback_reason = msg
            return ref
    return fast
