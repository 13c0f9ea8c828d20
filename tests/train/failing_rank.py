"""`python -m yunque ARGS` in which rank 1's training loss raises OSError at its 4th micro-batch (a disk or device
failing under one process only): what tests/train/test_distributed.py runs under torchrun to see how a job ends
when one rank fails."""

import os
import sys

import yunque.train.pretrain as pretrain
from yunque.cli import main

real_loss, calls = pretrain.next_token_loss_of, 0


def failing_loss(model, batch):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls == 4:
        raise OSError("injected: the disk under rank 1 failed")
    return real_loss(model, batch)


pretrain.next_token_loss_of = failing_loss
sys.exit(main(sys.argv[1:]))
