"""Perplexity and bits per byte of a model on text, and the unigram baseline they are compared against."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from yunque.data.loaders import TokenWindows
from yunque.losses import nll_over


def score_windows(model: torch.nn.Module, windows: TokenWindows, *, batch_size: int, seq_len: int,
                  max_batches: int | None = None, device: str = "cpu") -> tuple[float, int]:
    """(summed next-token NLL in nats, tokens scored) over consecutive windows of a token stream."""
    return nll_over(model, windows.iter_eval(batch_size, seq_len, max_batches=max_batches), device=device)


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """A mean per-token loss in nats as bits per UTF-8 byte of the text those tokens encode."""
    return loss_nats / math.log(2) * tokens / n_bytes


def text_perplexity(model: torch.nn.Module, tokenizer, texts: Iterable[str], *, batch_size: int = 8,
                    device: str = "cpu") -> dict[str, float]:
    """Mean loss per token, perplexity and bits per byte of `model` on the whole of `texts`.

    Each text is tokenized (with BOS where the tokenizer has one) and the stream is scored in windows of the
    model's context, each window predicting its tokens from the ones before it in that window.
    """
    ids: list[int] = []
    n_bytes = 0
    for text in texts:
        ids.extend(tokenizer.encode(text, bos=tokenizer.bos_id is not None))
        n_bytes += len(text.encode("utf-8", "replace"))
    if n_bytes == 0:
        raise ValueError("no text to score; pass files with text in them")
    seq_len = min(model.cfg.max_seq_len, max(1, len(ids) - 1))
    windows = TokenWindows([np.asarray(ids, dtype=np.int64)])
    nll, n = score_windows(model, windows, batch_size=batch_size, seq_len=seq_len, device=device)
    loss = nll / n
    return {"tokens": len(ids), "tokens_scored": n, "bytes": n_bytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": bits_per_byte(loss, len(ids), n_bytes)}


def unigram_loss(train: list[np.ndarray], val: list[np.ndarray], vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `val` of token frequencies counted on `train`, add-one smoothed:
    the score of a model that knows which tokens are common but nothing of context."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for shard in train:
        counts += np.bincount(np.asarray(shard), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for shard in val:
        total -= float(logp[np.asarray(shard)].sum())
        n += len(shard)
    return total / n
