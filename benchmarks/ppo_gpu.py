"""RLHF on one GPU (issue 07's GPU figures): a ~1B LLaMA policy with its reference, and a ~1B
reward model with the value model started from it, all colocated on one device; bf16, the SDPA
core attention (``use_flash_attn``; Transformer Engine's when it is installed).

    python benchmarks/ppo_gpu.py                      # on a GPU: 1B preset, the defaults below
    python benchmarks/ppo_gpu.py --cpu --size tiny    # the same code on a CPU (a smoke run)

Each configuration runs in its own process, so each has fresh CUDA memory statistics:

- ``sft``: plain training steps of the policy alone, at the PPO run's micro-batch and sequence
  length (``engine`` model, optimizer and forward-backward, as ``benchmarks/train_step.py``). This
  gives the peak memory of the plain SFT job.
- ``ppo``: PPO with the four roles resident.
- ``ppo-offload``: PPO with ``--offload true``, where only the role at work holds device memory.

``--modes`` picks some (``--work DIR`` keeps the tokenizer, checkpoint and each mode's result
between runs; a later run with the same ``--work`` and without ``sft`` compares with the SFT
result found there).

For each it prints: samples/s (samples of an episode / its wall time, median of the timed
episodes), the per-phase seconds of ``metrics.jsonl`` (generation, scoring forwards, training),
``torch.cuda.max_memory_allocated`` (GiB) and its ratio to the SFT job's, and the trainer's own
``resident_mb_max``. The prompts are chatterbot questions and the tokenizer a byte-level BPE trained
on them in the process (nothing is downloaded). Weights are a random init (pretrain
``--train-iters 0``): the cost does not depend on them, and a low learning rate keeps the responses
at full length.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

MODES = ("sft", "ppo", "ppo-offload")


def prepare(work: str, size: str, vocab: int, seq: int) -> dict:
    """Tokenizer, prompts and a random-init checkpoint of the preset under ``work`` (reused)."""
    import random

    from megatron_patch import assets
    from megatron_patch.launch import launch_local
    from ppo import train_bpe

    out = {"tok": os.path.join(work, "tok"), "prompts": os.path.join(work, "prompts.jsonl"),
           "init": os.path.join(work, f"init_{size}")}
    if not os.path.isdir(out["tok"]):
        pairs = list(assets.chatterbot_dialogs("english"))
        random.Random(0).shuffle(pairs)
        train_bpe(out["tok"], [q + " " + a for q, a in pairs], vocab)
        with open(out["prompts"], "w", encoding="utf-8") as f:
            for q, _ in pairs:
                f.write(json.dumps({"prompt": q}) + "\n")
    if not os.path.isdir(out["init"]):
        launch_local(["-m", "megatron_patch.training.pretrain", "--mock-data", "--tokenizer-model",
                      out["tok"], "--model-size", size, "--seq-length", str(seq),
                      "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "0",
                      "--save", out["init"]], 1)
    return out


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0


def child_sft(a, paths: dict) -> dict:
    """Peak memory and step time of plain training steps of the policy."""
    import torch

    from megatron_patch import platform
    from train_step import ours_step_fn, timed

    from tokenizers import Tokenizer

    seq = a.max_prompt_length + a.new_tokens
    vocab = Tokenizer.from_file(os.path.join(paths["tok"], "tokenizer.json")).get_vocab_size()
    # the policy's shapes (its vocabulary padded as the RLHF roles pad it); random weights
    flags = ["--mock-data", "--model-size", a.size, "--vocab-size", str(vocab),
             "--seq-length", str(seq), "--micro-batch-size", str(a.micro_batch),
             "--global-batch-size", str(a.micro_batch), "--train-iters", "1000", "--lr", "1e-6",
             "--use-flash-attn"] + ([] if a.cpu else ["--bf16"])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab, (a.micro_batch, seq), generator=g).to(
        platform.current_device())
    step, _ = ours_step_fn(flags, (tokens, torch.roll(tokens, -1, dims=1)))
    t = timed(step, 2, 5)
    return {"step_s": t, "peak_gib": _peak_gib()}


def child_ppo(a, paths: dict, offload: bool) -> dict:
    from megatron_patch.data.rl import PromptDataset
    from megatron_patch.rlhf import trainer as T
    from ppo import _NullLogger

    n = a.samples
    cfg = T.PPOConfig(algorithm="ppo", num_episodes=a.warmup + a.episodes, sample_per_episode=n,
                      generation_batch_size=a.generation_batch,
                      train_micro_batch_size=a.micro_batch,
                      train_global_batch_size=n, num_training_epoch=a.ppo_epochs,
                      max_new_tokens=a.new_tokens, max_prompt_length=a.max_prompt_length,
                      init_kl_coef=0.05, offload=offload)
    flags = ["--policy", paths["init"], "--prompts", paths["prompts"], "--lr", "1e-7",
             "--tokenizer-model", paths["tok"]] + ([] if a.cpu else ["--bf16"])
    cli = T.build_cli().parse_args(flags)

    def args():
        r = T.role_args(paths["init"], cli, 1e-7)
        r.use_flash_attn = True
        return r

    trainer = T.RLHFTrainer(cfg, args(), args(), args())  # reward and value: new scalar heads
    dataset = PromptDataset([paths["prompts"]], trainer.tokenizer, cfg.max_prompt_length)
    log = _NullLogger()
    recs, walls = [], []
    for i in range(a.warmup + a.episodes):
        t0 = time.perf_counter()
        m = trainer.run_episode(dataset, log)
        wall = time.perf_counter() - t0
        print(f"[{'ppo-offload' if offload else 'ppo'}] episode {i + 1}: {wall:.2f} s "
              f"(generation {m['time_generation_s']:.2f}, scoring {m['time_logprobs_s']:.2f}, "
              f"training {m['time_training_s']:.2f}; peak {_peak_gib():.2f} GiB)", flush=True)
        if i >= a.warmup:
            walls.append(wall)
            recs.append(m)
    if a.profile:
        calls = _profile_generation(trainer, dataset, log, gpu=not a.cpu)
        _compare_engines(trainer, calls, paths["init"], gpu=not a.cpu)
    med = lambda k: statistics.median(r[k] for r in recs)  # noqa: E731
    return {"samples_per_s": n / statistics.median(walls), "episode_s": statistics.median(walls),
            "generation_s": med("time_generation_s"), "scoring_s": med("time_logprobs_s"),
            "training_s": med("time_training_s"), "response_length": med("response_length"),
            "peak_gib": _peak_gib(), "resident_mb_max": max(r["resident_mb_max"] for r in recs),
            "roles_mb": recs[-1]["roles_mb"]}


def _profile_generation(trainer, dataset, log, gpu: bool) -> None:
    """One more episode with its rollout generation under torch.profiler (``generate.profiled``):
    the operators that take the rollout's time (not in the timed figures)."""
    from generate import profiled

    from megatron_patch.rlhf import trainer as T

    inner, engine, calls = trainer._generate, T.generate, []

    def wrapped(*args, **kwargs):
        with profiled("rollout generation of one episode", gpu, rows=25):
            return inner(*args, **kwargs)

    def recorded(model, prompts, params, **kwargs):  # the engine calls of the rollout
        calls.append((model, [list(p) for p in prompts], params, kwargs))
        return engine(model, prompts, params, **kwargs)

    trainer._generate, T.generate = wrapped, recorded
    try:
        trainer.run_episode(dataset, log)
    finally:
        trainer._generate, T.generate = inner, engine
    return calls


