"""SFT, reward and RL-prompt data that used to stop a dataset, train the wrong tokens or vanish
without a word: the --sft-format names the CLI offers, a record a chat template or the tokenizer
refuses, a SentencePiece chat template's <s>/</s> (were trained as text), the default template's
training ids vs inference ids, the reward model's row (eos was never an input, PPO reads the reward
at eos), tied reward pairs, RL prompts cut from the left (BOS lost) and bad RL records (never
printed). The shipped LLaMA sentencepiece model; fast.
"""
import json
import shutil

import pytest

from data_fixtures import llama_model
from megatron_patch.data.reward import RewardDataset
from megatron_patch.data.rl import PromptDataset
from megatron_patch.data.sft import SFTDataset, encode_chat, encode_record
from megatron_patch.tokenizer import build_tokenizer

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def sp():
    return build_tokenizer("auto", llama_model())


@pytest.fixture(scope="module")
def sp_chat(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp_chat")
    shutil.copy(llama_model(), d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_TEMPLATE}))
    return build_tokenizer("auto", str(d))


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_the_format_names_the_cli_offers(sp):
    qr = {"query": "What is 2+2?", "response": "4"}
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert encode_record(sp, qr, "query_response") == encode_record(sp, qr, "auto")
    assert encode_record(sp, chat, "messages") == encode_record(sp, chat, "auto")
    with pytest.raises(KeyError):  # a format that does not fit: a bad record for the dataset
        encode_record(sp, qr, "messages")


def test_a_refused_record_is_one_bad_record(tmp_path, sp_chat, sp):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}  # the template raises
    ds = SFTDataset(_jsonl(tmp_path / "t.jsonl", [good, bad, good]), sp_chat, seq_len=64)
    assert len(ds) == 2 and ds.bad.counts == {"bad-sft-record": 1}
    assert "t.jsonl:2" in ds.bad.examples[0] and "TemplateError" in ds.bad.examples[0]
    # a lone surrogate (valid JSON): SentencePiece raises a RuntimeError on it
    lone = '{"query": "bad \\ud800", "response": "x"}'
    ok = {"query": "fine", "response": "x"}
    ds = SFTDataset(_jsonl(tmp_path / "s.jsonl", [ok, lone]), sp, seq_len=64)
    assert len(ds) == 1 and ds.bad.total == 1
    rw = RewardDataset(_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        '{"prompt": "p", "chosen": "\\ud800", "rejected": "bad"}']), sp, seq_len=64)
    assert len(rw) == 1 and rw.bad.counts == {"bad-reward-record": 1}
    rl = PromptDataset(_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, '{"prompt": "\\ud800"}']),
                       sp, max_prompt_len=16)
    assert len(rl) == 1 and rl.bad.counts == {"bad-prompt-record": 1}


def test_sentencepiece_chat_template_special_tokens_are_tokens(sp_chat):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, trainable = encode_chat(sp_chat, msgs)
    assert ids[0] == sp_chat.bos and ids.count(sp_chat.bos) == 1  # one BOS, the real one
    assert ids[-1] == sp_chat.eos and trainable[-1]  # eos is trained on: generation stops
    assert "</s>" not in sp_chat.detokenize([i for i in ids if i != sp_chat.eos])
    # inference feeds the same prompt ids SFT trained on
    prompt = sp_chat.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True)
    assert ids[:len(prompt)] == prompt and not any(trainable[:len(prompt)])
    # plain tokenize keeps reading them as text (data cannot inject control tokens)
    assert sp_chat.bos not in sp_chat.tokenize("<s> text")


def test_default_template_training_ids_are_the_inference_ids(sp):
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]
    ids, trainable = encode_chat(sp, msgs)
    for k in (1, 3):  # before each assistant turn, after BOS
        prompt = sp.apply_chat_template(msgs[:k], add_generation_prompt=True, tokenize=True)
        assert ids[1:1 + len(prompt)] == prompt
        assert not trainable[1 + len(prompt) - 1]
    # the text rendering is unchanged (the documented template)
    assert sp.apply_chat_template(msgs[:1], add_generation_prompt=True) == \
        "<|user|>\nWhat is 2+2?\n<|assistant|>\n"


