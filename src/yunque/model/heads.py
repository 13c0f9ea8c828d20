"""Scalar heads on a language model's final hidden states: a reward model's score, PPO's value.

`WithHeads` is the model being trained plus its heads, as one module for the optimizer. The model itself stays an
ordinary GPT (its weights file is an ordinary model dir, or adapter dir); the heads are saved beside it in
heads.safetensors (train/checkpoint.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

HEADS = "heads.safetensors"
"""File of a run or model dir holding the heads' weights, named "<head>.weight", "<head>.bias"."""


class WithHeads(nn.Module):
    """A GPT (`model`) and named scalar heads (`heads`), each nn.Linear(d_model, 1)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict({n: scalar_head(model) for n in names})

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits (B, T, V), {head: its score (B, T) fp32 at every position}) of ids (B, T). The heads run inside
        forward so that a wrapper (DDP, FSDP) sees every parameter a loss uses."""
        logits, hidden = forward_with_hidden(self.model, ids)
        return logits, {name: self.score(name, hidden) for name in self.heads}

    def score(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """Head `name` applied at every position: (B, T) fp32."""
        head = self.heads[name]
        # a new tensor, not a view of the head's output: FSDP warns of views a wrapped module returns
        return head(hidden.to(head.weight.dtype)).squeeze(-1).to(torch.float32, copy=True)


def scalar_head(model: nn.Module) -> nn.Linear:
    """nn.Linear(d_model, 1), fp32, on the model's device: small at first (N(0, 1/(d_model+1)) as in the reward
    models of Ouyang et al. 2022 / TRL), bias 0."""
    d = model.cfg.d_model
    head = nn.Linear(d, 1, device=next(model.parameters()).device)
    nn.init.normal_(head.weight, std=1 / (d + 1))
    nn.init.zeros_(head.bias)
    return head


def forward_with_hidden(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, final normalised hidden states) of one forward: the output of `model.norm_f`, caught by a hook,
    is what the output head reads."""
    caught: list[torch.Tensor] = []
    hook = model.norm_f.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        logits = model(ids)
    finally:
        hook.remove()
    return logits, caught[-1]


def last_positions(targets_or_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of each row's last True position of a mask (B, T) (e.g. where a scored reply ends)."""
    mask = targets_or_mask.bool()
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1).clamp(min=0)


__all__ = ["HEADS", "WithHeads", "scalar_head", "forward_with_hidden", "last_positions"]
