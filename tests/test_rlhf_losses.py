"""The PPO / GRPO functions of megatron_patch.rlhf.losses on hand-derived numbers.

Every expected value is worked out in a comment next to it (ln 2 = 0.693147, e^-1 = 0.367879).
Masked positions (prompt, padding, after EOS) hold garbage, and a test swaps it for nan to show it
never reaches a result. The token mean over a global batch split into 1, 2 or 4 chunks equals the
whole batch's, and whiten_across over 2 gloo ranks equals whitening the concatenated batch.
"""
import math
import os

import pytest
import torch

from megatron_patch.rlhf import losses as L

LN2 = math.log(2.0)
E_1 = math.exp(-1.0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def t(*rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------
# masked reductions and whitening
# ---------------------------------------------------------------------------------------------

def test_masked_sum_mean_var():
    x = t([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0])
    mask = t([0, 1, 1, 0], [0, 0, 0, 1])  # real: 2, 3 | 8
    assert L.masked_sum(x, mask).item() == 13.0
    assert L.masked_sum(x, mask, dim=-1).tolist() == [5.0, 8.0]
    assert close(L.masked_mean(x, mask), 13 / 3)
    assert L.masked_mean(x, mask, dim=-1).tolist() == [2.5, 8.0]
    # explicit denominator (a global token count): 13 / 10
    assert close(L.masked_mean(x, mask, denom=10), 1.3)
    # an all-masked row: 0 / clamp(0, 1) = 0
    assert L.masked_mean(x, t([0, 0, 0, 0], [0, 0, 0, 1]), dim=-1).tolist() == [0.0, 8.0]
    # mean 13/3; deviations -7/3, -4/3, 11/3; squares sum (49 + 16 + 121) / 9 = 62/3
    assert close(L.masked_var(x, mask, unbiased=False), 62 / 9, 1e-5)  # / n
    assert close(L.masked_var(x, mask), 31 / 3, 1e-5)  # / (n - 1)
    # one real entry: unbiased variance 0 (denominator clamped), not nan
    assert L.masked_var(x, t([0, 1, 0, 0], [0, 0, 0, 0])).item() == 0.0


def test_masked_whiten_by_hand():
    x = t([1.0, 3.0, 9.0], [5.0, 9.0, 9.0])
    mask = t([1, 1, 0], [1, 0, 0])
    # real entries 1, 3, 5: mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    w = L.masked_whiten(x, mask)
    assert close(w, t([-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]), 1e-6)  # masked positions -> 0
    # shift_mean=False adds the mean back: (x - 3) / 2 + 3
    w = L.masked_whiten(x, mask, shift_mean=False)
    assert close(w, t([2.0, 3.0, 0.0], [4.0, 0.0, 0.0]), 1e-6)
    # single row [1, 2, 3 | 100]: mean 2, var (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1 | 0]
    w = L.masked_whiten(t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0]))
    assert close(w, t([-1.0, 0.0, 1.0, 0.0]), 1e-6)


def test_whiten_across_without_process_group_is_local():
    torch.manual_seed(0)
    x = torch.randn(3, 5) * 2 + 1
    mask = (torch.rand(3, 5) > 0.3).float()
    if not torch.distributed.is_initialized():
        assert torch.equal(L.whiten_across(x, mask), L.masked_whiten(x, mask))
    else:  # another in-process test set up a one-rank group: the all-reduce path, same numbers
        assert torch.distributed.get_world_size() == 1
        torch.testing.assert_close(L.whiten_across(x, mask), L.masked_whiten(x, mask))


def test_whiten_across_two_gloo_ranks_equals_whole_batch(tmp_path):
    from megatron_patch.launch import launch_local

    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g) * 3 + 2  # mean far from 0 so shift_mean matters
    mask = torch.zeros(5, 6)
    for row, (start, end) in enumerate([(1, 6), (0, 2), (2, 5), (0, 6), (3, 4)]):
        mask[row, start:end] = 1  # prompt before, padding after; uneven counts per rank
    x = torch.where(mask > 0, x, torch.full_like(x, 1e4))  # garbage at masked positions
    torch.save({"x": x, "mask": mask, "split": [3, 2]}, tmp_path / "in.pt")
    prefix = str(tmp_path / "out")
    launch_local([os.path.join(ROOT, "tests", "workers", "rlhf_whiten.py"),
                  str(tmp_path / "in.pt"), prefix], 2, cwd=ROOT, timeout=120)
    outs = [torch.load(f"{prefix}.rank{r}.pt") for r in range(2)]
    for key, shift in (("shifted", True), ("unshifted", False)):
        got = torch.cat([o[key] for o in outs])  # [3, 6] + [2, 6] -> [5, 6]
        want = L.masked_whiten(x, mask, shift_mean=shift)
        assert close(got, want, 1e-5), (key, got, want)
    # and it is not what each rank would get alone
    alone = L.masked_whiten(x[:3], mask[:3])
    assert not close(outs[0]["shifted"], alone, 1e-3)


