"""Key/value cache: preallocated per-layer buffers, owned and passed in by the caller.

The model writes each new step's keys and values at positions [pos, pos + T) and asks the cache for the
positions of its tokens and the attention mask. Batches of prompts of different lengths are left-padded; `pad[b]`
is the number of padding slots in row b, which the mask hides and which are subtracted from positions.

Rows come and go while the others decode: `select` keeps some rows, `join` appends another cache's rows (those of
a prompt prefilled on its own), left-padding whichever side has fewer positions filled so that all rows end at
the same fill level; `drop_common_padding` and `resize` make room. None of these changes any row's outputs.
A dynamic cache's rows may be a view of larger buffers: `select` of a run of consecutive rows keeps a view of them
(no copy), and `join(..., room=True)` leaves free rows behind the joined ones for the next newcomers, which are then
written into them (only their own rows copied), where copying the whole cache for each newcomer made a server's
staggered arrivals cost as much as the prompts' prefill (benchmarks/serve.py).

Two layouts give the same outputs:
- dynamic (default): attention reads keys [0, pos + T), so shapes grow by one every step; least work in eager mode.
- static: attention reads all `max_len` slots and the mask hides the unfilled ones. The fill level is a tensor,
  so a decode step has the same shapes and reads no Python number each time: torch.compile traces it once.
"""

from __future__ import annotations

import torch

from yunque.config import ModelConfig

ROOM_ROWS = 16
"""Free rows at most that `KVCache.join(room=True)` leaves behind a batch's rows: requests reach a server a few at a
time, so the whole cache is copied at most once per 16 newcomers, and a large batch does not hold twice its memory."""


