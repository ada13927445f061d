"""The training engine on megatron-core: parallel state, model provider, DDP, optimizer, scheduler,
microbatches through ``get_forward_backward_func``, validation, checkpoints and logs.

Pretraining, SFT and reward-model training share it; they differ in their datasets and in the
``forward_step`` they pass to ``train``. Losses are per-token sums with token counts
(``calculate_per_token_loss``), so the reported and optimised loss is the token mean over the global
batch, whatever the data-parallel size and the number of microbatches.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module

from megatron_patch import platform
from megatron_patch.convert import layout
from megatron_patch.models.builder import (
    arch_from_hf, build_gpt_model, padded_vocab, transformer_config)
from megatron_patch.models.common.config import MegatronArch
from megatron_patch.models.registry import get_family
from megatron_patch.training import checkpointing
from megatron_patch.training.arguments import ArgumentError
from megatron_patch.training.logging import MetricsLogger, print_rank_last

# --------------------------------------------------------------------------------------- set-up


def initialize(args) -> None:
    """torch.distributed + megatron parallel state + seeds (Megatron-LM's seeding rule). Call it after
    ``resolve_arch``, which turns --num-layers-per-virtual-pipeline-stage into the number of virtual
    stages that the parallel state must know before any model chunk is built."""
    platform.init_process_group(args.distributed_timeout_minutes)
    world = dist.get_world_size()
    from megatron_patch.training.arguments import validate

    validate(args, world)
    vpp = args.virtual_pipeline_model_parallel_size
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=args.expert_model_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    seed_all(args.seed)


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def checkpoint_hf_config(path: Optional[str]) -> Optional[dict]:
    if path and os.path.isdir(path):
        return layout.read_hf_config(path)
    return None


def resolve_arch(args) -> MegatronArch:
    """The architecture: the checkpoint's config.json (``--model-size auto``, or whenever a checkpoint
    carries one), else the family's preset; Megatron flags override either."""
    hf, from_checkpoint = None, False
    for path in (args.load, args.pretrained_checkpoint):
        if layout.has_checkpoint(path):
            hf = checkpoint_hf_config(path)
            if hf is not None:
                from_checkpoint = True
                break
    if hf is None:
        if args.model_size == "auto":
            raise ArgumentError("MODEL_SIZE=auto needs a checkpoint that carries config.json "
                                f"(looked in {args.load or '-'} and {args.pretrained_checkpoint or '-'})")
        hf = get_family(args.model_family).preset(args.model_size)
        hf["max_position_embeddings"] = max(hf.get("max_position_embeddings", 0), args.seq_length)
    fam = get_family(args.model_family) if hf.get("architectures") is None else None
    arch = arch_from_hf(hf, family=fam.name if fam else None)
    arch.extra["from_checkpoint"] = from_checkpoint
    overrides = {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
                 "ffn_hidden_size": args.ffn_hidden_size,
                 "num_attention_heads": args.num_attention_heads,
                 "num_query_groups": args.num_query_groups if args.group_query_attention or
                 args.num_query_groups else None}
    for k, v in overrides.items():
        if v is not None:
            arch.config[k] = v
    if args.hidden_size or args.num_attention_heads:
        arch.config["kv_channels"] = arch.config["hidden_size"] // arch.config["num_attention_heads"]
    if args.max_position_embeddings:
        arch.model["max_sequence_length"] = args.max_position_embeddings
    if args.untie_embeddings_and_output_weights:
        arch.model["share_embeddings_and_output_weights"] = False
    if arch.model.get("max_sequence_length", 0) < args.seq_length and \
            arch.model.get("position_embedding_type") == "learned_absolute":
        raise ArgumentError(f"--seq-length {args.seq_length} exceeds the model's "
                            f"{arch.model['max_sequence_length']} learned positions")
    arch.hf_config = get_family(arch.family).config_table.to_hf(arch)
    if args.num_layers_per_virtual_pipeline_stage and not args.virtual_pipeline_model_parallel_size:
        per = args.num_layers_per_virtual_pipeline_stage * args.pipeline_model_parallel_size
        args.virtual_pipeline_model_parallel_size = arch.config["num_layers"] // per
    return arch


def build_config(args, arch: MegatronArch):
    recompute = args.recompute_granularity or "none"
    cfg = transformer_config(
        arch, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        vpp=args.virtual_pipeline_model_parallel_size, ep=args.expert_model_parallel_size,
        sequence_parallel=args.sequence_parallel, precision=args.precision,
        recompute=recompute, recompute_layers=args.recompute_num_layers,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        calculate_per_token_loss=True,
    )
    if recompute == "full":
        cfg.recompute_method = args.recompute_method
    return cfg


