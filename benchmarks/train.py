"""Training speed: tokens/s and MFU of `fit` at ~1M, ~10M and ~50M parameters, fp32 eager against the fast path.

The reference is fp32 with no compile (`precision="fp32", compile="off"`); the fast path is what `fit` does by
default on a CPU with bf16 (`precision="auto"` -> bf16 autocast, `compile="on"`: the model and loss compiled
together, the bf16 attention path, fused AdamW, foreach clipping, one thread per physical core). Both go through
`fit` itself, on random tokens (speed does not depend on the data).

MFU = flops_per_token(seq_len) x tokens/s / the bf16 matrix-product peak, measured here by timing big bf16
matrix products in this process. Every figure comes from this one run: each (size, variant) trains `--passes`
times, ref and fast alternating, and a variant's speed is its fastest logged step after the first
WARMUP_STEPS, which hold the compile (so compile time is outside the timed region and is printed apart).

Also nanochat's depth-4 shape against nanochat's own figures on this machine kind (7.4k tokens/s bf16, 3.4k fp32;
sequence 512, batch 8, vocab 8192): depth 4 -> d_model 4 x 64 = 256, head_dim 128 -> 2 heads, untied output
head. nanochat's 11.5M parameters include 2 x 2.1M value embeddings (lookups: no matrix FLOPs), which this model
has not; the matrix shapes, and so the FLOPs per token, are the same (ReLU^2 4x MLP vs our SwiGLU at 2.75x).

    flock /tmp/yunque-bench.lock python benchmarks/train.py [--json train.json] [--sizes mini,small,medium,nanochat]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

# a fresh inductor cache, so that the first pass's compile time is a cold compile's (the second pass hits it)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="yunque-bench-inductor-"))

import torch  # noqa: E402

from yunque.config import ModelConfig, preset  # noqa: E402
from yunque.losses import next_token_loss  # noqa: E402
from yunque.model.gpt import GPT  # noqa: E402
from yunque.precision import physical_cores  # noqa: E402
from yunque.train.loop import LoopConfig, fit  # noqa: E402

WARMUP_STEPS = 3
"""Steps excluded from the timing: the first compiles (fast path) and the first two allocate."""

# name: (model config, batch, seq_len, timed steps per pass)
SIZES = {
    "mini": (preset("mini", vocab_size=4096, max_seq_len=256), 16, 256, 10),
    "small": (preset("small", vocab_size=8192, max_seq_len=256), 16, 256, 6),
    "medium": (preset("medium", vocab_size=8192, max_seq_len=256), 8, 256, 3),
    "nanochat": (ModelConfig(vocab_size=8192, n_layer=4, n_head=2, d_model=256, max_seq_len=512,
                             tie_embeddings=False), 8, 512, 6),
}
NANOCHAT_TOKENS_PER_SEC = {"bf16": 7400.0, "fp32": 3400.0}
VARIANTS = {"ref": dict(precision="fp32", compile="off"), "fast": dict(precision="auto", compile="on")}
TARGETS = ("fast >= 3x ref at ~10M (small); fast >= 1.3x nanochat bf16 (7.4k tokens/s) on its depth-4 shape; "
           "MFU >= 50% of the measured bf16 peak at ~50M (medium)")


def matmul_peak(dtype: torch.dtype, threads: int) -> tuple[float, str]:
    """Best FLOP/s of a few big matrix products in `dtype`, and the shape that gave it."""
    torch.set_num_threads(threads)
    best, best_shape = 0.0, ""
    for m, k, n in ((2048, 2048, 2048), (4096, 2048, 2048), (4096, 4096, 4096)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        reps = 3
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        rate = 2 * m * k * n * reps / (time.perf_counter() - t)
        if rate > best:
            best, best_shape = rate, f"{m}x{k}x{n}"
    return best, best_shape


def run(cfg: ModelConfig, batch: int, seq_len: int, steps: int, variant: dict, threads: int) -> dict:
    """One short `fit`: per-step tokens/s from its metrics, and the wall time of the warm-up (compile) steps."""
    data_gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (64, seq_len + 1), generator=data_gen)

    def batches(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, len(data), (batch,), generator=torch.Generator().manual_seed(i))
        return data[rows, :-1], data[rows, 1:]

    torch.manual_seed(0)
    model = GPT(cfg)
    with tempfile.TemporaryDirectory() as out:
        loop = LoopConfig(out_dir=out, max_steps=WARMUP_STEPS + steps, lr=1e-3, warmup_steps=1, eval_every=0,
                          log_every=1, progress=False, tokens_per_step=batch * seq_len, threads=threads, **variant)
        summary = fit(model, batches, lambda m, b: next_token_loss(m(b[0]), b[1]), loop)
        records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_sec"] for r in records[WARMUP_STEPS:]]
    return {"tokens_per_sec": max(timed), "median_tokens_per_sec": sorted(timed)[len(timed) // 2],
            "warmup_seconds": records[WARMUP_STEPS - 1]["elapsed"], "precision": summary["precision"],
            "compiled": summary["compiled"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--passes", type=int, default=2, help="runs of each variant, ref and fast alternating")
    ap.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    peak, peak_shape = matmul_peak(torch.bfloat16, threads)
    fp32_peak, _ = matmul_peak(torch.float32, threads)
    print(f"bf16 matmul peak {peak / 1e9:.0f} GFLOP/s ({peak_shape}), fp32 {fp32_peak / 1e9:.0f} GFLOP/s; "
          f"{threads} threads, torch {torch.__version__}")

    rows = []
    for name in args.sizes.split(","):
        cfg, batch, seq_len, steps = SIZES[name]
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for _ in range(args.passes):
            for variant, kw in VARIANTS.items():
                runs[variant].append(run(cfg, batch, seq_len, steps, kw, threads))
        best = {v: dict(max(rs, key=lambda r: r["tokens_per_sec"])) for v, rs in runs.items()}
        for v, rs in runs.items():  # the first pass compiles cold, later ones find the inductor cache warm
            best[v]["warmup_seconds"] = rs[0]["warmup_seconds"]
            best[v]["warm_cache_warmup_seconds"] = min(r["warmup_seconds"] for r in rs[1:]) if rs[1:] else None
        flops = cfg.flops_per_token(seq_len)
        row = {"size": name, "parameters": GPT(cfg).num_params(), "batch": batch, "seq_len": seq_len,
               "flops_per_token": flops, **{f"{v}_{k}": best[v][k] for v in VARIANTS for k in best[v]},
               "ratio": best["fast"]["tokens_per_sec"] / best["ref"]["tokens_per_sec"]}
        for v in VARIANTS:
            row[f"{v}_mfu"] = flops * best[v]["tokens_per_sec"] / peak
        if name == "nanochat":
            row["nanochat_bf16_ratio"] = best["fast"]["tokens_per_sec"] / NANOCHAT_TOKENS_PER_SEC["bf16"]
            row["nanochat_fp32_ratio"] = best["ref"]["tokens_per_sec"] / NANOCHAT_TOKENS_PER_SEC["fp32"]
        rows.append(row)
        print(f"  {name}: ref {best['ref']['tokens_per_sec']:.0f} tok/s, fast {best['fast']['tokens_per_sec']:.0f} "
              f"tok/s ({row['ratio']:.2f}x)", flush=True)

    print()
    head = (f"{'size':<9}{'params':>8}{'B x T':>9}{'ref tok/s':>11}{'ref MFU':>9}{'fast tok/s':>12}{'fast MFU':>10}"
            f"{'fast/ref':>10}{'compile s':>16}")
    print(head)
    print("-" * len(head))
    for r in rows:
        again = r["fast_warm_cache_warmup_seconds"]
        print(f"{r['size']:<9}{r['parameters'] / 1e6:>7.1f}M{r['batch']:>4} x{r['seq_len']:>4}"
              f"{r['ref_tokens_per_sec']:>11.0f}{r['ref_mfu']:>9.1%}{r['fast_tokens_per_sec']:>12.0f}"
              f"{r['fast_mfu']:>10.1%}{r['ratio']:>9.2f}x{r['fast_warmup_seconds']:>9.1f}"
              f"{'' if again is None else f'/{again:.1f}':>7}")
    for r in rows:
        if r["size"] == "nanochat":
            print(f"\nnanochat depth-4 shape: fast {r['fast_tokens_per_sec']:.0f} tok/s = "
                  f"{r['nanochat_bf16_ratio']:.2f}x nanochat bf16 (7.4k); ref {r['ref_tokens_per_sec']:.0f} tok/s = "
                  f"{r['nanochat_fp32_ratio']:.2f}x nanochat fp32 (3.4k)")
    print(f"tokens/s: fastest step of {args.passes} passes after {WARMUP_STEPS} warm-up steps (compile and first "
          f"allocations, not timed); 'compile s': wall time of the fast path's warm-up steps, first with an empty "
          f"inductor cache / again in the same process")
    print(f"targets: {TARGETS}")
    by = {r["size"]: r for r in rows}
    verdicts = []
    if "small" in by:
        verdicts.append(f"small fast/ref {by['small']['ratio']:.2f}x (>= 3x): "
                        f"{'met' if by['small']['ratio'] >= 3 else 'NOT met'}")
    if "nanochat" in by:
        verdicts.append(f"nanochat shape {by['nanochat']['nanochat_bf16_ratio']:.2f}x nanochat bf16 (>= 1.3x): "
                        f"{'met' if by['nanochat']['nanochat_bf16_ratio'] >= 1.3 else 'NOT met'}")
    if "medium" in by:
        verdicts.append(f"medium MFU {by['medium']['fast_mfu']:.0%} (>= 50%): "
                        f"{'met' if by['medium']['fast_mfu'] >= 0.5 else 'NOT met'}")
    for v in verdicts:
        print("  " + v)
    if args.json:
        Path(args.json).write_text(json.dumps({"bf16_peak_flops": peak, "fp32_peak_flops": fp32_peak,
                                               "threads": threads, "torch": torch.__version__, "rows": rows,
                                               "targets": TARGETS}, indent=2))


if __name__ == "__main__":
    main()
