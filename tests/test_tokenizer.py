"""Tokenizers: vocab padding numbers, per-family special ids with real tokenizer files, key
resolution, megatron-core compatibility, chat templates, save_pretrained, and the fast encoder's
identity with the reference tokenizers on real corpora."""
import json
import os

import numpy as np
import pytest

from data_fixtures import (chatterbot_dialogs, gpt2_folder, llama_model, peoples_daily,
                           qwen_tiktoken, train_bpe_folder)
from megatron_patch.tokenizer import (build_tokenizer, detect_kind, padded_vocab_size,
                                      resolve_tokenizer_path)
from megatron_patch.tokenizer.fast import (GigatokenEncoder, gigatoken_available,
                                           make_batch_encoder)


@pytest.mark.parametrize("orig,extra,div,tp,expected", [
    (32000, 0, 128, 2, 32000),     # 32000 = 125 * 256
    (32000, 0, 128, 1, 32000),
    (50257, 0, 128, 1, 50304),     # GPT-2: 393 * 128
    (32000, 3, 128, 8, 32768),     # 32003 -> multiple of 1024
    (151851, 0, 128, 1, 151936),   # Qwen-7B's padded size
    (151851, 0, 128, 4, 152064),   # 512 * 297
    (250680, 0, 128, 1, 250752),   # Bloom
    (65024, 0, 128, 1, 65024),     # ChatGLM2
    (1, 0, 1, 1, 1),
    (100, 28, 128, 1, 128),
    (100, 29, 128, 1, 256),
])
def test_padded_vocab_size(orig, extra, div, tp, expected):
    assert padded_vocab_size(orig, extra, div, tp) == expected


def test_padded_vocab_size_rejects_nonsense():
    with pytest.raises(ValueError):
        padded_vocab_size(0)
    with pytest.raises(ValueError):
        padded_vocab_size(10, -1)
    with pytest.raises(ValueError):
        padded_vocab_size(10, 0, 0)


def test_llama_sentencepiece():
    tok = build_tokenizer("auto", llama_model(), extra_vocab_size=0,
                          make_vocab_size_divisible_by=128, tensor_model_parallel_size=2)
    assert tok.family == "sentencepiece"
    assert tok.tokenize("Hello world") == [22557, 1526]  # no BOS by default
    assert (tok.bos, tok.eos, tok.eod) == (1, 2, 2)
    assert tok.pad == tok.eod == 2  # LLaMA has no pad piece: pad = eod (documented)
    assert tok.original_vocab_size == 32000 and tok.vocab_size == 32000
    assert tok.detokenize(tok.tokenize("你好，世界 hello")) == "你好，世界 hello"
    assert tok.special_tokens_dict["bos_token"] == "<s>"
    for name in ("GPTSentencePieceTokenizer", "Llama2Tokenizer", "sentencepiece"):
        assert build_tokenizer(name, llama_model()).tokenize("Hello world") == [22557, 1526]
    tok8 = build_tokenizer("sentencepiece", llama_model(), extra_vocab_size=3,
                           tensor_model_parallel_size=8)
    assert tok8.vocab_size == 32768 and tok8.original_vocab_size == 32000


def test_gpt2_bpe(tmp_path):
    folder = gpt2_folder(tmp_path)
    tok = build_tokenizer("GPT2BPETokenizer", folder)
    assert tok.tokenize("Hello world") == [15496, 995]
    assert tok.eod == tok.eos == tok.bos == tok.pad == 50256
    assert (tok.original_vocab_size, tok.vocab_size) == (50257, 50304)
    by_files = build_tokenizer("gpt2bpe", None, vocab_file=os.path.join(folder, "vocab.json"),
                               merge_file=os.path.join(folder, "merges.txt"))
    assert by_files.tokenize("Hello world") == [15496, 995]
    assert detect_kind(folder) == "gpt2bpe"
    # identical to transformers' GPT2TokenizerFast loaded from the folder
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(folder)
    text = "Hello world, 你好! It's 2024.\n\n  spaces"
    assert tok.tokenize(text) == hf.encode(text, add_special_tokens=False)
    assert tok.detokenize(tok.tokenize(text)) == text


