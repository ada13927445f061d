"""Continued pretraining (or pretraining from scratch) of any registered family on ``.bin/.idx`` data.

Run with torchrun (the launch scripts do): ``torchrun --nproc-per-node N -m
megatron_patch.training.pretrain --model-family llama --model-size 7B ...``. Rerunning the same command
resumes from ``--load`` (the scripts pass the run's own checkpoint folder); ``--pretrained-checkpoint``
starts from another checkpoint's weights only.
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict
from typing import Optional

import megatron_patch  # noqa: F401  (patches megatron-core before it is used)
from megatron.core import parallel_state

from megatron_patch import platform
from megatron_patch.cli import run_entry
from megatron_patch.data.pretrain import build_pretrain_datasets, data_iterator
from megatron_patch.training import engine
from megatron_patch.training.arguments import ArgumentError, build_parser, check_counts
from megatron_patch.training.logging import print_rank_last


class VocabOnlyTokenizer:
    """Stands in for a tokenizer when only the vocabulary size matters (``--vocab-size``)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = self.eos = vocab_size - 1
        self.pad = self.eod
        self.bos = None
        self.special_tokens_dict = {}
        self.unique_identifiers = OrderedDict(cls="VocabOnlyTokenizer", vocab_size=vocab_size)


def load_tokenizer(args, arch):
    """(tokenizer, original vocab size) from --tokenizer-model, the checkpoint folder, or --vocab-size."""
    if args.vocab_size:
        return VocabOnlyTokenizer(args.vocab_size), args.vocab_size
    from megatron_patch.tokenizer import build_tokenizer, resolve_tokenizer_path

    path = None
    if args.tokenizer_model or args.vocab_file:
        path = resolve_tokenizer_path(args.tokenizer_model or args.vocab_file)
    else:
        for root in (args.load, args.pretrained_checkpoint):
            if root and os.path.isdir(root) and any(
                    os.path.isfile(os.path.join(root, f)) for f in
                    ("tokenizer.json", "tokenizer.model", "vocab.json", "qwen.tiktoken")):
                path = root
                break
    if path is None:
        raise ArgumentError("no tokenizer: set TOKENIZER_PATH / --tokenizer-model, or start from a "
                            "checkpoint folder that carries tokenizer files")
    tok = build_tokenizer(args.tokenizer_type, path, extra_vocab_size=args.extra_vocab_size,
                          vocab_file=args.vocab_file, merge_file=args.merge_file,
                          make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                          tensor_model_parallel_size=args.tensor_model_parallel_size)
    original = getattr(tok, "original_vocab_size", tok.vocab_size)
    return tok, original + (args.extra_vocab_size if hasattr(tok, "original_vocab_size") else 0)


def main(argv: Optional[list] = None) -> int:
    parser = build_parser("megatron_patch continued pretraining")
    args = parser.parse_args(argv)

    def body():
        # first: an error below is then printed by rank 0 only
        platform.init_process_group(args.distributed_timeout_minutes)
        check_counts(args)
        engine.check_checkpoint_args(args)
        arch = engine.resolve_arch(args)  # first: it resolves the virtual pipeline size
        engine.initialize(args)
        tokenizer, original_vocab = load_tokenizer(args, arch)
        vocab = engine.model_vocab(args, arch, original_vocab)
        config = engine.build_config(args, arch)
        model = engine.build_model(args, arch, config, vocab)
        optimizer, scheduler = engine.build_optimizer(args, model)
        engine.wire_config(config, model, optimizer)
        engine.print_banner(args, arch, model)

        state = engine.restore(args, model, optimizer, scheduler)

        gbs = args.global_batch_size
        eval_runs = args.train_iters // args.eval_interval + 1 if args.eval_interval else 0
        train_ds, valid_ds, _ = build_pretrain_datasets(
            args.data_path, args.split, args.seq_length, args.seed, tokenizer,
            [args.train_iters * gbs, eval_runs * args.eval_iters * gbs, args.eval_iters * gbs],
            cache_path=args.data_cache_path, mock=args.mock_data)
        dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        chunks = len(model)
        train_iter = [data_iterator(train_ds, state.consumed_train_samples, args.micro_batch_size,
                                    dp_rank, dp) for _ in range(chunks)]
        valid_factory = None
        if valid_ds is not None and args.eval_iters and \
                len(valid_ds) >= args.micro_batch_size * dp:  # --eval-iters 0: no validation
            valid_factory = lambda: [data_iterator(valid_ds, 0, args.micro_batch_size, dp_rank, dp,
                                                   cyclic=True) for _ in range(chunks)]

        def save_meta():
            if args.save:
                engine.write_checkpoint_meta(args.save, arch, args, tokenizer, vocab, original_vocab)

        engine.train(args, arch, model, optimizer, scheduler, config, train_iter, valid_factory,
                     engine.gpt_forward_step, state, save_meta, vocab)
        print_rank_last(f"> training finished at iteration {state.iteration}")

    return run_entry(body)


if __name__ == "__main__":
    sys.exit(main())
