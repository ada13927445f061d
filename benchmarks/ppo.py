"""RLHF step cost on CPU: CPU seconds per PPO step and per GRPO step of
``megatron_patch.rlhf.trainer.RLHFTrainer`` (one ``run_episode`` = one step), tiny LLaMA roles.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/ppo.py [--episodes 20] [--json PATH]``
(``--algorithms ppo`` for one of them; ``--profile ppo`` prints a cProfile of that algorithm's timed
episodes, top 25 by cumulative time; every role runs with ``use_flash_attn`` (the SDPA core
attention), as the shipped ``examples/rlhf/configs`` set it, and ``--no-flash-attn`` with
megatron-core's unfused local attention; ``--work DIR`` keeps and reuses the tokenizer and
checkpoint; ``--help`` for the rest).
The default run takes under a minute on an idle core, most of it the timed episodes.

Workload (the issue's): 8 responses x 16 new tokens per step (8 prompts for PPO; 2 prompts x 4
samples for GRPO; ``grpo_rule``: GRPO scored by a rule-based reward function, ``ppo_plain.low_ids``,
instead of a reward model, its usual set-up), 4 PPO epochs over one mini-batch (``train_global_batch_size`` = 8 =
``sample_per_episode``, one micro-batch of 8), prompts up to 32 tokens (chatterbot-corpus
questions), sequence 32 + 16. Policy, reference, reward and value are each a ~100k-parameter LLaMA
(2 layers, hidden 32, FFN 128, 4 heads, a 1000-token byte-level BPE trained in-process on the
chatterbot dialogs, padded to 1024). The checkpoint is made by ``megatron_patch.training.pretrain
--mock-data --train-iters 0 --save`` (a random init, in a subprocess); the reward and value roles
start from it with a new scalar head (the trainer's ``HEAD_SWAP`` load, what it does for an LM
checkpoint given as a reward/value model): a reward model's forward costs the same whatever its
weights. ``lr`` 1e-5 keeps the policy near its start, so responses stay 16 tokens (a random policy
rarely samples EOS) and the workload is stationary.

Measured in this process (a torch.distributed world of one, gloo): ``time.process_time()`` around
each ``run_episode``; 3 warm-up episodes, then the median over ``--episodes``. The phase split
(median CPU s per step) wraps the trainer's own calls: ``generate`` (generation), ``collect``
(scoring forwards: old/reference log-probs, values, reward), ``train_role`` (PPO epochs of policy
and value: forward, backward, optimizer); ``other`` is the rest of the step (experience assembly,
advantages, metrics); each column is its own median, so they need not add up to the step's.
Goals: PPO <= 0.12 CPU s/step, GRPO <= 0.05 (TRL 1.12's PPOTrainer: ~0.6
CPU s/step on this workload, ~0.13 without its per-step ``gc.collect``).

``plain``: after each timed episode, one step of the same workload in plain PyTorch + transformers
(``benchmarks/ppo_plain.py``: HF ``generate``, AdamW, the same losses; no Megatron), timed the same
way; ``ratio`` = ours / plain (medians). The VM's speed drifts by up to +-30% over minutes, so the
ratio, measured in one run, is the figure that carries over; ``--no-plain`` leaves it out.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import megatron_patch  # noqa: E402,F401
import torch  # noqa: E402

from megatron_patch import assets  # noqa: E402
from megatron_patch.launch import launch_local  # noqa: E402

GOALS = {"ppo": 0.12, "grpo": 0.05, "grpo_rule": 0.05}
MODEL = dict(layers=2, hidden=32, ffn=128, heads=4, vocab=1000)
PHASES = ("generation", "scoring", "training", "other")


# ------------------------------------------------------------------------------------- set-up


def train_bpe(folder: str, texts, vocab_size: int) -> str:
    """A byte-level BPE as an HF folder (Bloom layout: <unk>=0 <s>=1 </s>=2 <pad>=3), as
    ``tests/data_fixtures.train_bpe_folder`` makes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "pad_token": "<pad>", "tokenizer_class": "BloomTokenizerFast"}, f)
    return folder


def prepare(work: str):
    """(tokenizer folder, prompts jsonl, policy checkpoint) under ``work``."""
    pairs = [(q, a) for q, a in assets.chatterbot_dialogs("english") if len(q) + len(a) < 200]
    random.Random(0).shuffle(pairs)
    tok = train_bpe(os.path.join(work, "tok"), [q + " " + a for q, a in pairs], MODEL["vocab"])
    prompts = os.path.join(work, "prompts.jsonl")
    with open(prompts, "w", encoding="utf-8") as f:
        for q, _ in pairs[:400]:
            f.write(json.dumps({"prompt": q}) + "\n")
    init = os.path.join(work, "init")
    launch_local(["-m", "megatron_patch.training.pretrain", "--mock-data", "--tokenizer-model",
                  tok, "--num-layers", str(MODEL["layers"]), "--hidden-size", str(MODEL["hidden"]),
                  "--ffn-hidden-size", str(MODEL["ffn"]), "--num-attention-heads",
                  str(MODEL["heads"]), "--seq-length", "64", "--micro-batch-size", "1",
                  "--global-batch-size", "1", "--train-iters", "0", "--save", init], 1)
    return tok, prompts, init


