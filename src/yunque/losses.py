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
