"""PPO and GRPO on megatron-core: the roles of RLHF colocated in one torchrun world.

Roles (all megatron-core ``GPTModel`` stages with the same tensor/pipeline layout, in one process
group; the inference twin of a trainable role is that role itself, so no weights are copied):

- ``policy`` (trainable; generates through ``megatron_patch.generation`` between training steps),
- ``reference`` (frozen copy of the starting policy: the KL anchor),
- ``reward`` (frozen ``GPTRewardModel``: the score of the last response token) and/or a Python
  ``reward_function`` (``module:function``, called as ``fn(prompts, responses, response_ids=...)``
  and returning one float per sample),
- ``value`` (trainable ``GPTRewardModel``; PPO only), started from the reward model, or from the
  policy checkpoint with a new head.

One episode: take ``sample_per_episode`` prompts (data-parallel ranks take disjoint shares; in a
seeded new order on every pass over the data with ``data_shuffle``), generate (temperature, top-k,
top-p, repetition penalty), score (old log-probs, reference log-probs, values, reward), form
per-token rewards (KL penalty ``kl_kind``, k1 by default, in the reward; with ``kl_in_loss`` the
KL is a ``kl_coef`` x k3 term of the policy loss instead) and GAE advantages (whitened across
data-parallel ranks), then ``num_training_epoch`` passes of mini-batches of
``train_global_batch_size`` samples through megatron-core's forward-backward function with the
clipped surrogate (policy) and clipped value loss (value). GRPO: ``num_samples_per_prompt``
responses per prompt, group-normalised scores as advantages, no value model, k3 KL to the
reference in the loss. Every log-prob (old, reference, new) comes from the same function of the
logits (megatron-core's vocab-parallel cross entropy; torch's at TP=1), so the first ratio of every
episode is exactly 1.
Log-probs and entropy are those of the distribution generation samples from (the vocabulary
padding is masked). The policy's token entropy (over the tensor-parallel vocabulary) is reported every episode, and
``entropy_coef`` > 0 adds the entropy bonus to the policy loss. With held-out prompts and
``eval_episode_interval``, the policy is evaluated (``eval_temperature``, 0 = greedy; reward,
KL to the reference, length) before training and every that many episodes.

Per-role layouts: each role has its own TP/PP (``megatron_patch.rlhf.layouts``: every role on
every process, world / (TP x PP) data-parallel replicas each). Every rank holds all the samples
of an episode; a role's replicas take equal shares for their forwards (outputs gathered back) and
for each mini-batch of training. The policy's inference twin (``generation_args``) in another
layout is a second copy that receives the trained weights, resharded in memory by megatron-core's
refit (``resharding.swap_model_weights``), after every episode; in the same layout the policy
generates itself. Likewise the value model's inference twin (``value_forward_args``), which
computes the values of an episode.

Settings: ``PPOConfig`` (defaults: the YAML schema of ``megatron_patch.rlhf.config``), built from
a YAML folder by ``ppo_config_from``; ``python -m megatron_patch.rlhf.run RLHF_YAML`` runs one,
``python -m megatron_patch.rlhf.trainer --policy CKPT --prompts FILE ...`` is the flag interface.

Tensors of an experience batch are in *action* layout: index ``t`` of a row scores the token at
sequence position ``t + 1`` (the model's output at ``t`` predicts it); ``mask[b, t]`` is 1 for the
response tokens up to and including EOS.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch import platform
from megatron_patch.cli import run_entry
from megatron_patch.convert import layout
from megatron_patch.generation import SamplingParams, generate
from megatron_patch.generation.engine import unwrap
from megatron_patch.models.builder import build_gpt_model, padded_vocab
from megatron_patch.models.common.selected_logits import logits_at
from megatron_patch.rlhf import losses as L
from megatron_patch.rlhf.layouts import Layouts
from megatron_patch.rlhf.offload import RoleMemory
from megatron_patch.rlhf.config import (RLHFConfigError, RLHFSettings,
                                     RoleRLHFKeys)
from megatron_patch.training import checkpointing, engine
from megatron_patch.training.arguments import ArgumentError, build_parser, validate
from megatron_patch.training.finetune import add_finetune_args
from megatron_patch.training.logging import MetricsLogger, print_rank_last
from megatron_patch.training.pretrain import load_tokenizer


_S, _K = RLHFSettings(), RoleRLHFKeys()  # the defaults of the YAML schema: the one source


@dataclasses.dataclass
class PPOConfig:
    """Settings of one run. Defaults are those of the YAML schema (``config.RLHFSettings`` for the
    run settings, ``config.RoleRLHFKeys`` for the per-model RLHF keys); ``ppo_config_from`` builds
    one from a loaded ``RLHFConfig``. ``num_episodes`` is the YAML's ``rlhf.num_ppo_episode``."""
    algorithm: str = _S.algorithm  # ppo | grpo
    num_episodes: int = _S.num_ppo_episode
    sample_per_episode: int = _S.sample_per_episode  # responses per episode, all DP ranks together
    generation_batch_size: int = _S.generation_batch_size  # prompts per generate call on a DP rank
    train_micro_batch_size: int = _S.train_micro_batch_size
    train_global_batch_size: int = _S.train_global_batch_size
    num_training_epoch: int = _S.num_training_epoch
    max_new_tokens: int = _K.max_new_tokens
    max_prompt_length: Optional[int] = _K.max_prompt_length  # required here (the YAML: None means
    #                                                          seq_length - max_new_tokens)
    temperature: float = _K.temperature
    top_k: int = _K.top_k
    top_p: float = _K.top_p  # 0 or 1: off
    repetition_penalty: float = _K.repetition_penalty
    clip_range: float = _K.clip_range
    clip_range_value: float = _K.clip_range_value
    gamma: float = _K.gamma
    lam: float = _K.lam
    init_kl_coef: float = _K.init_kl_coef
    kl_target: Optional[float] = _K.kl_target  # adaptive KL controller when set
    kl_horizon: float = _K.kl_horizon
    kl_kind: str = _K.kl_kind  # the estimator of the KL penalty in the rewards
    kl_in_loss: bool = _K.kl_in_loss  # PPO: KL to the reference in the loss, not in the rewards
    kl_divide_by_length: bool = _K.kl_divide_by_length
    clipped_value_only: bool = _K.clipped_value_only
    entropy_coef: float = _K.entropy_coef  # entropy bonus: loss -= coef x token entropy
    reward_scale: float = _K.reward_scale
    reward_clip: Optional[float] = _K.reward_clip
    whiten_advantages: bool = _K.whiten_advantages
    num_samples_per_prompt: int = _K.num_samples_per_prompt  # GRPO group size (>= 2 with grpo)
    reward_function: Optional[str] = _K.reward_function
    eval_episode_interval: int = _S.eval_episode_interval  # held-out evaluation every N (0: off)
    eval_temperature: float = _K.eval_temperature  # 0: greedy
    save_episode_interval: Optional[int] = _S.save_episode_interval  # None / 0: at the end only
    seed: int = _S.seed
    data_shuffle: bool = _S.data_shuffle  # prompts in a seeded new order on every pass
    offload: Optional[bool] = _S.offload  # idle roles to host memory (None: auto, offload_plan)
    # GRPO with one mini-batch per epoch takes the old log-probs from its first training forward
    # (RLHFTrainer.old_from_training); true: from a scoring forward, as PPO always does
    recompute_old_logprobs: bool = _S.recompute_old_logprobs


# Which per-model file a PPOConfig key is read from (ppo_config_from): generation settings from the
# role that generates (``policy``, the inference twin, as in ChatLearn), value-loss settings from
# the value model (``reward_train``, when present), everything else from the trained policy.
GENERATION_KEYS = ("max_new_tokens", "max_prompt_length", "temperature", "top_k", "top_p",
                   "repetition_penalty", "num_samples_per_prompt")
VALUE_KEYS = ("clip_range_value", "clipped_value_only")
POLICY_KEYS = ("clip_range", "gamma", "lam", "init_kl_coef", "kl_target", "kl_horizon", "kl_kind",
               "kl_in_loss", "kl_divide_by_length", "entropy_coef", "reward_scale", "reward_clip",
               "whiten_advantages")
