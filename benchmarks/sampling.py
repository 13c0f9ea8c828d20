"""Drawing one token per row from a vocabulary of GPT-2's size (50257), as a decode step of N rows does: microseconds
per call of `engine/sampling.py`'s `inverse_cdf` (a two-level search over blocks of CDF_BLOCK tokens) against the
simple path (one cumulative sum over the whole row and one search), and of the whole `sample` (softmax, one
generator per row, as the scheduler's rows have). Both draw the same tokens: the figures say so.

    python benchmarks/sampling.py [--rows 1 16 64] [--calls 200]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.utils.benchmark as benchmark

from yunque.engine.sampling import inverse_cdf, sample
from yunque.precision import cpu_description

VOCAB = 50257


def one_cumulative_sum(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The simple path: the first token whose cumulative probability exceeds u times the row's total."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    return torch.minimum(torch.searchsorted(cdf, u * total, right=True), torch.searchsorted(cdf, total)).squeeze(1)


def per_call_us(fn, calls: int) -> float:
    """Mean microseconds per call of fn() over `calls` calls (torch.utils.benchmark, this process's threads)."""
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(calls).mean * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"vocabulary {VOCAB}; microseconds per call")
    g = torch.Generator().manual_seed(0)
    for n in args.rows:
        logits = torch.randn(n, VOCAB, generator=g) * 3
        probs, u = logits.softmax(dim=-1), torch.rand(n, 1, generator=g)
        same = torch.equal(inverse_cdf(probs, u), one_cumulative_sum(probs, u))
        simple = per_call_us(lambda: one_cumulative_sum(probs, u), args.calls)
        blocked = per_call_us(lambda: inverse_cdf(probs, u), args.calls)
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        whole = per_call_us(lambda: sample(logits, generators=gens), args.calls)
        print(f"{n:3d} rows: one cumulative sum {simple:7.1f}, in blocks {blocked:7.1f} ({simple / blocked:.1f}x); "
              f"whole sample() {whole:7.1f}; same tokens: {same}")


if __name__ == "__main__":
    main()
