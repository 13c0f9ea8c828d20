"""A reward model on real human preferences: Anthropic HH-RLHF (harmless-base, the shared test file), split by
content into training and held-out pairs; held-out pairwise accuracy before and after training (chance: 50%).

The backbone is a chat model yunque trained (e.g. the speedrun's `chat/`, whose tokenizer learned Python source:
English dialogue costs it many tokens, and long conversations lose their oldest turns to fit its context).

    python benchmarks/hh_reward.py --model runs/speedrun/chat --out runs/hh-rm [--steps 300] [--lora]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from yunque.config import LoopConfig, LoraConfig, RewardConfig
from yunque.speedrun import cpu_name
from yunque.train.reward import main as train_reward

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the backbone: a chat model dir")
    p.add_argument("--out", default="runs/hh-rm")
    p.add_argument("--data", default=str(HH))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    load = os.getloadavg()[0]
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; load average {load:.1f}",
          flush=True)
    t0 = time.perf_counter()
    loop = LoopConfig(out_dir=args.out, max_steps=args.steps, lr=args.lr, warmup_steps=20, weight_decay=0.0,
                      eval_every=0, progress=False, compile="off")
    s = train_reward(RewardConfig(model=args.model, data=(args.data,), out=args.out, batch_size=args.batch_size,
                                  val_fraction=0.2, force=True, loop=loop,
                                  lora=LoraConfig(rank=16, alpha=32) if args.lora else None))
    figures = {"backbone": args.model, "parameters": s["parameters"], "trainable": s["trainable_parameters"],
               "train_pairs": s["pairs"]["train"], "held_out_pairs": s["after"]["pairs"], "steps": s["steps"],
               "before": s["before"]["accuracy"], "after": s["after"]["accuracy"],
               "seconds": round(time.perf_counter() - t0)}
    print(f"HH-RLHF reward model on {args.model}: held-out pairwise accuracy {figures['before']:.1%} -> "
          f"{figures['after']:.1%} ({figures['held_out_pairs']} pairs; trained on {figures['train_pairs']} for "
          f"{figures['steps']} steps, {figures['seconds']} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
