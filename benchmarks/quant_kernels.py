"""Weight-only quantized matrix products on this CPU: what `engine/cpu.py`'s `quant_kernel` chooses from.

For the linear layers of SmolLM2-135M (and its output head), 1, 4, 8, 16 and 32 rows (--rows: say 66 264 for
prompts), microseconds per call of:
fp32 `F.linear` (the simple path) and oneDNN-packed fp32 and bf16 (`PackedLinear`, what the engine does for float
weights); ATen's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` fed fp32 activations, and fed bf16 ones
(`Int8PackedLinear`, `Int4PackedLinear` without the engine's kernels: casts included); the engine's C++ products
(engine/kernels.cpp): `rows_linear` on fp32, bf16 and int8 weights, which `PackedLinear` and `Int8PackedLinear`
run up to NATIVE_ROWS rows, `rows_int4` (x rounded to 8 bits per group) and `dense_int4` (the int4 weight
widened to bf16 for the call, then oneDNN), which `Int4PackedLinear` runs up to NATIVE_ROWS and from
DEQUANT_ROWS rows, and, where the CPU has AVX-512 BF16, `pairs_linear` (bf16 dot products on the weight laid out
by `pack_pairs`), which `PackedLinear` runs for bf16 weights up to PAIR_ROWS rows (a block's layers up to
PROMPT_PAIR_ROWS: compare "bf16 packed" at --rows 66 264). The last column is the kernel
family the engine picks here for int8 and int4. Each call reads the same weight, so layers that fit in the CPU's
caches are read from there.

To see what a CPU without native bf16 (AVX2 only) gets, on a machine that has it: ATen and oneDNN then dispatch
to their AVX2 code and `bf16_supported` says False.

    python benchmarks/quant_kernels.py [--threads 1] [--calls 200] [--rows 1 4 8 16 32]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/quant_kernels.py
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch import nn

from yunque.engine.cpu import Int4PackedLinear, Int8PackedLinear, PackedLinear, quant_kernel
from yunque.engine.native import native_kernels
from yunque.model.quant import QuantLinear
from yunque.precision import bf16_supported, cpu_description

SHAPES = {"attn.qkv": (576, 960), "attn.proj": (576, 576), "mlp.up": (576, 3072), "mlp.down": (1536, 576),
          "lm_head": (576, 49152)}
"""SmolLM2-135M's layers: (in_features, out_features)."""


def per_call_us(fn, calls: int) -> float:
    """Mean microseconds per call of fn() over `calls` calls (torch.utils.benchmark, this process's threads)."""
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(calls).mean * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="rows of x (tokens) a call")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native = bf16_supported("cpu")
    print(f"CPU: {cpu_description()}; ATen kernels: {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{native}; torch {torch.__version__}, {torch.get_num_threads()} threads; us per call")
    columns = ["fp32 F.linear", "fp32 packed", "bf16 packed", "int8 x fp32", "int8 x bf16", "int4 x fp32",
               "int4 x bf16"]
    if not PackedLinear.supported(torch.device("cpu"), torch.bfloat16):
        columns.remove("bf16 packed")
    if native_kernels() is not None:
        columns += ["fp32 C++", "bf16 C++", "int8 C++", "int4 C++", "int4 dense"]
        if native_kernels().has_pairs():
            columns.append("bf16 pairs")
    print(f"{'layer':>10} rows " + " ".join(f"{c:>13}" for c in columns) + "   engine: int8, int4")
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    for name, (K, N) in SHAPES.items():
        linear = nn.Linear(K, N, bias=False)
        w = linear.weight.detach()
        int8, int4 = QuantLinear.from_linear(linear, 8), QuantLinear.from_linear(linear, 4, args.group_size)
        fast8, fast4 = Int8PackedLinear(int8), Int4PackedLinear(int4)
        packed = PackedLinear(linear)
        # oneDNN packs bf16 only where the CPU has bf16 instructions (a column left out elsewhere)
        packed16 = PackedLinear(copy.deepcopy(linear).to(torch.bfloat16)) if "bf16 packed" in columns else None
        w16 = w.bfloat16()
        pairs = torch.ops.yunque.pack_pairs(w16) if "bf16 pairs" in columns else None
        q4 = torch._convert_weight_to_int4pack_for_cpu(int4.int_weight().to(torch.int32), 1)
        sz = torch.stack([int4.scales, int4.zeros], -1).transpose(0, 1).contiguous().float()
        q4_parts = (int4.qweight, int4.scales, int4.zeros, args.group_size)  # as the engine's kernels take them
        choice = [quant_kernel(bits, K, N, args.group_size, native_bf16=native, device=cpu,
                               native=native_kernels() is not None) for bits in (8, 4)]
        for rows in args.rows:
            x = torch.randn(rows, K)
            x16 = x.bfloat16()
            fns = {"fp32 F.linear": lambda: F.linear(x, w), "fp32 packed": lambda: packed(x),
                   "bf16 packed": lambda: packed16(x16),
                   "int8 x fp32": lambda: torch._weight_int8pack_mm(x, int8.qweight, int8.scales),
                   "int8 x bf16": lambda: fast8(x),
                   "int4 x fp32": lambda: torch._weight_int4pack_mm_for_cpu(x, q4, args.group_size, sz),
                   "int4 x bf16": lambda: fast4(x),
                   "fp32 C++": lambda: torch.ops.yunque.rows_linear(x, w, None),
                   "bf16 C++": lambda: torch.ops.yunque.rows_linear(x16, w16, None).bfloat16(),
                   "int8 C++": lambda: torch.ops.yunque.rows_linear(x, int8.qweight, int8.scales),
                   "int4 C++": lambda: torch.ops.yunque.rows_int4(x, *q4_parts),
                   # widened to bf16 with native bf16, else to fp32: as the engine's int4 layer does
                   "int4 dense": lambda: torch.ops.yunque.dense_int4(x16 if native else x, *q4_parts),
                   "bf16 pairs": lambda: torch.ops.yunque.pairs_linear(x16, pairs, None, N)}
            with torch.inference_mode():
                times = [per_call_us(fns[c], args.calls if "x fp32" not in c else max(10, args.calls // 10))
                         for c in columns]
            print(f"{name:>10} {rows:4d} " + " ".join(f"{t:13.0f}" for t in times) + f"   {choice[0]}, {choice[1]}",
                  flush=True)


if __name__ == "__main__":
    main()