# ---------------------------------------------------------------------------------------------
# KL estimators and rewards
# ---------------------------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    logp = t([0.0, 0.0, 0.0])
    ref = t([0.0, -1.0, LN2])
    # d = logp - ref = [0, 1, -ln 2]
    assert close(L.kl_penalty(logp, ref, "k1"), t([0.0, 1.0, -LN2]))
    # 0.5 d^2 = [0, 0.5, 0.5 * 0.480453 = 0.240227]
    assert close(L.kl_penalty(logp, ref, "k2"), t([0.0, 0.5, 0.240227]))
    # r = ref - logp = [0, -1, ln 2]; e^r - r - 1:
    #   [0, e^-1 + 1 - 1 = 0.367879, 2 - ln2 - 1 = 0.306853]
    assert close(L.kl_penalty(logp, ref, "k3"), t([0.0, 0.367879, 0.306853]))
    assert close(L.kl_penalty(logp, ref, "k3"), t([0.0, E_1, 1 - LN2]))
    assert close(L.kl_penalty(logp, ref, "abs"), t([0.0, 1.0, LN2]))
    with pytest.raises(ValueError):
        L.kl_penalty(logp, ref, "k4")


def test_compute_rewards_by_hand():
    # row 0: [prompt, tok, tok, pad]; row 1: four real tokens
    mask = t([0, 1, 1, 0], [1, 1, 1, 1])
    logp = torch.zeros(2, 4)
    ref = torch.full((2, 4), -0.2)  # k1 = logp - ref = 0.2 per token
    score = torch.tensor([1.0, -2.0])
    r, kl = L.compute_rewards(score, logp, ref, mask, kl_coef=0.5)
    # -0.5 * 0.2 = -0.1 per real token; score added at the last real token (index 2 and 3)
    assert close(r, t([0.0, -0.1, -0.1 + 1.0, 0.0], [-0.1, -0.1, -0.1, -0.1 - 2.0]))
    assert close(kl, [0.4, 0.8])  # 2 * 0.2, 4 * 0.2
    # ChatLearn: KL divided by the row length: 0.2 / 2 = 0.1 -> -0.05; 0.2 / 4 = 0.05 -> -0.025
    r, kl = L.compute_rewards(score, logp, ref, mask, kl_coef=0.5, kl_divide_by_length=True)
    assert close(r, t([0.0, -0.05, 0.95, 0.0], [-0.025, -0.025, -0.025, -2.025]))
    assert close(kl, [0.4, 0.8])  # the sequence KL itself is not divided
    # scale 2 then clip to 3: scores 2, -4 -> -3
    r, _ = L.compute_rewards(score, logp, ref, mask, kl_coef=0.0, reward_scale=2.0,
                             reward_clip=3.0)
    assert close(r, t([0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -3.0]))
    # k2: 0.5 * 0.2^2 = 0.02 per token, coef 1 -> -0.02
    r, kl = L.compute_rewards(torch.zeros(2), logp, ref, mask, kl_coef=1.0, kind="k2")
    assert close(r, -0.02 * mask) and close(kl, [0.04, 0.08])


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------

def test_gae_gamma_lambda_one():
    rewards = t([0.0, 0.0, 1.0])
    values = t([0.5, 0.5, 0.5])
    adv, ret = L.gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # delta_2 = 1 + 0 - 0.5 = 0.5, delta_1 = 0 + 0.5 - 0.5 = 0, delta_0 = 0
    # A_2 = 0.5, A_1 = 0 + 0.5 = 0.5, A_0 = 0.5 (= sum of future rewards - V = 1 - 0.5)
    assert close(adv, t([0.5, 0.5, 0.5]))
    assert close(ret, t([1.0, 1.0, 1.0]))


