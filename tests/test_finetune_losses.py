"""The fine-tuning losses on hand-derived numbers (pure functions, no model)."""
import math

import torch

from megatron_patch.training.losses import (gather_last, last_token_index, masked_token_loss,
                                            pairwise_reward_loss, preference_pairs)


def test_masked_token_loss_counts_response_tokens_only():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]])
    loss, n = masked_token_loss(per_token, mask)
    assert loss.item() == 2.0 + 3.0 + 8.0 and n.item() == 3


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    values = torch.arange(15.0).view(3, 5)
    assert gather_last(values, right).tolist() == [2.0, 9.0, 10.0]
    assert gather_last(values, left).tolist() == [4.0, 9.0, 14.0]


def test_pairs_of_a_listwise_sample():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 1.0]])
    b, i, j = preference_pairs(scores)
    got = sorted(zip(b.tolist(), i.tolist(), j.tolist()))
    # sample 0: 3>1, 3>2, 2>1; sample 1: only index 2 beats 0 and 1 (the tie makes no pair)
    assert got == [(0, 0, 1), (0, 0, 2), (0, 2, 1), (1, 2, 0), (1, 2, 1)]


def test_pairwise_loss_accuracy_and_gap_by_hand():
    rewards = torch.tensor([[2.0, 0.0], [0.5, 1.5]])
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # chosen first
    loss, n, stats = pairwise_reward_loss(rewards, scores)
    # pair 1: diff +2 -> -log sigmoid(2) = log(1 + e^-2) = 0.126928
    # pair 2: diff -1 -> -log sigmoid(-1) = log(1 + e^1) = 1.313262
    assert n.item() == 2
    assert math.isclose(loss.item(), math.log1p(math.exp(-2)) + math.log1p(math.exp(1)),
                        rel_tol=1e-6)
    assert math.isclose(loss.item(), 0.126928 + 1.313262, abs_tol=1e-5)
    assert stats["correct"].item() == 1.0 and stats["gap"].item() == 1.0  # (+2) + (-1)
    # a margin of 1 shifts every difference: log(1 + e^-1) + log(1 + e^2)
    loss_m, _, _ = pairwise_reward_loss(rewards, scores, margin=1.0)
    assert math.isclose(loss_m.item(), math.log1p(math.exp(-1)) + math.log1p(math.exp(2)),
                        rel_tol=1e-6)


def test_pairwise_loss_gradient():
    rewards = torch.tensor([[1.0, 0.0, 3.0]], requires_grad=True)
    scores = torch.tensor([[2.0, 1.0, 0.0]])  # order 0 > 1 > 2
    loss, n, _ = pairwise_reward_loss(rewards, scores)
    loss.backward()
    s = torch.sigmoid
    # d/dr of -log sigmoid(d) is -(1 - sigmoid(d)) for the better, +(1 - sigmoid(d)) for the worse
    d01, d02, d12 = 1.0, -2.0, -3.0
    g0 = -(1 - s(torch.tensor(d01))) - (1 - s(torch.tensor(d02)))
    g1 = (1 - s(torch.tensor(d01))) - (1 - s(torch.tensor(d12)))
    g2 = (1 - s(torch.tensor(d02))) + (1 - s(torch.tensor(d12)))
    assert n.item() == 3
    torch.testing.assert_close(rewards.grad, torch.stack([g0, g1, g2]).view(1, 3))
