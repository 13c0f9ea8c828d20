"""Pure sampling functions: next-token logits (B, V) in, token ids (B,) out.

Order of operations, as in Hugging Face `generate`: penalties (on the raw logits), temperature, then top-k, then
top-p, then min-p, then one draw per row. Everything after the temperature is computed in fp32.
"""

from __future__ import annotations

import torch

from yunque.config import penalty_problems, sampling_problems
from yunque.engine.native import kernels


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


def filter_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits (..., V) with -inf on tokens whose probability is below p times the most likely token's.

    Min-p sampling, Nguyen et al. 2024. In log space: logit < max_logit + log(p). The most likely token stays.
    """
    problem = next(penalty_problems(min_p=p), None)
    if problem:
        raise ValueError(problem)
    if p <= 0:
        return logits
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(torch.tensor(p, dtype=logits.dtype))  # (..., 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def penalize(logits: torch.Tensor, counts: torch.Tensor, *, frequency: float = 0.0, presence: float = 0.0,
             repetition: float = 1.0, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, V) fp32 after the OpenAI frequency and presence penalties and the repetition penalty.

    counts (B, V): how many times each token was generated so far. OpenAI's definition:
    logit - counts * frequency - (counts > 0) * presence. seen (B, V) bool: the tokens the repetition penalty
    applies to (prompt and generated; default counts > 0); their positive logits are divided by `repetition`, their
    negative ones multiplied (Keskar et al. 2019, CTRL, as Hugging Face's RepetitionPenaltyLogitsProcessor).
    """
    problem = next(penalty_problems(None, frequency, presence, repetition), None)
    if problem:
        raise ValueError(problem)
    logits = logits.float()
    counts = counts.to(logits.dtype)
    if repetition != 1:
        seen = counts > 0 if seen is None else seen
        scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, scaled, logits)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


