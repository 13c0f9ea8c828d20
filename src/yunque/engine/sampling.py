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


MIN_TEMPERATURE = 1e-30
"""Temperatures below this divide as this: logits scaled by 1e30 stay finite in fp32 (up to 3.4e38) for any gap of
logits under 3e8, so a tiny positive temperature is (near-)greedy instead of producing inf - inf = NaN."""


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """Draw one token id per row of logits (B, V); returns int64 (B,).

    temperature == 0 is greedy (argmax, no randomness); a tiny positive one draws among the tokens tied with the
    most likely. `generators` holds one generator per row (None for torch's global one), so that a row's draw
    depends only on its own generator (batched sampling then equals sampling each row alone); None alone uses
    torch's global generator for every row.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.float().argmax(dim=-1)  # on CPU, argmax over bf16 is ~5x slower than over fp32
    logits = logits.float()
    # the row's best becomes 0 before dividing: the others only grow more negative (to -inf at worst), never NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, MIN_TEMPERATURE)
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


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability (B,) fp32 of token ids (B,) under the model's distribution, softmax(logits (B, V)): before
    any temperature, top-k or top-p, as a server reports it and as a policy-gradient loss recomputes it."""
    # one fused log_softmax pass: 2-2.5x faster than gather - logsumexp on CPU (vocabulary 50257, batch 1 and 8)
    return logits.float().log_softmax(dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


__all__ = ["MIN_TEMPERATURE", "check_sampling", "filter_top_k", "filter_top_p", "sample", "token_logprobs"]
