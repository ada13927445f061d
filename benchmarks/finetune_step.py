"""Fine-tuning step throughput: megatron_patch (megatron-core GPTModel / GPTRewardModel + DDP +
Megatron optimizer + schedule, with ``finetune.sft_forward_step`` / ``reward_forward_step``) vs
``transformers`` (``LlamaForCausalLM`` / ``LlamaForSequenceClassification``) + ``torch.optim.AdamW``
on the same tiny LLaMA (preset ``tiny``, vocabulary 32000) and the same batch, on CPU.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/finetune_step.py [--iters 30] [--json PATH]``
(``--ours-args=--use-flash-attn`` times ours with the SDPA core attention; ``--help`` for the rest).

- SFT: rows of ``SFTDataset`` over chatterbot-corpus dialogs (``{query, response}``, the Alpaca
  prompt, response-only loss), the LLaMA sentencepiece tokenizer, right-padded to ``--seq``. HF
  gets the same ``input_ids`` and the usual unshifted labels (-100 on prompt and padding); both
  losses are the token mean over the same response tokens. Reported: row tokens/s (padding
  included: the work done) and response (trained) tokens/s.
- Reward: ``RewardDataset`` pairs (``Human: q / Assistant:`` prompt, chosen = the dialog's answer,
  rejected = another dialog's answer); Bradley-Terry loss ``-logsigmoid(r_c - r_r).mean()``.
  Rows are padded with id 0 (``<unk>``, never produced by the tokenizer) because the tokenizer's pad
  id equals eos: HF's ``LlamaForSequenceClassification`` reads the last token that is not
  ``pad_token_id``, so with pad 0 it reads the eos, the same position ours reads (``lengths - 1``).
  Reported: pairs/s.

Each implementation is warmed up, then the N timed steps alternate between the two (noise on a
shared machine hits both alike); the table shows the median step. Ratio = ours / HF throughput
(higher is better; the goal is >= 0.8).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from functools import partial

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import megatron_patch  # noqa: E402,F401
import torch  # noqa: E402

from megatron_patch import assets  # noqa: E402
from megatron_patch.data import sft as sft_data  # noqa: E402
from megatron_patch.data.reward import RewardDataset  # noqa: E402
from megatron_patch.models.builder import build_gpt_model  # noqa: E402
from megatron_patch.models.llama.config import PRESETS  # noqa: E402
from megatron_patch.tokenizer import build_tokenizer  # noqa: E402
from megatron_patch.training import engine  # noqa: E402
from megatron_patch.training.arguments import build_parser, validate  # noqa: E402
from megatron_patch.training.finetune import reward_forward_step, sft_forward_step  # noqa: E402

IGNORE = sft_data.IGNORE_INDEX
REWARD_PAD = 0  # <unk>: see the module docstring


# ------------------------------------------------------------------------------------------ data


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_batches(tokenizer, n_rows: int, n_pairs: int, seq: int, seed: int = 0):
    """(SFT batch [n_rows, seq], reward batch [n_pairs, 2, seq]) as the fine-tuning collate makes
    them. Only samples that fit the row untruncated are used (so HF's own label shift drops
    nothing that ours trains on)."""
    dialogs = assets.chatterbot_dialogs("english")
    rng = random.Random(seed)
    order = list(range(len(dialogs)))
    rng.shuffle(order)
    pool = [dialogs[i] for i in order[:max(64, 8 * (n_rows + n_pairs))]]
    with tempfile.TemporaryDirectory() as d:
        sft_path, rm_path = os.path.join(d, "sft.jsonl"), os.path.join(d, "rm.jsonl")
        _write_jsonl(sft_path, [{"query": q, "response": a} for q, a in pool])
        _write_jsonl(rm_path, [{"prompt": f"Human: {q}\n\nAssistant: ", "chosen": a,
                                "rejected": pool[(i + len(pool) // 2) % len(pool)][1]}
                               for i, (q, a) in enumerate(pool)])
        sft_ds = sft_data.SFTDataset([sft_path], tokenizer, seq_len=seq, pad_len=seq)
        rm_ds = RewardDataset([rm_path], tokenizer, seq_len=seq, pad_len=seq)
    rm_ds.pad_id = REWARD_PAD
    sft_idx = [i for i, n in enumerate(sft_ds.full_lengths) if n <= seq][:n_rows]
    rm_idx = [i for i, (cands, _) in enumerate(rm_ds.items)
              if all(len(t) < seq for t, _lab in cands)][:n_pairs]
    if len(sft_idx) < n_rows or len(rm_idx) < n_pairs:
        raise SystemExit(f"not enough samples that fit --seq {seq}")
    sft = sft_data.collate([sft_ds[i] for i in sft_idx])
    rm = sft_data.collate([rm_ds[i] for i in rm_idx])
    real = torch.arange(seq) < rm["lengths"].unsqueeze(-1)
    assert not (rm["tokens"][real] == REWARD_PAD).any(), "a real token has the reward pad id"
    return sft, rm


def hf_sft_labels(batch) -> torch.Tensor:
    """Ours: labels[i] is the id at i+1 (shifted). HF: labels[i] is the id at i (it shifts)."""
    lab = batch["labels"]
    return torch.cat([torch.full_like(lab[:, :1], IGNORE), lab[:, :-1]], dim=1)


# ------------------------------------------------------------------------------------------ ours


def _flags(vocab: int, seq: int, mbs: int):
    return ["--mock-data", "--model-size", "tiny", "--vocab-size", str(vocab), "--seq-length",
            str(seq), "--micro-batch-size", str(mbs), "--global-batch-size", str(mbs),
            "--train-iters", "1000", "--lr", "1e-4", "--make-vocab-size-divisible-by", "1"]


_initialized = False


def ours_step_fn(vocab: int, batch: dict, task: str, extra_flags=()):
    """One optimizer step of ours on ``batch`` (the same microbatch every step)."""
    global _initialized
    if task == "sft":
        b, L = batch["tokens"].shape
        rows = b
    else:
        b, k, L = batch["tokens"].shape
        rows = b * k
    args = build_parser().parse_args(_flags(vocab, L, b) + list(extra_flags))
    arch = engine.resolve_arch(args)
    if not _initialized:
        engine.initialize(args)
        _initialized = True
    else:  # one process group for both tasks; derive this run's settings as initialize does
        validate(args, torch.distributed.get_world_size())
    torch.manual_seed(args.seed)
    config = engine.build_config(args, arch)
    builder = partial(build_gpt_model, reward_head=True) if task == "reward" else None
    model = engine.build_model(args, arch, config, vocab, model_builder=builder)
    optimizer, scheduler = engine.build_optimizer(args, model)
    engine.wire_config(config, model, optimizer)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    fwd = sft_forward_step if task == "sft" else partial(reward_forward_step, margin=0.0)
    key = "lm loss" if task == "sft" else "rm loss"

    def it():
        while True:
            yield batch

    data = it()

    def step():
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        losses = fb(forward_step_func=fwd, data_iterator=data, model=model[0],
                    num_microbatches=1, seq_length=L, micro_batch_size=rows, forward_only=False)
        optimizer.step()
        scheduler.step(increment=b)
        return float(losses[0][key][0] / losses[0][key][1])

    return step


# -------------------------------------------------------------------------------------------- HF


def hf_step_fn(hf_cfg: dict, batch: dict, task: str):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(1234)
    if task == "sft":
        model = LlamaForCausalLM(cfg).train()
        tokens, labels = batch["tokens"].clone(), hf_sft_labels(batch)
    else:
        cfg.num_labels = 1
        cfg.pad_token_id = REWARD_PAD
        model = LlamaForSequenceClassification(cfg).train()
        b, k, L = batch["tokens"].shape
        tokens = batch["tokens"].reshape(b * k, L).clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.01, foreach=True)

    def step():
        if task == "sft":
            loss = model(input_ids=tokens, labels=labels).loss
        else:
            r = model(input_ids=tokens).logits.view(b, k)  # [b, 2]: chosen, rejected
            loss = -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ---------------------------------------------------------------------------------------- timing


def alternate(steps: dict, warmup: int, iters: int):
    """Warm each step function up, then time them in turn; {name: (median s, first loss, last)}."""
    first = {}
    for name, step in steps.items():
        first[name] = step()
        for _ in range(warmup - 1):
            step()
    times = {name: [] for name in steps}
    last = {}
    for _ in range(iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            last[name] = step()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), first[name], last[name]) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=30, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="SFT rows per step")
    p.add_argument("--pairs", type=int, default=4, help="reward (chosen, rejected) pairs per step")
    p.add_argument("--seq", type=int, default=128, help="row length (padded)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", default="sft,reward")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--ours-args", default="", metavar="FLAGS",
                   help="extra training flags for ours, e.g. --ours-args=--use-flash-attn "
                        "(SDPA core attention instead of megatron-core's unfused one)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the numbers here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tasks = [t for t in a.tasks.split(",") if t]
    if not tasks or set(tasks) - {"sft", "reward"}:
        p.error("--tasks takes sft, reward or sft,reward")

    tokenizer = build_tokenizer("auto", assets.llama_sentencepiece(),
                                make_vocab_size_divisible_by=1)
    hf_cfg = dict(PRESETS["tiny"])
    vocab = hf_cfg["vocab_size"]
    assert tokenizer.vocab_size == vocab, (tokenizer.vocab_size, vocab)
    hf_cfg["max_position_embeddings"] = max(a.seq, hf_cfg["max_position_embeddings"])
    sft_batch, rm_batch = build_batches(tokenizer, a.batch, a.pairs, a.seq)

    import transformers

    results = {"torch": torch.__version__, "transformers": transformers.__version__,
               "threads": torch.get_num_threads(), "seq": a.seq, "iters": a.iters,
               "warmup": a.warmup, "ours_args": a.ours_args,
               "model": "tiny LLaMA (2 layers, hidden 64, vocab 32000)"}
    for task in tasks:
        batch = sft_batch if task == "sft" else rm_batch
        steps = {"ours": ours_step_fn(vocab, batch, task, a.ours_args.split())}
        if not a.no_hf:
            steps["hf"] = hf_step_fn(hf_cfg, batch, task)
        timed = alternate(steps, a.warmup, a.iters)
        r = {"batch": int(batch["tokens"].shape[0])}
        if task == "sft":
            rows, resp = batch["tokens"].numel(), int(batch["loss_mask"].sum())
            r.update(row_tokens=rows, response_tokens=resp)
        else:
            r.update(rows=int(batch["tokens"].shape[0] * batch["tokens"].shape[1]))
        for name, (t, l0, l1) in timed.items():
            e = {"step_ms": t * 1e3, "first_loss": l0, "last_loss": l1}
            if task == "sft":
                e.update(row_tokens_per_s=rows / t, response_tokens_per_s=resp / t)
            else:
                e.update(pairs_per_s=r["batch"] / t)
            r[name] = e
        if "hf" in r:
            metric = "row_tokens_per_s" if task == "sft" else "pairs_per_s"
            r["ratio"] = r["ours"][metric] / r["hf"][metric]
        results[task] = r

    print(f"\ntiny LLaMA (vocab {vocab}), CPU fp32, torch.get_num_threads()={results['threads']} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
          f"torch {results['torch']}, transformers {results['transformers']}; "
          f"median of {a.iters} alternating steps after {a.warmup} warm-up"
          + (f"; ours with {a.ours_args}" if a.ours_args else ""))
    print(f"| {'task':48} | {'ours':>10} | {'HF':>10} | {'ratio':>6} |")
    print(f"|{'-' * 50}|{'-' * 12}|{'-' * 12}|{'-' * 8}|")

    def row(label, ours, hf, ratio=True):
        rs = f"{ours / hf:6.3f}" if hf and ratio else " " * 6
        hs = f"{hf:10.1f}" if hf else f"{'-':>10}"
        print(f"| {label:48} | {ours:10.1f} | {hs} | {rs} |")

    for task in tasks:
        r = results[task]
        hf = r.get("hf", {})
        if task == "sft":
            tag = f"SFT {r['batch']} rows x {a.seq}"
            row(f"{tag}: row tokens/s", r["ours"]["row_tokens_per_s"],
                hf.get("row_tokens_per_s"))
            row(f"{tag}: response tokens/s ({r['response_tokens']}/step)",
                r["ours"]["response_tokens_per_s"], hf.get("response_tokens_per_s"))
        else:
            tag = f"reward {r['batch']} pairs x 2 x {a.seq}"
            row(f"{tag}: pairs/s", r["ours"]["pairs_per_s"], hf.get("pairs_per_s"))
        row(f"{task}: step ms", r["ours"]["step_ms"], hf.get("step_ms"), ratio=False)
    for task in tasks:
        r = results[task]
        line = (f"{task} loss first/last step: ours {r['ours']['first_loss']:.4f}/"
                f"{r['ours']['last_loss']:.4f}")
        if "hf" in r:
            line += f", HF {r['hf']['first_loss']:.4f}/{r['hf']['last_loss']:.4f}"
        print(line)
    if not a.no_hf:
        print("throughput ratio ours / HF: " + ", ".join(
            f"{t} {results[t]['ratio']:.3f}" for t in tasks if "ratio" in results[t]) +
            " (goal >= 0.8)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
