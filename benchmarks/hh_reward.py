"""A reward model on real human preferences: Anthropic HH-RLHF (harmless-base, the shared test file), split by
content into training and held-out pairs; held-out pairwise accuracy before and after training (chance: 50%).

The backbone is a chat model: one yunque trained (e.g. the speedrun's `chat/`, whose tokenizer learned Python
source: English dialogue costs it many tokens, and long conversations lose their oldest turns to fit its context),
or any model yunque reads, such as SmolLM2-135M-Instruct's GGUF file (LoRA and a short context keep it to
minutes on a CPU; bf16 autocast where the CPU multiplies bf16 natively).

    python benchmarks/hh_reward.py --model runs/speedrun/chat --out runs/hh-rm [--steps 300] [--lora]
    python benchmarks/hh_reward.py --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --lora \\
        --max-seq-len 128 --steps 60 --eval-pairs 200 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from yunque.config import LORA_LR, REWARD_LOOP, LoopConfig, LoraConfig, RewardConfig
from yunque.precision import cpu_description
from yunque.train.reward import main as train_reward

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the backbone: a chat model (dir or .gguf)")
    p.add_argument("--out", default="runs/hh-rm")
    p.add_argument("--data", default=str(HH))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, help=f"default {REWARD_LOOP.lr:g}, {LORA_LR:g} with --lora")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora", action="store_true", help="LoRA adapters (rank 16) on a frozen backbone")
    p.add_argument("--max-seq-len", type=int, help="longest conversation, in tokens (older turns cut first)")
    p.add_argument("--eval-pairs", type=int, help="held-out pairs measured (default: all of the 20%% held out)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: one per physical core)")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    lr = args.lr or (LORA_LR if args.lora else REWARD_LOOP.lr)
    loop = LoopConfig(out_dir=args.out, max_steps=args.steps, lr=lr, warmup_steps=min(20, args.steps // 5),
                      weight_decay=0.0, eval_every=0, progress=False, compile="off", threads=args.threads)
    eval_batches = -(-args.eval_pairs // args.batch_size) if args.eval_pairs else None
    s = train_reward(RewardConfig(model=args.model, data=(args.data,), out=args.out, batch_size=args.batch_size,
                                  val_fraction=0.2, force=True, loop=loop, max_seq_len=args.max_seq_len,
                                  eval_batches=eval_batches,
                                  lora=LoraConfig(rank=16, alpha=32) if args.lora else None))
    figures = {"backbone": args.model, "parameters": s["parameters"], "trainable": s["trainable_parameters"],
               "train_pairs": s["pairs"]["train"], "held_out_pairs": s["after"]["pairs"], "steps": s["steps"],
               "lr": lr, "max_seq_len": args.max_seq_len, "before": s["before"]["accuracy"],
               "after": s["after"]["accuracy"], "seconds": round(time.perf_counter() - t0),
               "load_average_end": os.getloadavg()[0]}
    print(f"HH-RLHF reward model on {args.model}: held-out pairwise accuracy {figures['before']:.1%} -> "
          f"{figures['after']:.1%} ({figures['held_out_pairs']} pairs; trained on {figures['train_pairs']} for "
          f"{figures['steps']} steps of {args.batch_size}, {figures['seconds']} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
