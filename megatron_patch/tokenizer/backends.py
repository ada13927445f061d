"""Tokenizer families: HF ``tokenizer.json`` folders, LLaMA-style SentencePiece ``.model`` files,
GPT-2 ``vocab.json`` + ``merges.txt``, and Qwen's ``.tiktoken`` ranks.

Special ids per family (what ``eod``/``pad``/``bos``/``eos`` resolve to):

========================  =====================  ======================  ===================
family                    bos                    eos = eod               pad
========================  =====================  ======================  ===================
SentencePiece (LLaMA)     ``bos_id()`` (1)       ``eos_id()`` (2)        ``pad_id()``, else eod
GPT-2 BPE                 50256                  ``<|endoftext|>`` 50256 eod
Qwen tiktoken             None                   ``<|endoftext|>`` 151643 eod
HF folder (Bloom, ...)    ``bos_token``          ``eos_token``           ``pad_token``, else eod
========================  =====================  ======================  ===================

For HF folders the tokens come from ``tokenizer_config.json``/``special_tokens_map.json``; without
them the usual names (``<s>``, ``</s>``, ``<|endoftext|>``, ``<pad>``) are looked up in the vocab.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from megatron_patch.tokenizer.base import PatchTokenizer

# ------------------------------------------------------------------------------------------------
# HF tokenizer.json
# ------------------------------------------------------------------------------------------------

_HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
                  "merges.txt", "generation_config.json")


def _token_content(tok) -> Optional[str]:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


def _read_json(path: str) -> dict:
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
                return data if isinstance(data, dict) else {}
            except json.JSONDecodeError:
                return {}
    return {}


class HFTokenizer(PatchTokenizer):
    """A ``tokenizers`` fast tokenizer from ``tokenizer.json`` (+ the HF side files in its folder)."""

    family = "hf"

    def __init__(self, path: str, backend=None, **kw) -> None:
        from tokenizers import Tokenizer

        if backend is None:
            json_path = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
            if not os.path.isfile(json_path):
                raise FileNotFoundError(f"HF tokenizer: no tokenizer.json at {path}")
            try:
                backend = Tokenizer.from_file(json_path)
            except Exception as e:  # tokenizers raises a bare Exception on a corrupt file
                raise ValueError(f"HF tokenizer: cannot read {json_path}: {e}") from None
            self._json_path = json_path
        else:
            self._json_path = None
        self.backend = backend
        self.folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        self._config = _read_json(os.path.join(self.folder, "tokenizer_config.json"))
        smap = _read_json(os.path.join(self.folder, "special_tokens_map.json"))
        for k, v in smap.items():
            self._config.setdefault(k, v)
        original = backend.get_vocab_size(with_added_tokens=True)
        super().__init__(path, original, **kw)
        self._resolve_specials()

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    def _first_present(self, names: Sequence[str]) -> Optional[int]:
        for n in names:
            i = self.backend.token_to_id(n)
            if i is not None:
                return i
        return None

    def _resolve_specials(self) -> None:
        cfg = self._config
        eos = self._id(_token_content(cfg.get("eos_token")))
        if eos is None:
            eos = self._first_present(("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>",
                                       "<|im_end|>", "<|eot_id|>"))
        bos = self._id(_token_content(cfg.get("bos_token")))
        if bos is None and "bos_token" not in cfg:
            bos = self._first_present(("<s>", "<|begin_of_text|>", "<bos>"))
        pad = self._id(_token_content(cfg.get("pad_token")))
        if pad is None and "pad_token" not in cfg:
            pad = self._first_present(("<pad>", "[PAD]", "<|pad|>"))
        unk = self._id(_token_content(cfg.get("unk_token")))
        if unk is None:
            unk = self._first_present(("<unk>",))
        if eos is None:
            raise ValueError(f"HF tokenizer {self.path}: cannot determine the end-of-document token "
                             "(set eos_token in tokenizer_config.json)")
        self._eos = self._eod = eos
        self._bos, self._pad, self._unk = bos, pad, unk

    def _encode(self, text: str) -> List[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def _decode(self, ids: List[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> Optional[str]:
        return self.backend.id_to_token(i)

    @property
    def vocab(self) -> Dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        out = []
        for t in self._config.get("additional_special_tokens") or []:
            i = self._id(_token_content(t))
            if i is not None:
                out.append(i)
        return out

    # -- chat --
    @property
    def chat_template(self) -> Optional[str]:
        tpl = self._config.get("chat_template")
        jinja = os.path.join(self.folder, "chat_template.jinja")
        if tpl is None and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                tpl = f.read()
        if isinstance(tpl, list):  # named templates: [{name, template}]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        return tpl

    def apply_chat_template(self, messages, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        tpl = self.chat_template
        if tpl is None:
            return super().apply_chat_template(messages, add_generation_prompt, tokenize)
        text = _render_jinja(tpl, messages, add_generation_prompt,
                             bos_token=_token_content(self._config.get("bos_token")) or "",
                             eos_token=_token_content(self._config.get("eos_token")) or "", **kwargs)
        return self.tokenize(text) if tokenize else text

    @property
    def files(self) -> List[str]:
        out = []
        if self._json_path:
            out.append(self._json_path)
        for name in _HF_SIDE_FILES:
            p = os.path.join(self.folder, name)
            if os.path.isfile(p) and (self._json_path or name != "tokenizer_config.json"):
                out.append(p)
        return out

    def backend_json(self) -> str:
        """The tokenizer.json text (used to build a faster, verified-identical backend)."""
        return self.backend.to_str()


def _render_jinja(template: str, messages, add_generation_prompt: bool, **context) -> str:
    """Render an HF chat template with jinja2 the way transformers does (trim_blocks, lstrip)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages),
                                            add_generation_prompt=add_generation_prompt, **context)


