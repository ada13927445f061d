"""The tokenizer interface every family shares, built on megatron-core's tokenizer base classes.

``PatchTokenizer`` subclasses megatron-core 0.16's ``megatron.core.tokenizers.MegatronTokenizerBase``
(the type ``GPTDatasetConfig.tokenizer`` is annotated with) and the legacy
``megatron.core.datasets.megatron_tokenizer.MegatronLegacyTokenizer`` (what older code checks with
``isinstance``), so it can be handed to either. It provides what megatron-core's datasets read
(``vocab_size``, ``eod``, ``pad``, ``bos``, ``eos``, ``special_tokens_dict``,
``unique_identifiers``) and what our tools need (``tokenize`` without BOS, ``encode_batch``,
``detokenize``, ``apply_chat_template``, ``save_pretrained``/``files``).

``vocab_size`` is the *padded* size (see ``vocab.padded_vocab_size``); the tokenizer's own size is
``original_vocab_size``. When a family has no pad token, ``pad`` is ``eod`` (padding positions are
always excluded from the loss by masks, never by comparing with the pad id).

Default chat template (used when the tokenizer carries none): every message renders as
``"<|{role}|>\\n{content}\\n"``; ``add_generation_prompt`` appends ``"<|assistant|>\\n"``. The markers are
plain text, so any tokenizer can encode them; SFT builders append ``eos`` after assistant turns.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_patch.tokenizer.vocab import padded_vocab_size

DEFAULT_CHAT_TEMPLATE_DOC = "<|{role}|>\\n{content}\\n per message; generation prompt <|assistant|>\\n"


def render_default_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The documented default chat template (see the module docstring)."""
    parts = []
    for m in messages:
        parts.append(f"<|{m['role']}|>\n{m['content']}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def default_chat_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False):
    """(ids, trainable flags) of the default template, tokenised segment by segment, the one
    tokenisation both SFT (``data.sft.encode_chat``) and inference (``apply_chat_template(...,
    tokenize=True)``) use: ``<|role|>\\n{content}\\n`` per message; an assistant turn is
    ``<|assistant|>\\n`` then ``{content}\\n`` + eos (trainable); the generation prompt is
    ``<|assistant|>\\n``. (Tokenising the rendered text whole differs at the segment starts for
    SentencePiece, which gives every segment a leading ``▁``: a model trained on one would be
    prompted with the other.)"""
    ids: List[int] = []
    mask: List[bool] = []
    for m in messages:
        if m["role"] == "assistant":
            head = list(tokenizer.tokenize("<|assistant|>\n"))
            body = list(tokenizer.tokenize(m["content"] + "\n")) + [tokenizer.eos]
            ids += head + body
            mask += [False] * len(head) + [True] * len(body)
        else:
            seg = list(tokenizer.tokenize(f"<|{m['role']}|>\n{m['content']}\n"))
            ids += seg
            mask += [False] * len(seg)
    if add_generation_prompt:
        head = list(tokenizer.tokenize("<|assistant|>\n"))
        ids += head
        mask += [False] * len(head)
    return ids, mask


class PatchTokenizer(MegatronTokenizerBase, MegatronLegacyTokenizer):
    """Common part of all tokenizer families; subclasses implement the ``_``-prefixed hooks."""

    family = "base"

    def __init__(self, path: str, original_vocab_size: int, extra_vocab_size: int = 0,
                 make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1,
                 **options) -> None:
        # MegatronLegacyTokenizer.__init__ only logs a deprecation warning and fills the identifiers
        # set below, so only the new base initialiser runs.
        MegatronTokenizerBase.__init__(self, path, {})
        self.extra_vocab_size = int(extra_vocab_size)
        self._original_vocab_size = int(original_vocab_size)
        self._padded = padded_vocab_size(self._original_vocab_size, self.extra_vocab_size,
                                         make_vocab_size_divisible_by, tensor_model_parallel_size)
        self.make_vocab_size_divisible_by = make_vocab_size_divisible_by
        self.tensor_model_parallel_size = tensor_model_parallel_size
        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = [os.path.abspath(path)]
        self.unique_identifiers["extra_vocab_size"] = str(self.extra_vocab_size)
        for k, v in options.items():
            self.unique_identifiers[k] = str(v)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Padded vocabulary size: the embedding rows the model has."""
        return self._padded

    @property
    def padded_vocab_size(self) -> int:
        return self._padded

    @property
    def original_vocab_size(self) -> int:
        """Number of ids the tokenizer itself can produce (including its special tokens)."""
        return self._original_vocab_size

    # ---- special ids (subclasses set _bos/_eos/_pad/_eod/_unk) -------------------------------
    _bos: Optional[int] = None
    _eos: Optional[int] = None
    _eod: Optional[int] = None
    _pad: Optional[int] = None
    _unk: Optional[int] = None

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eos if self._eos is not None else self._eod

    @property
    def eos_token_id(self) -> int:
        return self.eos

    @property
    def bos(self) -> Optional[int]:
        return self._bos

    @property
    def pad(self) -> int:
        """The pad id; ``eod`` when the family has no pad token."""
        return self._pad if self._pad is not None else self._eod

    @property
    def pad_token_id(self) -> int:
        return self.pad

    @property
    def unk(self) -> Optional[int]:
        return self._unk

    @property
    def special_tokens_dict(self) -> Dict[str, str]:
        out = {}
        for name, i in (("bos_token", self._bos), ("eos_token", self.eos), ("pad_token", self.pad),
                        ("unk_token", self._unk)):
            if i is not None and 0 <= i < self.original_vocab_size:
                piece = self.id_to_piece(i)
                if piece is not None:
                    out[name] = piece
        return out

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        return []

    # ---- encoding ----------------------------------------------------------------------------
    def tokenize(self, text: str) -> List[int]:
        """Ids of ``text``; no BOS/EOS are added."""
        return self._encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """``[tokenize(t) for t in texts]``, done by the backend in one call where it can."""
        return [self._encode(t) for t in texts]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids])

    def offsets(self, ids, text):  # pragma: no cover - optional in megatron-core
        raise NotImplementedError

    def id_to_piece(self, i: int) -> Optional[str]:
        return self.inv_vocab.get(i)

    @property
    def vocab(self) -> Dict[str, int]:
        raise NotImplementedError

    @property
    def inv_vocab(self) -> Dict[int, str]:
        if not hasattr(self, "_inv_vocab_cache"):
            self._inv_vocab_cache = {v: k for k, v in self.vocab.items()}
        return self._inv_vocab_cache

    # ---- chat --------------------------------------------------------------------------------
    @property
    def chat_template(self) -> Optional[str]:
        """The tokenizer's own (jinja) template, or None when the default template is used."""
        return None

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        """Render ``messages`` (``[{role, content}]``) to text, or with ``tokenize`` to the ids
        SFT trains on (``default_chat_ids``: segment by segment, eos after assistant turns)."""
        if tokenize:
            return default_chat_ids(self, messages, add_generation_prompt)[0]
        return render_default_chat(messages, add_generation_prompt)

    # ---- files -------------------------------------------------------------------------------
    @property
    def files(self) -> List[str]:
        """The files that make up this tokenizer (copied by ``save_pretrained``)."""
        return []

    def _save_name(self, src: str) -> str:
        """File name a tokenizer file gets in a checkpoint folder (the family's standard name)."""
        return os.path.basename(src)

    def _extra_files(self) -> Dict[str, str]:
        """Generated files for ``save_pretrained``: name -> text (only written when absent)."""
        return {}

    def save_pretrained(self, directory: str) -> List[str]:
        """Copy the tokenizer files into ``directory`` (a checkpoint folder); returns the paths."""
        os.makedirs(directory, exist_ok=True)
        written = []
        for f in self.files:
            dst = os.path.join(directory, self._save_name(f))
            if os.path.abspath(f) != os.path.abspath(dst):
                shutil.copy2(f, dst)
            written.append(dst)
        for name, text in self._extra_files().items():
            dst = os.path.join(directory, name)
            if not os.path.exists(dst):
                with open(dst, "w", encoding="utf-8") as fh:
                    fh.write(text)
                written.append(dst)
        return written

    # ---- subclass hooks ----------------------------------------------------------------------
    def _encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def _decode(self, ids: List[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, original_vocab_size="
                f"{self.original_vocab_size}, vocab_size={self.vocab_size}, eod={self.eod}, "
                f"pad={self.pad}, bos={self.bos})")
