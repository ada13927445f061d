"""Megatron-style command-line flags for the training entry points (the ones the launch scripts emit).

Flag names follow Megatron-LM (``--tensor-model-parallel-size``, ``--micro-batch-size``,
``--lr-warmup-iters``, ``--use-distributed-optimizer``, ...) so that users' existing scripts and
habits carry over. ``validate(args)`` derives and checks values and fails with one clear line.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from megatron_patch import platform


class ArgumentError(ValueError):
    pass


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _positive_int(s: str) -> int:
    value = int(s)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-family", default="llama", help="llama, qwen2, mistral, bloom, ...")
    g.add_argument("--model-size", default="tiny",
                   help="a size preset of the family (7B, 13B, tiny, ...) or 'auto' (read the "
                        "architecture from the checkpoint's config.json)")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--seq-length", type=int, required=False, default=None)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="fused attention: TE/flash on GPU, torch SDPA otherwise")
    g.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"],
                   default="auto")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=_positive_int,
                   default=platform.DEFAULT_TIMEOUT_MINUTES,
                   help="timeout of torch.distributed's collectives and of megatron-core's "
                        "process groups (default %(default)s; raise it where a rank may wait long on the "
                        "others, e.g. while a large checkpoint loads)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-tokens", type=int, default=None,
                   help="alternative to --train-iters: iterations = tokens / (GBS x seq)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="alternative to --train-iters (Megatron-LM's): iterations = samples / GBS")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine",
                                                "inverse-square-root", "WSD"], default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-tokens", type=int, default=None)
    g.add_argument("--lr-warmup-samples", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup iterations as a fraction of the decay iterations")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--initial-loss-scale", type=float, default=2 ** 16)
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--recompute-activations", action="store_true", help="selective recompute")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop after this iteration (for tests of resume)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="a prefix, or 'weight prefix weight prefix ...' (blend)")
    g.add_argument("--split", default="98,2,0")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--tokenizer-type", default="auto")
    g.add_argument("--tokenizer-model", "--tokenizer-path", dest="tokenizer_model", default=None,
                   help="HF tokenizer folder, sentencepiece .model, or a TOKENIZER key")
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--extra-vocab-size", type=int, default=0)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="use a vocabulary of this size without a tokenizer (mock data, tests)")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None,
                   help="resume from this folder's latest checkpoint (model, optimizer, RNG, data)")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="start from these weights only (optimizer and iteration are not loaded)")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--ckpt-format", choices=["legacy", "torch_dist"], default="legacy")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load --load's weights only and reset the iteration (Megatron-LM flag)")


def add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-dir", default=None, help="folder for metrics.jsonl")
    g.add_argument("--run-name", default=None)


def build_parser(description: str = "megatron_patch training") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for add in (add_model_args, add_parallel_args, add_training_args, add_data_args,
                add_checkpoint_args, add_logging_args):
        add(p)
    return p


def parse_args(argv: Optional[List[str]] = None, parser: Optional[argparse.ArgumentParser] = None):
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    return args


def derive_schedule(args) -> None:
    """Iterations from tokens or samples when not given; warmup and decay iterations (from
    iterations, tokens, samples or, for warmup, a fraction of the decay), as Megatron-LM derives
    them: samples / global batch, tokens / (global batch x sequence length)."""
    gbs, seq = args.global_batch_size, args.seq_length
    _one_of(args, "train_iters", "train_samples", "train_tokens")
    _one_of(args, "lr_decay_iters", "lr_decay_samples")
    warmups = ["lr_warmup_tokens", "lr_warmup_samples", "lr_warmup_fraction"]
    _one_of(args, *warmups)
    if args.lr_warmup_iters and any(getattr(args, w) is not None for w in warmups):
        raise ArgumentError("give one of --lr-warmup-iters, --lr-warmup-tokens, "
                            "--lr-warmup-samples, --lr-warmup-fraction")
    if args.train_iters is None:
        if args.train_samples is not None:
            args.train_iters = max(1, args.train_samples // gbs)
        elif args.train_tokens is not None:
            args.train_iters = max(1, args.train_tokens // (gbs * seq))
        else:
            raise ArgumentError("give --train-iters, --train-samples or --train-tokens")
    if args.lr_decay_samples is not None:
        args.lr_decay_iters = max(1, args.lr_decay_samples // gbs)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_tokens is not None:
        args.lr_warmup_iters = args.lr_warmup_tokens // (gbs * seq)
    elif args.lr_warmup_samples is not None:
        args.lr_warmup_iters = args.lr_warmup_samples // gbs
    elif args.lr_warmup_fraction is not None:
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    args.lr_warmup_iters = min(args.lr_warmup_iters, max(args.lr_decay_iters - 1, 0))


def _one_of(args, *names) -> None:
    given = [n for n in names if getattr(args, n) is not None]
    if len(given) > 1:
        raise ArgumentError("give one of " + ", ".join("--" + n.replace("_", "-") for n in names)
                            + f" (got {', '.join('--' + n.replace('_', '-') for n in given)})")


# flag -> smallest value that makes sense (a zero or negative batch, length or count would end
# in a ZeroDivisionError, an assertion deep in megatron-core, or a run that silently trains nothing)
_MINIMUM = {"micro_batch_size": 1, "global_batch_size": 1, "seq_length": 1, "train_iters": 0,
            "train_tokens": 1, "train_samples": 1, "lr_warmup_iters": 0, "lr_warmup_tokens": 0,
            "lr_warmup_samples": 0, "lr_decay_iters": 1, "lr_decay_samples": 1,
            "eval_iters": 0, "eval_interval": 0, "log_interval": 1, "exit_interval": 0,
            "epochs": 1, "pad_len": 1}


def check_counts(args) -> None:
    """One error line for a count flag below its minimum (the training entry points call it first;
    RLHF sets these values itself)."""
    if args.seq_length is None:
        raise ArgumentError("--seq-length is required")
    for name, least in _MINIMUM.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise ArgumentError(f"{flag} must be {'positive' if least == 1 else '>= 0'}, "
                                f"got {value}")


def validate(args, world_size: int) -> None:
    """Derive data-parallel size, microbatch counts and iterations; raise ArgumentError on nonsense."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ArgumentError("parallel sizes must be >= 1")
    if world_size % (tp * pp):
        raise ArgumentError(f"world size {world_size} is not a multiple of TP x PP = {tp * pp}")
    args.data_parallel_size = world_size // (tp * pp)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % per_step:
        raise ArgumentError(f"global batch size {args.global_batch_size} is not a multiple of "
                            f"micro batch x data parallel = {per_step}")
    args.num_microbatches = args.global_batch_size // per_step
    if args.fp16 and args.bf16:
        raise ArgumentError("choose one of --fp16 and --bf16")
    args.precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    if args.seq_length is None:
        raise ArgumentError("--seq-length is required")
    if not getattr(args, "epochs", None):  # epoch-based runs derive it from the data (finetune)
        derive_schedule(args)
    if args.virtual_pipeline_model_parallel_size and pp == 1:
        raise ArgumentError("virtual pipeline stages need --pipeline-model-parallel-size > 1")
    if args.save_interval is not None and args.save_interval < 0:
        raise ArgumentError("--save-interval must be >= 0 (0: one checkpoint at the end only)")
    if getattr(args, "task", None) is not None:  # fine-tuning reads json data, not .bin/.idx
        return
    if args.data_path is None and not args.mock_data:
        raise ArgumentError("give --data-path PREFIX (or --mock-data)")
    if args.data_path:
        prefixes = args.data_path[1::2] if len(args.data_path) > 1 else args.data_path
        for prefix in prefixes:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise ArgumentError(f"dataset prefix {prefix!r}: missing {prefix + ext}")
