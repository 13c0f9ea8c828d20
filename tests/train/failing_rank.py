"""`python -m yunque ARGS` in which rank 1's training loss raises OSError at its 4th micro-batch (a disk or device
failing under one process only): what tests/train/test_distributed.py runs under torchrun to see how a job ends
when one rank fails. The loss of `pretrain` and of `reward train` fail alike."""

import os
import sys

import yunque.train.pretrain as pretrain
import yunque.train.reward as reward
from yunque.cli import main

calls = 0


def failing(loss):
    def failing_loss(model, batch):
        global calls
        calls += 1
        if os.environ.get("RANK") == "1" and calls == 4:
            raise OSError("injected: the disk under rank 1 failed")
        return loss(model, batch)

    return failing_loss


pretrain.next_token_loss_of = failing(pretrain.next_token_loss_of)
reward.pair_loss = failing(reward.pair_loss)
sys.exit(main(sys.argv[1:]))
