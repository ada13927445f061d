"""PPO and GRPO through ``megatron_patch.rlhf.trainer`` on CPU, tiny models.

The policy starts from a tiny LLaMA (a BPE trained on real dialogs in the test); the reward is a
rule (``tests/workers/rlhf_rewards.py``: the share of response tokens with id < 100, about 0.1 for
the starting policy), so a policy can learn it in a few episodes:
- PPO (with a value model) and GRPO raise the mean reward far beyond its noise while the KL to the
  reference stays bounded;
- at TP=2 the first episode's statistics equal TP=1's;
- stopped after episode 2 and rerun, PPO reproduces the uninterrupted episodes 3-4 exactly.
"""
import json
import math
import os
import random
import statistics

import pytest

from data_fixtures import chatterbot_dialogs, train_bpe_folder
from megatron_patch.launch import launch_local

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = ["--reward-function", "rlhf_rewards:low_ids", "--max-new-tokens", "12",
          "--max-prompt-length", "24", "--init-kl-coef", "0.01", "--lr", "5e-3"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("rlhf"))
    pairs = [(q, a) for q, a in chatterbot_dialogs("english") if len(q) + len(a) < 100]
    random.Random(0).shuffle(pairs)
    tok = train_bpe_folder(os.path.join(tmp, "tok"), [q + " " + a for q, a in pairs],
                           vocab_size=1000)
    prompts = os.path.join(tmp, "prompts.jsonl")
    with open(prompts, "w") as f:
        for q, _ in pairs[:200]:
            f.write(json.dumps({"prompt": q}) + "\n")
    init = os.path.join(tmp, "init")
    launch_local(["-m", "megatron_patch.training.pretrain", "--mock-data", "--tokenizer-model", tok,
                  "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
                  "--train-iters", "0", "--save", init], 1)
    return dict(tmp=tmp, prompts=prompts, init=init)


