"""Instruction data: exact loss masks per SFT format, packing (positions, boundaries, attention),
truncation and padding, reward pairs/lists, RL prompts, malformed lines, and sample_stats."""
import importlib.util
import json
import os

import pytest
import torch

from data_fixtures import chatterbot_dialogs, llama_model, train_bpe_folder
from megatron_patch.data.reward import RewardDataset
from megatron_patch.data.rl import PromptDataset
from megatron_patch.data.sft import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX,
                                     SFTDataset, block_causal_mask, collate, make_packed_sample,
                                     pack)
from megatron_patch.tokenizer import build_tokenizer
from megatron_patch.tokenizer.base import PatchTokenizer

N = IGNORE_INDEX


class WordTokenizer(PatchTokenizer):
    """Whitespace words -> fixed ids (0 = unknown); <s>=1, </s>=2 = eod, no pad (pad = eod)."""

    family = "word"

    def __init__(self, words):
        self.v = {"<unk>": 0, "<s>": 1, "</s>": 2}
        for w in words:
            self.v.setdefault(w, len(self.v))
        super().__init__(os.getcwd(), len(self.v))
        self._bos, self._eos, self._eod = 1, 2, 2

    def _encode(self, text):
        return [self.v.get(w, 0) for w in text.split()]

    def _decode(self, ids):
        inv = {i: w for w, i in self.v.items()}
        return " ".join(inv[i] for i in ids)

    @property
    def vocab(self):
        return self.v


WORDS = ["<|system|>", "Be", "nice", "<|user|>", "Hi", "<|assistant|>", "Hello", "there", "Bye",
         "Ciao"]  # ids 3..12


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