def build_model(args, arch: MegatronArch, config, vocab_size: int,
                model_builder: Optional[Callable] = None, ddp: bool = True,
                inference: bool = False) -> List[torch.nn.Module]:
    """The model chunks of this rank (several with virtual pipeline stages), fp16/bf16-wrapped and
    in megatron-core DDP. ``ddp=False``: a model that is never trained (an RLHF reference or
    reward model) skips the DDP wrapper and its fp32 gradient buffers, and its parameters get
    ``requires_grad=False``."""
    use_te = None
    if args.transformer_impl == "local":
        use_te = False
    elif args.transformer_impl == "transformer_engine":
        use_te = True
    vpp = args.virtual_pipeline_model_parallel_size
    if vpp != parallel_state.get_virtual_pipeline_model_parallel_world_size():
        raise RuntimeError("the parallel state does not know the virtual pipeline size: call "
                           "engine.initialize after engine.resolve_arch")
    builder = model_builder or build_gpt_model
    chunks = []
    for vp_stage in (range(vpp) if vpp else [None]):
        m = builder(arch, config, vp_stage=vp_stage, vocab_size=vocab_size,
                    max_sequence_length=max(args.seq_length, arch.model.get("max_sequence_length", 0)),
                    use_te=use_te, flash=args.use_flash_attn,
                    **({"inference": True} if inference else {}))
        chunks.append(m)
    for m in chunks:
        for p in m.parameters():
            # megatron-core's TP attributes must exist on every parameter for the optimizer
            if not hasattr(p, "tensor_model_parallel"):
                p.tensor_model_parallel = False
                p.partition_dim = -1
                p.partition_stride = 1
    if args.precision in ("fp16", "bf16"):
        chunks = [Float16Module(config, m) for m in chunks]
    if not ddp:
        for m in chunks:
            m.requires_grad_(False)
        return chunks
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    chunks = [DistributedDataParallel(config, ddp_config, m,
                                      disable_bucketing=(i > 0))
              for i, m in enumerate(chunks)]
    for m in chunks:
        m.broadcast_params()
    return chunks


def fuse_torch_adam(optimizer) -> None:
    """Without Transformer Engine or Apex megatron-core steps ``torch.optim.AdamW`` one tensor at a
    time (a fresh sqrt/div per tensor); its fused kernel does the same update in one pass per
    tensor, on CPU and GPU alike (4-6x less optimizer time on the tiny models)."""
    for opt in checkpointing._chained(optimizer):
        inner = getattr(opt, "optimizer", None)
        if type(inner) in (torch.optim.AdamW, torch.optim.Adam):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False


def build_optimizer(args, model: List[torch.nn.Module]):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    ocfg = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, fp16=args.precision == "fp16", bf16=args.precision == "bf16",
        params_dtype=dtype, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(ocfg, model)
    fuse_torch_adam(optimizer)
    gbs = args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
        min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=max(1, args.lr_decay_iters) * gbs, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=max(1, args.train_iters) * gbs, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False)
    return optimizer, scheduler


def wire_config(config, model, optimizer) -> None:
    """Hooks the schedules need: grad sync control, grad finalisation, loss scaling."""
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if getattr(model[0].ddp_config, "overlap_grad_reduce", False):
        fns = [m.start_grad_sync for m in model]
        config.grad_sync_func = fns if len(model) > 1 else fns[0]
    if getattr(model[0].ddp_config, "overlap_param_gather", False):
        fns = [m.start_param_sync for m in model]
        config.param_sync_func = fns if len(model) > 1 else fns[0]


# --------------------------------------------------------------------------------------- loss


def per_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor, key: str = "lm loss"):
    """Token-sum loss and token count of one microbatch ([b, s] per-token losses)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {key: report}


def gpt_forward_step(data_iterator, model):
    """Forward of one pretraining microbatch (tokens, labels, loss_mask, position_ids)."""
    batch = next(data_iterator)
    dev = platform.current_device()
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    loss_mask = batch["loss_mask"].to(dev, non_blocking=True)
    position_ids = batch["position_ids"].to(dev, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(per_token_loss, loss_mask)


def reduce_losses(losses_reduced: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Sum (loss, tokens) over microbatches and data-parallel ranks -> token-mean per key.
    Meaningful on the last pipeline stage only (other stages return {})."""
    if not losses_reduced:
        return {}
    out = {}
    for key in losses_reduced[0]:
        total = torch.stack([x[key] for x in losses_reduced]).sum(0).double()
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        out[key] = (total[0] / total[1].clamp(min=1)).item()
    return out


