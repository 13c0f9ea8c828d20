"""Losses: next-token cross-entropy with IGNORE targets skipped, the summed form, and the held-out loop."""

import math

import torch
import torch.nn.functional as F

from yunque.losses import IGNORE, next_token_loss, next_token_nll_sum, nll_over


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