def test_gae_gamma_09_lambda_08():
    rewards = t([0.0, 0.0, 1.0])
    values = t([0.5, 0.4, 0.2])
    adv, ret = L.gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # delta_2 = 1 - 0.2 = 0.8
    # delta_1 = 0 + 0.9 * 0.2 - 0.4 = -0.22
    # delta_0 = 0 + 0.9 * 0.4 - 0.5 = -0.14
    # gamma * lam = 0.72
    # A_2 = 0.8; A_1 = -0.22 + 0.72 * 0.8 = 0.356; A_0 = -0.14 + 0.72 * 0.356 = 0.11632
    assert close(adv, t([0.11632, 0.356, 0.8]))
    assert close(ret, t([0.61632, 0.756, 1.0]))  # A + V


def test_gae_masked_positions_contribute_nothing():
    nan = float("nan")
    # row 0: [prompt, r0, r1, r2, pad] with the numbers of the gamma 0.9 / lambda 0.8 test
    # row 1: one real token then two post-EOS tokens: A = r - V = 2 - 0.5 = 1.5 (V after is 0)
    # row 2: a hole in the middle is skipped: [r0, -, r1] == the 2-token row [r0, r1]
    rewards = t([7.0, 0.0, 0.0, 1.0, 7.0], [2.0, 5.0, 5.0, 0.0, 0.0], [0.0, 9.0, 1.0, 0.0, 0.0])
    values = t([7.0, 0.5, 0.4, 0.2, 7.0], [0.5, 3.0, 3.0, 0.0, 0.0], [0.5, 9.0, 0.2, 0.0, 0.0])
    mask = t([0, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 0, 1, 0, 0])
    adv, ret = L.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 2: delta_1 = 1 - 0.2 = 0.8, delta_0 = 0.9 * 0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.576
    assert close(adv, t([0, 0.11632, 0.356, 0.8, 0], [1.5, 0, 0, 0, 0], [0.256, 0, 0.8, 0, 0]))
    assert close(ret, t([0, 0.61632, 0.756, 1.0, 0], [2.0, 0, 0, 0, 0], [0.756, 0, 1.0, 0, 0]))
    # nan at every masked position changes nothing
    adv2, ret2 = L.gae_advantages(rewards.masked_fill(mask == 0, nan),
                                  values.masked_fill(mask == 0, nan), mask, gamma=0.9, lam=0.8)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


# ---------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------

def test_ppo_policy_loss_clipping_by_hand():
    # row 0: [prompt, ratio 2 A=+1, ratio 1 A=+1, ratio 0.5 A=-1]
    # row 1: [ratio 0.5 A=+1, ratio 2 A=-1, pad, pad]
    old = torch.zeros(2, 4)
    logp = t([5.0, LN2, 0.0, -LN2], [-LN2, LN2, 5.0, 5.0]).requires_grad_()
    adv = t([9.0, 1.0, 1.0, -1.0], [1.0, -1.0, 9.0, 9.0])
    mask = t([0, 1, 1, 1], [1, 1, 0, 0])
    loss, n, stats = L.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=2,   A=+1: max(-2, -1.2)   = -1.2  clipped
    #   r=1,   A=+1: max(-1, -1)     = -1    not clipped
    #   r=0.5, A=-1: max(0.5, 0.8)   =  0.8  clipped
    #   r=0.5, A=+1: max(-0.5, -0.8) = -0.5  not clipped (pessimistic side)
    #   r=2,   A=-1: max(2, 1.2)     =  2    not clipped
    # sum = -1.2 - 1 + 0.8 - 0.5 + 2 = 0.1 over 5 tokens
    assert close(loss, 0.1, 1e-6) and n.item() == 5
    assert stats["clipfrac_sum"].item() == 2
    # k3 approx KL r - 1 - ln r: (1 - ln2) + 0 + (ln2 - 0.5) + (ln2 - 0.5) + (1 - ln2) = 1
    assert close(stats["approx_kl_sum"], 1.0, 1e-6)
    loss.backward()
    # d/dlogp of -A r = -A r on unclipped tokens, 0 on clipped and masked ones
    assert close(logp.grad, t([0.0, 0.0, -1.0, 0.0], [-0.5, 2.0, 0.0, 0.0]))