# --------------------------------------------------------------------------------------- loop


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0


def check_checkpoint_args(args) -> None:
    """Before any model is built: the checkpoint the run would start from exists. A --load folder
    without a checkpoint is the first run of a resumable job (the launch scripts pass --save as
    --load), so it starts from --pretrained-checkpoint or from scratch, with a warning when --load
    is not also --save (Megatron-LM's "will not load any checkpoints")."""
    if layout.has_checkpoint(args.load):
        return
    src = args.pretrained_checkpoint
    if src and not layout.has_checkpoint(src):
        raise ArgumentError(f"--pretrained-checkpoint {src}: " + (
            f"no {layout.TRACKER} in it (not a Megatron checkpoint folder)"
            if os.path.isdir(src) else "no such folder"))
    if args.finetune and args.load and not src:
        raise ArgumentError(f"--finetune starts from the weights of --load, but {args.load} holds "
                            f"no checkpoint (no {layout.TRACKER})")
    if args.load and not (args.save and os.path.abspath(args.save) == os.path.abspath(args.load)):
        print_rank_last(f"warning: --load {args.load} holds no checkpoint (no {layout.TRACKER}): "
                        f"starting from {src or 'random weights'}")


def checkpoint_source(args) -> Optional[str]:
    """The checkpoint this run starts from: its own --load when that holds one, else
    --pretrained-checkpoint (None: from scratch)."""
    return args.load if layout.has_checkpoint(args.load) else args.pretrained_checkpoint


def model_vocab(args, arch: MegatronArch, original_vocab: int) -> int:
    """The padded vocabulary the model is built with: the checkpoint's when it was written at this
    TP, else the tokenizer's padded. A model built from scratch takes the tokenizer's vocabulary."""
    vocab = padded_vocab(max(original_vocab, 1), args.make_vocab_size_divisible_by,
                         args.tensor_model_parallel_size)
    src = checkpoint_source(args)
    if src:
        meta = layout.read_meta(src)
        if meta.get("padded_vocab_size") and meta.get("tensor_model_parallel_size") == \
                args.tensor_model_parallel_size:
            vocab = meta["padded_vocab_size"]
    if not arch.extra.get("from_checkpoint"):
        arch.model["vocab_size"] = original_vocab
        arch.hf_config["vocab_size"] = original_vocab
    return vocab


def restore(args, model, optimizer, scheduler, value_head: bool = False) -> "TrainState":
    """Resume from the run's own --load checkpoint (model, optimizer, scheduler, RNG, data
    position), or start from another checkpoint's weights only (--pretrained-checkpoint, or --load
    with --finetune). ``value_head``: a reward/value model, which takes a language model's weights
    with a new head."""
    state = TrainState()
    if layout.has_checkpoint(args.load) and not args.finetune:
        common = checkpointing.load_checkpoint(
            args.load, model, optimizer, scheduler,
            load_optim=not args.no_load_optim, load_rng=not args.no_load_rng)
        state.iteration = common["iteration"]
        state.consumed_train_samples = int(common.get("consumed_train_samples", 0))
        state.consumed_valid_samples = int(common.get("consumed_valid_samples", 0))
        print_rank_last(f"> resumed from {args.load} at iteration {state.iteration}")
        return state
    src = checkpoint_source(args)
    if src:
        tolerate = None
        if value_head and not layout.read_meta(src).get("reward_model"):
            tolerate = checkpointing.HEAD_SWAP
        checkpointing.load_weights_only(src, model, tolerate=tolerate)
        optimizer.reload_model_params()
        print_rank_last(f"> initialised weights from {src} (optimizer not loaded"
                        f"{'; new value head' if tolerate else ''})")
    return state


def model_flops_per_iteration(arch: MegatronArch, seq: int, gbs: int, vocab: int) -> float:
    """Model FLOPs of one training iteration (forward + backward = 3x forward; no recompute)."""
    c = arch.config
    h, L = c["hidden_size"], c["num_layers"]
    heads = c["num_attention_heads"]
    groups = c.get("num_query_groups") or heads
    kv = c.get("kv_channels") or h // heads
    ffn = c["ffn_hidden_size"]
    gated = 3 if c.get("gated_linear_unit") else 2
    experts = c.get("moe_router_topk") or 1
    per_token_layer = 2 * (h * kv * (heads + 2 * groups) + heads * kv * h  # qkv + proj
                           + gated * h * ffn * experts  # mlp
                           + 2 * seq * heads * kv)  # scores + context (full, as Megatron counts)
    per_token = L * per_token_layer + 2 * h * vocab
    return 3.0 * per_token * seq * gbs