def test_reward_rows_end_at_eos_and_ties_are_skipped(tmp_path, sp):
    rows = [{"prompt": "Q: ", "chosen": "good answer", "rejected": "bad"},
            {"prompt": "Q: ", "chosen": "same", "rejected": "same"},
            {"prompt": "x " * 40, "chosen": "a", "rejected": "b"},  # both cut to the same tokens
            {"query": "Q", "response": ["a", "b", "c"], "score": [1, 1, 1]},
            {"query": "Q", "response": ["a", "b", "c"], "score": [2, 1, 0]}]
    ds = RewardDataset(_jsonl(tmp_path / "rw.jsonl", rows), sp, seq_len=16)
    assert len(ds) == 2
    assert ds.bad.counts == {"identical-candidates": 2, "tied-scores": 1}
    item = ds[0]
    for k in range(2):
        n = int(item["lengths"][k])
        # the reward is read at lengths - 1: the eos input token, where PPO reads it
        assert int(item["tokens"][k, n - 1]) == sp.eos
    full = [sp.bos] + sp.tokenize("Q: ") + sp.tokenize("good answer") + [sp.eos]
    assert item["tokens"][0, :len(full)].tolist() == full


def test_rl_prompts_keep_bos_and_report(tmp_path, sp, capsys):
    rows = [{"prompt": "one two three four five six seven eight nine ten"}, {"prompt": "short"},
            {"text": "wrong key"}, {"prompt": 5}, '""', '"   "']
    ds = PromptDataset(_jsonl(tmp_path / "p.jsonl", rows), sp, max_prompt_len=4)
    assert len(ds) == 2 and ds.bad.total == 4 and ds.truncated == 1
    assert ds.ids[0][0] == sp.bos and len(ds.ids[0]) == 4
    assert ds.ids[0][1:] == ([sp.bos] + sp.tokenize(rows[0]["prompt"]))[-3:]
    err = capsys.readouterr().err
    assert "RL prompts: 2 kept, 4 bad records skipped" in err and "1 cut from the left" in err


def test_cut_left_keeps_bos():
    """RL prompts and generation prompts are cut by one rule: the last tokens, a leading BOS kept
    in front (alone when only one token fits); nothing to cut, nothing changes."""
    from megatron_patch.data.rl import cut_left

    assert cut_left([1, 5, 6, 7], 3, 1) == [1, 6, 7]
    assert cut_left([1, 5, 6, 7], 1, 1) == [1]
    assert cut_left([5, 6, 7], 2, 1) == [6, 7]
    assert cut_left([5, 6, 7], 2, None) == [6, 7]
    assert cut_left([1, 5], 2, 1) == [1, 5]
    assert cut_left([], 2, 1) == []


def test_alpaca_fields_that_are_not_text_are_bad_records(tmp_path, sp):
    """``input: 0`` / ``false`` / a list was trained as "no input" (``obj.get('input') or ''``),
    a numeric instruction as its digits: each is now one counted bad record; a null or missing
    input is still "no input"."""
    ok = {"instruction": "Add", "input": "2 and 2", "output": "4"}
    rows = [ok, {"instruction": "Add", "input": 0, "output": "4"},
            {"instruction": "Add", "input": False, "output": "4"},
            {"instruction": "Add", "input": ["2", "2"], "output": "4"},
            {"instruction": 7, "output": "4"}, {"instruction": "Add", "output": 4},
            {"instruction": "Say hi", "input": None, "output": "hi"},
            {"instruction": "Say hi", "output": "hi"}]
    ds = SFTDataset(_jsonl(tmp_path / "a.jsonl", rows), sp, seq_len=128)
    assert len(ds) == 3 and ds.bad.counts == {"bad-sft-record": 5}, ds.bad.examples
    assert any("'input' must be a string, got int" in e for e in ds.bad.examples)
    assert encode_record(sp, rows[-2]) == encode_record(sp, rows[-1])
    qr = {"query": 3, "response": "x"}
    with pytest.raises(ValueError, match="'query' must be a string"):
        encode_record(sp, qr, "query")


REWRITING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
    "[/INST]{% else %}{% if loop.last %}{{ m['content'] }}{% else %}"
    "{{ m['content'].split('</think>')[-1] }}{% endif %}{{ eos_token }}{% endif %}{% endfor %}")


def test_template_that_rewrites_earlier_turns(tmp_path):
    """A template that renders an earlier assistant turn differently from the last one (reasoning
    models drop the earlier turns' <think> part): the ids are the whole conversation's rendering,
    the last assistant turn is trained, the rewritten earlier turn is context only (its trained
    form never appears in the sequence)."""
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(llama_model(), d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": REWRITING_TEMPLATE}))
    tok = build_tokenizer("auto", str(d))
    msgs = [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "<think>x y</think> ans one"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "<think>z</think> ans two"}]
    ids, mask = encode_chat(tok, msgs)
    assert ids == list(tok.apply_chat_template(msgs, tokenize=True))
    trained = tok.detokenize([i for i, m in zip(ids, mask) if m])
    assert trained.endswith("<think>z</think> ans two") and "ans one" not in trained
    assert mask[-1] and ids[-1] == tok.eos
    assert "ans one" in tok.detokenize(ids) and "x y" not in tok.detokenize(ids)
