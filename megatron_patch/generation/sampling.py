"""Sampling: small pure functions over a batch of next-token logits, plus ``SamplingParams``.

Order (the order ``transformers`` applies its processors and warpers in):
repetition penalty -> temperature -> top-k -> top-p -> greedy argmax or a seeded draw (``draw``).

- Repetition penalty (CTRL paper, as transformers does it): for every token already present in the
  row (prompt + generated), a positive logit is divided by the penalty and a negative one multiplied
  by it, so a penalty > 1 always makes the token less likely.
- Top-k keeps the k largest logits (ties at the k-th value are all kept).
- Top-p keeps the smallest set of most likely tokens whose probability mass reaches p (the most
  likely token is always kept). With both set, top-k is applied first and top-p renormalises over
  what top-k left.
- Greedy: ``greedy=True`` or ``temperature == 0``; top-k = 1 gives the same tokens.

Only torch is imported here, so PPO code and tests can use these without megatron.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch


@dataclasses.dataclass
class SamplingParams:
    """How to pick tokens. ``top_k=0`` and ``top_p`` in (0 or >= 1) switch those filters off."""

    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Sequence[int] = ()
    return_logprobs: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p < 0 or self.top_p > 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits: [b, V] float; seen: [b, V] bool (token present in the row). Returns new logits."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set everything below the k-th largest logit of each row to -inf. logits: [b, V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [b, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``p``. logits: [b, V]."""
    if p <= 0 or p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [b, V]
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p  # the set already reached p without this token
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams,
                   seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Penalty, temperature, top-k, top-p on float32 logits [b, V]; returns the filtered logits."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.is_greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    return top_p_filter(logits, params.top_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None,
           seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next tokens [b] (int64) from logits [b, V]."""
    logits = process_logits(logits, params, seen)
    if params.is_greedy or params.top_k == 1:
        return torch.argmax(logits, dim=-1)
    return draw(torch.softmax(logits, dim=-1), generator)


def draw(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of ``probs`` [b, V] (non-negative, any positive total), [b] int64: the
    distribution of ``torch.multinomial(probs, 1)`` by inverse transform sampling, one uniform
    per row against the row's cumulative sums (in float64). With ``right=True`` the chosen index is
    the first whose cumulative sum exceeds the uniform, so a zero-probability token (an equal
    cumulative sum) is never chosen. On a CPU, ``torch.multinomial`` takes ~180 us for 8 x 1000
    probabilities (one thread) and this ~23 us: ~2.5 ms of a 16-token PPO rollout."""
    cdf = probs.double().cumsum(-1)  # [b, V]
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device,
                   generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def make_generator(seed: Optional[int], device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (a fresh random seed when None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
