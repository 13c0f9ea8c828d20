"""Pure sampling functions: next-token logits (B, V) in, token ids (B,) out.

Order of operations, as in Hugging Face `generate`: temperature, then top-k, then top-p, then one draw per row.
Everything after the temperature is computed in fp32.
"""

from __future__ import annotations

import torch

from yunque.config import sampling_problems


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise ValueError naming the value and the accepted range if a sampling setting is out of range."""
    problem = next(sampling_problems(temperature, top_k, top_p), None)
    if problem:
        raise ValueError(problem)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (..., V) with -inf outside the k largest of each row (ties with the k-th are kept)."""
    check_sampling(top_k=k)
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits (..., V) with -inf outside the nucleus: the fewest most-likely tokens whose probability reaches p.

    Nucleus sampling, Holtzman et al. 2019. The most likely token is always kept.
    """
    check_sampling(top_p=p)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked strictly higher
    drop_sorted = mass_above >= p  # the top token has mass_above == 0 < p, so it always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Draw one token id per row of logits (B, V); returns int64 (B,).

    temperature == 0 is greedy (argmax, no randomness). `generators` holds one generator per row, so that a row's
    draw depends only on its own generator (batched sampling then equals sampling each row alone); None uses
    torch's global generator.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.float().argmax(dim=-1)  # on CPU, argmax over bf16 is ~5x slower than over fp32
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = filter_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"got {len(generators)} generators for {probs.shape[0]} rows of logits; pass one per row")
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])


__all__ = ["sample", "filter_top_k", "filter_top_p", "check_sampling"]