# ------------------------------------------------------------------------------------------------
# GPT-2 vocab.json + merges.txt
# ------------------------------------------------------------------------------------------------

class GPT2BPETokenizer(HFTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``: eod = bos = eos = ``<|endoftext|>``."""

    family = "gpt2bpe"

    def __init__(self, path: str, vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                 **kw) -> None:
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        if vocab_file is None:
            vocab_file = path if os.path.isfile(path) else os.path.join(path, "vocab.json")
        if merge_file is None:
            merge_file = os.path.join(os.path.dirname(os.path.abspath(vocab_file)), "merges.txt")
        for f in (vocab_file, merge_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"GPT-2 BPE tokenizer: missing {f}")
        self._vocab_file, self._merge_file = vocab_file, merge_file
        backend = Tokenizer(BPE.from_file(vocab_file, merge_file))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
        super().__init__(path, backend=backend, **kw)
        self._bos = self._eos = self._eod = backend.token_to_id("<|endoftext|>")
        self._pad = None

    @property
    def chat_template(self):
        return None

    @property
    def files(self) -> List[str]:
        return [self._vocab_file, self._merge_file]

    def _save_name(self, src: str) -> str:
        return "vocab.json" if src == self._vocab_file else "merges.txt"


# ------------------------------------------------------------------------------------------------
# SentencePiece (LLaMA-1/2, Mistral, Baichuan-style .model)
# ------------------------------------------------------------------------------------------------

class SentencePieceTokenizer(PatchTokenizer):
    """A SentencePiece ``.model``: bos = ``bos_id()``, eos = eod = ``eos_id()``, pad = ``pad_id()`` or
    eod when the model has none (LLaMA's has none)."""

    family = "sentencepiece"

    def __init__(self, path: str, **kw) -> None:
        import sentencepiece as spm

        model = path if os.path.isfile(path) else os.path.join(path, "tokenizer.model")
        if not os.path.isfile(model):
            raise FileNotFoundError(f"SentencePiece tokenizer: no tokenizer.model at {path}")
        self.model_file = model
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model)
        except (RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError on a bad file
            raise ValueError(f"SentencePiece tokenizer: cannot read {model} ({e}); expected a "
                             "SentencePiece .model (for a tokenizer.json folder pass the folder)"
                             ) from None
        super().__init__(path, self.sp.get_piece_size(), **kw)
        as_id = lambda i: i if i is not None and i >= 0 else None  # noqa: E731
        self._bos = as_id(self.sp.bos_id())
        self._eos = self._eod = as_id(self.sp.eos_id())
        self._pad = as_id(self.sp.pad_id())
        self._unk = as_id(self.sp.unk_id())
        if self._eod is None:
            raise ValueError(f"SentencePiece model {model} has no eos piece to use as eod")
        folder = os.path.dirname(os.path.abspath(model))
        self._side = [os.path.join(folder, n) for n in ("tokenizer_config.json",
                                                          "special_tokens_map.json")
                      if os.path.isfile(os.path.join(folder, n))]
        self._config = _read_json(os.path.join(folder, "tokenizer_config.json"))

    def _encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts), num_threads=1)

    def _decode(self, ids: List[int]) -> str:
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> Optional[str]:
        return self.sp.id_to_piece(i)

    @property
    def vocab(self) -> Dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}

    @property
    def chat_template(self):
        return self._config.get("chat_template")

    def apply_chat_template(self, messages, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        tpl = self.chat_template
        if tpl is None:
            return super().apply_chat_template(messages, add_generation_prompt, tokenize)
        text = _render_jinja(tpl, messages, add_generation_prompt,
                             bos_token=self.sp.id_to_piece(self._bos) if self._bos is not None else "",
                             eos_token=self.sp.id_to_piece(self._eos), **kwargs)
        return self._tokenize_template_text(text) if tokenize else text

    def _tokenize_template_text(self, text: str) -> List[int]:
        """Ids of a rendered chat template: the model's control pieces written in it (``<s>``,
        ``</s>``, ``[INST]`` where it is one) are those tokens, as ``transformers`` reads its
        special tokens in template text; the text between them is encoded as usual. (Plain
        ``tokenize`` keeps reading them as text, so data cannot inject control tokens.)"""
        import re

        if not hasattr(self, "_control_re"):
            control = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                       if self.sp.is_control(i)}
            self._control = control
            self._control_re = re.compile("|".join(
                re.escape(p) for p in sorted(control, key=len, reverse=True))) if control else None
        if self._control_re is None:
            return self.tokenize(text)
        ids: List[int] = []
        pos = 0
        for m in self._control_re.finditer(text):
            if m.start() > pos:
                ids += self.sp.encode(text[pos:m.start()])
            ids.append(self._control[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.sp.encode(text[pos:])
        return ids

    @property
    def files(self) -> List[str]:
        return [self.model_file] + self._side

    def _save_name(self, src: str) -> str:
        return "tokenizer.model" if src == self.model_file else os.path.basename(src)

    def _extra_files(self) -> Dict[str, str]:
        # Without a config naming the class, transformers' AutoTokenizer mis-reads a bare .model.
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
               "legacy": True}
        for name, i in (("bos_token", self._bos), ("eos_token", self._eos), ("unk_token", self._unk)):
            if i is not None:
                cfg[name] = self.sp.id_to_piece(i)
        return {"tokenizer_config.json": json.dumps(cfg, indent=2)}


# ------------------------------------------------------------------------------------------------
# Qwen tiktoken
# ------------------------------------------------------------------------------------------------

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(205))
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def load_tiktoken_ranks(path: str) -> Dict[bytes, int]:
    """The mergeable ranks of a ``.tiktoken`` file (``<base64 token> <rank>`` per line), read from
    the file itself. (``tiktoken.load.load_tiktoken_bpe`` caches files by their *path* in
    ``$TMPDIR/data-gym-cache``: a file replaced at the same path would be read stale.)"""
    import base64
    import binascii

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tiktoken tokenizer: no file {path}")
    with open(path, "rb") as f:
        data = f.read()
    ranks: Dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"tiktoken tokenizer: {path}:{n}: expected '<base64 token> <rank>', "
                             f"got {line[:60]!r}") from None
    if not ranks:
        raise ValueError(f"tiktoken tokenizer: {path} holds no tokens")
    return ranks


