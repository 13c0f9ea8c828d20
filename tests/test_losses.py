"""Losses: next-token cross-entropy with IGNORE targets skipped, the summed form, and the held-out loop; the
alignment losses against hand computations (DPO, IPO, Bradley-Terry, GAE, GRPO, PPO, KL estimators)."""

import math

import pytest
import torch
import torch.nn.functional as F

from yunque.losses import (
    IGNORE,
    bradley_terry_loss,
    dpo_loss,
    gae,
    group_advantages,
    implicit_rewards,
    kl_penalty,
    masked_mean,
    next_token_loss,
    next_token_nll_sum,
    nll_over,
    ppo_policy_loss,
    sequence_logprobs,
    target_logprobs,
    token_kl,
    value_loss,
)


def test_ignored_targets_contribute_nothing():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1, IGNORE, 4], [IGNORE, IGNORE, 0]])
    kept = [(0, 0), (0, 2), (1, 2)]
    by_hand = sum(-F.log_softmax(logits[b, t], -1)[targets[b, t]] for b, t in kept) / len(kept)
    torch.testing.assert_close(next_token_loss(logits, targets), by_hand)
    nll, n = next_token_nll_sum(logits, targets)
    assert n == 3 and math.isclose(float(nll), float(by_hand) * 3, rel_tol=1e-6)
    assert IGNORE == -100  # PyTorch's default ignore_index: data/ builds targets with it


def test_nll_over_sums_batches_without_grad():
    model = torch.nn.Sequential(torch.nn.Embedding(7, 7))
    batches = [(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, IGNORE]])), (torch.tensor([[4]]), torch.tensor([[5]]))]
    total, n = nll_over(model, batches)
    expected = sum(float(next_token_nll_sum(model(x), y)[0]) for x, y in batches)
    assert n == 3 and math.isclose(total, expected, rel_tol=1e-6)


# ---- alignment ----

def test_dpo_loss_equals_a_hand_computation():
    # log-probabilities of [chosen, rejected] for two pairs, under the policy and the reference
    policy = torch.tensor([[-10.0, -12.0], [-7.0, -6.0]])
    ref = torch.tensor([[-11.0, -11.5], [-7.5, -6.25]])
    beta = 0.5
    # pair 1: h = (-10 + 11) - (-12 + 11.5) = 1.5; pair 2: h = (-7 + 7.5) - (-6 + 6.25) = 0.25
    by_hand = (math.log(1 + math.exp(-beta * 1.5)) + math.log(1 + math.exp(-beta * 0.25))) / 2
    assert float(dpo_loss(policy, ref, beta=beta)) == pytest.approx(by_hand, rel=1e-6)
    # IPO: (h - 1/(2 beta))^2 = (1.5 - 1)^2, (0.25 - 1)^2
    assert float(dpo_loss(policy, ref, beta=beta, kind="ipo")) == pytest.approx((0.25 + 0.5625) / 2, rel=1e-6)
    assert float(dpo_loss(ref, ref, beta=beta)) == pytest.approx(math.log(2))  # policy = reference: chance
    torch.testing.assert_close(implicit_rewards(policy, ref, beta=beta), torch.tensor([[0.5, -0.25], [0.25, 0.125]]))
    with pytest.raises(ValueError, match="'dpo' or 'ipo'"):
        dpo_loss(policy, ref, kind="kto")


def test_bradley_terry_is_the_log_probability_of_the_right_order():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])
    by_hand = -(math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(3)))) / 2
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx(by_hand, rel=1e-6)


def test_sequence_logprobs_sum_only_the_targets_kept():
    logits = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[IGNORE, 3, 5, IGNORE], [1, IGNORE, IGNORE, IGNORE]])
    logp = logits.log_softmax(-1)
    by_hand = torch.tensor([logp[0, 1, 3] + logp[0, 2, 5], logp[1, 0, 1]])
    torch.testing.assert_close(sequence_logprobs(logits, targets), by_hand)
    torch.testing.assert_close(sequence_logprobs(logits, targets, mean=True), by_hand / torch.tensor([2.0, 1.0]))
    assert float(target_logprobs(logits, targets)[0, 0]) == 0.0


def test_gae_equals_a_loop_written_out_by_hand():
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    lengths = [5, 3, 1]
    mask = torch.tensor([[t < n for t in range(5)] for n in lengths])
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        expected = [0.0] * n
        running = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0  # the episode ends after its last token
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            expected[t] = running
        assert advantages[b, :n].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert returns[b, :n].tolist() == pytest.approx([a + float(v) for a, v in zip(expected, values[b, :n])],
                                                        rel=1e-5, abs=1e-6)
        assert not advantages[b, n:].any() and not returns[b, n:].any()


def test_a_grpo_group_with_equal_rewards_gives_zero_advantage():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0], [-3.0, -3.0, -3.0, -3.0]])
    adv = group_advantages(rewards)
    assert adv[0].tolist() == [0.0] * 4 and adv[2].tolist() == [0.0] * 4
    assert adv[1].tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0], abs=1e-5)  # (r - mean) / std
    assert group_advantages(rewards, scale=False)[1].tolist() == [-0.5, 0.5, -0.5, 0.5]


def test_ppo_clipped_objective_and_value_loss():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.tensor([[True, True]])
    loss, ratio = ppo_policy_loss(new, old, adv, mask, clip=0.2)
    torch.testing.assert_close(ratio, torch.tensor([[1.5, 0.5]]))
    assert float(loss) == pytest.approx(-(1.2 + 0.5) / 2)  # min(1.5, 1.2) and min(0.5, 0.8), times A = 1
    loss, ratio = ppo_policy_loss(old, old, adv, mask)
    assert ratio.tolist() == [[1.0, 1.0]] and float(loss) == -1.0
    v, v_old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.5]])
    # row 0: max((1-2)^2, (0.2-2)^2) = 3.24; row 1: max(0.25, 0.25)
    assert float(value_loss(v, v_old, ret, mask, clip=0.2)) == pytest.approx(0.5 * (3.24 + 0.25) / 2)
    assert float(masked_mean(torch.tensor([1.0, 5.0]), torch.tensor([True, False]))) == 1.0


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    log_r = logp - ref
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), log_r)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * log_r ** 2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.exp(-log_r) - 1 + log_r)
    assert (kl_penalty(logp, ref, "k3") >= 0).all() and not kl_penalty(ref, ref, "k3").any()
    logits = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(3))
    assert not token_kl(logits, logits).abs().max() > 1e-6
    p, q = logits.softmax(-1), (logits * 2).softmax(-1)
    torch.testing.assert_close(token_kl(logits, logits * 2), (p * (p.log() - q.log())).sum(-1))