def test_value_loss_max_by_hand():
    values = t([1.0, 0.0, -1.0, 5.0])
    old = t([0.5, 0.5, 0.5, 5.0])
    returns = t([2.0, 0.0, 0.5, 5.0])
    mask = t([1, 1, 1, 0])
    loss, n, stats = L.value_loss(values, old, returns, mask, clip_eps_v=0.2)
    # v_clip = old + clip(v - old, +-0.2) = [0.7, 0.3, 0.3]
    # (v - R)^2      = [1, 0, 2.25]
    # (v_clip - R)^2 = [1.69, 0.09, 0.04]
    # 0.5 * max      = [0.845, 0.045, 1.125] -> 2.015
    assert close(loss, 2.015, 1e-6) and n.item() == 3
    assert stats["vf_clipfrac_sum"].item() == 2
    # ChatLearn's clipped-only: 0.5 * [1.69, 0.09, 0.04] = 0.845 + 0.045 + 0.02 = 0.91
    loss, n, _ = L.value_loss(values, old, returns, mask, clip_eps_v=0.2, clipped_only=True)
    assert close(loss, 0.91, 1e-6)


def test_entropy_by_hand():
    # uniform over 2: ln 2; logits [0, ln 3] -> p = [1/4, 3/4]:
    # H = 1/4 ln 4 + 3/4 ln(4/3) = ln 4 - 3/4 ln 3 = 1.386294 - 0.823959 = 0.562335
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [1e4, -1e4]]])  # [1, 3, 2]
    assert close(L.entropy_from_logits(logits), t([LN2, 0.562335, 0.0]))
    s, n = L.entropy_bonus(logits, t([1, 1, 0]))
    assert close(s, LN2 + 0.562335) and n.item() == 2
    # the vocabulary-parallel form on one rank: the same numbers (its shift keeps 1e4 finite)
    assert close(L.vocab_parallel_entropy(logits), t([LN2, 0.562335, 0.0]))


def test_vocab_parallel_entropy_two_gloo_ranks_equals_whole_vocabulary(tmp_path):
    """Value and gradient of sum(w * H) with the vocabulary split 3 + 5 over two ranks equal the
    whole vocabulary's (entropy_from_logits through autograd)."""
    from megatron_patch.launch import launch_local

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 8, generator=g) * 3
    logits[0, 0, 6] = 40.0  # the max on rank 1 only: the shift must be the global max
    weights = torch.rand(2, 3, generator=g)
    torch.save({"logits": logits, "weights": weights, "split": [3, 5]}, tmp_path / "in.pt")
    prefix = str(tmp_path / "out")
    launch_local([os.path.join(ROOT, "tests", "workers", "rlhf_entropy.py"),
                  str(tmp_path / "in.pt"), prefix], 2, cwd=ROOT, timeout=120)
    outs = [torch.load(f"{prefix}.rank{r}.pt") for r in range(2)]
    full = logits.clone().requires_grad_(True)
    want = L.entropy_from_logits(full)
    (want * weights).sum().backward()
    for o in outs:  # every rank holds the whole entropy
        assert close(o["entropy"], want.detach(), 1e-5), (o["entropy"], want)
    assert close(torch.cat([o["grad"] for o in outs], -1), full.grad, 1e-5)


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------

def test_adaptive_kl_controller_by_hand_and_resume():
    c = L.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9: err = 9/6 - 1 = 0.5 -> clipped to 0.2; coef = 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024
    assert c.update(9.0, 256) == pytest.approx(0.201024, abs=1e-12)
    saved = c.state_dict()
    # KL 5.4: err = 0.9 - 1 = -0.1; coef *= 1 - 0.1 * 256 / 10000 = 0.99744
    #   0.201024 * 0.99744 = 0.201024 - 0.201024 * 0.00256
    #                      = 0.201024 - 0.00051462144 = 0.20050937856
    assert c.update(5.4, 256) == pytest.approx(0.20050937856, abs=1e-12)
    # KL 0: err = -1 -> clipped to -0.2; coef *= 1 - 0.2 * 100 / 10000 = 0.998
    assert c.update(0.0, 100) == pytest.approx(0.20050937856 * 0.998, abs=1e-12)
    # exact resume: a fresh controller loaded from the state after step 1 repeats steps 2 and 3
    r = L.AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1.0)
    r.load_state_dict(saved)
    r.update(5.4, 256)
    r.update(0.0, 100)
    assert r.value == c.value and r.state_dict() == c.state_dict()


def test_fixed_kl_controller():
    c = L.FixedKLController(0.05)
    assert c.update(100.0, 256) == 0.05 and c.value == 0.05
    r = L.FixedKLController(1.0)
    r.load_state_dict(c.state_dict())
    assert r.value == 0.05


