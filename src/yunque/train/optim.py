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


def make_optimizer(model: nn.Module, kind: str, *, lr: float, weight_decay: float, betas: tuple[float, float],
                   device_type: str = "cpu") -> torch.optim.Optimizer | Optimizers:
    """The optimizer `kind` names: "adamw" (`make_adamw`) or "muon".

    "muon": Muon (Jordan et al. 2024; torch.optim.Muon) on the matrices inside the blocks, whose updates it
    orthogonalises, and AdamW on the rest (embeddings, output head, norms, biases), as in its authors' recipe.
    Muon's steps are scaled to AdamW's update size (`adjust_lr_fn="match_rms_adamw"`, Liu et al. 2025), so one
    learning rate and schedule serve both.
    """
    if kind == "adamw":
        return make_adamw(model, lr=lr, weight_decay=weight_decay, betas=betas, device_type=device_type)
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r}; choose 'adamw' or 'muon'")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if p.dim() == 2 and n.startswith("blocks.")]
    rest = [p for n, p in named if not (p.dim() == 2 and n.startswith("blocks."))]
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cpu", "cuda"))
    return Optimizers(muon, adamw)


class Optimizers:
    """Several optimizers that act as one: the training loop sets the learning rate of `param_groups`, steps,
    zeroes gradients and checkpoints their state through this."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("optimizers", ())) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is of another optimizer; resume with the optimizer "
                             "the run was started with")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


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
