"""Supervised fine-tuning and reward-model training on megatron-core (``--task sft|reward``).

Same engine as pretraining (model provider, DDP, optimizer, scheduler, pipeline schedules,
checkpoints, logs); what differs is the data and the loss:

- ``sft``: ``SFTDataset`` (Alpaca JSON, ``{query, response}`` jsonl, chat ``messages``); the loss is
  the token-mean cross entropy over response tokens of the whole global batch (megatron-core's
  per-token loss: the same for any data-parallel size and accumulation). ``--packing`` packs
  several samples per row with positions restarting per sample and a block-diagonal causal mask.
- ``reward``: ``RewardDataset`` (``{prompt, chosen, rejected}`` or listwise ``{query, response,
  score}``); a ``GPTRewardModel`` (scalar head on the last real token) trained with the
  Bradley-Terry loss over every (better, worse) pair, optional ``--reward-margin``; validation
  reports accuracy and the mean chosen-rejected gap. Initialised from an SFT/LM checkpoint (the LM
  head is dropped, the value head is new); the checkpoint records ``reward_model: true``.

Epoch-based: each epoch visits the training set once in a seeded shuffled order (the tail that does
not fill a global batch is left out of that epoch), and validation runs over the whole validation
set after every epoch unless ``--eval-interval`` says otherwise. A rerun resumes exactly.
"""
from __future__ import annotations

import json
import math
import os
import sys
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch import platform
from megatron_patch.cli import run_entry
from megatron_patch.convert import layout
from megatron_patch.data import sft as sft_data
from megatron_patch.data.pretrain import data_iterator
from megatron_patch.data.reward import RewardDataset
from megatron_patch.models.builder import build_gpt_model
from megatron_patch.training import engine
from megatron_patch.training.arguments import (ArgumentError, build_parser, check_counts,
                                                 derive_schedule)
from megatron_patch.training.logging import print_rank_last
from megatron_patch.training.losses import gather_last, masked_token_loss, pairwise_reward_loss
from megatron_patch.training.pretrain import load_tokenizer


def add_finetune_args(p) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--task", choices=["sft", "reward"], default="sft")
    g.add_argument("--train-data", "--train-data-path", dest="train_data", nargs="+",
                   help="json/jsonl files (or folders) of training records")
    g.add_argument("--valid-data", "--valid-data-path", dest="valid_data", nargs="*", default=None)
    g.add_argument("--epochs", "--epoch", dest="epochs", type=int, default=None,
                   help="passes over the training set (sets --train-iters)")
    g.add_argument("--pad-len", "--max-padding-length", dest="pad_len", type=int, default=None,
                   help="row length (default --seq-length)")
    g.add_argument("--packing", action="store_true", help="SFT: pack several samples per row")
    g.add_argument("--sft-format", default="auto", choices=["auto", "alpaca", "query_response",
                                                              "messages"])
    g.add_argument("--reward-margin", type=float, default=0.0)
    g.add_argument("--eval-only", action="store_true",
                   help="load the checkpoint, report loss/perplexity (SFT) or accuracy (reward) on "
                        "--valid-data, and exit")
    p.set_defaults(eval_interval=None)


class EpochShuffled(torch.utils.data.Dataset):
    """Index ``i`` of ``epochs`` shuffled passes over ``dataset``, each cut to ``per_epoch`` items.
    The order depends on the seed and the epoch only, so a resumed run reads what the
    uninterrupted one would."""

    def __init__(self, dataset, epochs: int, per_epoch: int, seed: int):
        self.dataset, self.per_epoch, self.seed = dataset, per_epoch, seed
        self.epochs = epochs
        self._perm = {}

    def __len__(self) -> int:
        return self.epochs * self.per_epoch

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm[epoch] = np.random.RandomState(self.seed + epoch).permutation(
                len(self.dataset))
        return self._perm[epoch]

    def __getitem__(self, i: int):
        epoch, j = divmod(i, self.per_epoch)
        return self.dataset[int(self.perm(epoch)[j])]


def _to(batch: dict, key: str):
    v = batch.get(key)
    return None if v is None else v.to(platform.current_device(), non_blocking=True)


def sft_forward_step(data_iterator, model):
    """One SFT microbatch: cross entropy on response tokens ([b, s] per-token losses)."""
    batch = next(data_iterator)
    tokens, labels = _to(batch, "tokens"), _to(batch, "labels")
    loss_mask, position_ids = _to(batch, "loss_mask"), _to(batch, "position_ids")
    attention_mask = _to(batch, "attention_mask")
    if attention_mask is not None and attention_mask.dim() == 3:  # [b, L, L] -> [b, 1, L, L]
        attention_mask = attention_mask.unsqueeze(1)
    labels = labels.clamp(min=0)  # ignored positions (-100) are zeroed by loss_mask
    output = model(tokens, position_ids, attention_mask, labels=labels)

    def loss_func(output_tensor):
        loss_sum, n = masked_token_loss(output_tensor, loss_mask)
        return loss_sum, n.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), n])}
    return output, loss_func


