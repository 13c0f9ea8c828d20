"""What the training loop asks of the processes it runs in. This is the single-process runtime; the distributed one
(DDP / FSDP2 under torchrun, train/distributed.py) implements the same methods, so that it is the only module that
touches torch.distributed and `fit` stays the same.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from yunque.config import LoopConfig
from yunque.model.heads import WithHeads


class Runtime:
    """One process: it is the main one, there is nothing to synchronise and nothing to average."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files, logs and progress (rank 0)."""
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this process trains on, given the one asked for (a distributed runtime picks its GPU)."""
        return requested

    def threads(self, requested: int) -> int:
        """CPU threads for this process, given --threads (0: one per physical core, shared among processes)."""
        return requested

    def wrap(self, model: torch.nn.Module, cfg: LoopConfig) -> torch.nn.Module:
        """The model as it trains in this runtime: here itself, with activation checkpointing if asked."""
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        return model

    def shard(self, batch: Any) -> Any:
        """This process's rows of a global micro-batch (the whole of it here)."""
        return batch

    def no_sync(self, model: torch.nn.Module, last_micro_batch: bool):
        """Context for one micro-batch's forward and backward: a distributed runtime skips the gradient all-reduce
        on every micro-batch but the last of an accumulation."""
        return contextlib.nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over processes (a metric such as the loss); here, itself."""
        return value

    def agree(self, flag: bool, now: float) -> tuple[bool, float]:
        """(`flag` true in any process, rank 0's `now`): how every process ends a step with the same stop request
        and the same clock, so that time budgets and timed checkpoints decide alike; here, themselves."""
        return flag, now

    def broadcast_flag(self, flag: bool) -> bool:
        """True if `flag` is true in any process (e.g. "stop now" after a signal on one of them); here, itself."""
        return flag

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` in every process (picklable); here, itself."""
        return obj

    def gather_object(self, obj: Any) -> list[Any]:
        """Every process's `obj` (picklable), in rank order, in every process; here, [obj]."""
        return [obj]

    def whole(self, module: torch.nn.Module):
        """Context yielding `module` (the trained model or a part of it) with whole weights, as a plain module an
        engine can copy (RL rollouts): under FSDP a copy gathered from the shards, which every process must ask
        for at the same point; here, `module` itself."""
        return contextlib.nullcontext(module)

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def nonfinite_parameter(self, model: torch.nn.Module) -> str | None:
        """The name of a trained parameter holding NaN or inf (in any process), or None."""
        return next((n for n, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()), None)

    def save_checkpoint(self, out: Path, model: torch.nn.Module, optimizer: Any, step: int, extra: dict[str, Any],
                        *, trainable_only: bool) -> None:
        """A checkpoint of the step, complete or not at all (train/checkpoint.py: one weights file + train_state)."""
        from yunque.train.checkpoint import save_checkpoint

        save_checkpoint(out, model, optimizer, step, extra, trainable_only=trainable_only)

    def load_checkpoint(self, out: Path, model: torch.nn.Module, optimizer: Any, *,
                        trainable_only: bool) -> dict[str, Any]:
        """Restore the checkpoint in `out` (either kind: one file, or sharded by a distributed run of any size)."""
        from yunque.train.checkpoint import load_checkpoint

        return load_checkpoint(out, model, optimizer, trainable_only=trainable_only)


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing: each transformer block keeps only its input for backward and recomputes the rest
    (about a third more compute for the activations of one block instead of all). The parameter names stay the
    same, so checkpoints and model dirs do not change."""
    for block in blocks(model):
        if not getattr(block, "_checkpointed", False):
            block.forward = functools.partial(_recompute, block.forward)
            block._checkpointed = True


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a GPT, or of the GPT inside a model with heads (model/heads.WithHeads)."""
    return list(getattr(gpt_of(model), "blocks", ()))


def gpt_of(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT a trained module holds: itself, or the model under the heads of a WithHeads."""
    return model.model if isinstance(model, WithHeads) else model


def _recompute(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing to save for backward
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


__all__ = ["Runtime", "checkpoint_blocks", "blocks", "gpt_of"]