# ---------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------

def test_grpo_advantages_groups_with_a_tie():
    scores = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    adv = L.grpo_advantages(scores, group_size=3)
    # group 0 (a tie at 1): mean 2/3, deviations 1/3, 1/3, -2/3;
    #   unbiased var (1/9 + 1/9 + 4/9) / 2 = 1/3, std 1/sqrt3 -> [1/sqrt3, 1/sqrt3, -2/sqrt3]
    #   = [0.577350, 0.577350, -1.154701]
    # group 1 (all equal): std 0 -> 0 / (0 + eps) = 0
    assert close(adv, [0.577350, 0.577350, -1.154701, 0.0, 0.0, 0.0], 1e-5)
    # a group of two [0, 1]: mean 0.5, unbiased std sqrt(0.5 / 1) -> -+0.5 / 0.707107 = -+0.707107
    # (the population std 0.5 would give -+1)
    assert close(L.grpo_advantages(torch.tensor([0.0, 1.0]), 2), [-0.707107, 0.707107], 1e-5)
    with pytest.raises(ValueError):
        L.grpo_advantages(scores, group_size=4)
    # broadcast over the response mask
    a = L.broadcast_advantages(torch.tensor([2.0, -1.0]), t([0, 1, 1], [1, 0, 0]))
    assert a.tolist() == [[0.0, 2.0, 2.0], [-1.0, 0.0, 0.0]]


def test_grpo_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = t([LN2, 0.0, -LN2]).requires_grad_()  # ratios 2, 1, 0.5
    ref = t([LN2, -1.0, 0.0])  # ref - logp = [0, -1, ln 2]
    adv = t([1.0, 1.0, -1.0])
    mask = torch.ones(1, 3)
    loss, n, stats = L.grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    # surrogate: -1.2 (clipped) - 1 + 0.8 (clipped) = -1.4
    # k3 = [0, e^-1, 1 - ln 2] = [0, 0.367879, 0.306853], sum 0.674732, * 0.1 = 0.0674732
    # total = -1.4 + 0.0674732 = -1.3325268
    assert close(loss, -1.3325268, 1e-6) and n.item() == 3
    assert stats["clipfrac_sum"].item() == 2
    assert close(stats["ref_kl_sum"], 0.674732, 1e-6)
    assert close(stats["approx_kl_sum"], 0.5, 1e-6)  # (1 - ln2) + 0 + (ln2 - 0.5)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): [0, 1 - e^-1, 1 - 2] * 0.1 = [0, 0.0632121, -0.1]
    # surrogate: token 1 (unclipped) -A r = -1; tokens 0 and 2 clipped -> 0
    assert close(logp.grad, t([0.0, -1.0 + 0.0632121, -0.1]), 1e-6)
    # per-response advantages [B] are broadcast: A = 1 on all three tokens
    #   -1.2 (clipped) - 1 + max(-0.5, -0.8) = -0.5 (not clipped) -> -2.7 + 0.0674732
    loss_b, _, stats_b = L.grpo_loss(logp, old, ref, torch.tensor([1.0]), mask, 0.2, 0.1)
    assert close(loss_b, -2.7 + 0.0674732, 1e-6) and stats_b["clipfrac_sum"].item() == 1


# ---------------------------------------------------------------------------------------------
# response mask
# ---------------------------------------------------------------------------------------------

def test_response_mask():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 7, 2, 9, 9],   # eos at 2: real through it, 0 after
                        [5, 6, 7, 8, 0],   # no eos: real up to the padding
                        [4, 2, 2, 0, 0],   # the first of two eos ends it
                        [3, 3, 3, 3, 3]])  # no eos, no padding: all real
    mask, ended = L.response_mask(ids, eos, pad)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, False, True, False]
    # without pad_id a row without eos is all real
    mask, _ = L.response_mask(ids, eos)
    assert mask[1].tolist() == [1, 1, 1, 1, 1]
    # pad == eos: the first eos/pad ends the row and is kept
    mask, ended = L.response_mask(torch.tensor([[4, 5, 0, 0], [4, 5, 6, 7]]), eos_id=0, pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]


# ---------------------------------------------------------------------------------------------
# masked values never matter; the token mean is invariant to how the batch is split
# ---------------------------------------------------------------------------------------------