# ------------------------------------------------------------------------------------- timing


class _NullLogger:
    def log_episode(self, rec, episodes):
        pass


class PhaseClock:
    """CPU seconds spent in the trainer's generate / collect / train_role calls (not nested)."""

    def __init__(self, trainer_mod, trainer):
        self.acc = dict.fromkeys(PHASES[:3], 0.0)
        trainer_mod.generate = self._wrap(trainer_mod.generate, "generation")
        trainer_mod.collect = self._wrap(trainer_mod.collect, "scoring")
        trainer.train_role = self._wrap(trainer.train_role, "training")

    def _wrap(self, fn, key):
        def timed(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.acc[key] += time.process_time() - t0
        timed.__wrapped__ = fn
        return timed

    def take(self):
        out, self.acc = self.acc, dict.fromkeys(PHASES[:3], 0.0)
        return out


def bench(algorithm: str, tok: str, prompts: str, init: str, a) -> dict:
    from megatron.core import parallel_state

    from megatron_patch.data.rl import PromptDataset
    from megatron_patch.rlhf import trainer as T

    if parallel_state.model_parallel_is_initialized():  # the previous algorithm's trainer
        parallel_state.destroy_model_parallel()
    n = a.samples
    rule = algorithm == "grpo_rule"  # GRPO scored by a rule (ppo_plain.low_ids), no reward model
    kind = "grpo" if rule else algorithm
    cfg = T.PPOConfig(algorithm=kind, num_episodes=a.warmup + a.episodes, sample_per_episode=n,
                      generation_batch_size=n, train_micro_batch_size=n, train_global_batch_size=n,
                      num_training_epoch=a.ppo_epochs, max_new_tokens=a.new_tokens,
                      max_prompt_length=a.max_prompt_length, num_samples_per_prompt=a.group,
                      init_kl_coef=0.05, reward_function="ppo_plain:low_ids" if rule else None)
    cli = T.build_cli().parse_args(["--policy", init, "--prompts", prompts, "--lr", str(a.lr),
                                    "--tokenizer-model", tok])

    def args():
        r = T.role_args(init, cli, a.lr)
        r.use_flash_attn = a.use_flash_attn
        return r

    policy = args()
    reward = None if rule else args()  # an LM checkpoint: a new head (HEAD_SWAP)
    value = args() if algorithm == "ppo" else None
    trainer = T.RLHFTrainer(cfg, policy, reward, value)
    params = {r.name: sum(p.numel() for m in r.model for p in m.parameters())
              for r in (trainer.policy, trainer.reference, trainer.reward, trainer.value) if r}
    dataset = PromptDataset([prompts], trainer.tokenizer, cfg.max_prompt_length)
    log = _NullLogger()
    plain = None
    if a.plain:
        from ppo_plain import PlainStep

        plain = PlainStep(kind, os.path.join(init, "config.json"), dataset.ids, rule=rule,
                          samples=n, group=a.group, new_tokens=a.new_tokens,
                          ppo_epochs=a.ppo_epochs, lr=a.lr, pad_id=trainer.pad,
                          eos_id=trainer.eos, kl_coef=0.05)
        for _ in range(a.warmup):
            plain.step()
    clock = PhaseClock(T, trainer)
    saved = (T.generate, T.collect)
    try:
        for _ in range(a.warmup):
            trainer.run_episode(dataset, log)
        clock.take()
        prof = cProfile.Profile() if a.profile == algorithm else None
        steps, phases, metrics, plain_steps = [], {p: [] for p in PHASES}, [], []
        for _ in range(a.episodes):
            if prof:
                prof.enable()
            t0 = time.process_time()
            m = trainer.run_episode(dataset, log)
            dt = time.process_time() - t0
            if prof:
                prof.disable()
            ph = clock.take()
            ph["other"] = dt - sum(ph.values())
            steps.append(dt)
            for k, v in ph.items():
                phases[k].append(v)
            metrics.append(m)
            if plain is not None:
                t0 = time.process_time()
                plain.step()
                plain_steps.append(time.process_time() - t0)
    finally:
        T.generate, T.collect = saved
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(os.environ.get("PROFILE_SORT", "cumulative")).print_stats(a.profile_top)
        print(f"\ncProfile of {a.episodes} {algorithm} episodes (cumulative):\n" + s.getvalue())
    med = statistics.median(steps)
    plain_med = statistics.median(plain_steps) if plain_steps else None
    return {
        "plain_cpu_s_per_step": plain_med, "plain_steps": plain_steps,
        "ratio_to_plain": med / plain_med if plain_med else None,
        "cpu_s_per_step": med, "cpu_s_min": min(steps), "cpu_s_max": max(steps),
        "steps": steps, "goal_cpu_s": GOALS[algorithm],
        "phases_cpu_s": {k: statistics.median(v) for k, v in phases.items()},
        "prompts_per_step": n // (a.group if kind == "grpo" else 1),
        "responses_per_step": n,
        "response_tokens_mean": statistics.mean(m["response_length"] for m in metrics),
        "parameters": params,
        "wall_s_per_step": statistics.median(m["time_generation_s"] + m["time_training_s"]
                                             for m in metrics),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", default="ppo,grpo,grpo_rule",
                   help="any of ppo, grpo (reward model), grpo_rule (a rule-based reward: "
                        "ppo_plain.low_ids, no reward model)")
    p.add_argument("--episodes", type=int, default=20, help="timed episodes (steps) per algorithm")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--samples", type=int, default=8, help="responses per step (= mini-batch)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--group", type=int, default=4, help="GRPO samples per prompt")
    p.add_argument("--max-prompt-length", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-flash-attn", dest="use_flash_attn", action="store_false",
                   help="every role with megatron-core's local (unfused) core attention instead of "
                        "SDPA (the trainer CLI's default; the shipped RLHF configs set "
                        "use_flash_attn: true)")
    p.add_argument("--no-plain", dest="plain", action="store_false",
                   help="leave out the interleaved plain PyTorch + transformers step")
    p.add_argument("--profile", default=None, choices=sorted(GOALS),
                   help="cProfile this algorithm's timed episodes")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--work", default=None, help="keep the tokenizer/checkpoint here (else a tmp)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the numbers here")
    a = p.parse_args()
    algos = [x for x in a.algorithms.split(",") if x]
    if not algos or set(algos) - set(GOALS):
        p.error(f"--algorithms takes a comma-separated subset of {', '.join(GOALS)}")
    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or tmp
        os.makedirs(work, exist_ok=True)
        t0 = time.time()
        if a.work and os.path.isdir(os.path.join(work, "init")):
            tok, prompts, init = (os.path.join(work, "tok"), os.path.join(work, "prompts.jsonl"),
                                  os.path.join(work, "init"))
        else:
            tok, prompts, init = prepare(work)
        setup_s = time.time() - t0
        results = {}
        for algo in algos:
            results[algo] = bench(algo, tok, prompts, init, a)
    import megatron.core

    out = {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
           "python": sys.version.split()[0], "threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "model": dict(MODEL),
           "new_tokens": a.new_tokens, "ppo_epochs": a.ppo_epochs, "samples": a.samples,
           "max_prompt_length": a.max_prompt_length, "warmup": a.warmup, "episodes": a.episodes,
           "use_flash_attn": a.use_flash_attn,
           "setup_wall_s": setup_s, **results}

    first = results[algos[0]]["parameters"]
    print(f"\nRLHFTrainer on CPU fp32, torch.get_num_threads()={out['threads']} "
          f"(OMP_NUM_THREADS={out['omp_num_threads']}), torch {out['torch']}, megatron-core "
          f"{out['megatron_core']}; LLaMA {MODEL['layers']} layers, hidden {MODEL['hidden']}, "
          f"FFN {MODEL['ffn']}, vocab {MODEL['vocab']} ({first['policy']:,} parameters per "
          f"role); {a.samples} responses x {a.new_tokens} new tokens, {a.ppo_epochs} epochs x 1 "
          f"mini-batch; median CPU s/step of {a.episodes} steps after {a.warmup} warm-up"
          + ("; SDPA core attention (use_flash_attn)" if a.use_flash_attn
             else "; megatron-core's local core attention"))
    head = f"| {'algorithm':9} | {'CPU s/step':>10} | " + " | ".join(
        f"{k:>10}" for k in PHASES) + f" | {'goal':>6} | {'met':>3} | {'plain':>6} | {'ratio':>5} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for algo in algos:
        r = results[algo]
        ph = r["phases_cpu_s"]
        met = "yes" if r["cpu_s_per_step"] <= r["goal_cpu_s"] else "no"
        print(f"| {algo.upper():9} | {r['cpu_s_per_step']:10.4f} | " +
              " | ".join(f"{ph[k]:10.4f}" for k in PHASES) +
              f" | {r['goal_cpu_s']:6.2f} | {met:>3} | " +
              (f"{r['plain_cpu_s_per_step']:6.4f} | {r['ratio_to_plain']:5.2f} |"
               if r["plain_cpu_s_per_step"] else f"{'-':>6} | {'-':>5} |"))
    for algo in algos:
        r = results[algo]
        print(f"{algo}: min/max {r['cpu_s_min']:.4f}/{r['cpu_s_max']:.4f} CPU s, wall "
              f"{r['wall_s_per_step']:.4f} s/step, {r['prompts_per_step']} prompts x "
              f"{r['responses_per_step'] // r['prompts_per_step']}, mean response "
              f"{r['response_tokens_mean']:.1f} tokens, roles {r['parameters']}")
    print("reference: TRL 1.12 PPOTrainer ~0.6 CPU s/step on this workload (~0.13 without its "
          "per-step gc.collect)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