def reward_forward_step(data_iterator, model, margin: float = 0.0):
    """One reward microbatch: [b, K, L] candidates -> values at the last real tokens -> pairwise
    loss over every (better, worse) pair."""
    batch = next(data_iterator)
    b, k, L = batch["tokens"].shape
    tokens = _to(batch, "tokens").view(b * k, L)
    position_ids = _to(batch, "position_ids").view(b * k, L)
    scores = _to(batch, "scores")
    lengths = _to(batch, "lengths").view(b * k)
    real = torch.arange(L, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)  # [b*k, L]
    output = model(tokens, position_ids, None)

    def loss_func(values):  # values [b*k, L]
        rewards = gather_last(values, real).view(b, k)
        loss_sum, pairs, stats = pairwise_reward_loss(rewards, scores, margin)
        report = {"rm loss": torch.stack([loss_sum.detach(), pairs]),
                  "accuracy": torch.stack([stats["correct"], pairs]),
                  "chosen_rejected_gap": torch.stack([stats["gap"], pairs])}
        return loss_sum, pairs.to(torch.int), report
    return output, loss_func


def build_datasets(args, tokenizer):
    if args.task == "sft":
        make = partial(sft_data.SFTDataset, tokenizer=tokenizer, seq_len=args.seq_length,
                       pad_len=args.pad_len, packing=args.packing, fmt=args.sft_format,
                       create_attention_mask=args.packing)
    else:
        make = partial(RewardDataset, tokenizer=tokenizer, seq_len=args.seq_length,
                       pad_len=args.pad_len)
    train = make(args.train_data)
    valid = make(args.valid_data) if args.valid_data else None
    for name, ds in (("train", train), ("valid", valid)):
        if ds is None:
            continue
        if ds.bad:
            print_rank_last(f"warning: {name} data: {ds.bad.total} malformed records skipped "
                            f"({ds.bad.examples[:3]})")
        if args.task == "sft":
            # the rows are cut to min(--seq-length, --pad-len) tokens: name the flag that cuts
            limit = f"--seq-length {args.seq_length}"
            if args.pad_len is not None and args.pad_len < args.seq_length:
                limit = f"--pad-len {args.pad_len} (below --seq-length {args.seq_length})"
            empty = sum(all(x == sft_data.IGNORE_INDEX for x in labels)
                        for _, labels in ds.samples)
            if empty == len(ds.samples):
                raise ArgumentError(
                    f"{name} data: no sample keeps a response token within {limit} (the prompts "
                    "fill it): raise SEQ_LEN / PAD_LEN")
            if ds.truncated or empty:
                print_rank_last(f"warning: {name} data: {ds.truncated} of {len(ds.samples)} "
                                f"samples exceed {limit} and were cut; "
                                f"{empty} keep no response token")
    return train, valid