class KVCache:
    """Keys and values of B sequences, up to `max_len` positions each, for every layer."""

    causal = True
    """Whether the mask of `positions_and_mask` is each row's causal mask from its first real key (`pad`), all that
    kernels given only `pad` assume (engine/cpu.py's DecodeAttention); a subclass that masks otherwise says no."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 pad: torch.Tensor | None = None, static: bool = False) -> None:
        self.max_len = max_len or cfg.max_seq_len
        self.max_seq_len = cfg.max_seq_len
        shape = (batch_size, cfg.kv_heads, self.max_len, cfg.dim_head)  # (B, K, S, D)
        # one tensor per layer, not views of one: a compiled step then updates each in place
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.static = static
        """Attend over all max_len slots with a mask (compile friendly) instead of the filled ones only."""
        if static and pad is None:
            pad = torch.zeros(batch_size, dtype=torch.long)  # one graph whether or not a batch is padded
        self.pad = pad.to(device) if pad is not None else None
        """(B,) left-padding length of each row, or None when no row is padded."""
        self._pos = 0  # dynamic: positions filled so far
        self._filled = torch.zeros((), dtype=torch.long, device=device)  # static: the same, as a tensor
        self._buffers: tuple[list[torch.Tensor], list[torch.Tensor], int] | None = None
        """Dynamic caches whose rows are a view: the whole per-layer buffers of keys and values and the first of
        their rows that k and v show (B rows from there; the rows after those are free); None when k and v are
        whole tensors."""

    @property
    def pos(self) -> int:
        """Positions filled so far (the same for every row; padding counts as filled)."""
        return int(self._filled) if self.static else self._pos

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def positions_and_mask(self, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For the next T tokens: their positions (B|1, T), counted from each row's first real token, and the
        boolean attention mask (B|1, 1, T, S) over the S keys `update` will return (None if every key is visible).
        """
        device = self.k[0].device
        if self.static:
            S = self.k[0].shape[2]
            q = self._filled + torch.arange(T, device=device)  # (T,)
        else:
            start = self._pos
            if start + T > self.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len={self.max_seq_len}; "
                                 f"shorten the input or use a longer-context model")
            S = start + T
            q = torch.arange(start, S, device=device)
        pos = q.unsqueeze(0)  # (1, T)
        if self.pad is not None:
            pos = (pos - self.pad.unsqueeze(1)).clamp(min=0)  # (B, T): a padded row counts from its first token
        if self.pad is None and T == 1 and not self.static:
            return pos, None
        q = q.view(1, 1, T, 1)
        k = torch.arange(S, device=device).view(1, 1, 1, S)
        mask = k <= q
        if self.pad is not None:
            # padding keys are hidden; a padding query sees itself so that no row of the softmax is empty
            mask = mask & ((k >= self.pad.view(-1, 1, 1, 1)) | (k == q))
        return pos, mask

    def filled_after(self, T: int) -> torch.Tensor:
        """Static caches: the positions filled once T more are written (a one-element tensor, so that a compiled
        step reads it rather than baking it in): keys [0, filled_after(T)) are the real ones, the rest unfilled."""
        return (self._filled + T).view(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at the current position; return the keys/values to attend over (B, K, S, D):
        the filled ones (S = pos + T) or, static, all of them (S = max_len)."""
        T = k.shape[2]
        if self.static:
            # index_copy_ checks its indices in eager mode; the engine sizes the cache so that they fit
            index = self._filled + torch.arange(T, device=k.device)
            self.k[layer].index_copy_(2, index, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, index, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        end = self._pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions but {end} are needed; "
                             f"shorten the prompt or lower max_new_tokens")
        self.k[layer][:, :, self._pos:end] = k
        self.v[layer][:, :, self._pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more positions as filled (the model calls this once per forward, after the last layer)."""
        if self.static:
            self._filled += n
        else:
            self._pos += n

    def load_prefix(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Fill an empty cache's first n positions with keys and values computed before (one (B, K, n, D) tensor
        per layer each, as `update` stored them): a prompt's shared prefix, not run again."""
        assert self.pos == 0 and len(k) == len(v) == len(self.k), "an empty cache, a tensor per layer"
        n = k[0].shape[2]
        for mine, theirs in zip(self.k + self.v, k + v):
            mine[:, :, :n] = theirs
        self._set_pos(n)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (e.g. to drop finished sequences). A dynamic cache keeping a run of
        consecutive rows in order keeps a view of them, copying nothing (the rows let go stay allocated until a
        copy of the cache or its end)."""
        if not self.static and len(rows) and bool((rows.diff() == 1).all()):
            k, v, start = self._buffers or (self.k, self.v, 0)
            self._view(k, v, start + int(rows[0]), len(rows))
        else:
            self.k = [k[rows] for k in self.k]
            self.v = [v[rows] for v in self.v]
            self._buffers = None
        if self.pad is not None:
            self.pad = self.pad[rows]

    def rows(self, start: int, n: int) -> KVCache:
        """A new dynamic cache showing rows [start, start + n) of this one (its padding, positions and slots too):
        views, nothing copied. What either writes there, the other sees; joins into the new one never write into
        this one's other rows (their buffers are made anew)."""
        assert not self.static and 0 <= start and start + n <= self.batch_size, "rows of a dynamic cache"
        out = KVCache.__new__(KVCache)
        out.max_len, out.max_seq_len, out.static = self.max_len, self.max_seq_len, False
        out.pad = self.pad[start:start + n] if self.pad is not None else None
        out._pos, out._filled = self._pos, torch.zeros((), dtype=torch.long, device=self.k[0].device)
        out.k = [t[start:start + n] for t in self.k]
        out.v = [t[start:start + n] for t in self.v]
        out._buffers = None  # its k and v count as whole: no rows behind them are free
        return out

    def _view(self, k: list[torch.Tensor], v: list[torch.Tensor], start: int, n: int) -> None:
        """Show rows [start, start + n) of the per-layer buffers k and v as this cache's rows."""
        self.k = [t[start:start + n] for t in k]
        self.v = [t[start:start + n] for t in v]
        self._buffers = (k, v, start) if n < k[0].shape[0] else None

    def drop_common_padding(self) -> None:
        """Shift every row left by the smallest padding among them, freeing that many positions at the end.

        Lets shorter (more padded) rows of a batch keep generating after the longest prompt has used up the
        context. Padding is masked in every row, and pos and pad drop by the same amount, so positions and
        outputs are unchanged.
        """
        assert self.pad is not None and int(self.pad.min()) > 0, "no padding common to every row"
        m, end = int(self.pad.min()), self.pos
        for t in self.k + self.v:
            t[:, :, :end - m] = t[:, :, m:end].clone()
        self._set_pos(end - m)
        self.pad = self.pad - m

    def join(self, other: KVCache, max_len: int | None = None, *, room: bool = False) -> None:
        """Append the rows of `other` (of the same model) after this cache's rows, in this cache's layout.

        The side with fewer positions filled is left-padded by the difference, so that every row ends at the same
        fill level, max(pos, other.pos): a shorter newcomer is padded, a longer one pads the rows already here.
        Each row keeps its keys, values and positions, so its outputs are those of a cache of its own.
        max_len: the slots of the result (at least the new fill level); None keeps this cache's max_len, grown
        to the new fill level if needed.
        room (dynamic caches): a cache that more rows will join (a server's running batch). Where the new buffers
        are made, they get as many rows again free behind the joined ones, at most ROOM_ROWS, and a newcomer that
        fits in free rows behind this cache's (no more positions filled than here, the same max_len) is copied
        into them, the rows here left where they are.
        """
        pos, joined = max(self.pos, other.pos), self.batch_size + other.batch_size
        max_len = max_len or max(self.max_len, pos)
        if pos > max_len or max_len > self.max_seq_len:
            raise ValueError(f"a cache of {max_len} slots cannot hold {pos} positions within max_seq_len="
                             f"{self.max_seq_len}; pass a max_len between them")
        # each cache with its first row in the result and its shift to the right
        parts = [(self, 0, pos - self.pos), (other, self.batch_size, pos - other.pos)]
        device = self.k[0].device
        pad = torch.cat([(c.pad if c.pad is not None else torch.zeros(c.batch_size, dtype=torch.long)).to(device)
                         + shift for c, _, shift in parts])
        buffers = self._buffers
        if (buffers is not None and pos == self.pos and max_len == self.max_len
                and buffers[2] + joined <= buffers[0][0].shape[0]):
            k, v, start = buffers  # the newcomer goes into free rows; the rows here stay
            end, shift = start + self.batch_size, pos - other.pos
            for mine, theirs in zip(k + v, other.k + other.v):
                if shift:
                    mine[end:end + other.batch_size, :, :shift] = 0  # padding: hidden, and never stale
                mine[end:end + other.batch_size, :, shift:pos] = theirs[:, :, :other.pos]
            self._view(k, v, start, joined)
        else:
            rows = joined + min(joined, ROOM_ROWS) if room and not self.static else joined
            for name in ("k", "v"):
                layers = []
                for i, t in enumerate(getattr(self, name)):
                    shape = (rows, t.shape[1], max_len, t.shape[3])  # (B + B' [+ free], K, S, D)
                    # a dynamic cache never reads past its fill level, nor rows it does not show: only the
                    # padding needs zeros (masked, but a NaN left there would still reach the output). Zeroing
                    # the whole of a large batch's buffers took 2/3 of a join (5.3 against 1.9 ms, 12 layers'
                    # worth of 40 rows x 256 slots, Zen 4).
                    out = t.new_zeros(shape) if self.static else t.new_empty(shape)
                    for cache, row, shift in parts:
                        src = getattr(cache, name)[i][:, :, :cache.pos]
                        if shift and not self.static:
                            out[row:row + len(src), :, :shift] = 0
                        out[row:row + len(src), :, shift:shift + src.shape[2]] = src
                    layers.append(out)
                setattr(self, name, layers)
            if rows > joined:
                self._view(self.k, self.v, 0, joined)
            else:
                self._buffers = None
        self.max_len = max_len
        self.pad = pad if self.static or bool(pad.any()) else None
        self._set_pos(pos)

    def resize(self, max_len: int) -> None:
        """Give every row max_len slots (at least pos), keeping what is filled: room to grow, or memory back."""
        if not self.pos <= max_len <= self.max_seq_len:
            raise ValueError(f"max_len={max_len} must lie between the filled positions ({self.pos}) and "
                             f"max_seq_len={self.max_seq_len}")
        end = self.pos
        for ts in (self.k, self.v):
            for i, t in enumerate(ts):
                ts[i] = t.new_zeros(*t.shape[:2], max_len, t.shape[3])
                ts[i][:, :, :end] = t[:, :, :end]
        self.max_len = max_len
        self._buffers = None

    def _set_pos(self, n: int) -> None:
        if self.static:
            self._filled.fill_(n)
        else:
            self._pos = n
