"""Training step time: megatron_patch (megatron-core GPTModel + DDP + Megatron optimizer + schedule)
vs ``transformers`` ``LlamaForCausalLM`` + ``torch.optim.AdamW`` on the same config and batch.

CPU: ``OMP_NUM_THREADS=1 python benchmarks/train_step.py`` (tiny LLaMA, the issue's figure).
GPU: ``python benchmarks/train_step.py --gpu`` (a ~1B LLaMA, bf16, seq 2048: tokens/s and MFU).
Prints a small table; the ratio is ours / HF (lower is better), measured in one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import megatron_patch  # noqa: E402,F401
import torch  # noqa: E402

from megatron_patch import platform  # noqa: E402
from megatron_patch.models.llama.config import PRESETS  # noqa: E402
from megatron_patch.training import engine  # noqa: E402
from megatron_patch.training.arguments import build_parser  # noqa: E402

H100_BF16_PEAK = 989e12


def hf_step_fn(hf_cfg: dict, batch, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.01, foreach=True)
    tokens, labels = batch

    def step():
        out = model(input_ids=tokens, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    return step


def ours_step_fn(args_list, batch):
    args = build_parser().parse_args(args_list)
    arch = engine.resolve_arch(args)  # first: it resolves the virtual pipeline size
    engine.initialize(args)
    config = engine.build_config(args, arch)
    model = engine.build_model(args, arch, config, args.vocab_size)
    optimizer, scheduler = engine.build_optimizer(args, model)
    engine.wire_config(config, model, optimizer)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    tokens, labels = batch
    dev = platform.current_device()
    b, s = tokens.shape
    mb = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(b, s, device=dev),
          "position_ids": torch.arange(s, device=dev).unsqueeze(0).expand(b, s)}

    def it():
        while True:
            yield mb

    data = it()

    def step():
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        losses = fb(forward_step_func=engine.gpt_forward_step, data_iterator=data, model=model[0],
                    num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=False)
        optimizer.step()
        scheduler.step(increment=b)
        return float(losses[0]["lm loss"][0] / losses[0]["lm loss"][1])

    return step, arch


def timed(step, warmup: int, iters: int):
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--size", default=None, help="llama preset (default tiny on CPU, 1B on GPU)")
    p.add_argument("--no-hf", action="store_true")
    a = p.parse_args()
    gpu = a.gpu
    size = a.size or ("1B" if gpu else "tiny")
    seq = a.seq or (2048 if gpu else 128)
    batch = a.batch or (4 if gpu else 4)
    iters = a.iters or (10 if gpu else 30)
    hf_cfg = dict(PRESETS[size])
    hf_cfg["max_position_embeddings"] = max(seq, hf_cfg["max_position_embeddings"])
    vocab = hf_cfg["vocab_size"]
    dev = platform.current_device()
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), device=dev)
    labels = torch.roll(tokens, -1, dims=1)
    flags = ["--mock-data", "--model-size", size, "--vocab-size", str(vocab), "--seq-length",
             str(seq), "--micro-batch-size", str(batch), "--global-batch-size", str(batch),
             "--train-iters", "1000", "--lr", "1e-4", "--make-vocab-size-divisible-by", "1"]
    if gpu:
        flags += ["--bf16", "--use-flash-attn"]
    ours, arch = ours_step_fn(flags, (tokens, labels))
    t_ours = timed(ours, 3, iters)
    rows = [("megatron_patch (megatron-core)", t_ours)]
    if not a.no_hf:
        dtype = torch.bfloat16 if gpu else torch.float32
        hf_tokens = tokens.clone()
        hf_step = hf_step_fn(hf_cfg, (hf_tokens, hf_tokens), dev, dtype)
        t_hf = timed(hf_step, 3, iters)
        rows.append(("transformers + AdamW", t_hf))
    toks = batch * seq
    flops = engine.model_flops_per_iteration(arch, seq, batch, vocab)
    print(f"\n{size} LLaMA, batch {batch} x seq {seq}, {'GPU bf16' if gpu else 'CPU fp32'}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, median of {iters} steps")
    print(f"| {'implementation':32} | {'step (ms)':>10} | {'tokens/s':>10} | {'TFLOP/s':>8} |"
          + (" MFU |" if gpu else ""))
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 12}|{'-' * 10}|" + ("-----|" if gpu else ""))
    for name, t in rows:
        line = f"| {name:32} | {t * 1e3:10.2f} | {toks / t:10.0f} | {flops / t / 1e12:8.3f} |"
        if gpu:
            line += f" {flops / t / H100_BF16_PEAK:.1%} |"
        print(line)
    if len(rows) == 2:
        print(f"ratio ours / HF step time: {rows[0][1] / rows[1][1]:.3f} (goal <= 1.2)")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