class TiktokenTokenizer(PatchTokenizer):
    """Qwen(-1) ``qwen.tiktoken``: mergeable ranks, then the special tokens from id
    ``len(ranks)`` (151643) on: ``<|endoftext|>`` (= eod = eos = pad), ``<|im_start|>``,
    ``<|im_end|>``, ``<|extra_0..204|>``. ``tokenize`` encodes special-token *strings* in text as
    ordinary text (``encode_ordinary``), so raw data cannot inject control tokens; the chat template
    is ChatML and ``apply_chat_template(tokenize=True)`` maps its markers to their ids."""

    family = "tiktoken"

    def __init__(self, path: str, **kw) -> None:
        import tiktoken

        if os.path.isdir(path):
            cands = sorted(f for f in os.listdir(path) if f.endswith(".tiktoken"))
            if not cands:
                raise FileNotFoundError(f"tiktoken tokenizer: no *.tiktoken file in {path}")
            model = os.path.join(path, "qwen.tiktoken" if "qwen.tiktoken" in cands else cands[0])
        else:
            model = path
        self.model_file = model
        ranks = load_tiktoken_ranks(model)
        start = len(ranks)
        self.special_ids = {tok: start + i for i, tok in enumerate(QWEN_SPECIALS)}
        self.enc = tiktoken.Encoding(os.path.basename(model), pat_str=QWEN_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=self.special_ids)
        super().__init__(path, start + len(QWEN_SPECIALS), **kw)
        self._eod = self._eos = self.special_ids["<|endoftext|>"]
        self._bos = None
        self._pad = None

    def _encode(self, text: str) -> List[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=1)

    def _decode(self, ids: List[int]) -> str:
        return self.enc.decode(ids)

    def id_to_piece(self, i: int) -> Optional[str]:
        try:
            return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")
        except KeyError:
            return None

    @property
    def vocab(self) -> Dict[str, int]:
        out = {}
        for i in range(self.enc.n_vocab):
            try:
                out[self.enc.decode_single_token_bytes(i).decode("latin-1")] = i
            except KeyError:
                pass
        return out

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        return sorted(self.special_ids.values())

    @property
    def chat_template(self) -> str:
        return QWEN_CHAT_TEMPLATE

    def apply_chat_template(self, messages, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        text = _render_jinja(QWEN_CHAT_TEMPLATE, messages, add_generation_prompt)
        if not tokenize:
            return text
        return self.enc.encode(text, allowed_special={"<|im_start|>", "<|im_end|>"},
                               disallowed_special=())

    @property
    def files(self) -> List[str]:
        return [self.model_file]
