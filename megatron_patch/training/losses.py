"""Loss functions of the fine-tuning stages: small pure functions over tensors and masks.

Each returns sums and counts rather than means, so that megatron-core (``calculate_per_token_loss``)
divides by the count over the whole global batch: the loss is then the same for any data-parallel
size and any number of accumulation steps.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def masked_token_loss(per_token: torch.Tensor, loss_mask: torch.Tensor) -> Tuple[torch.Tensor,
                                                                                  torch.Tensor]:
    """(sum of per-token losses where ``loss_mask`` is 1, number of such tokens)."""
    mask = loss_mask.float().reshape(-1)
    return torch.sum(per_token.float().reshape(-1) * mask), mask.sum()


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) position of each row, for right- or left-padded rows.
    mask: [N, L] (1 = real token) -> [N] long. A row without real tokens gives 0."""
    L = mask.shape[-1]
    m = mask.to(torch.bool)
    # position of the last True: L - 1 - (index of the first True in the flipped row)
    last = L - 1 - torch.argmax(m.flip(-1).to(torch.int8), dim=-1)
    return torch.where(m.any(-1), last, torch.zeros_like(last))


def gather_last(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [N, L], mask [N, L] -> the value at each row's last real token, [N]."""
    idx = last_token_index(mask)
    return values.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def preference_pairs(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (better, worse) pair of each listwise sample.

    scores [B, K] -> (batch index, better index, worse index), each [P], for all i, j with
    ``scores[b, i] > scores[b, j]`` (ties make no pair).
    """
    better = scores.unsqueeze(2) > scores.unsqueeze(1)  # [B, K, K]: row i beats column j
    b, i, j = better.nonzero(as_tuple=True)
    return b, i, j


def pairwise_reward_loss(rewards: torch.Tensor, scores: torch.Tensor, margin: float = 0.0
                         ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Bradley-Terry loss over every (better, worse) pair.

    rewards [B, K] (the model's scalar per candidate), scores [B, K] (the data's order).
    Returns (sum over pairs of ``-log sigmoid(r_better - r_worse - margin)``, number of pairs,
    {"correct": pairs with r_better > r_worse, "gap": sum of r_better - r_worse}).
    """
    b, i, j = preference_pairs(scores)
    diff = rewards[b, i].float() - rewards[b, j].float()  # [P]
    loss = -F.logsigmoid(diff - margin).sum()
    stats = {"correct": (diff > 0).float().sum().detach(), "gap": diff.sum().detach()}
    return loss, torch.tensor(float(b.numel()), device=rewards.device), stats
