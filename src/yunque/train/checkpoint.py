"""Atomic checkpoints: weights in model.safetensors, optimizer/RNG/step in train_state.pt.

Both files are written in full under temporary names, fsynced, and only then renamed into place, so a kill
during a save leaves the previous checkpoint loadable and resumable. Both files carry the step; resuming from a
pair whose steps differ (a kill between the two renames) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from yunque.model.gpt import GPT
from yunque.modeldir import WEIGHTS, atomic_write_all, load_state, load_weights, write_weights

STATE = "train_state.pt"


def save_checkpoint(out_dir: str | Path, model: GPT, optimizer: torch.optim.Optimizer, step: int,
                    extra: dict[str, Any] | None = None) -> None:
    """Save weights and training state after `step` optimizer steps."""
    out_dir = Path(out_dir)
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), **(extra or {})}
    atomic_write_all([(out_dir / STATE, lambda p: torch.save(state, p)),
                      (out_dir / WEIGHTS, lambda p: write_weights(p, model, metadata={"step": str(step)}))])


def has_checkpoint(out_dir: str | Path) -> bool:
    return (Path(out_dir) / STATE).is_file()


def load_checkpoint(out_dir: str | Path, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG in place; return the saved state (with "step")."""
    path = Path(out_dir) / STATE
    if not path.is_file():
        raise ValueError(f"{path}: missing; there is nothing to resume (run without --resume to start afresh)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt pickle zip
        raise ValueError(f"{path}: cannot read training state ({type(e).__name__}); the checkpoint is corrupt, "
                         f"delete it to restart from the weights alone") from None
    weights, metadata = load_weights(out_dir)
    if metadata.get("step") != str(state["step"]):
        raise ValueError(f"{out_dir}: weights are from step {metadata.get('step')} but {STATE} is from step "
                         f"{state['step']} (a save was interrupted); resume is not exact, start a new run")
    load_state(model, {k: v.to(next(model.parameters()).device) for k, v in weights.items()}, out_dir)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state
