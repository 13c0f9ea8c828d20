"""The decode step's attention: the engine's C++ kernel (`decode_attention`, engine/kernels.cpp) against PyTorch's
SDPA with the mask a one-token step over a KV cache gives, and what it does to whole decode steps.

1. One layer, microseconds per call, for N rows of S positions (a third of the rows left-padded by S/4, as rows
   that joined a running batch are), 6 heads of 64: keys and values in fp32 (the engine's CPU cache) and bf16.
   Each call reads another of LAYERS caches, so that, as in a model, they are not in the CPU's caches.
2. Whole one-token decode steps of the ~30M GPT-2 shape of benchmarks/serve.py (random weights), 1 and 16 rows,
   milliseconds per step, the engine with the kernel and the same engine with SDPA, alternated REPEATS times
   (medians). Both give the same results: tests/engine/test_native.py.
3. Prompts (prefill): one layer, the kernels' `prompt_attention` against SDPA with a prompt's mask, for N prompts of
   T tokens left-padded to one length (as `Engine.prefill_many` runs them), bf16; and whole prefills of 8 prompts of
   66 tokens of that model, kernel and SDPA alternated REPEATS times (medians).

    python benchmarks/decode_attention.py [--rows 1 16 64] [--positions 128 512] [--calls 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

from yunque.config import ModelConfig
from yunque.engine.cpu import DecodeAttention
from yunque.engine.engine import Engine, SamplingParams
from yunque.engine.native import native_kernels
from yunque.model.gpt import GPT, Attention
from yunque.precision import cpu_description
from yunque.tokenizer.bpe import gpt2_tokenizer_from_files

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-bpe"
H, D, LAYERS, REPEATS = 6, 64, 12, 6
GPT2_30M = dict(n_layer=6, n_head=6, d_model=384, max_seq_len=1024, pos="learned", norm="layernorm", mlp="gelu",
                bias=True)


def per_call_us(fn, calls: int) -> float:
    """Mean microseconds per call of fn() over `calls` calls (torch.utils.benchmark, this process's threads)."""
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(calls).mean * 1e6


def one_layer(rows: int, S: int, dtype: torch.dtype, calls: int) -> tuple[float, float, float]:
    """(SDPA us, kernel us, largest difference) per layer call."""
    g = torch.Generator().manual_seed(S)
    caches = [(torch.randn(rows, H, S + 64, D, generator=g).to(dtype)[:, :, :S],
               torch.randn(rows, H, S + 64, D, generator=g).to(dtype)[:, :, :S]) for _ in range(LAYERS)]
    q = torch.randn(rows, H, 1, D, generator=g)
    pad = torch.tensor([S // 4 if i % 3 == 0 else 0 for i in range(rows)])
    mask = (torch.arange(S).view(1, 1, 1, S) >= pad.view(-1, 1, 1, 1)) | (torch.arange(S) == S - 1)
    kernel = native_kernels().decode_attention
    turn = iter(range(1 << 62))

    def sdpa():
        k, v = caches[next(turn) % LAYERS]
        return F.scaled_dot_product_attention(q.to(dtype), k, v, attn_mask=mask)

    def native():
        k, v = caches[next(turn) % LAYERS]
        return kernel(q.view(rows, H, D), k, v, pad, None, D ** -0.5)

    k, v = caches[0]
    diff = (F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask).view(rows, H, D)
            - kernel(q.view(rows, H, D), k, v, pad, None, D ** -0.5)).abs().max().item()
    return per_call_us(sdpa, calls * LAYERS), per_call_us(native, calls * LAYERS), diff


def prompt_layer(prompts: int, T: int, calls: int) -> tuple[float, float, float]:
    """(SDPA us, kernel us, largest difference) per layer call of `prompts` bf16 prompts of up to T tokens."""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(prompts, H, T, D, generator=g).bfloat16() for _ in range(3))
    pad = torch.tensor([(3 * i) % 5 for i in range(prompts)])
    qpos, kpos = torch.arange(T).view(1, 1, T, 1), torch.arange(T).view(1, 1, 1, T)
    mask = (kpos <= qpos) & ((kpos >= pad.view(-1, 1, 1, 1)) | (kpos == qpos))
    kernel = native_kernels().prompt_attention
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    diff = (kernel(q, k, v, pad, D ** -0.5).float() - want).abs().max().item()
    return (per_call_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), calls),
            per_call_us(lambda: kernel(q, k, v, pad, D ** -0.5), calls), diff)