MIN_TEMPERATURE = 1e-30
"""Temperatures below this divide as this: logits scaled by 1e30 stay finite in fp32 (up to 3.4e38) for any gap of
logits under 3e8, so a tiny positive temperature is (near-)greedy instead of producing inf - inf = NaN."""


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, generators: list[torch.Generator | None] | None = None,
           u: torch.Tensor | None = None, native: bool = False) -> torch.Tensor:
    """Draw one token id per row of logits (B, V); returns int64 (B,).

    temperature == 0 is greedy (argmax, no randomness); a tiny positive one draws among the tokens tied with the
    most likely. `generators` holds one generator per row (None for torch's global one), so that a row's draw
    depends only on its own generator (batched sampling then equals sampling each row alone); None alone uses
    torch's global generator for every row. u: the uniform numbers (B, 1) to draw with instead (then generators is
    not read), as `uniforms` would give them.

    native: fp32 or bf16 logits on CPU with no top-k, top-p or min-p are drawn by the engine's C++ kernel
    (`torch.ops.yunque.sample_rows`, which the caller has loaded): the same rule as the tensor ops below in one pass
    that reads the logits as they are, without writing the softmax; the same tokens up to rounding at a boundary
    between two.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.float().argmax(dim=-1)  # on CPU, argmax over bf16 is ~5x slower than over fp32
    # Inverse transform sampling: one uniform number per row. torch.multinomial, row by row for the rows' own
    # generators, draws an exponential per vocabulary entry: ~3 ms a row at V = 50257, half a 16-row decode step of
    # a 30M model (benchmarks/serve.py's profile).
    if u is None:
        u = uniforms(logits.shape[0], generators, logits.device)  # (B, 1)
    filtered = top_k is not None or (top_p is not None and top_p < 1) or (min_p is not None and min_p > 0)
    kernel = native and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
    if not kernel or filtered:
        return inverse_cdf(probabilities(logits, temperature, top_k, top_p, min_p), u)
    tokens = kernels().sample_rows(logits, u.view(-1), 1 / max(temperature, MIN_TEMPERATURE))
    odd = (tokens < 0).nonzero().view(-1)  # rows holding an infinity or a NaN: the kernel leaves them to softmax
    if len(odd):
        tokens[odd] = inverse_cdf(probabilities(logits[odd], temperature), u[odd])
    return tokens


def uniforms(n: int, generators: list[torch.Generator | None] | None, device: torch.device) -> torch.Tensor:
    """n uniform numbers in [0, 1) (n, 1) fp32, the i-th from generators[i] (torch's global one for None)."""
    if generators is None:
        return torch.rand(n, 1, device=device)
    if len(generators) != n:
        raise ValueError(f"got {len(generators)} generators for {n} rows of logits; pass one per row")
    return torch.stack([torch.rand(1, generator=g, device=device) for g in generators])


def probabilities(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """softmax(logits / temperature) (B, V) fp32 after the top-k, top-p and min-p filters that are set."""
    logits = logits.float()
    if temperature != 1:  # at 1 nothing divides, and softmax shifts by the row's best itself
        # the row's best becomes 0 before dividing: the others only grow more negative (to -inf at worst), never NaN
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, MIN_TEMPERATURE)
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = filter_top_p(logits, top_p)
    if min_p is not None and min_p > 0:
        logits = filter_min_p(logits, min_p)
    return logits.softmax(dim=-1)


CDF_BLOCK = 256
"""Vocabulary entries per block of `inverse_cdf`'s two-level search."""


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row of probs (B, V) (non-negative, not necessarily normalised), the first token whose cumulative
    probability exceeds u (B, 1) in [0, 1) times the row's total; int64 (B,). Never a token of probability 0.

    In two levels: the sums of blocks of CDF_BLOCK tokens, a cumulative sum and a search over those, then a
    cumulative sum and a search within the one block found. A cumulative sum over the whole vocabulary runs one
    element after the other: 358 us for 16 rows of 50257 against 89 us in blocks, 1548 against 217 us for 64 rows,
    the same tokens (benchmarks/sampling.py; Zen 5, torch 2.13, 2 threads).
    """
    B, V = probs.shape
    whole = V // CDF_BLOCK * CDF_BLOCK
    sums = probs[:, :whole].reshape(B, -1, CDF_BLOCK).sum(-1)  # (B, V // CDF_BLOCK)
    if whole < V:
        sums = torch.cat([sums, probs[:, whole:].sum(-1, keepdim=True)], dim=1)
    cdf = sums.cumsum(dim=-1)  # (B, blocks)
    total = cdf[:, -1:].contiguous()  # (B, 1): the row's total, which rounding keeps from being exactly 1
    target = (u * total).contiguous()
    # the first block whose cumulative sum exceeds the target; should the target round up to the total, the last
    # block of positive probability (the first to reach the total)
    block = torch.minimum(torch.searchsorted(cdf, target, right=True), torch.searchsorted(cdf, total))  # (B, 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    index = block * CDF_BLOCK + torch.arange(CDF_BLOCK, device=probs.device)  # (B, CDF_BLOCK)
    inside = torch.where(index < V, probs.gather(1, index.clamp(max=V - 1)), 0.0).cumsum(dim=-1)
    # within the block the same rule; summed in another order, the block's total may fall short of what is left
    # of the target by a rounding, hence again the first token reaching the block's total as the bound
    at = torch.minimum(torch.searchsorted(inside, target - before, right=True),
                       torch.searchsorted(inside, inside[:, -1:].contiguous()))
    return (block * CDF_BLOCK + at).squeeze(1)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability (B,) fp32 of token ids (B,) under the model's distribution, softmax(logits (B, V)): before
    any temperature, top-k or top-p, as a server reports it and as a policy-gradient loss recomputes it."""
    # one fused log_softmax pass: 2-2.5x faster than gather - logsumexp on CPU (vocabulary 50257, batch 1 and 8)
    return logits.float().log_softmax(dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row of logits (B, V) and their log-probabilities: (ids (B, k), logprobs
    (B, k) fp32), most likely first; the same values `token_logprobs` gives for those ids."""
    values, ids = logits.float().log_softmax(dim=-1).topk(k, dim=-1)
    return ids, values


__all__ = ["MIN_TEMPERATURE", "check_sampling", "filter_min_p", "filter_top_k", "filter_top_p", "penalize",
           "probabilities", "sample", "token_logprobs", "top_logprobs", "uniforms"]
