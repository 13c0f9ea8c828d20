"""DPO with LoRA on real human preferences: a few hundred Anthropic HH-RLHF pairs (harmless-base, the shared test
file's first --pairs records, split by content into training and held-out pairs), through `yunque align --method
dpo --lora`'s own functions.

Held out, before and after: the implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) ranks the chosen reply
first for what share of the pairs. Before training pi is the reference, so every implicit reward is 0 and the
share is 50% by construction; what the model itself preferred before is the share of pairs whose chosen reply it
gives the higher log-probability (summed over the reply's tokens, and per token), printed beside it.

    python benchmarks/hh_dpo.py --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/hh-dpo \\
        [--pairs 400] [--steps 40] [--max-seq-len 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import torch

from yunque.config import AlignConfig, LoopConfig, LoraConfig, align_loop
from yunque.data.preferences import pair_batches
from yunque.losses import IGNORE
from yunque.modeldir import load_model
from yunque.precision import autocast, cpu_description, resolve_precision
from yunque.tokenizer.chat import ChatFormat
from yunque.train.align import main as align
from yunque.train.align import pair_logprobs

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def ranked_right(logps: torch.Tensor) -> float:
    """Share of (N, 2) [chosen, rejected] scores whose chosen one is higher (ties count half)."""
    margin = logps[:, 0] - logps[:, 1]
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a chat model (dir or .gguf)")
    p.add_argument("--out", default="runs/hh-dpo")
    p.add_argument("--data", default=str(HH), help="HH-RLHF transcripts (.jsonl or .jsonl.gz)")
    p.add_argument("--pairs", type=int, default=400, help="records read from the start of --data")
    p.add_argument("--val-fraction", type=float, default=0.35)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, help=f"default {align_loop('dpo', True).lr:g}, yunque align's for LoRA")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-seq-len", type=int, default=128, help="longest conversation (older turns cut first)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: one per physical core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if args.data.endswith(".gz") else open
    with opener(args.data, "rt", encoding="utf-8") as f:
        records = [line for line in f if line.strip()][:args.pairs]
    data = out.with_name(out.name + "-pairs.jsonl")  # beside the run dir, which the run claims whole
    data.write_text("".join(records), encoding="utf-8")

    model, tok = load_model(args.model)
    model.float().eval()
    fmt = ChatFormat.of(args.model, tok)
    _, train, val = pair_batches([str(data)], fmt, max_seq_len=args.max_seq_len, val_fraction=args.val_fraction,
                                 seed=args.seed)
    precision = resolve_precision("auto", "cpu")
    with autocast(precision, "cpu"):
        own = pair_logprobs(model, val, args.batch_size, "cpu")
    del model
    reply_tokens = torch.cat([torch.stack((y != IGNORE).sum(dim=1).chunk(2), dim=1)
                              for y in (val.collate(range(i, min(i + args.batch_size, len(val))))[1]
                                        for i in range(0, len(val), args.batch_size))])
    own_mean = own / reply_tokens.clamp(min=1)
    before = {"logp_accuracy": ranked_right(own), "logp_per_token_accuracy": ranked_right(own_mean)}
    print(f"before: the model gives the chosen reply the higher log-probability in {before['logp_accuracy']:.1%} "
          f"of {len(val)} held-out pairs ({before['logp_per_token_accuracy']:.1%} per token)", flush=True)

    lr = args.lr or align_loop("dpo", True).lr
    loop = LoopConfig(out_dir=str(out), max_steps=args.steps, lr=lr, warmup_steps=min(10, args.steps // 5),
                      weight_decay=0.0, eval_every=0, progress=False, compile="off", threads=args.threads)
    cfg = AlignConfig(model=args.model, data=(str(data),), out=str(out), method="dpo", beta=args.beta,
                      lora=LoraConfig(rank=16, alpha=32), batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                      val_fraction=args.val_fraction, eval_batches=None, seed=args.seed, force=True, loop=loop)
    s = align(cfg)
    figures = {"model": args.model, "precision": precision, "train_pairs": len(train), "held_out_pairs": len(val),
               "steps": s["steps"], "batch_size": args.batch_size, "lr": lr, "beta": args.beta,
               "max_seq_len": args.max_seq_len, "trainable": s["trainable_parameters"], "before": before,
               "implicit_accuracy_before": s["before"]["reward_accuracy"],
               "implicit_accuracy_after": s["after"]["reward_accuracy"], "dpo_loss_before": s["before"]["loss"],
               "dpo_loss_after": s["after"]["loss"], "reward_margin_after": s["after"]["reward_margin"],
               "seconds": round(time.perf_counter() - t0), "load_average_end": os.getloadavg()[0]}
    print(f"HH-RLHF DPO (LoRA) on {args.model}: held-out implicit-reward accuracy "
          f"{figures['implicit_accuracy_before']:.1%} -> {figures['implicit_accuracy_after']:.1%}, DPO loss "
          f"{figures['dpo_loss_before']:.3f} -> {figures['dpo_loss_after']:.3f} ({len(val)} pairs; trained on "
          f"{len(train)} for {s['steps']} steps of {args.batch_size}, {figures['seconds']} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