def schedule_shape(args) -> dict:
    """The [seq, micro batch] of the activations pipeline stages exchange: fine-tuning rows may be
    longer than --seq-length (--pad-len) and a reward sample holds several candidate rows."""
    return {"seq_length": getattr(args, "pad_len", None) or args.seq_length,
            "micro_batch_size": args.micro_batch_size * getattr(args, "rows_per_sample", 1)}


def train(args, arch, model, optimizer, scheduler, config, train_iter: List[Iterator],
          valid_iter_factory: Optional[Callable[[], List[Iterator]]], forward_step_func,
          state: TrainState, save_meta: Callable[[], None], vocab_size: int,
          loss_key: str = "lm loss", extra_eval: Optional[Callable] = None) -> TrainState:
    """Run iterations state.iteration+1 .. args.train_iters (or --exit-interval)."""
    fb = get_forward_backward_func()
    logger = MetricsLogger(args, start_iteration=state.iteration)
    flops = model_flops_per_iteration(arch, args.seq_length, args.global_batch_size, vocab_size)
    tokens_per_iter = args.global_batch_size * args.seq_length
    world = dist.get_world_size()
    for m in model:
        m.train()
    t_start = time.time()
    it_done = 0
    last_saved = state.iteration
    stop_at = args.train_iters
    if args.exit_interval:
        stop_at = min(stop_at, args.exit_interval)
    while state.iteration < stop_at:
        t0 = time.time()
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        losses = fb(forward_step_func=forward_step_func,
                    data_iterator=train_iter if len(train_iter) > 1 else train_iter[0],
                    model=model if len(model) > 1 else model[0],
                    num_microbatches=args.num_microbatches, **schedule_shape(args),
                    forward_only=False)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (logged as Megatron does)
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=args.global_batch_size)
        if getattr(model[0].ddp_config, "overlap_param_gather", False) and \
                state.iteration + 1 == stop_at:
            for m in model:
                m.start_param_sync(force_sync=True)
        state.iteration += 1
        state.consumed_train_samples += args.global_batch_size
        it_done += 1
        metrics = reduce_losses(losses)
        dt = time.time() - t0
        record = {
            "iteration": state.iteration,
            "consumed_samples": state.consumed_train_samples,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "loss_scale": float(optimizer.get_loss_scale().item()),
            "skipped": not ok,
            "iteration_time_s": dt,
            "tokens_per_s": tokens_per_iter / dt,
            **{k.replace(" ", "_"): v for k, v in metrics.items()},
        }
        if platform.use_cuda():
            record["tflops_per_gpu"] = flops / dt / world / 1e12
        remaining = (time.time() - t_start) / it_done * (stop_at - state.iteration)
        if state.iteration % args.log_interval == 0 or state.iteration == stop_at:
            logger.log_train(record, args.train_iters, eta_s=remaining)
        if valid_iter_factory is not None and args.eval_interval and \
                state.iteration % args.eval_interval == 0:
            evaluate_and_log(args, model, fb, valid_iter_factory, forward_step_func, state, logger,
                             loss_key, extra_eval)
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save(args, model, optimizer, scheduler, state, save_meta)
            last_saved = state.iteration
    if args.save and state.iteration != last_saved:
        save(args, model, optimizer, scheduler, state, save_meta)
    elif args.save and state.iteration == 0 and not layout.has_checkpoint(args.save):
        save(args, model, None, scheduler, state, save_meta)  # initial weights (train_iters 0)
    logger.close()
    return state


def evaluate(args, model, fb, valid_iter_factory, forward_step_func, eval_iters: int) -> Dict[str, float]:
    for m in model:
        m.eval()
    totals: Dict[str, torch.Tensor] = {}
    iters = valid_iter_factory()
    with torch.no_grad():
        for _ in range(eval_iters):
            try:
                losses = fb(forward_step_func=forward_step_func,
                            data_iterator=iters if len(iters) > 1 else iters[0],
                            model=model if len(model) > 1 else model[0],
                            num_microbatches=args.num_microbatches, **schedule_shape(args),
                            forward_only=True)
            except StopIteration:
                break
            for x in losses:
                for k, v in x.items():
                    totals[k] = totals.get(k, 0) + v.double()
    for m in model:
        m.train()
    out = {}
    for k, v in totals.items():
        dist.all_reduce(v, group=parallel_state.get_data_parallel_group())
        out[k] = (v[0] / v[1].clamp(min=1)).item()
    return out


