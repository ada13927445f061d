"""PPO and GRPO losses, advantages, rewards and KL control as small pure torch functions.

Conventions, shared by every function here:

- Per-token tensors are ``[B, T]`` over response positions (B rows of the micro batch, T response
  positions). ``mask`` is a float ``[B, T]``: 1 at a real response token, 0 at prompt, padding and
  tokens after EOS. A masked position never changes a result, even if it holds ``inf`` or ``nan``:
  masked values are dropped with ``torch.where`` before any arithmetic reaches them.
- Losses return ``(sum, count, stats)``: the masked *sum* over tokens, the token count
  ``mask.sum()``, and a dict of detached stat sums (also over tokens). The caller divides the sum of
  sums by the sum of counts over the global batch (all micro batches, all data-parallel ranks), so
  the token mean does not depend on the data-parallel size or the number of accumulation steps.
  Dividing each micro batch by its own count (a mean of means) would.
- ``logprobs`` are log pi(a_t | s_t) of the sampled tokens under the policy being trained,
  ``old_logprobs`` under the policy that generated the rollout, ``ref_logprobs`` under the frozen
  reference (SFT) model.

Only torch is imported; ``torch.distributed`` is used by :func:`whiten_across` alone.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor
Stats = Dict[str, Tensor]

KL_KINDS = ("k1", "k2", "k3", "abs")


# ----------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------

def _keep(x: Tensor, mask: Tensor) -> Tensor:
    """x * mask where mask != 0, exactly 0 elsewhere (so inf/nan at masked positions vanish)."""
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """sum_i mask_i * x_i over ``dim`` (all dims when None).

    x, mask: same shape (e.g. [B, T]). Returns a 0-d tensor, or x's shape without ``dim``.
    """
    kept = _keep(x, mask)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None, denom=None) -> Tensor:
    """sum_i mask_i * x_i / denom, with denom = sum_i mask_i unless given explicitly.

    x, mask: same shape. ``denom`` (number or tensor broadcastable to the result) is the place to
    pass a global token count, so that the mean is over the global batch. An all-masked
    reduction with the default denominator returns 0 (the count is clamped to >= 1).
    """
    s = masked_sum(x, mask, dim)
    if denom is None:
        n = mask.sum() if dim is None else mask.sum(dim)
        denom = n.to(s.dtype).clamp_min(1.0)
    return s / denom


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of x (all dims): sum m (x - mean)^2 / (n - 1), n = sum m.

    ``unbiased=False`` divides by n instead of n - 1. The denominator is clamped to >= 1, so one
    (or no) real entry gives variance 0. Returns a 0-d tensor.
    """
    mean = masked_mean(x, mask)
    n = mask.sum().to(x.dtype)
    ss = masked_sum((x - mean) ** 2, mask)
    return ss / ((n - 1.0) if unbiased else n).clamp_min(1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; 0 at masked positions.

    mean and var are over all real entries of x (every row and position), var unbiased (n - 1),
    as in TRL and verl. ``shift_mean=False`` adds the mean back: (x - mean) / sqrt(var + eps) + mean
    (only the scale is normalised, the usual choice for rewards). x, mask: [B, T] -> [B, T].
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    return _finish_whiten(x, mask, mean, var, shift_mean, eps)


def _finish_whiten(x, mask, mean, var, shift_mean, eps):
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask != 0, out, torch.zeros((), dtype=out.dtype, device=out.device))


def whiten_across(x: Tensor, mask: Tensor, group=None, shift_mean: bool = True,
                  eps: float = 1e-8) -> Tensor:
    """:func:`masked_whiten` with mean and var over every rank of ``group`` (data parallel).

    Each rank holds its own [B_r, T] slice of the global batch (B_r and the counts may differ).
    One all_reduce (sum) of the float64 vector (S1, S2, N) = (sum m x, sum m x^2, sum m) gives
    mean = S1 / N and the unbiased var = (S2 - N mean^2) / (N - 1) of the concatenated batch, so
    the result equals masked_whiten of the whole global batch, sliced to this rank. ``group=None``
    means the default (world) group when torch.distributed is initialised; when it is not, this is
    the local masked_whiten. The global mean and var are constants for autograd (advantages and
    rewards are whitened without gradient anyway). x, mask: [B_r, T] -> [B_r, T].
    """
    if not (dist.is_available() and dist.is_initialized()):
        return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    x64 = x.detach().to(torch.float64)
    m64 = mask.to(torch.float64)
    stats = torch.stack([masked_sum(x64, m64), masked_sum(x64 * x64, m64), m64.sum()])  # [3]
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    s1, s2, n = stats.unbind(0)
    mean = s1 / n.clamp_min(1.0)
    var = ((s2 - n * mean * mean) / (n - 1.0).clamp_min(1.0)).clamp_min(0.0)
    return _finish_whiten(x, mask, mean.to(x.dtype), var.to(x.dtype), shift_mean, eps)


