"""PPO driven by a reward model trained as in the SFT/RM stage (``finetune --task reward``), on CPU
with tiny models, and the held-out evaluation and entropy bonus of ``megatron_patch.rlhf.trainer``.

The preference is one a tiny model can learn from text: of two responses to a prompt, the one with
more single-character tokens (ids 5-99 of the byte-level BPE: punctuation, digits, letters) is
better (pairs whose shares differ by 0.25 or more); the reward model reaches 85% validation
accuracy or more in two epochs. PPO then raises the
reward-model score of its greedy answers to 32 held-out prompts far beyond the noise of that
mean, while the KL to the reference per response token stays below what moving all the mass onto
that tenth of the vocabulary costs (ln 10) plus one nat. An entropy bonus keeps the policy's
entropy up: with it the entropy falls by less than with no bonus over the same 8 episodes.
"""
import json
import math
import os
import random

import pytest

from data_fixtures import chatterbot_dialogs, train_bpe_folder
from megatron_patch.launch import launch_local

PPO = ["--max-new-tokens", "12", "--max-prompt-length", "24", "--init-kl-coef", "0.1",
       "--lr", "5e-3", "--sample-per-episode", "32", "--generation-batch-size", "16",
       "--train-micro-batch-size", "8", "--train-global-batch-size", "16",
       "--num-training-epoch", "4"]


def _write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _records(log):
    with open(os.path.join(log, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from tokenizers import Tokenizer

    tmp = str(tmp_path_factory.mktemp("rlhf_rm"))
    pairs = [(q, a) for q, a in chatterbot_dialogs("english") if len(q) + len(a) < 100]
    random.Random(0).shuffle(pairs)
    tok = train_bpe_folder(os.path.join(tmp, "tok"), [q + " " + a for q, a in pairs],
                           vocab_size=1000)
    bpe = Tokenizer.from_file(os.path.join(tok, "tokenizer.json"))
    vocab = bpe.get_vocab_size()
    rng = random.Random(1)

    def response(share):  # 12 tokens, about `share` of them single characters (ids 5-99)
        return bpe.decode([rng.randrange(5, 100) if rng.random() < share else
                           rng.randrange(100, vocab) for _ in range(12)])

    rows = []
    while len(rows) < 960:
        worse, better = sorted([rng.random(), rng.random()])
        if better - worse >= 0.25:
            rows.append({"prompt": rng.choice(pairs)[0], "chosen": response(better),
                         "rejected": response(worse)})
    _write(os.path.join(tmp, "rm_train.jsonl"), rows[:-64])
    _write(os.path.join(tmp, "rm_valid.jsonl"), rows[-64:])
    _write(os.path.join(tmp, "prompts.jsonl"), [{"prompt": q} for q, _ in pairs[:200]])
    _write(os.path.join(tmp, "held_out.jsonl"), [{"prompt": q} for q, _ in pairs[200:232]])
    init = os.path.join(tmp, "init")  # the policy: a freshly initialised tiny LLaMA
    launch_local(["-m", "megatron_patch.training.pretrain", "--mock-data", "--tokenizer-model", tok,
                  "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
                  "--train-iters", "0", "--save", init], 1)
    rm, rm_log = os.path.join(tmp, "rm"), os.path.join(tmp, "rm_log")
    launch_local(["-m", "megatron_patch.training.finetune", "--task", "reward",
                  "--tokenizer-model", tok, "--seq-length", "64", "--lr", "2e-3",
                  "--train-data", os.path.join(tmp, "rm_train.jsonl"),
                  "--valid-data", os.path.join(tmp, "rm_valid.jsonl"), "--epochs", "2",
                  "--micro-batch-size", "8", "--global-batch-size", "16", "--log-dir", rm_log,
                  "--pretrained-checkpoint", init, "--save", rm, "--seed", "5"], 1, timeout=600)
    valid = [r for r in _records(rm_log) if "valid_accuracy" in r]
    return dict(tmp=tmp, init=init, rm=rm, rm_valid=valid)


def ppo(ws, name, *flags):
    log = os.path.join(ws["tmp"], name)
    launch_local(["-m", "megatron_patch.rlhf.trainer", "--policy", ws["init"], "--reward", ws["rm"],
                  "--prompts", os.path.join(ws["tmp"], "prompts.jsonl"), "--log-dir", log,
                  *PPO, *flags], 1, timeout=900)
    return _records(log)


def test_ppo_with_a_trained_reward_model_raises_the_held_out_reward(ws):
    assert ws["rm_valid"][-1]["valid_accuracy"] >= 0.85, ws["rm_valid"]
    recs = ppo(ws, "ppo", "--num-episodes", "20", "--eval-episode-interval", "5",
               "--eval-prompts", os.path.join(ws["tmp"], "held_out.jsonl"))
    # iteration 0: the starting policy's evaluation alone; then one record per episode, with the
    # evaluation after episodes 5, 10, 15 and 20
    assert [r["iteration"] for r in recs] == list(range(21))
    assert set(k for k in recs[0] if k != "iteration") == {
        "eval_reward_mean", "eval_reward_std", "eval_kl", "eval_response_length", "eval_ended",
        "eval_samples", "time_eval_s"}
    evals = [r for r in recs if "eval_reward_mean" in r]
    assert [r["iteration"] for r in evals] == [0, 5, 10, 15, 20]
    assert all(r["eval_samples"] == 32 for r in evals)
    assert recs[0]["eval_kl"] == 0.0  # the policy starts as the reference
    curve = " ".join(f"{r['iteration']}:{r['eval_reward_mean']:.3f}" for r in evals)
    print("held-out reward-model score (greedy):", curve)
    print("training reward:", " ".join(f"{r['reward_mean']:.2f}" for r in recs[1:]))
    start, end = evals[0], evals[-1]
    noise = start["eval_reward_std"] / math.sqrt(start["eval_samples"])  # of the held-out mean
    assert end["eval_reward_mean"] > start["eval_reward_mean"] + 4 * noise + \
        start["eval_reward_std"], curve
    per_token = [r["kl"] / r["response_length"] for r in recs[1:]]
    assert max(per_token) < math.log(10) + 1, per_token
    assert all(0 < r["entropy"] <= math.log(1000) + 1e-4 for r in recs[1:])


def test_entropy_bonus_keeps_the_entropy_up(ws):
    plain = ppo(ws, "no_bonus", "--num-episodes", "8")
    bonus = ppo(ws, "entropy", "--num-episodes", "8", "--entropy-coef", "0.1")
    assert [r["iteration"] for r in bonus] == [r["iteration"] for r in plain]
    drop_plain = plain[0]["entropy"] - plain[-1]["entropy"]
    drop_bonus = bonus[0]["entropy"] - bonus[-1]["entropy"]
    print(f"entropy drop over 8 episodes: {drop_plain:.3f} without, {drop_bonus:.3f} with the bonus")
    assert drop_plain > 0.1 and drop_bonus < 0.75 * drop_plain, (drop_plain, drop_bonus)
