"""Batches for pretraining: windows of packed tokens cut from the shards of one split."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch


class TokenWindows:
    """Windows of T+1 consecutive tokens from a list of 1-D token arrays (the shards of one split, usually
    the memory maps from `open_split`). A window never crosses a shard end; it may cross document boundaries,
    which the BOS tokens mark."""

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        self.shards = list(shards)

    @property
    def num_tokens(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def sample(self, batch_size: int, seq_len: int, *, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training batch: inputs x (B, T) and targets y (B, T), y[:, t] = x[:, t + 1] in the data, int64.

        Offsets come from `numpy.random.default_rng([seed, step])` (seed, step >= 0), uniform over every window
        in the split (so each shard is chosen in proportion to its length). Batch `step` is therefore a pure
        function of (seed, step): a run resumed at step k sees exactly the batches an uninterrupted run would,
        which is how exact resume works without saving any loader state.
        """
        _check_shape(batch_size, seq_len)
        shards = self._long_enough(seq_len)
        n_windows = np.array([len(shard) - seq_len for shard in shards])  # start offsets per shard
        ends = np.cumsum(n_windows)
        picks = np.random.default_rng([seed, step]).integers(0, ends[-1], size=batch_size)
        which = np.searchsorted(ends, picks, side="right")
        starts = picks - (ends[which] - n_windows[which])
        return _to_xy([np.asarray(shards[i][s : s + seq_len + 1]) for i, s in zip(which, starts)])

    def iter_eval(
        self, batch_size: int, seq_len: int, *, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation batches (x, y), each (B, T) int64, in order over the whole split: consecutive windows at
        offsets 0, T, 2T, ... of each shard, so no token is a target twice. The last batch may hold fewer than
        `batch_size` rows. The tail of a shard too short for a full window (fewer than T+1 tokens left) is
        skipped, not padded, so up to T tokens per shard are never targets."""
        _check_shape(batch_size, seq_len)
        windows = (
            np.asarray(shard[start : start + seq_len + 1])
            for shard in self._long_enough(seq_len)
            for start in range(0, len(shard) - seq_len, seq_len)
        )
        n_batches = 0
        while max_batches is None or n_batches < max_batches:
            batch = list(itertools.islice(windows, batch_size))
            if not batch:
                return
            yield _to_xy(batch)
            n_batches += 1

    def _long_enough(self, seq_len: int) -> list[np.ndarray]:
        shards = [shard for shard in self.shards if len(shard) >= seq_len + 1]
        if not shards:
            longest = max((len(shard) for shard in self.shards), default=0)
            raise ValueError(
                f"the split has {self.num_tokens} tokens (longest shard {longest}) but a window needs "
                f"seq_len+1 = {seq_len + 1} in one shard; lower --seq-len or add data"
            )
        return shards


def _check_shape(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be at least 1")


def _to_xy(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.from_numpy(np.stack(windows).astype(np.int64))  # (B, T+1)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