def _compare_engines(trainer, calls, init: str, gpu: bool, new: int = 64) -> None:
    """The first rollout call of the profiled episode again, cut to ``new`` tokens and without stop
    tokens (every row makes every step): on the rollout's own model (the trained policy: DDP,
    Float16Module) and on the same checkpoint loaded for generation (``load_for_generation``, as
    ``benchmarks/generate.py``), each with the rollout's prompts (mixed lengths, left padding) and
    with the prompts cut to the shortest one's length. Milliseconds per decode step, printed: which
    of model, prompts or sampling makes the rollout slower per token than generate.py."""
    import dataclasses

    import torch

    from megatron_patch.generation import generate
    from megatron_patch.generation.loader import load_for_generation

    if not calls:
        print("rollout engine comparison: no generate call was recorded", flush=True)
        return
    model, prompts, params, kwargs = calls[0]
    params = dataclasses.replace(params, max_new_tokens=new, stop_token_ids=())
    trainer._resident(trainer.generator)
    fresh = load_for_generation(init, precision="bf16" if gpu else "fp32", flash=True,
                                log=lambda *a: None).model
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    short = min(map(len, prompts))
    equal = [p[-short:] for p in prompts]
    print(f"\nrollout engine comparison: {len(prompts)} prompts of {short}-"
          f"{max(map(len, prompts))} tokens, {new} sampled tokens, no stop tokens", flush=True)
    print("| model | prompts | ms per step |\n|---|---|---|")
    with trainer.layouts.use(trainer.generator.layout):
        for name, m in (("rollout role (trained policy)", model), ("load_for_generation", fresh)):
            generate(m, equal, dataclasses.replace(params, max_new_tokens=2), **kwargs)  # warm-up
            for label, rows in (("as in the rollout", prompts), (f"all cut to {short}", equal)):
                sync()
                t0 = time.perf_counter()
                generate(m, rows, params, **kwargs)
                sync()
                ms = (time.perf_counter() - t0) / new * 1e3
                print(f"| {name} | {label} | {ms:.2f} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (fp32; a smoke run)")
    p.add_argument("--size", default="1B", help="llama preset of every role (default 1B)")
    p.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary trained in-process")
    p.add_argument("--samples", type=int, default=64, help="samples per episode (one mini-batch)")
    p.add_argument("--generation-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--profile", action="store_true",
                   help="after the timed episodes, print a torch.profiler table of one more "
                        "episode's rollout generation, then time that rollout's first generate "
                        "call on the rollout's model and on the checkpoint loaded for generation "
                        "(PPO modes)")
    p.add_argument("--work", default=None, help="keep the tokenizer and checkpoint here")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--child", default=None, choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.cpu:
        os.environ["MEGATRON_PATCH_DEVICE"] = "cpu"
    if a.child:
        import megatron_patch  # noqa: F401

        paths = prepare(a.work, a.size, a.vocab, a.max_prompt_length + a.new_tokens)
        res = child_sft(a, paths) if a.child == "sft" else child_ppo(
            a, paths, a.child == "ppo-offload")
        with open(a.out, "w") as f:
            json.dump(res, f)
        return 0

    modes = [m for m in a.modes.split(",") if m]
    if set(modes) - set(MODES):
        p.error(f"--modes takes {', '.join(MODES)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or tmp
        os.makedirs(work, exist_ok=True)
        same = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                if k not in ("cpu", "modes", "work", "json", "child", "out", "profile")]
        for mode in modes:
            out = os.path.join(work, f"result_{mode}.json")
            r = subprocess.run([sys.executable, os.path.abspath(__file__), *same,
                                *(["--cpu"] if a.cpu else []),
                                *(["--profile"] if a.profile else []),
                                "--work", work, "--child", mode, "--out", out])
            if r.returncode:
                print(f"{mode}: failed (exit {r.returncode})", file=sys.stderr)
                return r.returncode
            with open(out) as f:
                results[mode] = json.load(f)
        earlier = os.path.join(work, "result_sft.json")
        if "sft" not in results and a.work and os.path.exists(earlier):
            # the SFT job's peak from an earlier run in the same --work folder (same settings)
            with open(earlier) as f:
                results["sft"] = json.load(f)
            modes = ["sft"] + modes
    dev = "CPU fp32" if a.cpu else "GPU bf16"
    print(f"\nRLHF, {a.size} LLaMA policy + reference + reward + value (from the reward model), "
          f"one {dev} device; {a.samples} samples x {a.new_tokens} new tokens per episode "
          f"(prompts up to {a.max_prompt_length}), micro-batch {a.micro_batch}, {a.ppo_epochs} "
          f"PPO epoch(s); median of {a.episodes} episodes after {a.warmup} warm-up")
    sft = results.get("sft", {}).get("peak_gib")
    print("| run | samples/s | episode s | generation s | scoring s | training s | peak GiB | "
          "vs SFT | resident MB | roles MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        r = results[mode]
        if mode == "sft":
            print(f"| sft step | | {r['step_s']:.3f} | | | | {r['peak_gib']:.2f} | 1.00 | | |")
            continue
        ratio = f"{r['peak_gib'] / sft:.2f}" if sft else "-"
        print(f"| {mode} | {r['samples_per_s']:.2f} | {r['episode_s']:.2f} | "
              f"{r['generation_s']:.2f} | {r['scoring_s']:.2f} | {r['training_s']:.2f} | "
              f"{r['peak_gib']:.2f} | {ratio} | {r['resident_mb_max']:.0f} | "
              f"{r['roles_mb']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