def rlhf(ws, name, nproc, *flags, outputs=None, env=None):
    """The run's per-episode metrics; ``outputs`` (a list) gets each rank's output; ``env``: more
    environment variables."""
    log = os.path.join(ws["tmp"], name, "log")
    env = dict(env or {}, PYTHONPATH=os.path.join(HERE, "workers") + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    logs = launch_local(["-m", "megatron_patch.rlhf.trainer", "--policy", ws["init"], "--prompts",
                         ws["prompts"], "--log-dir", log, *COMMON, *flags], nproc, timeout=900,
                        env=env)
    if outputs is not None:
        outputs.extend(logs)
    out = {}
    with open(os.path.join(log, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            assert rec["iteration"] not in out, "one record per episode"
            out[rec["iteration"]] = rec
    return [out[k] for k in sorted(out)]


def _learns(episodes, label):
    first = [e["reward_mean"] for e in episodes[:5]]
    last = [e["reward_mean"] for e in episodes[-5:]]
    noise = statistics.pstdev(first) + 0.01
    curve = " ".join(f"{e['reward_mean']:.3f}" for e in episodes)
    print(f"{label} reward curve: {curve}")
    print(f"{label} KL curve: " + " ".join(f"{e['kl']:.2f}" for e in episodes))
    assert statistics.mean(last) > statistics.mean(first) + 4 * noise, curve
    assert episodes[0]["kl"] == 0.0  # the policy starts as the reference
    # bounded: per response token, below what moving all mass onto the rewarded tenth of the
    # vocabulary costs from a uniform reference (ln 10 = 2.3 nats) plus one nat
    per_token = [e["kl"] / e["response_length"] for e in episodes]
    assert max(per_token) < math.log(10) + 1, per_token


LEARN = ["--num-episodes", "25", "--sample-per-episode", "32", "--generation-batch-size", "16",
         "--train-micro-batch-size", "8", "--train-global-batch-size", "16",
         "--num-training-epoch", "4"]


def test_ppo_raises_the_reward(ws):
    episodes = rlhf(ws, "ppo", 1, *LEARN, "--init-kl-coef", "0.02")
    assert len(episodes) == 25
    assert all("value_loss" in e and "clipfrac" in e for e in episodes)
    _learns(episodes, "PPO")


def test_grpo_raises_the_reward(ws):
    episodes = rlhf(ws, "grpo", 1, "--algorithm", "grpo", "--num-samples-per-prompt", "4",
                    *LEARN, "--init-kl-coef", "0.1")
    assert all("value_loss" not in e for e in episodes)
    _learns(episodes, "GRPO")


def test_grpo_old_logprobs_from_the_first_training_step(ws):
    """GRPO with the episode in one mini-batch: the old log-probs come from the first training
    forward (no scoring forward of the policy). The same episodes as with the scoring forward
    (recompute_old_logprobs), to the bit: later epochs read the recorded rows back in the right
    places. At DP=2 each replica records its own rows and they are gathered."""
    steps = ["--algorithm", "grpo", "--num-samples-per-prompt", "4", "--num-episodes", "2",
             "--sample-per-episode", "16", "--generation-batch-size", "8",
             "--train-micro-batch-size", "4", "--train-global-batch-size", "16",
             "--num-training-epoch", "3"]
    logs = []
    first = rlhf(ws, "grpo_first", 1, *steps, outputs=logs)
    assert "old log-probs: from the first training step" in logs[0], logs[0][-3000:]
    logs = []
    scored = rlhf(ws, "grpo_scored", 1, *steps, "--recompute-old-logprobs", "true", outputs=logs)
    assert "old log-probs: from the first training step" not in logs[0]
    same = [k for k in scored[0] if not k.startswith("time_") and k != "tokens_per_s"]
    assert {"kl", "entropy", "approx_kl", "clipfrac", "policy_loss"} <= set(same)
    for a, b in zip(first, scored):
        for k in same:
            assert a[k] == b[k], (a["iteration"], k, a[k], b[k])
    assert first[1]["kl"] != 0.0 and first[1]["approx_kl"] != 0.0  # the epochs moved the policy
    two = rlhf(ws, "grpo_first_dp2", 2, *steps)
    for a, b in zip(first, two):
        for k in ("reward_mean", "reward_std", "response_length", "ended"):
            assert a[k] == b[k], (a["iteration"], k, a[k], b[k])
        for k in ("kl", "entropy", "policy_loss", "approx_kl", "clipfrac", "ref_kl"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["iteration"], k, a[k], b[k])


SHORT = ["--sample-per-episode", "16", "--generation-batch-size", "8",
         "--train-micro-batch-size", "4", "--train-global-batch-size", "8",
         "--num-training-epoch", "2"]


def test_tp2_first_episode_equals_tp1(ws):
    """One optimizer step per role (the losses are those of the forward before it)."""
    one_step = ["--num-episodes", "1", "--sample-per-episode", "16", "--generation-batch-size",
                "8", "--train-micro-batch-size", "4", "--train-global-batch-size", "16"]
    one = rlhf(ws, "tp1", 1, *one_step)[0]
    two = rlhf(ws, "tp2", 2, *one_step, "--tensor-model-parallel-size", "2")[0]
    for k in ("reward_mean", "reward_std", "response_length", "ended", "kl"):
        assert one[k] == two[k], (k, one[k], two[k])  # the same responses
    for k in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy"):
        assert abs(one[k] - two[k]) <= 1e-5 * max(1.0, abs(one[k])), (k, one[k], two[k])


def _reward_model(ws):
    """A reward-model checkpoint with its own head (one training step from the policy's init)."""
    rm = os.path.join(ws["tmp"], "rm")
    if not os.path.isdir(rm):
        pairs = os.path.join(ws["tmp"], "pairs.jsonl")
        with open(pairs, "w") as f:
            for q in ("hello there", "what is your name"):
                f.write(json.dumps({"prompt": q, "chosen": "fine, thanks", "rejected": "NO"}) + "\n")
        launch_local(["-m", "megatron_patch.training.finetune", "--task", "reward",
                      "--pretrained-checkpoint", ws["init"], "--train-data", pairs,
                      "--epochs", "1", "--seq-length", "64", "--micro-batch-size", "2",
                      "--global-batch-size", "2", "--save", rm], 1)
    return rm


def test_offloading_idle_roles_changes_nothing_but_memory(ws):
    """Policy, reference, reward and value models: with offloading, only the role at work keeps
    its storages (weights; gradients and optimizer state while it trains) and the others are
    released to host memory between phases; per role, only the roles named release what they are
    told. The episodes are the same to the bit, and the most bytes held at once fall well below
    the sum of the roles (between the two with per-role offloading)."""
    steps = ["--num-episodes", "2", "--sample-per-episode", "16", "--generation-batch-size", "8",
             "--train-micro-batch-size", "4", "--train-global-batch-size", "8",
             "--reward", _reward_model(ws)]
    kept = rlhf(ws, "offload_no", 1, *steps, "--offload", "false")
    moved = rlhf(ws, "offload_yes", 1, *steps, "--offload", "true")
    # per role (ChatLearn's offload_weights / free_memory): the reference's weights, all of the
    # value model's storages
    some = rlhf(ws, "offload_some", 1, *steps, "--offload-role", "reference=weights",
                "--offload-role", "value=all")
    skip = ("time_generation_s", "time_logprobs_s", "time_training_s", "tokens_per_s",
            "resident_mb_max")
    for a, b, c in zip(kept, moved, some):
        assert {k: v for k, v in a.items() if k not in skip} == \
            {k: v for k, v in b.items() if k not in skip} == \
            {k: v for k, v in c.items() if k not in skip}
    held, roles = moved[-1]["resident_mb_max"], moved[-1]["roles_mb"]
    partly = some[-1]["resident_mb_max"]
    print(f"most MB held at once: {held:.2f} offloading, {partly:.2f} offloading the reference's "
          f"weights and the value model, {kept[-1]['resident_mb_max']:.2f} not, of {roles:.2f} "
          "for the four roles")
    assert kept[-1]["resident_mb_max"] == roles  # without offloading every role stays
    # with it the peak is the policy while it trains (its weights, fp32 gradient buffer and
    # Adam's two moments: 3.41 MB of 7.28 here), the largest of the four roles' footprints
    assert 0 < held < 0.5 * roles, (held, roles)
    # per role: the policy and the reward model always stay, so the peak lies in between
    assert held < partly < roles, (held, partly, roles)


def test_per_role_layouts_equal_all_tp1(ws):
    """The policy trained at TP=2 while it generates through an inference twin at TP=1 (2
    data-parallel replicas; its weights resharded into the twin after each episode), the reference,
    reward and value models at TP=1, the values computed by the value model's inference twin at
    TP=2 (the trained value weights resharded into it likewise): the first episode's statistics
    equal an all-TP=1 run's, and so do the second's (generated by the twin from the resharded
    policy, advantages from the resharded value model)."""
    rm = _reward_model(ws)
    two_steps = ["--num-episodes", "2", "--sample-per-episode", "16", "--generation-batch-size",
                 "8", "--train-micro-batch-size", "4", "--train-global-batch-size", "16",
                 "--reward", rm]
    one = rlhf(ws, "layouts_tp1", 1, *two_steps)
    mixed = rlhf(ws, "layouts_mixed", 2, *two_steps, "--tensor-model-parallel-size", "2",
                 "--layout", "generation=1x1", "--layout", "reference=1x1",
                 "--layout", "reward=1x1", "--layout", "value=1x1",
                 "--layout", "value_forward=2x1")
    assert all(e["time_weight_sync_s"] > 0 for e in mixed)
    for a, b in zip(one, mixed):
        for k in ("reward_mean", "reward_std", "response_length", "ended"):
            assert a[k] == b[k], (a["iteration"], k, a[k], b[k])  # the same responses
        for k in ("kl", "policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["iteration"], k, a[k], b[k])
    assert one[1]["kl"] != 0.0  # the second episode was generated by the trained policy


def test_dp2_and_accumulation_equal_dp1(ws):
    """Two data-parallel replicas with micro-batches of 2 (4 accumulation steps each) against one
    process with micro-batches of 8: the same samples (generation seeds follow the prompts' place,
    not the rank), the same token-mean losses over two episodes."""
    steps = ["--num-episodes", "2", "--sample-per-episode", "16", "--generation-batch-size", "8",
             "--train-global-batch-size", "16"]
    one = rlhf(ws, "dp1", 1, *steps, "--train-micro-batch-size", "8")
    two = rlhf(ws, "dp2", 2, *steps, "--train-micro-batch-size", "2")
    for a, b in zip(one, two):
        for k in ("reward_mean", "reward_std", "response_length", "ended"):
            assert a[k] == b[k], (a["iteration"], k, a[k], b[k])
        for k in ("kl", "policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["iteration"], k, a[k], b[k])


def test_stop_and_resume_reproduces_the_episodes(ws):
    full = rlhf(ws, "full", 1, "--num-episodes", "4", *SHORT)
    ck = os.path.join(ws["tmp"], "resume", "ckpt")
    rlhf(ws, "resume", 1, "--num-episodes", "2", "--save", ck, *SHORT)
    got = rlhf(ws, "resume", 1, "--num-episodes", "4", "--save", ck, *SHORT)
    assert len(got) == 4
    skip = ("time_generation_s", "time_logprobs_s", "time_training_s", "tokens_per_s")
    for a, b in zip(got, full):
        assert {k: v for k, v in a.items() if k not in skip} == \
            {k: v for k, v in b.items() if k not in skip}


def test_kill_and_resume_reproduces_the_episodes(ws):
    """SIGKILL after the third episode's record (during episode 4, or between a record and its
    checkpoint; a checkpoint after every episode), then rerun: the five records equal those of an
    uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    full = rlhf(ws, "kill_full", 1, "--num-episodes", "5", *SHORT)
    ck = os.path.join(ws["tmp"], "kill", "ckpt")
    log = os.path.join(ws["tmp"], "kill", "log")
    argv = [sys.executable, "-m", "megatron_patch.rlhf.trainer", "--policy", ws["init"],
            "--prompts", ws["prompts"], "--log-dir", log, "--save", ck,
            "--save-episode-interval", "1", "--num-episodes", "5", *COMMON, *SHORT]
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "workers") + os.pathsep +
               os.environ.get("PYTHONPATH", ""), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = os.path.join(log, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-episode 4 (or between its record and checkpoint)
    proc.wait()
    got = rlhf(ws, "kill", 1, "--save", ck, "--save-episode-interval", "1", "--num-episodes", "5",
               *SHORT)
    assert [e["iteration"] for e in got] == [1, 2, 3, 4, 5]
    skip = ("time_generation_s", "time_logprobs_s", "time_training_s", "tokens_per_s")
    for a, b in zip(got, full):
        assert {k: v for k, v in a.items() if k not in skip} == \
            {k: v for k, v in b.items() if k not in skip}
    # a kill while saving: the roles' folders already hold episode 5 but the state file still
    # says 3 -> the roles are loaded at episode 3, and episodes 4-5 come out the same again
    state_file = os.path.join(ck, "rlhf_state.json")
    state = json.load(open(state_file))
    state.update(episode=3, consumed_prompts=3 * 16)
    with open(state_file, "w") as f:
        json.dump(state, f)
    again = rlhf(ws, "kill", 1, "--save", ck, "--save-episode-interval", "1", "--num-episodes",
                 "5", *SHORT)
    for a, b in zip(again, full):
        assert {k: v for k, v in a.items() if k not in skip} == \
            {k: v for k, v in b.items() if k not in skip}


def _free_port():
    from megatron_patch.launch import free_port

    return free_port()
