"""Many processes on this machine: tokens/s of `yunque pretrain` in one process and in two (torchrun, DDP), each
process one thread, and the share of a two-process DDP step that is the gradient all-reduce.

tokens/s: the real command on the same text (--tokenizer bytes, the same preset, batch and steps per process), one
process without torchrun, then `torchrun --standalone --nproc-per-node 2 ... --parallel ddp`; the figure is the
run's own (metrics.jsonl: every process's tokens per second of training), the median of its logged windows after
the first. Two processes train twice the global batch per step (batch per process x 2).

All-reduce share: under torchrun with two processes, one DDP model, the same micro-batch, steps timed in
alternating blocks with the gradient all-reduce and without it (every backward under no_sync, as inside an
accumulation): share = 1 - (step without) / (step with), the part of a step the all-reduce adds.

The CPU and its flags, the load average before and after, and the flags print first. A load average above 0.5
before starting (or above the cores plus our own two processes after) means other work shared the machine: the
figures are then lower than an idle machine's, and the script says so.

    flock /tmp/yunque-bench.lock python benchmarks/distributed.py [--preset mini] [--steps 60] [--data FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from yunque.precision import cpu_description

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def flags(args) -> list[str]:
    return ["--tokenizer", "bytes", "--preset", args.preset, "--seq-len", str(args.seq_len), "--batch-size",
            str(args.batch_size), "--max-steps", str(args.steps), "--log-every", "10", "--eval-every", "0",
            "--eval-batches", "1", "--checkpoint-minutes", "0", "--precision", "fp32", "--compile", "off",
            "--threads", "1", "--no-progress", "--parallel", "ddp"]


def tokens_per_sec(out: Path) -> float:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["tokens_per_sec"] for r in records[1:]]  # the first window holds start-up
    return statistics.median(speeds)


def pretrain(launcher: list[str], out: Path, data: Path, args) -> float:
    cmd = [*launcher, "pretrain", "--out", str(out), "--data", str(data), *flags(args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return tokens_per_sec(out)


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]


def allreduce_worker(args) -> None:
    """Under torchrun: time DDP steps with and without the gradient all-reduce; rank 0 prints JSON."""
    import torch

    from yunque.config import LoopConfig, preset
    from yunque.losses import next_token_loss
    from yunque.model.gpt import GPT
    from yunque.train.distributed import session
    from yunque.train.optim import make_adamw

    torch.set_num_threads(1)
    loop = LoopConfig(parallel="ddp", precision="fp32")
    with session("benchmark", loop) as runtime:
        torch.manual_seed(0)
        model = GPT(preset(args.preset, vocab_size=263, max_seq_len=args.seq_len))
        ddp = runtime.wrap(model, loop)
        opt = make_adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
        x = torch.randint(0, 263, (args.batch_size, args.seq_len))

        def step(sync: bool) -> float:
            runtime.barrier()
            start = time.perf_counter()
            with runtime.no_sync(ddp, last_micro_batch=sync):
                next_token_loss(ddp(x[:, :-1]), x[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        times: dict[bool, list[float]] = {True: [], False: []}
        for sync in (True, False):  # warm-up
            step(sync)
        for block in range(args.blocks):
            for sync in ((True, False) if block % 2 == 0 else (False, True)):
                times[sync] += [step(sync) for _ in range(5)]
        with_ar, without = statistics.median(times[True]), statistics.median(times[False])
        if runtime.is_main:
            print(json.dumps({"with": with_ar, "without": without, "params": model.num_params()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per process and step")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--blocks", type=int, default=6, help="alternating blocks of 5 steps for the all-reduce share")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.allreduce_worker:
        allreduce_worker(args)
        return 0

    import torch

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; load average {load_before:.1f} before starting")
    print(f"flags: {' '.join(flags(args))} (OMP_NUM_THREADS=1 in every process)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "text.txt"
        data.write_text(args.data.read_text(encoding="utf-8")[:300_000], encoding="utf-8")
        one = pretrain([sys.executable, "-m", "yunque"], tmp / "one", data, args)
        two = pretrain([*torchrun(2), "-m", "yunque"], tmp / "two", data, args)
    p = subprocess.run([*torchrun(2), __file__, "--allreduce-worker", "--preset", args.preset, "--seq-len",
                        str(args.seq_len), "--batch-size", str(args.batch_size), "--blocks", str(args.blocks)],
                       capture_output=True, text=True, env=ENV)
    if p.returncode != 0:
        sys.exit(f"the all-reduce worker failed:\n{p.stderr[-2000:]}")
    ar = json.loads(p.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()[0]
    print(f"tokens/s, {args.preset} ({ar['params']:,} parameters), seq {args.seq_len}, batch {args.batch_size} per "
          f"process: 1 process {one:,.0f}; 2 processes (DDP, gloo) {two:,.0f} = {two / one:.2f}x")
    share = max(0.0, 1 - ar["without"] / ar["with"])
    print(f"a 2-process DDP step: {ar['with'] * 1e3:.1f} ms with the gradient all-reduce, {ar['without'] * 1e3:.1f} "
          f"ms without: the all-reduce is {share:.0%} of the step")
    if load_before > 0.5 or load_after > cores + 0.5:  # before: others' work alone; after: ours (2) and theirs
        print(f"the machine was contended: load average {load_before:.1f} before and {load_after:.1f} after on "
              f"{cores} logical CPUs (other work shared them), so these figures are below an idle machine's")
    else:
        print(f"load average {load_after:.1f} after, on {cores} logical CPUs: not contended by other work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