# rlhf: section -> PPOConfig
SETTINGS_KEYS = {"algorithm": "algorithm", "num_ppo_episode": "num_episodes",
                 "sample_per_episode": "sample_per_episode",
                 "generation_batch_size": "generation_batch_size",
                 "train_micro_batch_size": "train_micro_batch_size",
                 "train_global_batch_size": "train_global_batch_size",
                 "num_training_epoch": "num_training_epoch",
                 "save_episode_interval": "save_episode_interval", "seed": "seed",
                 "eval_episode_interval": "eval_episode_interval", "offload": "offload",
                 "data_shuffle": "data_shuffle",
                 "recompute_old_logprobs": "recompute_old_logprobs"}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def ppo_config_from(rlhf_config, warn: Callable[[str], None] = _warn) -> PPOConfig:
    """The PPOConfig of a loaded ``config.RLHFConfig``: the ``rlhf:`` run settings plus the RLHF
    keys of the per-model files. Which role's file wins for which key:

    - generation (``max_new_tokens``, ``max_prompt_length``, ``temperature``, ``top_k``,
      ``top_p``, ``repetition_penalty``, ``num_samples_per_prompt``): the ``policy`` role (the
      inference twin that generates; ``ppo_policy`` if there is none). ``max_prompt_length: null``
      becomes that role's ``seq_length - max_new_tokens``;
    - value loss (``clip_range_value``, ``clipped_value_only``): ``reward_train`` (the value
      model), else ``ppo_policy``;
    - everything else (clipping, GAE, the KL coefficient/controller/estimator, ``kl_in_loss``,
      ``entropy_coef``, reward scaling and clipping, whitening): ``ppo_policy``;
    - ``reward_function``: whichever files set it (all that set it must agree).

    A key set to another value in a file that does not win (and that the winning role does not
    read itself, like a shared base.yaml) is reported through ``warn`` (one line naming both).
    Settings that this trainer cannot honour are errors (``RLHFConfigError``, one line naming the
    file and key): ``rlhf.eval_data_path`` without ``rlhf.eval_episode_interval`` or the reverse;
    ``rlhf.log_interval`` other than 1 and the PPO-only keys with grpo are warnings."""
    m, s = rlhf_config.models, rlhf_config.rlhf
    where = rlhf_config.path
    gen = m.get("policy") or m["ppo_policy"]
    owner = {k: gen for k in GENERATION_KEYS + ("eval_temperature",)}
    owner.update({k: m.get("reward_train") or m["ppo_policy"] for k in VALUE_KEYS})
    owner.update({k: m["ppo_policy"] for k in POLICY_KEYS})
    values = {}
    for key, role in owner.items():
        values[key] = role.rlhf_values()[key]
        read = set(role.origins.values())  # the files the winning role read (shared includes)
        for other in m.values():
            if other is not role and key in other.values and \
                    other.origins.get((key,)) not in read and \
                    other.rlhf_values()[key] != values[key]:
                warn(f"{other.model_config_file}: {key}: {other.rlhf_values()[key]!r} is not used; "
                     f"{key} is read from role {role.name} ({role.model_config_file}: "
                     f"{values[key]!r})")
    fns = {r.name: r.rlhf_values()["reward_function"] for r in m.values()}
    fns = {k: v for k, v in fns.items() if v}
    if len(set(fns.values())) > 1:
        raise RLHFConfigError(f"{where}: the model files set different reward_function values ("
                              + ", ".join(f"{k}: {v}" for k, v in fns.items()) + ")")
    values["reward_function"] = next(iter(fns.values()), None)
    if bool(s.eval_data_path) != bool(s.eval_episode_interval):
        raise RLHFConfigError(f"{where}: rlhf.eval_data_path and rlhf.eval_episode_interval go "
                              "together (the held-out prompts, and every how many episodes they "
                              "are evaluated)")
    if s.algorithm == "grpo":  # no value model, no GAE: these keys have no effect
        for k in ("gamma", "lam", "whiten_advantages") + VALUE_KEYS:
            if values[k] != getattr(_K, k):
                warn(f"{owner[k].model_config_file}: {k} has no effect with grpo (no value model)")
    if s.log_interval != 1:
        warn(f"{where}: rlhf.log_interval {s.log_interval}: every episode is logged")
    if values["max_prompt_length"] is None:
        seq = gen.megatron_args().seq_length
        if not seq or seq <= values["max_new_tokens"]:
            raise RLHFConfigError(f"{gen.model_config_file}: max_prompt_length is null and "
                                  f"seq_length ({seq}) leaves no room for a prompt before "
                                  f"max_new_tokens ({values['max_new_tokens']})")
        values["max_prompt_length"] = seq - values["max_new_tokens"]
    values.update({dst: getattr(s, src) for src, dst in SETTINGS_KEYS.items()})
    return PPOConfig(**values)


class Role:
    def __init__(self, name: str, args, arch, model: List[torch.nn.Module], vocab: int,
                 optimizer=None, scheduler=None, vocab_limit: Optional[int] = None,
                 layout_key: tuple = None, scalar_head: bool = False):
        self.name, self.args, self.arch, self.model, self.vocab = name, args, arch, model, vocab
        self.optimizer, self.scheduler = optimizer, scheduler
        self.vocab_limit = vocab_limit  # token ids the tokenizer can produce (the rest: padding)
        self.scalar_head = scalar_head  # a reward/value model: per-position scalars, no LM head
        self.layout = layout_key  # its megatron-core parallel layout (Layouts key)
        self.dp = parallel_state.get_data_parallel_world_size()  # (built under that layout)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None


# ------------------------------------------------------------------------------------ forward


def _batches(exp: Dict[str, torch.Tensor], index: torch.Tensor, micro: int, seq: int,
             width: Optional[int] = None):
    """Micro-batches of the rows ``index``; per-position tensors ([rows, seq]) keep their first
    ``width`` columns."""
    for i in range(0, len(index), micro):
        idx = index[i:i + micro]
        yield {k: (v[idx, :width] if width is not None and v.dim() == 2 and v.shape[1] == seq
                   else v[idx]) for k, v in exp.items()}


def _width(role: Role, mask: torch.Tensor, seq: int) -> int:
    """The columns that the rows of ``mask`` [rows, seq] need: through the target of each row's
    last action (every later column is padding, which a causal model's earlier outputs never
    see), rounded up to the multiple that sequence or context parallelism splits the sequence by.
    The rows' padding need not go through the model: on 8 PPO samples of chat prompts (9 tokens on
    average) + 16-token responses, ~40 of 48 columns; on 2 GRPO prompts x 4, ~30."""
    need = int(L.last_index(mask).max()) + 2 if mask.numel() else 1
    unit = 1
    cfg = getattr(unwrap(role.model[0]), "config", None)
    if cfg is not None:
        tp = cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1
        cp = getattr(cfg, "context_parallel_size", 1)
        unit = math.lcm(tp, 2 * cp if cp > 1 else 1)
    return min(seq, max(1, -(-need // unit) * unit))


def _padding_bias(logits: torch.Tensor, first: int) -> torch.Tensor:
    """[v] for ``logits`` [..., v]: 0 before column ``first``, the dtype's minimum from it on.
    (``x + min`` stays finite for any |x| < 1e31; exp of it after the max shift is 0.)"""
    bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    bias[first:] = torch.finfo(logits.dtype).min
    return bias


def _token_logprobs(model, tokens, position_ids, entropy: Optional[str] = None,
                    vocab_limit: Optional[int] = None, mask: Optional[torch.Tensor] = None):
    """The negative log-likelihood -log p(tokens[:, t+1] | tokens[:, :t+1]) per position, [b, s]
    on the last stage (hidden states for the next stage on the others): megatron-core's
    vocab-parallel cross entropy over the tensor-parallel ranks (at TP=1, torch's cross entropy:
    the same function, 4x cheaper on CPU; with ``entropy``, its log-softmax, shared with the
    entropy). The last column scores the wrapped-around first token
    and is never in a response mask.

    With ``mask`` ([b, s], the response positions) the output layer and the softmax run at the
    mask's positions only (``models.common.selected_logits``; where that model cannot select,
    everywhere) and every other position holds 0: the consumers read masked positions only.

    The distribution is that of the sampler: the vocabulary-padding columns (ids >= ``vocab_limit``,
    which generation never samples) are left out of the normalisation. ``entropy`` (``"grad"`` or
    ``"metric"``): return ``(nll, entropy)``, the entropy [b, s] of that distribution from the same
    logits at the positions of ``mask`` (0 elsewhere), with gradient for the entropy bonus or
    detached when it is only reported."""
    from megatron.core import tensor_parallel

    labels = torch.roll(tokens, -1, dims=1)
    shape = labels.shape
    where = None
    if mask is not None:
        where = (mask > 0).nonzero(as_tuple=True)  # (rows, columns) of the response tokens
        with logits_at(model, *where) as selected:
            logits = model(tokens, position_ids, None)
        if selected:
            labels = labels[where].unsqueeze(0)  # [1, N], as the logits [1, N, v/tp]
        else:
            where = None
    else:
        logits = model(tokens, position_ids, None)
    if not getattr(unwrap(model), "post_process", True):
        return logits  # hidden states for the next pipeline stage
    # logits: [b, s, v/tp] (or [1, N, v/tp] at the mask's positions), this rank's vocabulary slice
    width = logits.shape[-1]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    start = parallel_state.get_tensor_model_parallel_rank() * width
    if vocab_limit is not None and start + width > vocab_limit:
        # the padding columns at the dtype's minimum: exp() -> exactly 0, and so is their gradient
        first = max(vocab_limit - start, 0)
        if logits.requires_grad:
            # +0 leaves every other logit as it is. Not the in-place fill: its backward copies the
            # whole gradient and rebuilds it through as_strided (two more passes over
            # [positions, vocabulary] per training step)
            logits = logits + _padding_bias(logits, first)
        else:
            logits[..., first:] = torch.finfo(logits.dtype).min
    ent = None
    if tp == 1 and entropy is None:
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                reduction="none").view(labels.shape)
    elif tp == 1:
        # one log-softmax for both: the NLL is cross_entropy's (its log_softmax, then the pick);
        # the entropy is -sum_v p_v log p_v (a padding column adds exp(min) = 0 x a finite log p)
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy == "grad"):
            ent = -(logp.exp() * logp).sum(-1)  # [b, s] or [1, N]
        if mask is not None and where is None:
            ent = ent * (mask > 0)
    else:
        if entropy is not None:
            group = parallel_state.get_tensor_model_parallel_group()
            if mask is not None and where is None:
                keep = mask > 0
            else:  # every position (every selected one is a mask position)
                keep = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
            ent = torch.zeros(logits.shape[:2], dtype=torch.float32, device=logits.device)
            if entropy == "grad":
                ent = ent.index_put((keep,), L.vocab_parallel_entropy(logits[keep], group))
                logits = logits.clone()  # the vocab-parallel cross entropy works in place
            else:
                with torch.no_grad():
                    ent[keep] = L.vocab_parallel_entropy(logits.detach()[keep], group)
        nll = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)  # [b, s] or [1, N]
    if where is not None:  # back to [b, s], 0 off the mask (differentiable in the values)
        nll = nll.new_zeros(shape).index_put(where, nll[0])
        if ent is not None:
            ent = ent.new_zeros(shape).index_put(where, ent[0])
    return nll if ent is None else (nll, ent)