class EvalPadded(torch.utils.data.Dataset):
    """The validation set padded to ``length`` with zero-weight copies of its first sample (SFT:
    no trained token; reward: equal scores, so no pair), so that one pass of whole global
    batches evaluates every sample exactly once."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if i < len(self.dataset):
            return self.dataset[i]
        s = dict(self.dataset[0])
        if "scores" in s:
            s["scores"] = torch.zeros_like(s["scores"])
        else:
            s["loss_mask"] = torch.zeros_like(s["loss_mask"])
        return s


def main(argv: Optional[list] = None) -> int:
    parser = build_parser("megatron_patch fine-tuning (SFT / reward model)")
    add_finetune_args(parser)
    args = parser.parse_args(argv)

    def body():
        # first: an error below is then printed by rank 0 only
        platform.init_process_group(args.distributed_timeout_minutes)
        check_counts(args)
        engine.check_checkpoint_args(args)
        if args.eval_only:
            if not args.valid_data:
                raise ArgumentError("--eval-only needs --valid-data FILE [FILE ...]")
            if not (layout.has_checkpoint(args.load) or args.pretrained_checkpoint):
                raise ArgumentError("--eval-only needs a checkpoint (--load or "
                                    "--pretrained-checkpoint)")
            args.train_data = args.train_data or args.valid_data
            args.train_iters, args.epochs, args.save = 0, None, None
        if not args.train_data:
            raise ArgumentError("give --train-data FILE [FILE ...]")
        if args.epochs is None and args.train_iters is None:
            raise ArgumentError("give --epochs N (or --train-iters)")
        if args.packing and args.task != "sft":
            raise ArgumentError("--packing is for --task sft")
        if args.pad_len is None:
            args.pad_len = args.seq_length
        if args.packing and args.transformer_impl != "local":
            args.transformer_impl = "local"  # packed rows use a block mask (SDPA / local attention)
        arch = engine.resolve_arch(args)
        engine.initialize(args)
        tokenizer, original_vocab = load_tokenizer(args, arch)
        vocab = engine.model_vocab(args, arch, original_vocab)
        src = engine.checkpoint_source(args)

        train_ds, valid_ds = build_datasets(args, tokenizer)
        if args.task == "reward":
            ks = {len(scores) for ds in (train_ds, valid_ds) if ds is not None
                  for _, scores in ds.items}
            if len(ks) > 1 and (args.micro_batch_size > 1 or args.pipeline_model_parallel_size > 1):
                raise ArgumentError(f"listwise records with different numbers of responses "
                                    f"({sorted(ks)}) need --micro-batch-size 1 and PP=1")
            args.rows_per_sample = max(ks)
        gbs = args.global_batch_size
        per_epoch = (len(train_ds) // gbs) * gbs
        if per_epoch == 0:
            raise ArgumentError(f"the training set has {len(train_ds)} samples, fewer than the "
                                f"global batch size {gbs}")
        iters_per_epoch = per_epoch // gbs
        if args.eval_only:
            args.eval_interval = 1
        elif args.epochs:
            args.train_iters = args.epochs * iters_per_epoch
        epochs = args.epochs or max(1, math.ceil(args.train_iters / iters_per_epoch))
        derive_schedule(args)
        if args.eval_interval is None:
            args.eval_interval = iters_per_epoch
        if args.save and args.save_interval is None:
            args.save_interval = iters_per_epoch
        if valid_ds is not None:
            args.eval_iters = math.ceil(len(valid_ds) / gbs)
            valid_ds = EvalPadded(valid_ds, args.eval_iters * gbs)

        reward = args.task == "reward"
        config = engine.build_config(args, arch)
        builder = partial(build_gpt_model, reward_head=True) if reward else None
        model = engine.build_model(args, arch, config, vocab, model_builder=builder)
        optimizer, scheduler = engine.build_optimizer(args, model)
        engine.wire_config(config, model, optimizer)
        engine.print_banner(args, arch, model)
        print_rank_last(f"> {args.task}: {len(train_ds)} training samples, {iters_per_epoch} "
                        f"iterations per epoch x {epochs} epochs = {args.train_iters} iterations; "
                        f"{len(valid_ds.dataset) if valid_ds is not None else 0} validation "
                        "samples")

        state = engine.restore(args, model, optimizer, scheduler, value_head=reward)

        dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        chunks = len(model)
        ordered = EpochShuffled(train_ds, epochs, per_epoch, args.seed)
        collate = sft_data.collate
        train_iter = [data_iterator(ordered, state.consumed_train_samples, args.micro_batch_size,
                                    dp_rank, dp, collate_fn=collate) for _ in range(chunks)]
        valid_factory = None
        if valid_ds is not None:
            valid_factory = lambda: [data_iterator(valid_ds, 0, args.micro_batch_size, dp_rank,
                                                   dp, collate_fn=collate)
                                     for _ in range(chunks)]

        def save_meta():
            if args.save:
                engine.write_checkpoint_meta(args.save, arch, args, tokenizer, vocab,
                                             original_vocab, reward_model=reward)

        step = partial(reward_forward_step, margin=args.reward_margin) if reward \
            else sft_forward_step
        if args.eval_only:
            metrics = engine.evaluate(args, model, get_forward_backward_func(), valid_factory,
                                      step, args.eval_iters)
            if "lm loss" in metrics:
                metrics["ppl"] = math.exp(min(20.0, metrics["lm loss"]))
            print_rank_last("> evaluation of " + src + " on " + " ".join(args.valid_data) + ": " +
                            " | ".join(f"{k}: {v:.6f}" for k, v in metrics.items()))
            if args.log_dir and dist.get_rank() == dist.get_world_size() - 1:
                os.makedirs(args.log_dir, exist_ok=True)
                with open(os.path.join(args.log_dir, "evaluation.json"), "w") as f:
                    json.dump({"checkpoint": src, "data": args.valid_data,
                               "samples": len(valid_ds.dataset), **metrics}, f, indent=1)
            return 0
        engine.train(args, arch, model, optimizer, scheduler, config, train_iter, valid_factory,
                     step, state, save_meta, vocab, loss_key="rm loss" if reward else "lm loss")
        print_rank_last(f"> {args.task} finished at iteration {state.iteration}")

    return run_entry(body)


if __name__ == "__main__":
    sys.exit(main())