def test_qwen_tiktoken():
    tok = build_tokenizer("auto", qwen_tiktoken())
    assert tok.family == "tiktoken"
    assert tok.eod == tok.eos == tok.pad == 151643
    assert tok.bos is None
    assert tok.special_ids["<|im_start|>"] == 151644 and tok.special_ids["<|im_end|>"] == 151645
    assert min(tok.special_ids.values()) == 151643
    assert tok.original_vocab_size == 151851 and tok.vocab_size == 151936
    # special-token strings in raw text are plain text
    assert 151643 not in tok.tokenize("a <|endoftext|> b")
    text = "Qwen 通义千问 tiktoken 测试\n"
    assert tok.detokenize(tok.tokenize(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  tokenize=True)
    assert ids[0] == 151644 and ids.count(151645) == 1


def test_bloom_and_glm_trained_in_process(tmp_path):
    texts = peoples_daily(300) + [q + " " + a for q, a in chatterbot_dialogs()[:300]]
    bloom = build_tokenizer("hf", train_bpe_folder(str(tmp_path / "bloom"), texts, "bloom"))
    assert (bloom.bos, bloom.eos, bloom.eod, bloom.pad) == (1, 2, 2, 3)
    glm = build_tokenizer("HuggingFaceTokenizer",
                          train_bpe_folder(str(tmp_path / "glm"), texts, "glm"))
    assert (glm.bos, glm.eos, glm.eod) == (1, 2, 2)
    assert glm.pad == glm.eod  # no pad token
    s = "人民日报 People's Daily 1998"
    assert bloom.detokenize(bloom.tokenize(s)) == s
    assert bloom.tokenize(s) == bloom.backend.encode(s, add_special_tokens=False).ids


def test_resolve_tokenizer_keys(tmp_path, monkeypatch):
    folder = gpt2_folder(tmp_path)
    os.rename(folder, tmp_path / "gpt2bpe")
    monkeypatch.setenv("TOKENIZER_PATH", str(tmp_path))
    assert resolve_tokenizer_path("gpt2bpe") == str(tmp_path / "gpt2bpe")
    assert build_tokenizer("auto", "gpt2bpe").tokenize("Hello world") == [15496, 995]
    with pytest.raises(FileNotFoundError, match="llamabpe"):
        resolve_tokenizer_path("llamabpe")
    monkeypatch.delenv("TOKENIZER_PATH")
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        resolve_tokenizer_path("qwenbpe")
    with pytest.raises(FileNotFoundError, match="nosuch"):
        resolve_tokenizer_path(str(tmp_path / "nosuch"))
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("wordpiece", str(tmp_path / "gpt2bpe"))


def test_megatron_core_compatibility(tmp_path):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer
    from megatron.core.tokenizers import MegatronTokenizerBase

    tok = build_tokenizer("auto", llama_model())
    assert isinstance(tok, MegatronTokenizerBase) and isinstance(tok, MegatronLegacyTokenizer)
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=16, blend=None, split="1,0,0",
                           tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False)
    assert cfg.tokenizer.eod == 2
    assert json.loads(tok.unique_description)["class"] == "SentencePieceTokenizer"
    from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

    mock = MockGPTLowLevelDataset(tok)
    assert mock.vocab_size == 32000 and mock.eod_token == 2


def test_chat_templates(tmp_path):
    tok = build_tokenizer("auto", llama_model())
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == \
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    texts = [q + " " + a for q, a in chatterbot_dialogs()[:200]]
    folder = train_bpe_folder(str(tmp_path / "chat"), texts, "bloom")
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
                            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    json.dump(cfg, open(cfg_path, "w"))
    hf = build_tokenizer("hf", folder)
    out = hf.apply_chat_template(msgs[1:], add_generation_prompt=True)
    assert out == "user: Hi</s>assistant: "
    assert hf.apply_chat_template(msgs[1:], tokenize=True)[-1] == hf.eos


def test_save_pretrained_round_trip(tmp_path):
    for kind, path in (("sentencepiece", llama_model()), ("gpt2bpe", gpt2_folder(tmp_path)),
                       ("tiktoken", qwen_tiktoken())):
        tok = build_tokenizer(kind, path)
        dst = tmp_path / f"ckpt_{kind}"
        tok.save_pretrained(str(dst))
        again = build_tokenizer("auto", str(dst))
        s = "Hello 世界, checkpoint folders carry their tokenizer."
        assert again.tokenize(s) == tok.tokenize(s)
        assert (again.eod, again.pad, again.bos) == (tok.eod, tok.pad, tok.bos)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt_sentencepiece"))
    assert hf.encode("Hello world", add_special_tokens=False) == [22557, 1526]


def _corpus(n_zh=6000):
    return peoples_daily(n_zh) + [q + "\n" + a for q, a in chatterbot_dialogs()]


@pytest.mark.skipif(not gigatoken_available(), reason="gigatoken not installed")
@pytest.mark.parametrize("family", ["sentencepiece", "gpt2bpe", "tiktoken", "hf"])
def test_fast_encoder_identical_on_corpus(family, tmp_path):
    paths = {"sentencepiece": llama_model, "tiktoken": qwen_tiktoken,
             "gpt2bpe": lambda: gpt2_folder(tmp_path)}
    texts = _corpus(2500 if family in ("gpt2bpe", "tiktoken") else 8000)
    if family == "hf":
        path = train_bpe_folder(str(tmp_path / "bloom"), texts[:2000], "bloom", vocab_size=2000)
    else:
        path = paths[family]()
    tok = build_tokenizer(family, path)
    enc = make_batch_encoder(tok, "gigatoken")
    assert isinstance(enc, GigatokenEncoder)
    flat, offs = enc.encode_flat(texts)
    ref = tok.encode_batch(texts)
    for i, ids in enumerate(ref):
        assert flat[offs[i]:offs[i + 1]].tolist() == ids, texts[i][:60]


def test_reference_encoder_flat(tmp_path):
    tok = build_tokenizer("auto", llama_model())
    enc = make_batch_encoder(tok, "reference")
    flat, offs = enc.encode_flat(["Hello world", "", "a"])
    assert offs.tolist() == [0, 2, 2, offs[-1]]
    assert flat[:2].tolist() == [22557, 1526]
    assert flat.dtype == np.uint32


def test_fast_encoder_falls_back_on_any_difference(monkeypatch):
    from megatron_patch.tokenizer import fast

    tok = build_tokenizer("auto", llama_model())
    if gigatoken_available():
        real = fast.GigatokenEncoder.encode_flat

        def off_by_one(self, texts):
            flat, offs = real(self, texts)
            if len(flat):
                flat = flat.copy()
                flat[-1] += 1
            return flat, offs

        monkeypatch.setattr(fast.GigatokenEncoder, "encode_flat", off_by_one)
        enc = make_batch_encoder(tok, "auto", verify=["Hello world"])
        assert enc.name == "reference" and "differ" in enc.fallback_reason
        with pytest.raises(ValueError, match="differ"):
            make_batch_encoder(tok, "gigatoken")

    def unusable(self, tokenizer):
        raise ImportError("no gigatoken here")

    monkeypatch.setattr(fast.GigatokenEncoder, "__init__", unusable)
    enc = make_batch_encoder(tok, "auto")
    assert enc.name == "reference" and "no gigatoken here" in enc.fallback_reason