CHAT = {"messages": [{"role": "system", "content": "Be nice"}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello there"},
                     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}


def test_chat_default_template_masks_exact(tmp_path):
    tok = WordTokenizer(WORDS)
    ds = SFTDataset(write_jsonl(tmp_path / "chat.jsonl", [CHAT]), tok, seq_len=16)
    s = ds[0]
    # ids: <s> | <|system|> Be nice | <|user|> Hi | <|assistant|> Hello there </s> | <|user|> Bye |
    #      <|assistant|> Ciao </s>; tokens = ids[:-1], labels = ids[1:] masked outside assistant
    assert s["tokens"].tolist() == [1, 3, 4, 5, 6, 7, 8, 9, 10, 2, 6, 11, 8, 12, 2, 2]
    assert s["labels"].tolist() == [N, N, N, N, N, N, 9, 10, 2, N, N, N, 12, 2, N, N]
    assert s["loss_mask"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0]
    assert s["position_ids"].tolist() == list(range(16))
    assert s["attention_mask"] is None
    assert s["loss_mask"].dtype == torch.float32
    # truncation to SEQ_LEN: 5 ids kept -> 4 positions, nothing of the answer left
    short = SFTDataset(write_jsonl(tmp_path / "c2.jsonl", [CHAT]), tok, seq_len=7, pad_len=8)[0]
    assert short["tokens"].tolist() == [1, 3, 4, 5, 6, 7, 8, 2]
    assert short["labels"].tolist() == [N, N, N, N, N, N, 9, N]


def test_query_response_masks_exact(tmp_path):
    tok = WordTokenizer(WORDS + ["What?", "Nothing."])
    ds = SFTDataset(write_jsonl(tmp_path / "qr.jsonl", [{"query": "What?", "response":
                                                         "Nothing."}]), tok, seq_len=64)
    prompt = [1] + tok.tokenize(ALPACA_PROMPT_NO_INPUT.format(instruction="What?"))
    s = ds[0]
    n = len(prompt)
    assert s["tokens"][:n + 1].tolist() == prompt + [14]
    assert s["labels"].tolist() == [N] * (n - 1) + [14, 2] + [N] * (64 - n - 1)
    assert int(s["loss_mask"].sum()) == 2


def test_alpaca_masks_with_llama_tokenizer(tmp_path):
    tok = build_tokenizer("auto", llama_model())
    recs = [{"instruction": "把这句话翻译成英文", "input": "你好，世界", "output": "Hello, world"},
            {"instruction": "Say hi", "input": "", "output": "Hi!"}]
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    ds = SFTDataset(str(p), tok, seq_len=128, pad_len=160)
    for rec, s, tpl in zip(recs, (ds[0], ds[1]), (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT)):
        prompt = [1] + tok.tokenize(tpl.format(**rec))
        resp = tok.tokenize(rec["output"]) + [2]
        n = len(prompt)
        assert s["tokens"].shape == (160,)
        assert s["tokens"][:n + len(resp) - 1].tolist() == prompt + resp[:-1]
        assert s["labels"].tolist() == [N] * (n - 1) + resp + [N] * (160 - n - len(resp) + 1)
        assert s["tokens"][n + len(resp) - 1:].tolist() == [tok.pad] * (160 - n - len(resp) + 1)


def test_chat_with_hf_template(tmp_path):
    texts = [q + " " + a for q, a in chatterbot_dialogs()[:300]]
    folder = train_bpe_folder(str(tmp_path / "tok"), texts, "bloom")
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>"
                            "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    json.dump(cfg, open(cfg_path, "w"))
    tok = build_tokenizer("hf", folder)
    ds = SFTDataset(write_jsonl(tmp_path / "c.jsonl", [CHAT]), tok, seq_len=96)
    s = ds[0]
    full = tok.apply_chat_template(CHAT["messages"], tokenize=True)
    n = len(full) - 1
    assert s["tokens"][:n].tolist() == full[:-1]
    trained = [t for t in s["labels"].tolist() if t != N]
    assert tok.detokenize(trained) == "Hello there</s>Ciao</s>"
    # the masked part is exactly the prompt of each assistant turn
    p1 = tok.apply_chat_template(CHAT["messages"][:2], add_generation_prompt=True, tokenize=True)
    assert s["labels"][:len(p1) - 1].tolist() == [N] * (len(p1) - 1)
    assert s["labels"][len(p1) - 1] != N


def test_pack_and_packed_sample_exact():
    samples = [([1] * 5, [1] * 5), ([2] * 4, [2] * 4), ([3] * 3, [3] * 3), ([4] * 2, [4] * 2)]
    assert pack(samples, 8) == [[0, 2], [1, 3]]
    s = make_packed_sample([([1, 2, 3], [2, 3, N]), ([4, 5], [5, 6])], 8, pad_id=0)
    assert s["tokens"].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert s["labels"].tolist() == [2, 3, N, 5, 6, N, N, N]
    assert s["loss_mask"].tolist() == [1, 1, 0, 1, 1, 0, 0, 0]
    assert s["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert s["cu_seqlens"].tolist() == [0, 3, 5, 8]
    assert s["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    m = block_causal_mask(torch.tensor([1, 1, 2, 0]))[0]
    allowed = (~m).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    batch = collate([s, s])
    assert batch["tokens"].shape == (2, 8) and batch["attention_mask"] is None
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 8, 11, 13, 16]


def test_sft_packing_dataset(tmp_path):
    tok = WordTokenizer(WORDS)
    recs = [CHAT, {"messages": CHAT["messages"][1:3]}, {"messages": CHAT["messages"][3:]}]
    ds = SFTDataset(write_jsonl(tmp_path / "p.jsonl", recs), tok, seq_len=16, packing=True,
                    create_attention_mask=True)
    # tokens per sample: 14, 6, 5 -> rows [14], [6, 5]
    assert len(ds) == 2 and ds.bins == [[0], [1, 2]]
    r = ds[1]
    assert r["tokens"].tolist() == [1, 6, 7, 8, 9, 10, 1, 6, 11, 8, 12] + [2] * 5
    assert r["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert r["cu_seqlens"].tolist() == [0, 6, 11, 16]
    assert r["segment_ids"].tolist() == [1] * 6 + [2] * 5 + [0] * 5
    assert r["labels"].tolist() == [N, N, N, 9, 10, 2, N, N, N, 12, 2] + [N] * 5
    assert r["attention_mask"].shape == (1, 16, 16)
    assert bool(r["attention_mask"][0, 6, 5]) and not bool(r["attention_mask"][0, 7, 6])


def test_sft_real_dialogs_and_malformed_lines(tmp_path, capsys):
    tok = build_tokenizer("auto", llama_model())
    pairs = chatterbot_dialogs()[:200]
    lines = [{"query": q, "response": a} for q, a in pairs]
    lines.insert(5, "{not json")
    lines.insert(9, {"foo": "bar"})
    path = write_jsonl(tmp_path / "qr.jsonl", lines)
    ds = SFTDataset(path, tok, seq_len=256)
    assert len(ds) == 200
    assert ds.bad.total == 2
    assert any("qr.jsonl:6: malformed-json" in e for e in ds.bad.examples)
    assert any("qr.jsonl:10: bad-sft-record" in e for e in ds.bad.examples)
    for i in range(0, 200, 17):
        trained = [t for t in ds[i]["labels"].tolist() if t != N]
        assert trained == tok.tokenize(pairs[i][1]) + [2]
    bad_only = write_jsonl(tmp_path / "bad.jsonl", ["{x", {"a": 1}])
    with pytest.raises(ValueError, match="malformed"):
        SFTDataset(bad_only, tok, seq_len=32)


def test_reward_pairs_and_lists(tmp_path):
    tok = WordTokenizer(["Q", "good", "bad"])  # ids 3, 4, 5
    p = write_jsonl(tmp_path / "rm.jsonl", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad bad"},
        {"query": "Q", "response": ["bad", "good good", "good"], "score": [0.1, 0.9, 0.5]},
        {"query": "Q", "response": ["only one"], "score": [1]},
    ])
    ds = RewardDataset(p, tok, seq_len=6)
    assert len(ds) == 2 and ds.bad.total == 1
    a = ds[0]
    # chosen: <s> Q good </s> ; rejected: <s> Q bad bad </s>
    assert a["tokens"].tolist() == [[1, 3, 4, 2, 2, 2], [1, 3, 5, 5, 2, 2]]
    assert a["labels"].tolist() == [[N, 4, 2, N, N, N], [N, 5, 5, 2, N, N]]
    # eos is the last input token of a row: the reward is read there (as PPO reads it)
    assert a["scores"].tolist() == [1.0, 0.0] and a["lengths"].tolist() == [4, 5]
    b = ds[1]
    assert b["tokens"].shape == (3, 6)
    assert b["scores"].tolist() == pytest.approx([0.1, 0.9, 0.5])
    assert b["labels"][1].tolist() == [N, 4, 4, 2, N, N]


def test_rl_prompts(tmp_path):
    tok = WordTokenizer(["a", "b", "c", "d"])  # ids 3..6
    p = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "a b"}, {"query": "a b c d"}, {"x": 1}])
    ds = PromptDataset(p, tok, max_prompt_len=4, pad_len=5)
    assert len(ds) == 2 and ds.bad.total == 1 and ds.prompts == ["a b", "a b c d"]
    s = ds[0]
    assert s["tokens"].tolist() == [2, 2, 1, 3, 4]
    assert s["position_ids"].tolist() == [0, 0, 0, 1, 2]
    assert int(s["prompt_length"]) == 3
    assert s["labels"].tolist() == [N] * 5 and s["loss_mask"].sum() == 0
    # <s> a b c d cut to 4: BOS stays in front of the last 3 ids
    assert ds[1]["tokens"].tolist() == [2, 1, 4, 5, 6] and ds.truncated == 1


def test_sample_stats_cli(tmp_path, capsys):
    pairs = chatterbot_dialogs()[:100]
    path = write_jsonl(tmp_path / "qr.jsonl", [{"query": q, "response": a} for q, a in pairs])
    spec = importlib.util.spec_from_file_location(
        "sample_stats", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "toolkits", "sft_data_preprocessing", "sample_stats.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--input", path, "--tokenizer", llama_model(), "--bins", "5"]) == 0
    out = capsys.readouterr().out
    assert "samples 100" in out and "p95" in out and out.count("#") > 0
    assert mod.main(["--input", path, "--tokenizer", llama_model(), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["count"] == 100 and sum(c for _a, _b, c in stats["histogram"]) == 100
