"""Shared by the training-loop tests: batches that are a pure function of the step, and the next-token loss."""

from __future__ import annotations

import torch

from yunque.losses import next_token_loss


def window_batch(stream: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch i: 4 windows of 17 tokens from `stream`, chosen by a generator seeded with i (as `fit` requires for
    exact resume), as inputs and next-token targets."""
    starts = torch.randint(0, len(stream) - 17, (4,), generator=torch.Generator().manual_seed(i))
    xy = torch.stack([stream[s:s + 17] for s in starts.tolist()])
    return xy[:, :-1], xy[:, 1:]


def loss_fn(model, batch):
    x, y = batch
    return next_token_loss(model(x), y)