def _batch(b=8, tlen=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(b, tlen, generator=g, dtype=torch.float64)  # noqa: E731
    mask = torch.zeros(b, tlen, dtype=torch.float64)
    for i in range(b):
        start = int(torch.randint(0, 3, (1,), generator=g))  # prompt positions
        end = int(torch.randint(start + 1, tlen + 1, (1,), generator=g))  # padding / post-eos
        mask[i, start:end] = 1
    return dict(logp=r() * 0.3 - 1, old=r() * 0.3 - 1, ref=r() * 0.3 - 1, adv=r(), values=r(),
                old_values=r(), returns=r(), score=r()[:, 0], mask=mask,
                logits=torch.randn(b, tlen, 5, generator=g, dtype=torch.float64))


def _all_outputs(d):
    m = d["mask"]
    out = {"ppo": L.ppo_policy_loss(d["logp"], d["old"], d["adv"], m, 0.2),
           "value": L.value_loss(d["values"], d["old_values"], d["returns"], m, 0.2),
           "value_c": L.value_loss(d["values"], d["old_values"], d["returns"], m, 0.2, True),
           "grpo": L.grpo_loss(d["logp"], d["old"], d["ref"], d["adv"], m, 0.2, 0.05),
           "rewards": L.compute_rewards(d["score"], d["logp"], d["ref"], m, 0.1, "k3",
                                        kl_divide_by_length=True),
           "gae": L.gae_advantages(d["adv"], d["values"], m, 0.9, 0.8),
           "whiten": L.masked_whiten(d["adv"], m),
           "mean": L.masked_mean(d["adv"], m, dim=-1),
           "var": L.masked_var(d["adv"], m)}
    for kind in L.KL_KINDS:
        out[kind] = L.masked_sum(L.kl_penalty(d["logp"], d["ref"], kind), m)
    return out


def _flat(x):
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _flat(x[k])]
    if isinstance(x, (tuple, list)):
        return [v for y in x for v in _flat(y)]
    return [x]


def test_masked_values_do_not_change_any_result():
    d = _batch()
    base = _flat(_all_outputs(d))
    off = d["mask"] == 0
    for fill in (float("nan"), 1e6):
        d2 = {k: (v.masked_fill(off, fill) if v.shape == off.shape and k != "mask" else v)
              for k, v in d.items()}
        for a, b in zip(base, _flat(_all_outputs(d2))):
            assert torch.equal(a, b), (fill, a, b)


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_token_mean_is_invariant_to_the_split(chunks):
    d = _batch()

    def losses(p, rows):
        m = d["mask"][rows]
        return {"ppo": L.ppo_policy_loss(p[rows], d["old"][rows], d["adv"][rows], m, 0.2),
                "value": L.value_loss(d["values"][rows], d["old_values"][rows],
                                      d["returns"][rows], m, 0.2),
                "grpo": L.grpo_loss(p[rows], d["old"][rows], d["ref"][rows], d["adv"][rows], m,
                                    0.2, 0.05),
                "entropy": L.entropy_bonus(d["logits"][rows], m)}

    whole_p = d["logp"].clone().requires_grad_()
    whole = losses(whole_p, slice(None))
    split_p = d["logp"].clone().requires_grad_()
    parts = [losses(split_p, rows) for rows in torch.arange(8).chunk(chunks)]
    global_count = sum(p["ppo"][1] for p in parts)  # known before the backward passes
    for key in whole:
        want = whole[key][0] / whole[key][1]
        got = sum(p[key][0] for p in parts) / sum(p[key][1] for p in parts)
        assert close(got, want, 1e-12), key
        if chunks > 1 and key == "ppo":
            # a mean of per-chunk means is not the token mean (the counts differ per chunk)
            mean_of_means = sum(p[key][0] / p[key][1] for p in parts) / chunks
            assert not close(mean_of_means, want, 1e-6)
    # gradient accumulation: each chunk's backward of sum / global count adds up to the whole
    (whole["ppo"][0] / whole["ppo"][1] + whole["grpo"][0] / whole["grpo"][1]).backward()
    for p in parts:
        ((p["ppo"][0] + p["grpo"][0]) / global_count).backward()
    assert torch.allclose(split_p.grad, whole_p.grad, atol=1e-12, rtol=0)
    # the stats are token sums too
    for stat in ("clipfrac_sum", "approx_kl_sum"):
        assert close(sum(p["ppo"][2][stat] for p in parts), whole["ppo"][2][stat], 1e-12)
