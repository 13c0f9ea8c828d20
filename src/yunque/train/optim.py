"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def make_adamw(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
               device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not on norms and biases); the fused kernel where it exists."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_at(step: int, *, peak: float, warmup: int, total: int | None, min_ratio: float = 0.1,
          kind: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Learning rate at `step` (0-based): linear warmup, then cosine to min_ratio*peak, or
    warmup-stable-decay (flat, then linear decay over the last `decay_fraction` of training; Hu et al. 2024).
    With total unknown (a time budget not yet calibrated) the rate stays at the warmup/peak value."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if kind == "wsd":
        start = 1 - decay_fraction
        if progress < start:
            return peak
        return peak * (1 - (1 - min_ratio) * (progress - start) / decay_fraction)
    raise ValueError(f"unknown schedule {kind!r}; choose 'cosine' or 'wsd'")