# ----------------------------------------------------------------------------------------------
# KL to the reference, rewards, advantages
# ----------------------------------------------------------------------------------------------

def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1/k2/k3).

    With d = logp - ref (log pi(a) - log pi_ref(a)):
      k1:  d                         (unbiased, can be negative)
      k2:  0.5 * d^2                 (biased, low variance, >= 0)
      k3:  exp(-d) - (-d) - 1 = exp(ref - logp) - (ref - logp) - 1   (unbiased, >= 0)
      abs: |d|
    logprobs, ref_logprobs: [B, T] -> [B, T] (elementwise; not masked, mask the result).
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        r = -d  # ref - logp
        return torch.exp(r) - r - 1.0
    if kind == "abs":
        return d.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_KINDS}")


def last_index(mask: Tensor) -> Tensor:
    """Index of the last real position of each row (-1 for a row with none). mask [B, T] -> [B]."""
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # [B, T]
    return torch.where(mask != 0, pos, torch.full_like(pos, -1)).amax(-1)


def compute_rewards(score: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                    kl_coef: float, kind: str = "k1", kl_divide_by_length: bool = False,
                    reward_clip: Optional[float] = None,
                    reward_scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Per-token PPO rewards: a KL penalty at every response token, the score at the last one.

      kl_t      = mask_t * kl_penalty(logp_t, ref_t, kind)                          [B, T]
      r_t       = -kl_coef * kl_t / (L if kl_divide_by_length else 1)              [B, T]
      r_last   += clip(reward_scale * score, -reward_clip, reward_clip)     (last real token)
    with L = sum_t mask_t the row's response length (ChatLearn's per-length KL variant). The score
    is scaled first, then clipped (no clip when reward_clip is None). A row without real tokens
    gets no score. score: [B]; logprobs, ref_logprobs, mask: [B, T].
    Returns (rewards [B, T], 0 at masked positions; kl_sum [B] = sum_t kl_t, the sequence KL in
    nats, before kl_coef and before the length division: what an adaptive controller tracks).
    """
    kl = _keep(kl_penalty(logprobs, ref_logprobs, kind), mask)  # [B, T]
    kl_sum = kl.sum(-1)  # [B]
    per_token = kl
    if kl_divide_by_length:
        length = mask.sum(-1, keepdim=True).to(kl.dtype).clamp_min(1.0)  # [B, 1]
        per_token = kl / length
    rewards = -kl_coef * per_token  # [B, T]
    s = score.to(rewards.dtype) * reward_scale  # [B]
    if reward_clip is not None:
        s = s.clamp(-reward_clip, reward_clip)
    last = last_index(mask)  # [B]
    has = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    rewards = rewards.index_put((rows, last[has]), s[has], accumulate=True)
    return rewards, kl_sum


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
                   lam: float) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the real tokens of each row.

      delta_t = r_t + gamma * V_next(t) - V_t
      A_t     = delta_t + gamma * lam * A_next(t)
    where next(t) is the next *real* position after t: masked positions are skipped (their reward
    and value are never read), and after the last real token V_next = A_next = 0 (the episode
    ends). returns_t = A_t + V_t. rewards, values, mask: [B, T].
    Returns (advantages [B, T], returns [B, T]), both 0 at masked positions. No gradient flows.
    """
    with torch.no_grad():
        keep = mask != 0  # [B, T]
        zero = torch.zeros_like(values[:, 0])  # [B]
        next_value, next_adv = zero, zero
        adv = torch.zeros_like(values)  # [B, T]
        # a column no row keeps changes nothing (next_* carry over, its advantages stay 0)
        for t in reversed(keep.any(0).nonzero().flatten().tolist()):
            k = keep[:, t]  # [B]
            v = torch.where(k, values[:, t], zero)
            r = torch.where(k, rewards[:, t], zero)
            a = r + gamma * next_value - v + gamma * lam * next_adv
            next_value = torch.where(k, v, next_value)
            next_adv = torch.where(k, a, next_adv)
            adv[:, t] = torch.where(k, a, zero)
        returns = torch.where(keep, adv + values, torch.zeros_like(values))
    return adv, returns


# ----------------------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------------------

