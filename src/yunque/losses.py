"""Losses: pure functions of logits and labels, below both train/ and eval/ (and data/, which uses IGNORE).

Next-token prediction (pretraining) and the masked next-token loss of fine-tuning are the same function: targets
that should not be learned (padding, prompt tokens) are IGNORE. `nll_over` sums the same loss over held-out
batches, for validation during training and for perplexity.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

IGNORE = -100
"""Label value that contributes no loss (padding, prompt tokens); PyTorch's default ignore_index."""


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T); IGNORE targets are skipped."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def next_token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood in nats, number of counted targets), for perplexity and bits per byte."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return nll, int((targets != IGNORE).sum())


def nll_over(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             device: str | torch.device = "cpu") -> tuple[float, int]:
    """(summed next-token NLL in nats, targets counted) of `model` over batches (x, y) of (B, T) ids, no grad."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y in batches:
            nll, n = next_token_nll_sum(model(x.to(device)), y.to(device))
            total, count = total + float(nll), count + n
    return total, count


# ---- alignment: preferences and policy optimisation ----
# Pure functions of log-probabilities, rewards and values. Shapes: B sequences, T tokens, G groups of k samples.

def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability (B, T) fp32 of each target under logits (B, T, V); 0 where the target is IGNORE."""
    mask = targets != IGNORE
    logps = logits.float().log_softmax(dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
    """Summed (or with `mean`, per-token mean) log-probability (B,) of each row's non-IGNORE targets."""
    total = target_logprobs(logits, targets).sum(dim=-1)
    return total / (targets != IGNORE).sum(dim=-1).clamp(min=1) if mean else total


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is true (0 if there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float = 0.1,
             kind: str = "dpo") -> torch.Tensor:
    """Preference loss of log-probabilities (B, 2) of [chosen, rejected] replies under the policy and the frozen
    reference; mean over the batch.

    dpo: -log sigmoid(beta * h), Rafailov et al. 2023, eq. 7; ipo: (h - 1 / (2 beta))^2, Azar et al. 2023, eq. 17;
    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).
    """
    ratios = policy_logps.float() - ref_logps.float()  # (B, 2)
    h = ratios[:, 0] - ratios[:, 1]
    if kind == "dpo":
        return -F.logsigmoid(beta * h).mean()
    if kind == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean()
    raise ValueError(f"unknown preference loss {kind!r}; choose 'dpo' or 'ipo'")


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """DPO's implicit reward beta * log(pi / ref) of each reply, (B, 2); a pair is ranked right when column 0 is
    larger."""
    return beta * (policy_logps.float() - ref_logps.float())


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log P(chosen beats rejected) = -log sigmoid(r_w - r_l), mean over pairs of scalar rewards (B,)
    (Bradley & Terry 1952; the reward-model loss of Ouyang et al. 2022, eq. 1)."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probabilities of tokens sampled from the policy
    (Schulman 2020, "Approximating KL divergence"): k1 = log r, k2 = (log r)^2 / 2, k3 = (1/r - 1) + log r with
    r = pi / ref. k1 is unbiased but can be negative; k3 is unbiased and never negative (GRPO's choice)."""
    log_ratio = logps.float() - ref_logps.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose 'k1', 'k2' or 'k3'")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over per-token rewards and values (B, T);
    `mask` marks each row's tokens (a prefix of it: right padding). The episode ends after the last token (its
    next value is 0). Returns (advantages, returns = advantages + values), 0 outside the mask."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]  # padding after a row's end carries nothing back
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def group_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, sec. 4.1.2): rewards (G, k) of k samples per prompt
    minus their group's mean, divided by the group's standard deviation (with `scale`). A group whose samples
    all scored the same has advantage 0: it teaches nothing."""
    centred = rewards.float() - rewards.float().mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.float().std(dim=1, keepdim=True, unbiased=False) + eps)


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated to a loss, over tokens (B, T) under `mask`:
    mean of -min(r A, clip(r, 1 - clip, 1 + clip) A), r = exp(logps - old_logps). Returns (loss, ratio r)."""
    ratio = torch.exp(logps.float() - old_logps.float())
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -masked_mean(surrogate, mask), ratio


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss: mean over `mask` of max((v - R)^2, (clip(v, v_old +- clip) - R)^2) / 2."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) (B, T) between the next-token distributions of logits (B, T, V), position by
    position. Summed over a sampled reply's positions, it estimates the replies' KL without the variance of the
    sampled tokens' log-ratio."""
    logp, logq = logits.float().log_softmax(dim=-1), ref_logits.float().log_softmax(dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)
