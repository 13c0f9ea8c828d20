"""What the training loop asks of the processes it runs in. This is the single-process runtime; a distributed one
(DDP / FSDP under torchrun) implements the same four things, so that it is the only module that touches
torch.distributed and `fit` stays the same.
"""

from __future__ import annotations

import contextlib

import torch


class Runtime:
    """One process: it is the main one, there is nothing to synchronise and nothing to average."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files, logs and progress (rank 0)."""
        return self.rank == 0

    def no_sync(self, model: torch.nn.Module, last_micro_batch: bool):
        """Context for one micro-batch's backward: a distributed runtime skips the gradient all-reduce on every
        micro-batch but the last of an accumulation."""
        return contextlib.nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over processes (a metric such as the loss); here, itself."""
        return value

    def broadcast_flag(self, flag: bool) -> bool:
        """A flag every process agrees on (e.g. "stop now" after a signal on one of them); here, itself."""
        return flag


__all__ = ["Runtime"]