def _clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_eps):
    """Per-token -min(ratio A, clip(ratio) A), clipped flags, k3 approx KL; all [B, T]."""
    log_ratio = torch.where(mask != 0, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    is_clipped = (clipped > unclipped).to(logprobs.dtype)
    with torch.no_grad():
        approx_kl = ratio - 1.0 - log_ratio  # k3 of KL(pi_old || pi)
    return per_token, is_clipped, approx_kl


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip_eps: float) -> Tuple[Tensor, Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017), as a token sum.

      ratio_t = exp(logp_t - old_t)
      loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_eps, 1 + clip_eps))
    (= -min of the two objectives). logprobs, old_logprobs, advantages, mask: [B, T].
    Returns (loss_sum = sum_t m_t loss_t, count = sum_t m_t, stats) with, as token sums:
      clipfrac_sum:  number of tokens where the clipped term is the max (its gradient is 0);
      approx_kl_sum: k3 estimate of KL(pi_old || pi) from the rollout's samples,
                     sum m_t * (ratio_t - 1 - log ratio_t)  (>= 0, unbiased).
    """
    per_token, is_clipped, approx_kl = _clipped_surrogate(logprobs, old_logprobs, advantages, mask,
                                                          clip_eps)
    stats = {"clipfrac_sum": masked_sum(is_clipped, mask).detach(),
             "approx_kl_sum": masked_sum(approx_kl, mask).detach()}
    return masked_sum(per_token, mask), mask.sum(), stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_eps_v: float, clipped_only: bool = False) -> Tuple[Tensor, Tensor, Stats]:
    """Clipped value loss, as a token sum.

      v_clip_t = old_t + clip(v_t - old_t, -clip_eps_v, clip_eps_v)
      loss_t   = 0.5 * max((v_t - R_t)^2, (v_clip_t - R_t)^2)
    or, with ``clipped_only`` (ChatLearn's variant), loss_t = 0.5 * (v_clip_t - R_t)^2.
    values, old_values, returns, mask: [B, T].
    Returns (loss_sum, count = sum m, stats {vf_clipfrac_sum: tokens where the clipped error is
    the larger one}).
    """
    v_clip = old_values + (values - old_values).clamp(-clip_eps_v, clip_eps_v)
    err = (values - returns) ** 2  # [B, T]
    err_clip = (v_clip - returns) ** 2  # [B, T]
    per_token = 0.5 * (err_clip if clipped_only else torch.maximum(err, err_clip))
    stats = {"vf_clipfrac_sum": masked_sum((err_clip > err).to(values.dtype), mask).detach()}
    return masked_sum(per_token, mask), mask.sum(), stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: H = logsumexp(z) - sum_v softmax(z)_v z_v.

    logits: [..., V] -> [...] (e.g. [B, T, V] -> [B, T]).
    """
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


class _SumAcross(torch.autograd.Function):
    """All-reduce (sum) over ``group`` forward; identity backward: every rank's loss is the same
    function of the total, so d loss / d (its partial sum) = d loss / d total."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def vocab_parallel_entropy(logits: Tensor, group=None) -> Tensor:
    """``entropy_from_logits`` for a vocabulary split across the ranks of ``group`` (tensor
    parallel; None: the whole vocabulary is here). logits: [..., V/tp] -> [...].

    With the max shift c = max_v z_v (over every rank; a constant for the gradient) and
    Z = sum_v exp(z_v - c), S = sum_v exp(z_v - c) z_v, each a sum of per-rank partial sums:
      H = log Z + c - S / Z      (= logsumexp(z) - sum_v softmax(z)_v z_v).
    Differentiable on every rank (the partial sums' all-reduce has an identity backward).
    """
    z = logits.float()
    c = z.max(dim=-1, keepdim=True).values.detach()
    if group is not None:
        torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MAX, group=group)
    e = torch.exp(z - c)
    total, weighted = e.sum(-1), (e * z).sum(-1)
    if group is not None:
        total, weighted = _SumAcross.apply(total, group), _SumAcross.apply(weighted, group)
    return torch.log(total) + c.squeeze(-1) - weighted / total


def entropy_bonus(logits: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Masked token entropy of the policy: (sum_t m_t H_t, sum_t m_t).

    logits: [B, T, V], mask: [B, T]. The loss adds ``-entropy_coef * sum`` (maximising entropy)
    and divides by the global token count like the other sums.
    """
    return masked_sum(entropy_from_logits(logits), mask), mask.sum()


# ----------------------------------------------------------------------------------------------
# KL controllers
# ----------------------------------------------------------------------------------------------

class FixedKLController:
    """A constant KL coefficient. ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

    After a batch of ``n_steps`` samples whose mean sequence KL is ``current_kl``:
      err   = clip(current_kl / target - 1, -0.2, 0.2)
      coef *= 1 + err * n_steps / horizon
    so the coefficient rises when the KL overshoots the target and falls when it undershoots.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


# ----------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------

def grpo_advantages(scores: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath): one scalar per response.

    scores: [B] with B = P * group_size, group-contiguous (rows g*G .. g*G + G - 1 answer prompt g).
      A_i = (s_i - mean_g) / (std_g + eps)
    std is the *unbiased* sample std (divides by G - 1, like torch.std, TRL and verl). A group of
    equal scores (or G = 1) has std 0 and gets advantage 0. Returns [B].
    """
    if scores.dim() != 1 or scores.shape[0] % group_size != 0:
        raise ValueError(f"scores must be [P * group_size], got {tuple(scores.shape)} "
                         f"for group_size={group_size}")
    g = scores.view(-1, group_size)  # [P, G]
    mean = g.mean(-1, keepdim=True)  # [P, 1]
    std = g.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # [P, 1]
    return ((g - mean) / (std + eps)).reshape(-1)  # [P, G] -> [B]


def broadcast_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-response advantages to every real token: [B] -> [B, T] = A[:, None] * mask."""
    return _keep(advantages[:, None].expand(mask.shape), mask)  # [B, 1] -> [B, T]


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor,
              mask: Tensor, clip_eps: float, kl_coef: float) -> Tuple[Tensor, Tensor, Stats]:
    """GRPO loss: the PPO clipped surrogate plus a k3 KL to the reference in the loss.

      loss_t = max(-A_t ratio_t, -A_t clip(ratio_t, 1 +- clip_eps)) + kl_coef * k3_t
      k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    advantages: [B, T] (e.g. from broadcast_advantages) or [B] (broadcast here); the rest [B, T].
    Reduced as a token sum (the caller divides by the global token count), not the paper's mean
    per sequence then over sequences: so the mean is invariant to how the batch is split.
    Returns (loss_sum, count, stats {clipfrac_sum, approx_kl_sum (k3 of KL(pi_old || pi), as in
    ppo_policy_loss), ref_kl_sum (sum m_t k3_t, detached)}).
    """
    if advantages.dim() == 1:
        advantages = broadcast_advantages(advantages, mask)  # [B] -> [B, T]
    per_token, is_clipped, approx_kl = _clipped_surrogate(logprobs, old_logprobs, advantages, mask,
                                                          clip_eps)
    kl = kl_penalty(logprobs, ref_logprobs, "k3")  # [B, T]
    stats = {"clipfrac_sum": masked_sum(is_clipped, mask).detach(),
             "approx_kl_sum": masked_sum(approx_kl, mask).detach(),
             "ref_kl_sum": masked_sum(kl, mask).detach()}
    return masked_sum(per_token + kl_coef * kl, mask), mask.sum(), stats


# ----------------------------------------------------------------------------------------------
# Response mask
# ----------------------------------------------------------------------------------------------

def response_mask(response_ids: Tensor, eos_id: int,
                  pad_id: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Mask of the real tokens of generated responses, and whether each ended with EOS.

    response_ids: [B, T] (generated tokens only, no prompt). A row with an EOS is real up to and
    including its first EOS and 0 after. A row without one is real up to (excluding) its first
    ``pad_id`` token, or everywhere when pad_id is None. pad_id == eos_id is fine (the first EOS
    then ends the row). Returns (mask [B, T] float32, ended [B] bool).
    """
    is_eos = (response_ids == eos_id).long()  # [B, T]
    ended = is_eos.any(-1)  # [B]
    upto_eos = (is_eos.cumsum(-1) - is_eos) == 0  # [B, T]: before or at the first eos
    if pad_id is None:
        before_pad = torch.ones_like(upto_eos)
    else:
        before_pad = (response_ids == pad_id).long().cumsum(-1) == 0  # [B, T]
    mask = torch.where(ended[:, None], upto_eos, before_pad)  # [B, 1] broadcast over T
    return mask.to(torch.float32), ended


__all__ = [
    "KL_KINDS", "masked_sum", "masked_mean", "masked_var", "masked_whiten", "whiten_across",
    "kl_penalty", "last_index", "compute_rewards", "gae_advantages", "ppo_policy_loss",
    "value_loss", "entropy_from_logits", "entropy_bonus", "FixedKLController",
    "AdaptiveKLController", "grpo_advantages", "broadcast_advantages", "grpo_loss",
    "response_mask",
]
