"""Losses: pure functions of logits and labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
"""Label value that contributes no loss (padding, prompt tokens)."""


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T); IGNORE targets are skipped."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def next_token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood in nats, number of counted targets), for perplexity and bits per byte."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return nll, int((targets != IGNORE).sum())