def _run(role: Role, exp: Dict[str, torch.Tensor], index: torch.Tensor, forward_only: bool,
         loss_fn: Callable, micro: int, seq: int, entropy: Optional[str] = None) -> List[dict]:
    """Micro-batches ``index`` of ``exp`` through megatron-core's forward-backward function
    (``entropy``: see ``_token_logprobs``), on the first ``_width`` columns of the rows (the loss
    function and the outputs see ``[b, width]``; every rank of a model replica holds the same rows,
    so its stages and tensor-parallel ranks agree on the width)."""
    fb = get_forward_backward_func()
    dev = platform.current_device()
    n_micro = math.ceil(len(index) / micro)
    width = _width(role, exp["mask"][index], seq)

    def step(data_iterator, model):
        batch = {k: v.to(dev) for k, v in next(data_iterator).items()}
        if role.scalar_head:
            out = model(batch["tokens"], batch["position_ids"], None)  # [b, s] values
        else:
            out = _token_logprobs(model, batch["tokens"], batch["position_ids"], entropy,
                                  role.vocab_limit, batch.get("mask"))
        return out, partial(loss_fn, batch)

    iters = [_batches(exp, index, micro, seq, width) for _ in role.model]
    return fb(forward_step_func=step, data_iterator=iters[0] if len(iters) == 1 else iters,
              model=role.model[0] if len(role.model) == 1 else role.model,
              num_microbatches=n_micro, seq_length=width, micro_batch_size=micro,
              forward_only=forward_only)


def collect(role: Role, exp, key_out: str, micro: int, seq: int, transform=None,
            entropy_out: Optional[str] = None) -> None:
    """exp[key_out] = the role's per-position output over the whole batch [rows, seq] (last stage;
    zeros on the others, and in the padding columns that ``_run`` leaves out). With
    ``entropy_out`` (a policy): also exp[entropy_out], the token entropy at the mask's positions
    from the same forward (``_token_logprobs``)."""
    got, ents = [], []

    def keep(batch, out):
        if entropy_out is not None:
            out, ent = out
            ents.append(ent.detach().float())
        o = out.detach().float()
        got.append(transform(o) if transform else o)
        return out.sum() * 0, torch.tensor(1, dtype=torch.int, device=out.device), {}

    modes = [m.training for m in role.model]
    for m in role.model:
        if m.training:  # (a frozen role stays in eval mode: Module.train visits every submodule)
            m.eval()
    with torch.no_grad():
        _run(role, exp, torch.arange(exp["tokens"].shape[0]), True, keep, micro, seq,
             None if entropy_out is None else "metric")
    for m, mode in zip(role.model, modes):
        if mode:
            m.train()
    for key, parts in ((key_out, got), (entropy_out, ents)):
        if key is None:
            continue
        exp[key] = torch.zeros(exp["tokens"].shape, dtype=torch.float32)
        if parts:
            out = torch.cat(parts).cpu()
            exp[key][:, :out.shape[1]] = out


# ------------------------------------------------------------------------------------ trainer


def check_config(cfg: PPOConfig) -> None:
    """ArgumentError for settings this trainer cannot run (before anything is built)."""
    if cfg.algorithm not in ("ppo", "grpo"):
        raise ArgumentError(f"algorithm must be ppo or grpo, got {cfg.algorithm!r}")
    if cfg.kl_kind not in L.KL_KINDS:
        raise ArgumentError(f"kl_kind must be one of {', '.join(L.KL_KINDS)}, got {cfg.kl_kind!r}")
    if cfg.max_prompt_length is None or cfg.max_prompt_length < 1:
        raise ArgumentError(f"max_prompt_length must be a positive number of tokens, got "
                            f"{cfg.max_prompt_length!r}")
    if cfg.kl_divide_by_length and (cfg.kl_in_loss or cfg.algorithm == "grpo"):
        raise ArgumentError("kl_divide_by_length applies to the KL penalty in the rewards; with "
                            f"{'grpo' if cfg.algorithm == 'grpo' else 'kl_in_loss'} the KL term "
                            "is in the loss")
    if cfg.algorithm == "grpo" and cfg.num_samples_per_prompt < 2:
        raise ArgumentError(f"grpo needs num_samples_per_prompt >= 2 (the group whose scores are "
                            f"normalised), got {cfg.num_samples_per_prompt}")


LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
               "virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage")


def layout_key(args, arch=None) -> tuple:
    """The Layouts key of a role's arguments (after resolve_arch, which sets the virtual
    pipeline size)."""
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    return Layouts.key(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, vpp,
                       getattr(args, "expert_model_parallel_size", 1) or 1)


def layout_of(args) -> tuple:
    return tuple(getattr(args, k, None) for k in LAYOUT_KEYS)


def check_layouts(role_args: Dict[str, Optional[argparse.Namespace]], world: int) -> None:
    """Every role's TP x PP must divide the world (each role runs on every process, with
    world / (TP x PP) data-parallel replicas): an ArgumentError naming the role otherwise."""
    for name, args in role_args.items():
        if args is None:
            continue
        size = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
        if world % size:
            raise ArgumentError(f"the {name} role's TP={args.tensor_model_parallel_size} x "
                                f"PP={args.pipeline_model_parallel_size} does not divide the "
                                f"{world} processes of this job (every role runs on all of them)")


TRAINABLE = ("policy", "value")


