"""The main job: `yunque speedrun`."""

from __future__ import annotations

from pathlib import Path

from yunque.cli.common import command
from yunque.cli.flags import add_fields, values
from yunque.config import SpeedrunConfig

SPEEDRUN_FLAGS = ["out", "minutes", "sft_minutes", "align_minutes", "preset", "vocab_size", "seq_len", "batch_size",
                  "lr", "sft_lr", "eval_tokens", "heldout_questions", "benchmark_items", "benchmark_data", "seed",
                  "force", "progress"]


def register(sub) -> None:
    sr = command(sub, "speedrun", cmd_speedrun,
                 help="the main job: tokenizer + model on the built-in corpus, fine-tuned, then a report",
                 description="Train a BPE tokenizer and a model on Python's standard library source and "
                             "documentation (no network needed), fine-tune it into an assistant that answers "
                             "questions about the standard library, then write report.md and report.json.",
                 examples="  yunque speedrun                          # about ten minutes on two CPU cores\n"
                          "  yunque speedrun --minutes 1 --sft-minutes 0.5 --align-minutes 0.5 --out runs/quick\n")
    add_fields(sr, SpeedrunConfig, SPEEDRUN_FLAGS, metavars={"out": "DIR", "benchmark_data": "DIR"})


def cmd_speedrun(args) -> int:
    from yunque.speedrun import main

    r = main(SpeedrunConfig(**values(args, SPEEDRUN_FLAGS)))
    b, a = r["sft"]["before"], r["sft"]["after"]
    aligned = r.get("align")
    short = (f"; aligned: short replies {aligned['before']['rule']:.0%} -> {aligned['after']['rule']:.0%}"
             if aligned and "skipped" not in aligned else "")
    print(f"validation {r['val_bits_per_byte']:.3f} bits/byte vs unigram {r['unigram_bits_per_byte']:.3f}; "
          f"assistant: format {b['format_rate']:.0%} -> {a['format_rate']:.0%}, F1 {b['mean_f1']:.2f} -> "
          f"{a['mean_f1']:.2f}{short}; {r['wall_seconds']:.0f}s in all; report: {Path(args.out) / 'report.md'}")
    return 0
