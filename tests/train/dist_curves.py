"""Under torchrun: pretrain one tiny model five ways in one process group, 20 steps each: DDP and FSDP, each
without and with 2-step gradient accumulation, and FSDP with activation checkpointing; batch 2 per process.
tests/train/test_distributed.py compares their loss curves with one process's at batch 4.

    torchrun --standalone --nproc-per-node 2 tests/train/dist_curves.py OUT_BASE DATA...
"""

import dataclasses
import sys
from pathlib import Path

from yunque.config import LoopConfig, PretrainConfig
from yunque.train.distributed import session
from yunque.train.pretrain import main

RUNS = {"ddp": {"parallel": "ddp"}, "fsdp": {"parallel": "fsdp"},
        "ddp-accum": {"parallel": "ddp", "grad_accum": 2}, "fsdp-accum": {"parallel": "fsdp", "grad_accum": 2},
        "fsdp-recompute": {"parallel": "fsdp", "activation_checkpointing": True}}
LOOP = LoopConfig(max_steps=20, precision="fp32", compile="off", eval_every=10, log_every=1, progress=False,
                  threads=1, checkpoint_minutes=0)


def config(out: Path, data: list[str], batch_size: int, loop: LoopConfig) -> PretrainConfig:
    """The run every curve test makes (one process at batch 4, or two at batch 2)."""
    return PretrainConfig(out=str(out), data=tuple(data), tokenizer="bytes", preset="tiny", seq_len=32,
                          batch_size=batch_size, val_fraction=0.5, eval_batches=2, loop=loop)


if __name__ == "__main__":
    base, data = Path(sys.argv[1]), sys.argv[2:]
    with session("pretrain", LOOP) as runtime:
        for name, changes in RUNS.items():
            main(config(base / name, data, 2, dataclasses.replace(LOOP, **changes)), runtime)
