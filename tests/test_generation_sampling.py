"""The sampling functions on hand-built logits (numbers derived in the comments)."""
import math

import pytest
import torch

from megatron_patch.generation.sampling import (SamplingParams, apply_repetition_penalty,
                                                make_generator, process_logits, sample,
                                                top_k_filter, top_p_filter)

NEG = float("-inf")


def _logits_of(probs):
    return torch.tensor([probs]).log()  # [1, V]


def test_top_p_keeps_smallest_set_reaching_p():
    # probs 0.5, 0.2, 0.15, 0.1, 0.05 (given out of order)
    logits = _logits_of([0.1, 0.5, 0.05, 0.2, 0.15])
    kept = lambda p: (top_p_filter(logits, p)[0] > NEG).tolist()
    # p=0.5: 0.5 alone reaches it
    assert kept(0.5) == [False, True, False, False, False]
    # p=0.6: 0.5 < 0.6, 0.5+0.2 = 0.7 >= 0.6 -> two tokens
    assert kept(0.6) == [False, True, False, True, False]
    # p=0.8: 0.7 < 0.8, 0.7+0.15 = 0.85 >= 0.8 -> three tokens
    assert kept(0.8) == [False, True, False, True, True]
    # p=0.86: 0.85 < 0.86 -> four tokens
    assert kept(0.86) == [True, True, False, True, True]
    # p=0.01: the most likely token is always kept
    assert kept(0.01) == [False, True, False, False, False]
    # off (0 or 1): everything
    assert kept(0.0) == kept(1.0) == [True] * 5
    # kept logits are unchanged
    out = top_p_filter(logits, 0.6)[0]
    assert out[1] == logits[0, 1] and out[3] == logits[0, 3]


def test_top_p_renormalised_distribution():
    logits = _logits_of([0.5, 0.2, 0.15, 0.1, 0.05])
    probs = torch.softmax(top_p_filter(logits, 0.6), -1)[0]
    # 0.5/0.7 and 0.2/0.7
    torch.testing.assert_close(probs, torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))


def test_repetition_penalty_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    # seen positive: 2/2 = 1, 0.5/2 = 0.25; seen negative: -2*2 = -4; unseen unchanged
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0, 0.25]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    # a penalty < 1 rewards: 2/0.5 = 4, -2*0.5 = -1
    assert apply_repetition_penalty(logits, seen, 0.5)[0, :2].tolist() == [4.0, -1.0]


def test_top_k_with_ties_and_order_k_then_p():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    assert (top_k_filter(logits, 2)[0] > NEG).tolist() == [False, True, False, True, False]
    assert (top_k_filter(logits, 3)[0] > NEG).tolist() == [False, True, True, True, False]
    assert torch.equal(top_k_filter(logits, 0), logits)
    # k then p: probs 0.4, 0.3, 0.2, 0.1; top_k=2 leaves 0.4, 0.3 -> renormalised 4/7, 3/7;
    # top_p=0.5 then keeps 4/7 alone (p before k would have kept 0.4 + 0.3 -> two tokens)
    logits = _logits_of([0.4, 0.3, 0.2, 0.1])
    out = process_logits(logits, SamplingParams(top_k=2, top_p=0.5))
    assert (out[0] > NEG).tolist() == [True, False, False, False]


def test_temperature_and_greedy():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    out = process_logits(logits, SamplingParams(temperature=0.5))
    assert out.tolist() == [[2.0, 4.0, 1.0]]
    assert sample(logits, SamplingParams(greedy=True)).tolist() == [1]
    assert sample(logits, SamplingParams(temperature=0.0)).tolist() == [1]
    assert sample(logits, SamplingParams(top_k=1, seed=3), make_generator(3, "cpu")).tolist() == [1]
    # greedy applies the repetition penalty first: 2/4 = 0.5 < 1.0
    seen = torch.tensor([[False, True, False]])
    assert sample(logits, SamplingParams(greedy=True, repetition_penalty=4.0), seen=seen).tolist() == [0]


def test_seeded_multinomial_reproducible_and_frequencies():
    logits = _logits_of([0.5, 0.3, 0.2]).expand(20000, -1)
    p = SamplingParams()
    a = sample(logits, p, make_generator(5, "cpu"))
    b = sample(logits, p, make_generator(5, "cpu"))
    c = sample(logits, p, make_generator(6, "cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=3).float() / a.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.02, rtol=0)
    # top-p 0.6 -> only tokens 0 and 1, with 5/8 and 3/8
    f = torch.bincount(sample(logits, SamplingParams(top_p=0.6), make_generator(1, "cpu")),
                       minlength=3).float() / a.numel()
    assert f[2] == 0 and math.isclose(float(f[0]), 5 / 8, abs_tol=0.02)


def test_draw_matches_the_distribution_and_never_picks_zero_mass():
    from megatron_patch.generation.sampling import draw

    # zero mass at both ends and in the middle, an unnormalised row (total 2)
    probs = torch.tensor([[0.0, 0.2, 0.0, 1.2, 0.6, 0.0]]).expand(60000, -1)
    got = draw(probs, make_generator(0, "cpu"))
    freq = torch.bincount(got, minlength=6).double() / got.numel()
    assert freq[0] == 0 and freq[2] == 0 and freq[5] == 0
    torch.testing.assert_close(freq[[1, 3, 4]], torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64),
                               atol=0.01, rtol=0)
    # a one-hot row always draws its token (zero mass before and after it)
    assert draw(torch.tensor([[0.0, 0.0, 1.0, 0.0]]).expand(1000, -1)).eq(2).all()
    a, b = draw(probs[:50], make_generator(9, "cpu")), draw(probs[:50], make_generator(9, "cpu"))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=-1), dict(temperature=-1), dict(top_k=-2),
                                dict(top_p=1.2), dict(repetition_penalty=0)])
def test_params_validation(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
