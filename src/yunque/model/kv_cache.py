"""Key/value cache: preallocated per-layer buffers, owned and passed in by the caller.

The model writes each new step's keys and values at positions [pos, pos + T) and attends over [0, pos + T).
Batches of prompts of different lengths are left-padded; `pad[b]` is the number of padding slots in row b, which
the model masks out and subtracts from positions.
"""

from __future__ import annotations

import torch

from yunque.config import ModelConfig


class KVCache:
    """Keys and values of B sequences, up to `max_len` positions each, for every layer."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 pad: torch.Tensor | None = None) -> None:
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, self.max_len, cfg.dim_head)  # (L, B, Hkv, Tmax, D)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        """Positions filled so far (the same for every row; padding counts as filled)."""
        self.pad = pad.to(device) if pad is not None else None
        """(B,) left-padding length of each row, or None when no row is padded."""

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at the current position; return all keys/values so far (B, Hkv, pos+T, D)."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions but {end} are needed; "
                             f"shorten the prompt or lower max_new_tokens")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more positions as filled (the model calls this once per forward, after the last layer)."""
        self.pos += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (e.g. to drop finished sequences)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        if self.pad is not None:
            self.pad = self.pad[rows]

    def drop_common_padding(self) -> None:
        """Shift every row left by the smallest padding among them, freeing that many positions at the end.

        Lets shorter (more padded) rows of a batch keep generating after the longest prompt has used up the
        context. Padding is masked in every row, and pos and pad drop by the same amount, so positions and
        outputs are unchanged.
        """
        assert self.pad is not None and int(self.pad.min()) > 0, "no padding common to every row"
        m, end = int(self.pad.min()), self.pos
        self.k[:, :, :, :end - m] = self.k[:, :, :, m:end].clone()
        self.v[:, :, :, :end - m] = self.v[:, :, :, m:end].clone()
        self.pos -= m
        self.pad = self.pad - m