def evaluate_and_log(args, model, fb, valid_iter_factory, forward_step_func, state, logger,
                     loss_key, extra_eval=None):
    metrics = evaluate(args, model, fb, valid_iter_factory, forward_step_func, args.eval_iters)
    if extra_eval is not None:
        metrics.update(extra_eval(model) or {})
    if loss_key == "lm loss" and loss_key in metrics:
        metrics["ppl"] = math.exp(min(20.0, metrics[loss_key]))
    logger.log_valid(state.iteration, {k.replace(" ", "_"): v for k, v in metrics.items()})
    return metrics


def save(args, model, optimizer, scheduler, state: TrainState, save_meta) -> None:
    t0 = time.time()
    save_meta()
    checkpointing.save_checkpoint(
        args.save, state.iteration, model, optimizer, scheduler,
        {"consumed_train_samples": state.consumed_train_samples,
         "consumed_valid_samples": state.consumed_valid_samples},
        ckpt_format=args.ckpt_format, args=_plain_args(args))
    print_rank_last(f"saved checkpoint at iteration {state.iteration} to {args.save} "
                    f"({args.ckpt_format}, {time.time() - t0:.1f}s)")


def _plain_args(args) -> dict:
    return {k: v for k, v in vars(args).items()
            if isinstance(v, (int, float, str, bool, type(None))) or
            (isinstance(v, list) and all(isinstance(x, (int, float, str)) for x in v))}


def write_checkpoint_meta(root: str, arch: MegatronArch, args, tokenizer, padded: int,
                          original_vocab: int, reward_model: bool = False) -> None:
    """Make the checkpoint folder self-describing: config.json, tokenizer files, family, layout."""
    if dist.get_rank() != 0:
        return
    os.makedirs(root, exist_ok=True)
    layout.atomic_write_bytes(os.path.join(root, "config.json"),
                              json.dumps(arch.hf_config, indent=2, sort_keys=True).encode())
    layout.write_meta(root, {
        "family": arch.family,
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
        "expert_model_parallel_size": args.expert_model_parallel_size,
        "padded_vocab_size": padded,
        "original_vocab_size": original_vocab,
        "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
        "extra_vocab_size": args.extra_vocab_size,
        "format": args.ckpt_format,
        "reward_model": reward_model,
    })
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        try:
            tokenizer.save_pretrained(root)
        except Exception as e:  # tokenizer files are a convenience; the weights are what matters
            print_rank_last(f"warning: could not copy tokenizer files to {root}: {e}")


def copy_tokenizer_files(src: str, dst: str) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt", "qwen.tiktoken", "generation_config.json")
    for n in names:
        if os.path.isfile(os.path.join(src, n)):
            shutil.copy2(os.path.join(src, n), os.path.join(dst, n))


def print_banner(args, arch, model) -> None:
    # dense parameters are replicated over data parallel; expert-parallel ones (allreduce=False)
    # only over expert data parallel
    dense = sum(p.numel() for m in model for p in m.parameters() if getattr(p, "allreduce", True))
    expert = sum(p.numel() for m in model for p in m.parameters()
                 if not getattr(p, "allreduce", True))
    # NCCL reduces device tensors only; gloo takes CPU ones (platform.current_device is either).
    counts = torch.tensor([dense, expert], dtype=torch.long, device=platform.current_device())
    dist.all_reduce(counts)
    total = (counts[0].item() // parallel_state.get_data_parallel_world_size()
             + counts[1].item() // parallel_state.get_expert_data_parallel_world_size())
    ep = parallel_state.get_expert_model_parallel_world_size()
    print_rank_last(
        f"> {arch.family} model: {arch.config['num_layers']} layers, hidden "
        f"{arch.config['hidden_size']}, {total:,} parameters | TP={args.tensor_model_parallel_size} "
        f"PP={args.pipeline_model_parallel_size} DP={args.data_parallel_size} "
        f"{'EP=' + str(ep) + ' ' if ep > 1 else ''}"
        f"{'VPP=' + str(args.virtual_pipeline_model_parallel_size) + ' ' if args.virtual_pipeline_model_parallel_size else ''}"
        f"| {args.precision} | {platform.device_type()} | micro batch {args.micro_batch_size}, "
        f"global batch {args.global_batch_size} ({args.num_microbatches} microbatches)")
    sys.stdout.flush()
