"""Drawing one token per row from a vocabulary of GPT-2's size (50257), as a decode step of N rows does: microseconds
per call of `engine/sampling.py`'s `inverse_cdf` (a two-level search over blocks of CDF_BLOCK tokens) against the
simple path (one cumulative sum over the whole row and one search), and of the whole `sample` (softmax, one
generator per row, as the scheduler's rows have), on the tensor path and with the engine's C++ kernel
(`native=True`: `torch.ops.yunque.sample_rows`, one pass reading the logits as they are), over fp32 and over bf16
logits (a bf16 model's). The two searches draw the same tokens, and the kernel those of the tensor path but where
rounding puts a draw at a boundary between two: the figures say how many of the rows agree.

    python benchmarks/sampling.py [--rows 1 16 64] [--calls 200]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.utils.benchmark as benchmark

from yunque.engine.native import native_kernels
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
    kernels = native_kernels()
    print(f"vocabulary {VOCAB}; microseconds per call" + ("" if kernels else "; the C++ kernel did not build here"))
    g = torch.Generator().manual_seed(0)
    for n in args.rows:
        logits = torch.randn(n, VOCAB, generator=g) * 3
        probs, u = logits.softmax(dim=-1), torch.rand(n, 1, generator=g)
        same = torch.equal(inverse_cdf(probs, u), one_cumulative_sum(probs, u))
        simple = per_call_us(lambda: one_cumulative_sum(probs, u), args.calls)
        blocked = per_call_us(lambda: inverse_cdf(probs, u), args.calls)
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        print(f"{n:3d} rows: one cumulative sum {simple:7.1f}, in blocks {blocked:7.1f} ({simple / blocked:.1f}x); "
              f"same tokens: {same}")
        for dtype in (torch.float32, torch.bfloat16):
            x = logits.to(dtype)
            whole = per_call_us(lambda: sample(x, generators=gens), args.calls)
            line = f"      whole sample() over {str(dtype)[6:]:8s}: tensor path {whole:7.1f}"
            if kernels is not None:
                fused = per_call_us(lambda: sample(x, generators=gens, native=True), args.calls)
                agree = 0
                for k in range(20):  # 20 draws of every row, the same seeds on both paths
                    seeds = [1000 * k + i for i in range(n)]
                    agree += int((sample(x, generators=[torch.Generator().manual_seed(i) for i in seeds], native=True)
                                  == sample(x, generators=[torch.Generator().manual_seed(i) for i in seeds])).sum())
                line += f", C++ kernel {fused:7.1f} ({whole / fused:.1f}x; the same token in {agree}/{20 * n} draws)"
            print(line)


if __name__ == "__main__":
    main()