def prefill_ms(engine: Engine, prompts: int = 8) -> float:
    """Milliseconds per `Engine.prefill_many` of `prompts` prompts of 64-68 tokens."""
    pending = [engine.begin([(7919 * i + 31 * j) % 50000 + 1 for j in range(64 + i % 5)],
                            SamplingParams(max_new_tokens=8)) for i in range(prompts)]
    start = time.perf_counter()
    engine.prefill_many(pending)
    return (time.perf_counter() - start) * 1e3


def step_ms(engine: Engine, rows: int, steps: int = 40) -> float:
    """Milliseconds per decode step of `rows` rows whose prompts (64 + 3 i tokens) joined one batch."""
    batch = engine.new_batch()
    pending = []
    for i in range(rows):
        prompt = [(7919 * i + 31 * j) % 50000 + 1 for j in range(64 + 3 * i)]
        p = engine.begin(prompt, SamplingParams(max_new_tokens=steps + 10, temperature=1.0, seed=i))
        engine.prefill(p, len(prompt))
        pending.append(p)
    engine.join(batch, pending)
    for _ in range(5):
        engine.step(batch)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step(batch)
    return (time.perf_counter() - start) / steps * 1e3


def use_kernel(engine: Engine, on: bool) -> None:
    """Switch the engine's attention layers between the kernel and Attention's SDPA (same parameters)."""
    for m in engine.model.modules():
        if isinstance(m, Attention):
            m.__class__ = DecodeAttention if on else Attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--positions", type=int, nargs="+", default=[128, 512])
    p.add_argument("--calls", type=int, default=20, help="calls per layer cache in part 1")
    args = p.parse_args()
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    if native_kernels() is None:
        raise SystemExit("the engine's C++ kernels did not build here (see the line above): nothing to compare")
    print(f"1. one layer, {H} heads of {D}, microseconds per call (SDPA -> kernel, speed-up; largest difference)")
    with torch.inference_mode():
        for rows in args.rows:
            for S in args.positions:
                line = []
                for dtype in (torch.float32, torch.bfloat16):
                    sdpa, native, diff = one_layer(rows, S, dtype, args.calls)
                    line.append(f"{str(dtype)[6:]} {sdpa:7.1f} -> {native:6.1f} us ({sdpa / native:.2f}x; {diff:.1e})")
                print(f"  {rows:3d} rows x {S:4d} positions: " + ";  ".join(line))
    tok = gpt2_tokenizer_from_files(SHARED / "gpt2_vocab.json", SHARED / "gpt2_merges.txt")
    torch.manual_seed(0)
    engine = Engine(GPT(ModelConfig(vocab_size=tok.vocab_size, **GPT2_30M)), tok)
    engine.stop_ids = set()  # random weights: no early end of text
    print(f"2. whole decode steps, ~30M GPT-2 shape in {str(engine.dtype)[6:]} (fp32 cache), ms per step, "
          f"medians of {REPEATS}")
    times = {(on, rows): [] for on in (False, True) for rows in (1, 16)}
    for r in range(REPEATS):
        for on in ((False, True) if r % 2 else (True, False)):
            use_kernel(engine, on)
            for rows in (1, 16):
                times[on, rows].append(step_ms(engine, rows))
    for rows in (1, 16):
        sdpa, native = statistics.median(times[False, rows]), statistics.median(times[True, rows])
        print(f"  {rows:2d} rows: SDPA {sdpa:.2f} ms, kernel {native:.2f} ms ({sdpa / native:.2f}x)")
    for on in (False, True):
        ratio = statistics.median(times[on, 1]) * 16 / statistics.median(times[on, 16])
        print(f"  16 rows' tokens/s over one row's, {'kernel' if on else 'SDPA'}: {ratio:.2f}x")
    print(f"3. prompts, one layer, {H} heads of {D}, bf16, microseconds per call (SDPA -> kernel, speed-up; largest "
          f"difference), and whole prefills")
    with torch.inference_mode():
        for prompts, T in ((1, 66), (8, 66), (16, 66), (4, 256)):
            sdpa, native, diff = prompt_layer(prompts, T, args.calls * 4)
            print(f"  {prompts:2d} prompts of {T:3d} tokens: {sdpa:7.1f} -> {native:6.1f} us ({sdpa / native:.2f}x; "
                  f"{diff:.1e})")
    fills = {False: [], True: []}
    for r in range(REPEATS):
        for on in ((False, True) if r % 2 else (True, False)):
            use_kernel(engine, on)
            prefill_ms(engine)  # a first call of this shape builds oneDNN's kernels
            fills[on].append(prefill_ms(engine))
    sdpa, native = statistics.median(fills[False]), statistics.median(fills[True])
    print(f"  8 prompts of 64-68 tokens, whole prefill: SDPA {sdpa:.1f} ms, kernel {native:.1f} ms "
          f"({sdpa / native:.2f}x)")


if __name__ == "__main__":
    main()