def check_batch_split(cfg: PPOConfig, role_args: Dict[str, Optional[argparse.Namespace]],
                      world: int) -> None:
    """Every role takes an equal share of an episode's samples per data-parallel replica (in
    whole micro-batches through a pipeline), and a trainable role's optimizer step splits into
    micro-batches on each replica: an ArgumentError naming the role and the settings otherwise.
    Checked before anything is built (``run.prepare`` does it in the pre-flight)."""
    n, micro = cfg.sample_per_episode, cfg.train_micro_batch_size
    for name, args in role_args.items():
        if args is None:
            continue
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        dp = world // (tp * pp)
        if n % dp or (pp > 1 and (n // dp) % micro):
            raise ArgumentError(
                f"sample_per_episode {n} must split into the {dp} data-parallel replicas of "
                f"the {name} role (TP={tp} PP={pp} on {world} processes)"
                + (f" in whole micro-batches of train_micro_batch_size {micro}" if pp > 1 else ""))
        if name in TRAINABLE and cfg.train_global_batch_size % (micro * dp):
            raise ArgumentError(
                f"train_global_batch_size {cfg.train_global_batch_size} must be a multiple of "
                f"train_micro_batch_size x the {name} role's data-parallel size ({micro} x {dp}: "
                f"TP={tp} PP={pp} on {world} processes)")


class RLHFTrainer:
    def __init__(self, cfg: PPOConfig, policy_args, reward_args=None, value_args=None,
                 reference_args=None, generation_args=None, value_forward_args=None,
                 offload_roles: Optional[Dict[str, str]] = None):
        """``reference_args``: the reference model's arguments (default: ``policy_args``; it must
        load a checkpoint). Each role runs with the TP/PP layout of its own arguments (every role
        on every process). ``generation_args``: the layout of the policy's inference twin when it
        differs from the trained policy's: a second copy of the policy generates, and the trained
        weights are resharded into it after every episode (``time_weight_sync_s``); with the
        same layout (or None) the trained policy generates itself (no copy).
        ``value_forward_args``: likewise for the value model's inference twin, which scores the
        values of each episode (PPO). ``offload_roles``: {role name: ``"weights"`` or ``"all"``},
        what of that role goes to host memory while it is idle (ChatLearn's per-model
        ``offload_weights`` / ``free_memory``); ``cfg.offload`` means ``"all"`` for every role."""
        self.cfg = cfg
        check_config(cfg)
        if reward_args is None and not cfg.reward_function:
            raise ArgumentError("give a reward model or a reward_function (module:function)")
        timeout = policy_args.distributed_timeout_minutes
        platform.init_process_group(timeout)
        world = dist.get_world_size()
        check_layouts({"policy": policy_args, "generation": generation_args,
                       "reference": reference_args, "reward": reward_args, "value": value_args,
                       "value_forward": value_forward_args}, world)
        check_batch_split(cfg, {
            "policy": policy_args, "generation": generation_args,
            "reference": reference_args or policy_args, "reward": reward_args,
            "value": (value_args or reward_args or policy_args) if cfg.algorithm == "ppo" else None,
            "value_forward": value_forward_args if cfg.algorithm == "ppo" else None}, world)
        self.reward_fn = load_reward_function(cfg.reward_function) if cfg.reward_function else None
        steps = cfg.num_episodes * cfg.num_training_epoch * (cfg.sample_per_episode //
                                                             cfg.train_global_batch_size)
        arch = engine.resolve_arch(policy_args)
        init_args = argparse.Namespace(**vars(policy_args))  # the schedule is the trainer's
        init_args.train_iters, init_args.train_tokens, init_args.epochs = steps, None, None
        init_args.train_samples = init_args.lr_decay_samples = None
        engine.initialize(init_args)
        self.layouts = Layouts(layout_key(init_args), seed=init_args.seed,
                               timeout_minutes=timeout)
        self.tokenizer, original = load_tokenizer(policy_args, arch)
        self.eos = self.tokenizer.eos
        self.pad = self.tokenizer.pad
        self.vocab_limit = original
        self.padded_vocab = padded_vocab(original, policy_args.make_vocab_size_divisible_by,
                                         policy_args.tensor_model_parallel_size)
        if cfg.sample_per_episode % cfg.train_global_batch_size:
            raise ArgumentError("sample_per_episode must be a multiple of train_global_batch_size")
        group = cfg.num_samples_per_prompt if cfg.algorithm == "grpo" else 1
        if cfg.sample_per_episode % group:
            raise ArgumentError("sample_per_episode must be a multiple of num_samples_per_prompt")
        self.seq = cfg.max_prompt_length + cfg.max_new_tokens
        self.policy = self._role("policy", policy_args, arch, steps, trainable=True)
        self.generator = self.policy  # the role that generates: the policy, or its inference twin
        if generation_args is not None and layout_key(generation_args, arch) != self.policy.layout:
            self.generator = self._role("generation", generation_args, None, steps,
                                        trainable=False)
        self.reference = self._role("reference", reference_args or policy_args,
                                    None if reference_args is not None else arch, steps,
                                    trainable=False)
        self.reward = self._role("reward", reward_args, None, steps, trainable=False,
                                 head=True) if reward_args is not None else None
        self.value = None
        if cfg.algorithm == "ppo":
            self.value = self._role("value", value_args or reward_args or policy_args, None, steps,
                                    trainable=True, head=True)
        self.value_scorer = self.value  # the role that computes values: the value model or its twin
        if self.value is not None and value_forward_args is not None and \
                layout_key(value_forward_args) != self.value.layout:
            twin = argparse.Namespace(**vars(value_forward_args))
            twin.load = self.value.args.load  # it starts from the value model's weights
            twin.pretrained_checkpoint = getattr(self.value.args, "pretrained_checkpoint", None)
            self.value_scorer = self._role("value_forward", twin, None, steps, trainable=False,
                                           head=True)
        if cfg.kl_target:
            self.kl_ctl = L.AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
        else:
            self.kl_ctl = L.FixedKLController(cfg.init_kl_coef)
        self.episode = 0
        self.consumed_prompts = 0
        self._orders: Dict[int, List[int]] = {}
        roles = [r for r in (self.policy, self.generator, self.reference, self.reward, self.value,
                             self.value_scorer) if r is not None]
        self.roles = list({id(r): r for r in roles}.values())
        unknown = set(offload_roles or {}) - {r.name for r in self.roles}
        bad = {k: v for k, v in (offload_roles or {}).items() if v not in OFFLOAD_KINDS}
        if unknown or bad:
            raise ArgumentError(f"offload: {sorted(unknown)} are not roles of this run"
                                if unknown else f"offload: {bad}: expected one of {OFFLOAD_KINDS}")
        # id(role) -> (weights, training state) released while the role is idle
        plan = offload_plan([r.name for r in self.roles], cfg.offload, offload_roles,
                            platform.use_cuda())
        self.offload_parts = {id(r): (True, plan[r.name] == "all")
                              for r in self.roles if r.name in plan}
        self.offload = bool(self.offload_parts)
        if cfg.offload is None and plan and not offload_roles:
            print_rank_last("> offloading: every idle role to host memory between phases (on a "
                            "GPU by default; rlhf.offload / --offload false keeps them resident)")
        self.memory = {id(r): RoleMemory(r.model, r.optimizer) for r in self.roles}
        self.peak_bytes = 0  # the most bytes the roles held at once (phase boundaries)
        self._sized = 0  # episodes whose role sizes were measured (constant after the second)
        self._roles_bytes = 0
        self._record = None  # (rows, log-probs, entropy) of the first step (old_from_training)
        if self.old_from_training:
            print_rank_last("> old log-probs: from the first training step of each episode (GRPO, "
                            "one mini-batch per epoch; recompute_old_logprobs: a scoring forward)")

    # -- set-up

    def _role(self, name, args, arch, steps, trainable, head=False) -> Role:
        args = argparse.Namespace(**vars(args))
        args.global_batch_size = self.cfg.train_global_batch_size
        args.micro_batch_size = self.cfg.train_micro_batch_size
        args.seq_length = self.seq
        args.train_iters, args.lr_decay_iters = steps, None
        # the schedule is the episodes' optimizer steps
        args.train_tokens = args.train_samples = args.lr_decay_samples = args.epochs = None
        validate(args, dist.get_world_size())  # precision, data parallel size, schedule
        if arch is None:
            arch = engine.resolve_arch(args)
        key = layout_key(args, arch)
        self.layouts.add(key)
        with self.layouts.use(key):
            return self._build_role(name, args, arch, trainable, head, key)

    def _build_role(self, name, args, arch, trainable, head, key) -> Role:
        src = engine.checkpoint_source(args)
        meta = layout.read_meta(src) if src else {}
        vocab = meta.get("padded_vocab_size") or padded_vocab(
            self.vocab_limit, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
        config = engine.build_config(args, arch)
        builder = partial(build_gpt_model, reward_head=True) if head else None
        model = engine.build_model(args, arch, config, vocab, model_builder=builder,
                                   ddp=trainable,  # frozen roles: no DDP, no gradient buffers
                                   inference=True)
        if not trainable:
            for m in model:
                m.eval()  # a frozen role only scores (and generates): no dropout
        optimizer = scheduler = None
        if trainable:
            optimizer, scheduler = engine.build_optimizer(args, model)
            engine.wire_config(config, model, optimizer)
        if src:
            tolerate = checkpointing.HEAD_SWAP if head and not meta.get("reward_model") else None
            checkpointing.load_weights_only(src, model, tolerate=tolerate)
            if optimizer is not None:
                optimizer.reload_model_params()
        elif not trainable:
            raise ArgumentError(f"the {name} role needs a checkpoint")
        print_rank_last(f"> {name}: {arch.family}, {'trainable' if trainable else 'frozen'}, "
                        f"TP={key[0]} PP={key[1]}{', from ' + src if src else ''}")
        return Role(name, args, arch, model, vocab, optimizer, scheduler, self.vocab_limit, key,
                    scalar_head=head)

    # -- offloading: the roles that offload keep their storages on the device only while at work

    def _resident(self, *roles: Role, training: bool = False) -> None:
        """Before a phase: ``roles`` keep their weights (and, with ``training``, gradients and
        optimizer state) on the device; every other role that offloads puts what it offloads
        (``offload_parts``) in host memory, and so does a role at work that is not training with
        its training state. Also tracks the bytes held at once (``resident_mb_max``)."""
        if self.offload:
            keep = {id(r) for r in roles}
            for r in self.roles:
                parts = self.offload_parts.get(id(r))
                if parts and id(r) not in keep:
                    self.memory[id(r)].offload(weights=parts[0], training=parts[1])
            for r in roles:
                mem = self.memory[id(r)]
                mem.onload(training=training)
                parts = self.offload_parts.get(id(r))
                if not training and parts and parts[1]:
                    mem.offload(weights=False, training=True)
            self.peak_bytes = max(self.peak_bytes, sum(m.nbytes() for m in self.memory.values()))

    # -- the rows of an episode: every rank holds all of them; a role's replica takes its share

    @staticmethod
    def _share(role: Role, n: int) -> slice:
        per = n // role.dp
        return slice(role.dp_rank * per, (role.dp_rank + 1) * per)

    def _gather_rows(self, role: Role, t: torch.Tensor) -> torch.Tensor:
        """``t``: the rows of this rank's share, valid on the role's last pipeline stage -> every
        row of every replica, on every rank (broadcast from the last stage, then all-gathered over
        the role's data-parallel group). Call under the role's layout."""
        dev = platform.current_device()
        t = t.to(dev).contiguous()
        if role.pp > 1:
            dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        if role.dp > 1:
            parts = [torch.empty_like(t) for _ in range(role.dp)]
            dist.all_gather(parts, t, group=parallel_state.get_data_parallel_group())
            t = torch.cat(parts)
        return t.cpu()

    def _collect(self, role: Role, exp, key_out: str, transform=None,
                 entropy_out: Optional[str] = None) -> None:
        """exp[key_out] (and exp[entropy_out]: ``collect``) = the role's per-position output for
        every row (its replicas score equal shares, then the outputs are gathered)."""
        n = exp["tokens"].shape[0]
        mine = {k: exp[k][self._share(role, n)] for k in ("tokens", "position_ids", "mask")}
        self._resident(role)
        with self.layouts.use(role.layout):
            collect(role, mine, key_out, self.cfg.train_micro_batch_size, self.seq, transform,
                    entropy_out)
            for key in (key_out, entropy_out):
                if key is not None:
                    exp[key] = self._gather_rows(role, mine[key])

    # -- experience

    def prompts_for_episode(self, dataset) -> List[List[int]]:
        cfg = self.cfg
        group = cfg.num_samples_per_prompt if cfg.algorithm == "grpo" else 1
        n = cfg.sample_per_episode // group
        pick = [self._prompt_index(self.consumed_prompts + i, len(dataset.ids)) for i in range(n)]
        ids = [dataset.ids[k] for k in pick]
        texts = [dataset.prompts[k] for k in pick]
        return [p for p in ids for _ in range(group)], [t for t in texts for _ in range(group)]

    def _prompt_index(self, i: int, n: int) -> int:
        """The dataset index of the i-th prompt consumed: in file order, or (data_shuffle) in a
        seeded permutation of its pass over the data; a function of i only (resume-exact)."""
        if not self.cfg.data_shuffle:
            return i % n
        epoch = i // n
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
            self._orders = {epoch: torch.randperm(n, generator=g).tolist()}
        return self._orders[epoch][i % n]

    def make_experience(self, prompts: List[List[int]], texts: List[str],
                        evaluation: bool = False) -> Dict[str, torch.Tensor]:
        """Generate, then score: old and reference log-probs, values (PPO), the reward. With
        ``evaluation``: ``eval_temperature`` (0: greedy), one seed for every evaluation (the same
        sampling noise at every episode), no values. Sets ``self.last_timing`` (seconds of the
        generation and of the scoring forwards)."""
        t0 = time.time()
        rows, masks = [], []
        resp_ids, ended = self._generate(prompts, evaluation)
        for p, r in zip(prompts, resp_ids):  # one row per sample
            row = torch.full((self.seq,), self.pad, dtype=torch.long)
            row[:len(p) + len(r)] = torch.tensor(list(p) + r, dtype=torch.long)
            m = torch.zeros(self.seq)
            m[len(p) - 1:len(p) - 1 + len(r)] = 1.0  # actions: outputs at t predict t + 1
            rows.append(row)
            masks.append(m)
        exp = {"tokens": torch.stack(rows), "mask": torch.stack(masks),
               "position_ids": torch.arange(self.seq).expand(len(rows), -1).clone()}
        t_gen = time.time()
        neg = (lambda o: -o)
        if not evaluation and self.old_from_training:
            exp["row"] = torch.arange(len(rows))  # (the first training step fills the rows in)
        else:  # the policy's token entropy on its own samples (reported) from the same forward
            self._collect(self.policy, exp, "old_logprobs", neg,
                          None if evaluation else "entropy")
        self._collect(self.reference, exp, "ref_logprobs", neg)
        if self.value is not None and not evaluation:
            self._collect(self.value_scorer, exp, "values")
        score = torch.zeros(len(rows))
        if self.reward is not None:
            self._collect(self.reward, exp, "rm_values")
            # the reward model reads the last real token: the last action's target position
            last = L.last_index(exp["mask"]) + 1
            score = score + exp.pop("rm_values")[torch.arange(len(rows)), last]
        if self.reward_fn is not None:
            responses = [self.tokenizer.detokenize(r) for r in resp_ids]
            out = self.reward_fn(texts, responses, response_ids=resp_ids)
            try:
                extra = torch.tensor([float(x) for x in out], dtype=score.dtype)
            except (TypeError, ValueError):
                extra = None
            if extra is None or extra.shape != score.shape:
                raise RuntimeError(f"reward_function {self.cfg.reward_function} returned "
                                   f"{str(out)[:200]} for {len(rows)} responses (episode "
                                   f"{self.episode + 1}); it must return one number per response")
            score = score + extra
        exp["score"] = score
        exp["ended"] = torch.tensor(ended, dtype=torch.float32)
        exp["response_length"] = exp["mask"].sum(-1)
        self.last_timing = {"generation": t_gen - t0, "scoring": time.time() - t_gen}
        return exp

    def _generate(self, prompts: List[List[int]], evaluation: bool):
        """Responses to every prompt (lists of token ids) and whether each ended with EOS. The
        generating role's replicas take equal shares of the prompts, in chunks of
        generation_batch_size; each chunk's sampling seed depends on the episode and on the chunk's
        place among all the prompts, so the samples do not depend on the data-parallel size when
        the shares are whole chunks."""
        cfg, g = self.cfg, self.generator
        temperature = cfg.eval_temperature if evaluation else cfg.temperature
        episode_seed = -1 if evaluation else self.episode
        n = len(prompts)
        share = self._share(g, n)
        mine_ids, mine_ended = [], []
        self._resident(g)
        with self.layouts.use(g.layout):
            gb = cfg.generation_batch_size
            for i in range(share.start, share.stop, gb):
                chunk = prompts[i:min(i + gb, share.stop)]
                params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                                        greedy=temperature == 0, top_k=cfg.top_k, top_p=cfg.top_p,
                                        repetition_penalty=cfg.repetition_penalty,
                                        stop_token_ids=[self.eos],
                                        seed=cfg.seed * 100003 + episode_seed * 1009 + i,
                                        return_logprobs=False)  # (the scoring forward's are used)
                out = generate(g.model[0], chunk, params, pad_id=self.pad,
                               vocab_size=self.vocab_limit)
                for j in range(len(chunk)):
                    mine_ids.append(out.row(j))
                    mine_ended.append(out.finish_reasons[j] == "stop_token")
            if g.dp == 1:
                return mine_ids, mine_ended
            parts = [None] * g.dp
            dist.all_gather_object(parts, (mine_ids, mine_ended),
                                   group=parallel_state.get_data_parallel_group())
        return [r for p in parts for r in p[0]], [e for p in parts for e in p[1]]

    def sync_twins(self) -> float:
        """Reshard the trained weights into the inference twins in other layouts (the policy's
        generator, the value model's scorer); seconds taken (0 when every role serves itself)."""
        t0 = time.time()
        for trained, twin in ((self.policy, self.generator), (self.value, self.value_scorer)):
            if twin is not trained:
                self._reshard(trained, twin)
        return time.time() - t0

    def _reshard(self, src: Role, dst: Role) -> None:
        """``dst`` gets ``src``'s weights in its own layout. One model chunk each: in memory, by
        megatron-core's refit (``resharding.swap_model_weights``: a plan of TP slices and
        point-to-point copies between the two layouts' ranks, built once and cached on the
        destination; NCCL on GPUs, gloo on a CPU). Virtual pipeline chunks: through a torch_dist
        checkpoint in a temporary folder (``dist_checkpointing`` reshards)."""
        self._resident(src, dst)
        if len(src.model) == 1 and len(dst.model) == 1:
            from megatron.core.resharding.refit import swap_model_weights

            with torch.no_grad():
                swap_model_weights(src.model[0], dst.model[0],
                                   "nccl" if platform.use_cuda() else "gloo")
            return
        tmp = [tempfile.mkdtemp(prefix="rlhf_sync_") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(tmp, src=0)
        try:
            with self.layouts.use(src.layout):
                checkpointing.save_checkpoint(tmp[0], 1, src.model, None, None, {},
                                              ckpt_format="torch_dist")
            with self.layouts.use(dst.layout):
                checkpointing.load_weights_only(tmp[0], dst.model)
        finally:
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(tmp[0], ignore_errors=True)

    def evaluate(self, dataset) -> Dict[str, float]:
        """The current policy on the held-out prompts: ``eval_reward_mean`` / ``_std`` (over every
        sample of every data-parallel rank), ``eval_kl`` (k1 to the reference, summed over a
        response, mean over samples), ``eval_response_length``, ``eval_ended``, ``eval_samples``.
        The first ``n`` prompts are used, ``n`` the largest multiple of train_micro_batch_size x
        every role's data-parallel size that the file holds (``eval_size``); each role's replicas
        take equal shares."""
        n = self.eval_size(len(dataset.ids))
        exp = self.make_experience(dataset.ids[:n], dataset.prompts[:n], evaluation=True)
        kl = (L.kl_penalty(exp["old_logprobs"], exp["ref_logprobs"], "k1") * exp["mask"]).sum(-1)
        score = exp["score"].double()
        return {"eval_reward_mean": score.mean().item(),
                "eval_reward_std": score.std(unbiased=False).item(),
                "eval_kl": kl.double().mean().item(),
                "eval_response_length": exp["response_length"].double().mean().item(),
                "eval_ended": exp["ended"].double().mean().item(), "eval_samples": n}

    def eval_unit(self) -> int:
        """train_micro_batch_size x the data-parallel sizes of the roles an evaluation uses
        (their least common multiple)."""
        unit = 1
        for r in (self.policy, self.generator, self.reference, self.reward):
            if r is not None:
                unit = math.lcm(unit, r.dp * self.cfg.train_micro_batch_size)
        return unit

    def eval_size(self, available: int) -> int:
        """The held-out prompts an evaluation uses: the largest multiple of ``eval_unit``."""
        return available // self.eval_unit() * self.eval_unit()

    @staticmethod
    def rollout_entropy(exp) -> float:
        """The policy's token entropy on its samples (token mean)."""
        mask = exp["mask"]
        return (L.masked_sum(exp["entropy"], mask) / mask.sum().clamp(min=1)).item()

    @classmethod
    def rollout_stats(cls, exp) -> Dict[str, float]:
        """``kl`` (k1 of the old log-probs to the reference's, summed over a response, mean over
        samples) and ``entropy`` (``rollout_entropy``)."""
        kl_tok = L.kl_penalty(exp["old_logprobs"], exp["ref_logprobs"], "k1") * exp["mask"]
        return {"kl": (kl_tok.sum(-1)).mean().item(), "entropy": cls.rollout_entropy(exp)}

    @property
    def old_from_training(self) -> bool:
        """Whether the old log-probs come from the first training step: GRPO with the whole
        episode in one mini-batch (and ``recompute_old_logprobs`` off). That step's forward runs
        the weights that sampled, so its log-probs, detached, are the old ones (the ratio is 1
        there, as with scored ones), and the policy's scoring forward is left out: one forward of
        the policy over the episode per episode. PPO needs them before training (the KL penalty in
        the rewards), and a later mini-batch runs updated weights."""
        cfg = self.cfg
        return (cfg.algorithm == "grpo" and not cfg.recompute_old_logprobs
                and cfg.train_global_batch_size == cfg.sample_per_episode)

    def _fill_old_logprobs(self, exp) -> None:
        """After the first training step (``old_from_training``): exp["old_logprobs"] and
        exp["entropy"] from the log-probs and entropies it recorded (``_policy_loss``), on every
        rank (this replica's rows from its last pipeline stage, then every replica's)."""
        role, seq = self.policy, self.seq
        rec, self._record = self._record, None
        per = self.cfg.train_global_batch_size // role.dp
        rows = torch.zeros(per, dtype=torch.long)
        vals = torch.zeros(per, 2, seq)
        if rec:  # the last stage: [b, width] per micro-batch
            rows = torch.cat([r for r, _, _ in rec]).cpu()
            width = rec[0][1].shape[1]
            vals[:, 0, :width] = torch.cat([lp for _, lp, _ in rec]).float().cpu()
            vals[:, 1, :width] = torch.cat([e for _, _, e in rec]).float().cpu()
        with self.layouts.use(role.layout):
            rows, vals = self._gather_rows(role, rows), self._gather_rows(role, vals)
        n = exp["tokens"].shape[0]
        for i, key in enumerate(("old_logprobs", "entropy")):
            exp[key] = torch.zeros(n, seq)
            exp[key][rows] = vals[:, i]

    def advantages(self, exp) -> Dict[str, float]:
        cfg, mask = self.cfg, exp["mask"]
        if cfg.algorithm == "grpo":
            # (old_from_training: rollout_stats once the first training step has them)
            stats = self.rollout_stats(exp) if "old_logprobs" in exp else {}
            score = exp["score"] * cfg.reward_scale
            if cfg.reward_clip is not None:
                score = score.clamp(-cfg.reward_clip, cfg.reward_clip)
            adv = L.grpo_advantages(score, cfg.num_samples_per_prompt)
            exp["advantages"] = L.broadcast_advantages(adv, mask)
            return stats
        # kl_in_loss: the KL term is in the policy loss (_policy_loss), not in the rewards
        rewards, kl_sum = L.compute_rewards(
            exp["score"], exp["old_logprobs"], exp["ref_logprobs"], mask,
            0.0 if cfg.kl_in_loss else self.kl_ctl.value,
            kind=cfg.kl_kind, kl_divide_by_length=cfg.kl_divide_by_length,
            reward_clip=cfg.reward_clip, reward_scale=cfg.reward_scale)
        adv, ret = L.gae_advantages(rewards, exp["values"] * mask, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:  # over the whole episode: every rank holds every sample
            adv = L.masked_whiten(adv, mask)
        exp["advantages"], exp["returns"] = adv, ret
        # kl: kl_kind's estimate, whatever the coefficient
        return {"kl": kl_sum.mean().item(), "entropy": self.rollout_entropy(exp)}

    # -- training

    @property
    def loss_kl_kind(self) -> str:
        """The KL estimator of a KL term in the loss (GRPO, PPO with kl_in_loss): kl_kind, where k1
        (whose gradient is zero in expectation on the policy's own samples) means k3."""
        return "k3" if self.cfg.kl_kind == "k1" else self.cfg.kl_kind

    def _policy_loss(self, batch, out):
        cfg = self.cfg
        entropy = None
        if isinstance(out, tuple):  # nll and entropy per position (train_role's entropy)
            out, entropy = out
        logprobs = -out
        old = batch.get("old_logprobs")
        if old is None:  # the first step of old_from_training: these weights sampled
            old = logprobs.detach()
            self._record.append((batch["row"], old, entropy.detach()))
        kind = self.loss_kl_kind
        if cfg.algorithm == "grpo" and kind == "k3":
            loss, n, st = L.grpo_loss(logprobs, old, batch["ref_logprobs"],
                                      batch["advantages"], batch["mask"], cfg.clip_range,
                                      self.kl_ctl.value)
        elif cfg.algorithm == "grpo" or cfg.kl_in_loss:  # surrogate + kl_coef x KL(kind)
            loss, n, st = L.ppo_policy_loss(logprobs, old, batch["advantages"],
                                            batch["mask"], cfg.clip_range)
            kl = L.masked_sum(L.kl_penalty(logprobs, batch["ref_logprobs"], kind), batch["mask"])
            loss = loss + self.kl_ctl.value * kl
            st = dict(st, ref_kl_sum=kl.detach())
        else:
            loss, n, st = L.ppo_policy_loss(logprobs, old, batch["advantages"], batch["mask"],
                                            cfg.clip_range)
        if cfg.entropy_coef:  # the bonus: maximise the entropy of the response tokens
            loss = loss - cfg.entropy_coef * L.masked_sum(entropy, batch["mask"])
        rep = {"policy_loss": torch.stack([loss.detach(), n.float()])}
        rep.update({k.replace("_sum", ""): torch.stack([v.detach().float(), n.float()])
                    for k, v in st.items()})
        return loss, n.to(torch.int), rep

    def _value_loss(self, batch, out):
        loss, n, st = L.value_loss(out, batch["values"], batch["returns"], batch["mask"],
                                   self.cfg.clip_range_value, self.cfg.clipped_value_only)
        rep = {"value_loss": torch.stack([loss.detach(), n.float()])}
        rep.update({k.replace("_sum", ""): torch.stack([v.detach().float(), n.float()])
                    for k, v in st.items()})
        return loss, n.to(torch.int), rep

    def train_role(self, role: Role, exp, loss_fn, order: torch.Tensor) -> Dict[str, float]:
        cfg = self.cfg
        # the entropy bonus; the reported entropy is the rollout's (make_experience, or recorded
        # by the first step of old_from_training)
        entropy = None
        if role is self.policy and cfg.entropy_coef:
            entropy = "grad"
        elif role is self.policy and self._record is not None:
            entropy = "metric"
        gbs = cfg.train_global_batch_size
        per_rank = gbs // role.dp
        totals: Dict[str, torch.Tensor] = {}
        self._resident(role, training=True)
        with self.layouts.use(role.layout):
            for start in range(0, len(order), gbs):
                # a mini-batch of the whole episode; this replica's share of it
                idx = order[start:start + gbs][role.dp_rank * per_rank:(role.dp_rank + 1) * per_rank]
                for m in role.model:
                    m.zero_grad_buffer()
                role.optimizer.zero_grad()
                losses = _run(role, exp, idx, False, loss_fn, cfg.train_micro_batch_size,
                              self.seq, entropy)
                ok, _, _ = role.optimizer.step()
                if ok:
                    role.scheduler.step(increment=gbs)
                for x in losses:
                    for k, v in x.items():
                        totals[k] = totals.get(k, 0) + v.double()
            out = {}
            for k, v in totals.items():
                if role.dp > 1:
                    v = v.to(platform.current_device())
                    dist.all_reduce(v, group=parallel_state.get_data_parallel_group())
                out[k] = (v[0] / v[1].clamp(min=1)).item()
        return out

    def run_episode(self, dataset, logger: MetricsLogger, eval_dataset=None) -> dict:
        """One episode; with ``eval_dataset``, the trained policy is evaluated on it after the
        episode when the episode number is a multiple of ``eval_episode_interval`` or the last."""
        cfg = self.cfg
        t0 = time.time()
        prompts, texts = self.prompts_for_episode(dataset)
        exp = self.make_experience(prompts, texts)
        timing = self.last_timing
        t_gen = time.time()
        stats = self.advantages(exp)
        metrics = {"iteration": self.episode + 1,
                   "reward_mean": exp["score"].mean().item(),
                   "reward_std": exp["score"].std(unbiased=False).item(),
                   "response_length": exp["response_length"].mean().item(),
                   "ended": exp["ended"].mean().item(), **stats}
        g = torch.Generator().manual_seed(cfg.seed + self.episode)
        for _ in range(cfg.num_training_epoch):
            order = torch.randperm(len(prompts), generator=g)
            if "old_logprobs" not in exp:  # old_from_training: this step records them
                self._record = []
            metrics.update(self.train_role(self.policy, exp, self._policy_loss, order))
            if self._record is not None:
                self._fill_old_logprobs(exp)
            if "kl" not in metrics:
                metrics.update(self.rollout_stats(exp))
            if self.value is not None:
                metrics.update(self.train_role(self.value, exp, self._value_loss, order))
        self.kl_ctl.update(metrics["kl"], cfg.sample_per_episode)
        metrics["kl_coef"] = self.kl_ctl.value
        metrics["time_generation_s"] = timing["generation"]
        metrics["time_logprobs_s"] = timing["scoring"]  # old/reference log-probs, values, reward
        metrics["time_training_s"] = time.time() - t_gen
        if self.generator is not self.policy or self.value_scorer is not self.value:
            metrics["time_weight_sync_s"] = self.sync_twins()
        metrics["tokens_per_s"] = float(exp["response_length"].sum()) / max(time.time() - t0, 1e-9)
        if self._sized < 2:  # constant once the optimizer state exists
            self._sized += 1
            self._roles_bytes = sum(m.total_bytes() for m in self.memory.values())
        roles_bytes = self._roles_bytes
        # without offloading every role holds all of its storages all the time
        metrics["resident_mb_max"] = (self.peak_bytes if self.offload else roles_bytes) / 2 ** 20
        metrics["roles_mb"] = roles_bytes / 2 ** 20
        self.episode += 1
        self.consumed_prompts += cfg.sample_per_episode // (
            cfg.num_samples_per_prompt if cfg.algorithm == "grpo" else 1)
        if eval_dataset is not None and cfg.eval_episode_interval and (
                self.episode % cfg.eval_episode_interval == 0 or self.episode == cfg.num_episodes):
            t_eval = time.time()
            metrics.update(self.evaluate(eval_dataset))
            metrics["time_eval_s"] = time.time() - t_eval
        logger.log_episode(metrics, cfg.num_episodes)
        return metrics

    # -- checkpoints

    @staticmethod
    def role_dir(role: Role, root: str) -> str:
        """Where a trainable role is saved: its own ``save`` argument, else ``root/<role name>``
        (root holds rlhf_state.json)."""
        return role.args.save or os.path.join(root, role.name)

    def save(self, root: str) -> None:
        for role in (self.policy, self.value):
            if role is None:
                continue
            self._resident(role, training=True)
            args = argparse.Namespace(**vars(role.args))
            args.save = self.role_dir(role, root)
            state = engine.TrainState(iteration=self.episode)
            meta = partial(engine.write_checkpoint_meta, args.save, role.arch, args,
                           self.tokenizer if role is self.policy else None, role.vocab,
                           self.vocab_limit, reward_model=role is self.value)
            with self.layouts.use(role.layout):
                engine.save(args, role.model, role.optimizer, role.scheduler, state, meta)
        if dist.get_rank() == 0:
            layout.atomic_write_bytes(os.path.join(root, "rlhf_state.json"), json.dumps({
                "episode": self.episode, "consumed_prompts": self.consumed_prompts,
                "kl_controller": self.kl_ctl.state_dict()}).encode())
        dist.barrier()

    def load(self, root: str) -> bool:
        path = os.path.join(root, "rlhf_state.json")
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            st = json.load(f)
        for role in (self.policy, self.value):
            if role is not None:  # the episode of the state file: a run killed while saving may
                self._resident(role, training=True)  # have saved one role's next episode already
                with self.layouts.use(role.layout):
                    checkpointing.load_checkpoint(self.role_dir(role, root), role.model,
                                                  role.optimizer, role.scheduler,
                                                  iteration=st["episode"])
        self.episode, self.consumed_prompts = st["episode"], st["consumed_prompts"]
        self.kl_ctl.load_state_dict(st["kl_controller"])
        self.sync_twins()
        return True


def load_reward_function(spec: str) -> Callable:
    mod, _, fn = spec.partition(":")
    if not fn:
        raise ArgumentError(f"reward_function must be module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ArgumentError(f"reward_function {spec}: {e}") from None


def run(cfg: PPOConfig, policy_args, reward_args, value_args, prompts: List[str],
        save: Optional[str], log_dir: Optional[str], tensorboard_dir: Optional[str] = None,
        reference_args=None, eval_prompts: Optional[List[str]] = None,
        generation_args=None, value_forward_args=None,
        offload_roles: Optional[Dict[str, str]] = None) -> List[dict]:
    """Train ``cfg.num_episodes`` episodes (resuming from ``save``'s rlhf_state.json when there
    is one); ``save``: the folder of rlhf_state.json, and of the trainable roles that have no
    ``save`` argument of their own (``save/policy``, ``save/value``).

    ``eval_prompts`` (held-out prompt files) with ``cfg.eval_episode_interval``: the starting
    policy is evaluated before the first episode (a metrics record with ``iteration`` 0 and only
    ``eval_*`` keys), then after every ``eval_episode_interval`` episodes and after the last
    (``eval_*`` keys in that episode's record)."""
    from megatron_patch.data.rl import PromptDataset

    if bool(eval_prompts) != bool(cfg.eval_episode_interval):
        raise ArgumentError("held-out evaluation needs both the eval prompts and "
                            "eval_episode_interval")
    trainer = RLHFTrainer(cfg, policy_args, reward_args, value_args, reference_args,
                          generation_args, value_forward_args, offload_roles)
    dataset = PromptDataset(prompts, trainer.tokenizer, cfg.max_prompt_length)
    eval_dataset = None
    if eval_prompts:
        eval_dataset = PromptDataset(eval_prompts, trainer.tokenizer, cfg.max_prompt_length)
        if trainer.eval_size(len(eval_dataset.ids)) == 0:
            raise ArgumentError(f"the eval prompts hold {len(eval_dataset.ids)} prompts; "
                                f"evaluation needs at least {trainer.eval_unit()} "
                                "(train_micro_batch_size x the roles' data-parallel sizes)")
    if save and trainer.load(save):
        print_rank_last(f"> resumed from {save} at episode {trainer.episode}")
    logger = MetricsLogger(argparse.Namespace(log_dir=log_dir, tensorboard_dir=tensorboard_dir),
                           start_iteration=trainer.episode)
    out = []
    if eval_dataset is not None and trainer.episode == 0:
        t_eval = time.time()
        rec = dict(iteration=0, **trainer.evaluate(eval_dataset))
        rec["time_eval_s"] = time.time() - t_eval
        logger.log_episode(rec, cfg.num_episodes)
    while trainer.episode < cfg.num_episodes:
        out.append(trainer.run_episode(dataset, logger, eval_dataset))
        if save and (trainer.episode == cfg.num_episodes or (
                cfg.save_episode_interval and trainer.episode % cfg.save_episode_interval == 0)):
            trainer.save(save)
    logger.close()
    return out


# ---------------------------------------------------------------------------------------- CLI


def build_cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PPO / GRPO on megatron-core (all roles in one job)")
    p.add_argument("--policy", required=True, help="the SFT checkpoint (policy and reference)")
    p.add_argument("--reward", default=None, help="the reward-model checkpoint (or none)")
    p.add_argument("--value", default=None, help="the value model's start (default: the reward "
                   "model, else the policy with a new head)")
    p.add_argument("--prompts", nargs="+", required=True, help="jsonl {prompt} / {query}")
    p.add_argument("--eval-prompts", nargs="+", default=None,
                   help="held-out prompts, evaluated every --eval-episode-interval episodes")
    p.add_argument("--save", default=None)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--tensorboard-dir", default=None)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--layout", action="append", default=[], metavar="ROLE=TPxPP",
                   help="another TP x PP for one role (generation, reference, reward, value; "
                        "e.g. reward=1x1); default: the policy's --tensor/--pipeline sizes")
    p.add_argument("--offload-role", action="append", default=[], metavar="ROLE=weights|all",
                   help="what of one role goes to host memory while it is idle (roles policy, "
                        "generation, reference, reward, value, value_forward); --offload true: "
                        "all of every role")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--value-lr", type=float, default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--seq-length", type=int, default=None,
                   help="without --max-prompt-length: max_prompt_length = this - max_new_tokens")
    for f in dataclasses.fields(PPOConfig):
        flag, typ = "--" + f.name.replace("_", "-"), str(f.type)
        flag = [flag, "--num-ppo-episode"] if f.name == "num_episodes" else [flag]
        if f.name == "offload":
            p.add_argument(*flag, type=_bool_or_auto, default=f.default, metavar="true|false|auto",
                           help="idle roles to host memory between phases (auto: on a GPU, "
                                "unless --offload-role names the roles; off on a CPU)")
        elif "bool" in typ:
            p.add_argument(*flag, type=lambda s: s.lower() in ("1", "true", "yes"),
                           default=f.default)
        elif "float" in typ:
            p.add_argument(*flag, type=float, default=f.default)
        elif "int" in typ:
            p.add_argument(*flag, type=int, default=f.default)
        else:
            p.add_argument(*flag, default=f.default)
    return p


LAYOUT_ROLES = ("generation", "reference", "reward", "value", "value_forward")
OFFLOAD_KINDS = ("weights", "all")


def offload_plan(roles: List[str], offload: Optional[bool], per_role: Optional[Dict[str, str]],
                 cuda: bool) -> Dict[str, str]:
    """{role: "weights" | "all"}: what of each role goes to host memory while it is idle.
    ``offload`` true: all of every role; false: only the ``per_role`` settings (ChatLearn's
    per-model ``offload_weights`` / ``free_memory``); None (auto): on a GPU, where the colocated
    roles share the device's memory, like true unless ``per_role`` names the roles; on a CPU like
    false (host memory is the same memory: copies would gain nothing)."""
    per_role = dict(per_role or {})
    if offload is None:
        offload = cuda and not per_role
    if offload:
        return {r: "all" for r in roles}
    return {r: per_role[r] for r in roles if per_role.get(r)}


def _bool_or_auto(s: str) -> Optional[bool]:
    v = s.strip().lower()
    if v in ("auto", "none", "null"):
        return None
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or auto, got {s!r}")


def parse_layouts(items: List[str]) -> Dict[str, tuple]:
    """``ROLE=TPxPP`` (or ``ROLE=TP``) flags -> {role: (tp, pp)}; ArgumentError when malformed."""
    out = {}
    for item in items:
        role, _, shape = item.partition("=")
        parts = shape.lower().split("x")
        if role not in LAYOUT_ROLES or not shape or len(parts) > 2 or \
                not all(x.isdigit() and int(x) > 0 for x in parts):
            raise ArgumentError(f"--layout {item!r}: expected ROLE=TPxPP with ROLE one of "
                                f"{', '.join(LAYOUT_ROLES)} (e.g. reward=1x1)")
        out[role] = (int(parts[0]), int(parts[1]) if len(parts) == 2 else 1)
    return out


def parse_offload_roles(items: List[str]) -> Dict[str, str]:
    """``ROLE=weights|all`` flags -> {role: kind}; ArgumentError when malformed."""
    out = {}
    for item in items:
        role, _, kind = item.partition("=")
        if role not in ("policy",) + LAYOUT_ROLES or kind not in OFFLOAD_KINDS:
            raise ArgumentError(f"--offload-role {item!r}: expected ROLE=weights or ROLE=all with "
                                f"ROLE one of policy, {', '.join(LAYOUT_ROLES)}")
        out[role] = kind
    return out


def role_args(ckpt: Optional[str], cli, lr: float, shape: Optional[tuple] = None):
    tp, pp = shape or (cli.tensor_model_parallel_size, cli.pipeline_model_parallel_size)
    flags = ["--model-size", "auto", "--seq-length", "8", "--lr", str(lr), "--min-lr", str(lr),
             "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
             "--weight-decay", "0.0", "--seed", str(cli.seed), "--train-iters", "1"]
    if ckpt:
        flags += ["--pretrained-checkpoint", ckpt]
    if cli.bf16:
        flags.append("--bf16")
    if cli.tokenizer_model:
        flags += ["--tokenizer-model", cli.tokenizer_model]
    p = build_parser()
    add_finetune_args(p)
    return p.parse_args(flags)


def main(argv: Optional[list] = None) -> int:
    cli = build_cli().parse_args(argv)
    cfg = PPOConfig(**{f.name: getattr(cli, f.name) for f in dataclasses.fields(PPOConfig)})

    def body():
        if cfg.max_prompt_length is None:
            if not cli.seq_length or cli.seq_length <= cfg.max_new_tokens:
                raise ArgumentError("give --max-prompt-length, or --seq-length larger than "
                                    f"--max-new-tokens ({cfg.max_new_tokens})")
            cfg.max_prompt_length = cli.seq_length - cfg.max_new_tokens
        check_config(cfg)
        shapes = parse_layouts(cli.layout)
        reward = None if cli.reward in (None, "none") else role_args(cli.reward, cli, cli.lr,
                                                                     shapes.get("reward"))
        value_src = cli.value or (None if reward is None else cli.reward) or cli.policy
        value = role_args(value_src, cli, cli.value_lr or cli.lr, shapes.get("value"))
        reference = role_args(cli.policy, cli, cli.lr, shapes["reference"]) \
            if "reference" in shapes else None
        generation = role_args(cli.policy, cli, cli.lr, shapes["generation"]) \
            if "generation" in shapes else None
        value_forward = role_args(value_src, cli, cli.lr, shapes["value_forward"]) \
            if "value_forward" in shapes else None
        run(cfg, role_args(cli.policy, cli, cli.lr), reward, value, cli.prompts, cli.save,
            cli.log_dir, cli.tensorboard_dir, reference_args=reference,
            eval_prompts=cli.eval_prompts, generation_args=generation,
            value_forward_args=value_forward, offload_roles=parse_offload_roles(cli.offload_role))

    return run_entry(body)


if __name__ == "__main__":
    sys.exit(main())
